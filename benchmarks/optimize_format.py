"""Why INT8 static misses its targets on the PP-OCR models: four quantised formats of the
same model, side by side in one run (issue #15's follow-up experiment).

For ``ocr_cls`` and ``ocr_det`` (tests/corpus.py; data rendered as benchmarks/optimize.py
renders it) this builds with onnxruntime.quantization, from the same pre-processed model and
calibration samples (MinMax, per-channel, uint8 activations, int8 weights):

- ``qdq``: edged optimize's ``int8-static-minmax`` (edged.optimize.methods), the default;
- ``qoperator``: the same, ``QuantFormat.QOperator`` (QLinearConv etc. in the file);
- ``qdq-conv-only``: QDQ with ``op_types_to_quantize`` = Conv, MatMul, Gemm;
- ``qdq-ort-opt``: ``qdq`` after ONNX Runtime's optimizer at ORT_ENABLE_EXTENDED, saved
  offline (``SessionOptions.optimized_model_filepath``; loadable by ONNX Runtime only).

and reports for the float original and each: file size, gzip size, tensor bytes
(initializers and Constant nodes) by dtype and the rest (graph structure), node counts
(QuantizeLinear/DequantizeLinear and fused QLinear*) left after ONNX
Runtime's optimizer at ORT_ENABLE_EXTENDED, batch-1 latency median at one intra-op thread
(all variants interleaved: one inference of each in turn, per round) and agreement with the
original on held-out inputs (top-1 for ocr_cls, with task accuracy; pixels on the same side
of 0.5 for ocr_det), and ONNX Runtime's profile of where the time goes (ms per inference
by op type). Never pass/fail.

    .venv/bin/python benchmarks/optimize_format.py [--models ocr_cls,ocr_det] [--runs 200]
        > optimize_format.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from optimize import machine, pages, text_lines  # benchmarks/optimize.py

from edged.optimize.data import Samples
from edged.optimize.measure import decisions, gzip_size
from edged.optimize.methods import METHODS, Options, _Reader, preprocess

OPTIONS = Options()
COUNTED = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearAdd", "QLinearMul",
           "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearMatMul", "MatMulInteger",
           "ConvInteger", "Conv", "FusedConv", "HardSigmoid", "Mul")  # fmt: skip


def data(name: str) -> tuple[Samples, Samples]:
    """(calibration, held out) as benchmarks/optimize.py makes them."""
    if name == "ocr_cls":
        x, y = text_lines(1200, seed=1)
        return Samples({"x": x[:200]}, y[:200]), Samples({"x": x[200:]}, y[200:])
    x, _ = pages(48, seed=2)
    return Samples({"x": x[:32]}), Samples({"x": x[32:]})


def quantise(pre: Path, out: Path, calib: Samples, fmt: QuantFormat, ops: list[str] | None) -> None:
    """``pre`` quantised as ``int8-static-minmax`` does, in ``fmt``, of ``ops`` (None: all)."""
    quantize_static(
        str(pre),
        str(out),
        _Reader(calib, OPTIONS.calibration_samples),
        quant_format=fmt,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=ops,
    )


def ort_optimised(model: Path, out: Path) -> Path:
    """``model`` after ONNX Runtime's CPU optimizer at ORT_ENABLE_EXTENDED, saved to ``out``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return out


def describe(path: Path, tmp: Path) -> dict[str, Any]:
    model = onnx.load(str(path))
    by_dtype: collections.Counter[str] = collections.Counter()
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value"]  # fmt: skip
    for t in tensors:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        by_dtype[str(dtype)] += int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
    after = onnx.load(str(ort_optimised(path, tmp / f"counted-{path.name}")))
    ops = collections.Counter(n.op_type for n in after.graph.node)
    return {
        "bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
        "tensor_bytes": dict(sorted(by_dtype.items())),
        "other_bytes": path.stat().st_size - sum(by_dtype.values()),
        "nodes_in_file": len(model.graph.node),
        "nodes_after_ort": len(after.graph.node),
        "ops_after_ort": {k: ops[k] for k in COUNTED if ops[k]},
    }


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_profile(path: Path, sample: dict[str, np.ndarray], runs: int, tmp: Path) -> dict[str, float]:
    """ONNX Runtime's profiler: ms per inference spent in each op type (the six largest)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / f"profile-{path.stem}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, sample)
    spent: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(sess.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return {k: round(v, 3) for k, v in spent.most_common(6)}


def outputs(sess: ort.InferenceSession, held: Samples) -> np.ndarray:
    return np.concatenate([sess.run(None, batch)[0] for batch in held.batches(8)])


def latencies(sessions: dict[str, ort.InferenceSession], sample: dict[str, np.ndarray],
              runs: int) -> dict[str, float]:  # fmt: skip
    """Median batch-1 ms of each, interleaved: every round runs each session once."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(5):
        for s in sessions.values():
            s.run(None, sample)
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, sample)
            times[name].append(time.perf_counter() - start)
    return {k: round(statistics.median(v) * 1000, 3) for k, v in times.items()}


def one(name: str, runs: int, tmp: Path) -> dict[str, Any]:
    from tests.corpus import CORPUS, fetch

    source = fetch(next(m for m in CORPUS if m.name == name))
    calib, held = data(name)
    pre = preprocess(source, tmp / "pre.onnx")
    files = {"float": source}
    files["qdq"] = METHODS["int8-static-minmax"](source, tmp / "qdq.onnx", calib, OPTIONS).path
    quantise(pre, tmp / "qoperator.onnx", calib, QuantFormat.QOperator, None)
    files["qoperator"] = tmp / "qoperator.onnx"
    quantise(pre, tmp / "qdq-conv-only.onnx", calib, QuantFormat.QDQ, ["Conv", "MatMul", "Gemm"])
    files["qdq-conv-only"] = tmp / "qdq-conv-only.onnx"
    files["qdq-ort-opt"] = ort_optimised(files["qdq"], tmp / "qdq-ort-opt.onnx")
    sessions = {k: session(p) for k, p in files.items()}
    reference = outputs(sessions["float"], held)
    want = decisions(reference)
    report: dict[str, Any] = {}
    for k, p in files.items():
        got = outputs(sessions[k], held)
        row = describe(p, tmp)
        row["agreement"] = round(float(np.mean(decisions(got) == want)), 4)
        if held.labels is not None:
            row["accuracy"] = round(float(np.mean(np.argmax(got, axis=1) == held.labels)), 4)
        report[k] = row
    sample = {"x": held.inputs["x"][:1]}
    for k, ms in latencies(sessions, sample, runs).items():
        report[k]["latency_ms_median"] = ms
    for k, p in files.items():
        report[k]["op_ms_profiled"] = op_profile(p, sample, max(20, runs // 4), tmp)
    base = report["float"]
    for row in report.values():
        row["smaller_x"] = round(base["bytes"] / row["bytes"], 2)
        row["faster_x"] = round(base["latency_ms_median"] / row["latency_ms_median"], 2)
    return {"model": name, "held_out": len(held), "runs": runs, "variants": report}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="ocr_cls,ocr_det")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine(), "onnx_runtime_threads": 1, "models": []}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="edged-format-") as tmp:
            result["models"].append(one(name, args.runs, Path(tmp)))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
