"""Why INT8 is slower than float on PP-OCR's classifier on this x86 CPU, and what ONNX
Runtime's quantiser offers against it (issue #15, third wave). Never pass/fail.

For ``ocr_cls`` (tests/corpus.py; text lines rendered as benchmarks/optimize.py renders
them: 200 calibration, 1000 held out, labelled) this builds, from the same
pre-processed model (``quant_pre_process``, as ``int8-static-minmax`` runs it) and the same
64 calibration samples, one variant per quantiser setting:

- ``int8-static-minmax``: edged's default (QDQ, uint8 activations, int8 weights per
  channel, MinMax);
- ``qoperator``: ``QuantFormat.QOperator``;
- ``conv-only``: ``op_types_to_quantize=["Conv"]`` (small ops left float);
- ``no-maxpool``: every quantisable type but MaxPool (the uint8 MaxPool is slow);
- ``u8u8``: weights ``QUInt8`` too (the non-VNNI recommendation);
- ``s8s8``: activations ``QInt8``;
- ``s8s8-symmetric``: activations ``QInt8`` with ``ActivationSymmetric`` and
  ``WeightSymmetric``;
- ``reduce-range``: 7-bit weights (``reduce_range=True``);
- ``per-tensor``: ``per_channel=False``;

then edged's own graph rewrites: ``fuse-hardswish`` (float), ``fuse-hardswish`` followed by
``int8-static-minmax``, and that with every prunable channel set padded with dead channels
(zero weights) to a multiple of 16 first (:func:`pad_channels`, an experiment here: MLAS's
fast int8 depthwise kernel needs 16k channels). Each is timed at batch 1, one intra-op thread,
interleaved with the float model (one inference of each per round, a pair at a time, so
that each has the caches a served model has; medians; ``faster_x`` is the pair's ratio), also
``int8-static-minmax`` and the float model at ORT_ENABLE_EXTENDED (no NCHWc layout), and
profiled with ONNX Runtime's profiler (ms per inference by op type). A micro-benchmark times
a lone 5x5 depthwise convolution, float against QDQ int8, at channel counts the classifier
has (88, 200) and the next multiples of 16 (96, 208).

    .venv/bin/python benchmarks/optimize_int8.py [--runs 300] > optimize_int8.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import time

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from optimize import machine  # benchmarks/optimize.py
from optimize_format import data, op_profile, outputs  # benchmarks/optimize_format.py

from edged.optimize import channels
from edged.optimize.data import Samples
from edged.optimize.measure import decisions
from edged.optimize.methods import METHODS, Options, _Reader, load_model, preprocess

OPTIONS = Options()
SETTINGS: dict[str, dict[str, Any]] = {
    "qoperator": {"quant_format": QuantFormat.QOperator},
    "conv-only": {"op_types_to_quantize": ["Conv"]},
    "no-maxpool": {
        "op_types_to_quantize": [
            "Conv",
            "Gemm",
            "MatMul",
            "Add",
            "Mul",
            "Relu",
            "Clip",
            "GlobalAveragePool",
            "Reshape",
            "Flatten",
            "Softmax",
        ]
    },
    "u8u8": {"weight_type": QuantType.QUInt8},
    "s8s8": {"activation_type": QuantType.QInt8},
    "s8s8-symmetric": {
        "activation_type": QuantType.QInt8,
        "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True},
    },
    "reduce-range": {"reduce_range": True},
    "per-tensor": {"per_channel": False},
}
"""Each variant's arguments to ``quantize_static`` beyond edged's defaults."""


def quantise(pre: Path, out: Path, calib: Samples, **changes: Any) -> Path:
    """``pre`` quantised as ``int8-static-minmax`` does, with ``changes``."""
    args: dict[str, Any] = {
        "quant_format": QuantFormat.QDQ,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "per_channel": True,
        "calibrate_method": CalibrationMethod.MinMax,
    }
    args.update(changes)
    quantize_static(str(pre), str(out), _Reader(calib, OPTIONS.calibration_samples), **args)
    return out


def pad_channels(source: Path, out: Path, align: int = 16) -> Path:
    """``source`` with every prunable channel set (edged.optimize.channels) widened to a
    multiple of ``align`` by dead channels: zero producer weights and bias, zero reader
    weights, zero depthwise filters, BatchNormalization (1, 0, 0, 1), per-channel constants
    1 for Mul/Div and 0 otherwise. The function is unchanged (a dead channel is a constant
    that every reader ignores)."""
    model = load_model(source)
    channels.fold_constant_reshapes(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}

    def put(node: Any, index: int, array: np.ndarray) -> None:
        name = f"{node.input[index]}__pad_{node.output[0]}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        inits[name] = graph.initializer[-1]
        node.input[index] = name

    def widened(name: str, axis: int, extra: int, value: float = 0.0) -> np.ndarray:
        array = numpy_helper.to_array(inits[name])
        width = [(0, 0)] * array.ndim
        width[axis] = (0, extra)
        return np.pad(array, width, constant_values=value)

    for group in channels.channel_sets(model):
        if not group.blocked and group.producers:
            _pad_group(group, align, put, widened, inits)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def _pad_group(group: Any, align: int, put: Any, widened: Any, inits: dict[str, Any]) -> None:
    """Widen one channel set (see :func:`pad_channels`)."""
    first = group.producers[0]
    axis = 1 if first.op_type == "ConvTranspose" else 0
    width = int(inits[first.input[1]].dims[axis])
    extra = -width % align
    if not extra:
        return
    for node in group.producers:
        put(node, 1, widened(node.input[1], 1 if node.op_type == "ConvTranspose" else 0, extra))
        if len(node.input) > 2 and node.input[2]:
            put(node, 2, widened(node.input[2], 0, extra))
    for node in group.readers:
        put(node, 1, widened(node.input[1], 0 if node.op_type == "ConvTranspose" else 1, extra))
    for node in group.depthwise:
        put(node, 1, widened(node.input[1], 0, extra))
        if len(node.input) > 2 and node.input[2]:
            put(node, 2, widened(node.input[2], 0, extra))
        for a in node.attribute:
            if a.name == "group":
                a.i = width + extra
    for node in group.norms:
        for index, value in zip(range(1, 5), (1.0, 0.0, 0.0, 1.0), strict=True):
            put(node, index, widened(node.input[index], 0, extra, value))
    for node, index, at in group.constants:
        neutral = 1.0 if node.op_type in ("Mul", "Div") else 0.0
        put(node, index, widened(node.input[index], at, extra, neutral))


def session(path: Path, level: Any = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> Any:
    """A session as edged's cpu-onnx executor makes one (hal/cpu_onnx.py), at ``level``."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = level
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def pair_times(
    sessions: dict[str, Any], sample: dict[str, np.ndarray], runs: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median batch-1 wall ms and CPU ms of the calling thread (``time.thread_time``: one
    intra-op thread runs every kernel on it, so time the scheduler gives to other processes
    is not counted; cache misses they cause still are) of each, interleaved."""
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(5):
        for s in sessions.values():
            s.run(None, sample)
    for _ in range(runs):
        for name, s in sessions.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            s.run(None, sample)
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return (
        {k: round(float(np.median(v)) * 1000, 3) for k, v in wall.items()},
        {k: round(float(np.median(v)) * 1000, 3) for k, v in cpu.items()},
    )


def depthwise(tmp: Path, runs: int) -> dict[str, Any]:
    """A lone 5x5 depthwise Conv + Relu on [1, C, 3, 96] (the classifier's late stage),
    float against ``quantize_static``'s QDQ int8, interleaved."""
    rng = np.random.default_rng(0)
    found: dict[str, Any] = {}
    for c in (88, 96, 200, 208):
        w = (rng.normal(size=(c, 1, 5, 5)) * 0.1).astype(np.float32)
        graph = helper.make_graph(
            [
                helper.make_node("Conv", ["x", "w"], ["c"], group=c, pads=[2, 2, 2, 2]),
                helper.make_node("Relu", ["c"], ["y"]),
            ],
            "dw",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 3, 96])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 3, 96])],
            [numpy_helper.from_array(w, "w")],
        )
        path = tmp / f"dw{c}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        x = rng.normal(size=(8, c, 3, 96)).astype(np.float32)
        q = quantise(path, tmp / f"dw{c}-int8.onnx", Samples({"x": x}))
        ms, cpu = pair_times({"float": session(path), "int8": session(q)}, {"x": x[:1]}, runs)
        found[str(c)] = {
            **ms,
            "int8_over_float": round(ms["int8"] / ms["float"], 2),
            "int8_over_float_cpu": round(cpu["int8"] / cpu["float"], 2),
        }
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    from tests.corpus import CORPUS, fetch

    flags = next(
        (
            ln.split(":", 1)[1].split()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("flags")
        ),
        [],
    )
    result: dict[str, Any] = {
        "machine": machine(),
        "cpu_int8_flags": sorted(
            f for f in flags if "vnni" in f or "amx" in f or f == "avx2" or f.startswith("avx512")
        ),
        "load_average_before": os.getloadavg(),
    }
    source = fetch(next(m for m in CORPUS if m.name == "ocr_cls"))
    calib, held = data("ocr_cls")
    with tempfile.TemporaryDirectory(prefix="edged-int8-") as name:
        tmp = Path(name)
        pre = preprocess(source, tmp / "pre.onnx")
        files: dict[str, Path] = {"float": source}
        files["int8-static-minmax"] = quantise(pre, tmp / "default.onnx", calib)
        for key, changes in SETTINGS.items():
            files[key] = quantise(pre, tmp / f"{key}.onnx", calib, **changes)
        fused = METHODS["fuse-hardswish"](source, tmp / "fused.onnx", calib, OPTIONS).path
        files["fuse-hardswish"] = fused
        files["fuse-hardswish+int8"] = METHODS["int8-static-minmax"](
            fused, tmp / "fused-int8.onnx", calib, OPTIONS
        ).path
        padded = pad_channels(fused, tmp / "padded.onnx")
        files["fuse-hardswish+pad16+int8"] = METHODS["int8-static-minmax"](
            padded, tmp / "padded-int8.onnx", calib, OPTIONS
        ).path
        sessions = {k: session(p) for k, p in files.items()}
        sessions["float@extended"] = session(source, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        sessions["int8-static-minmax@extended"] = session(
            files["int8-static-minmax"], ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )
        reference = outputs(sessions["float"], held)
        sample = {"x": held.inputs["x"][:1]}
        variants: dict[str, Any] = {}
        for key, sess in sessions.items():
            got = outputs(sess, held)
            path = files.get(key.split("@")[0])
            pair = {"float": sessions["float"], key: sess} if key != "float" else {key: sess}
            ms, cpu = pair_times(pair, sample, args.runs)
            variants[key] = {
                "bytes": path.stat().st_size if path else None,
                "latency_ms_median": ms[key],
                "float_ms_median": ms["float"],
                "faster_x": round(ms["float"] / ms[key], 3),
                "cpu_ms_median": cpu[key],
                "float_cpu_ms_median": cpu["float"],
                "faster_x_cpu": round(cpu["float"] / cpu[key], 3),
                "agreement": round(float(np.mean(decisions(got) == decisions(reference))), 4),
                "accuracy": round(float(np.mean(np.argmax(got, axis=1) == held.labels)), 4),
            }
        for key in (
            "float",
            "fuse-hardswish",
            "int8-static-minmax",
            "fuse-hardswish+int8",
            "fuse-hardswish+pad16+int8",
        ):
            variants[key]["op_ms_profiled"] = op_profile(files[key], sample, 100, tmp)
        result["variants"] = variants
        result["depthwise_5x5"] = depthwise(tmp, args.runs)
    result["load_average_after"] = os.getloadavg()
    print(__import__("json").dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
