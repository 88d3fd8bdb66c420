"""The head targets of issue #15, measured: INT8 post-training quantisation (``edged optimize``'s
``int8-static-minmax``, ONNX Runtime's quantiser) against quantisation-aware fine-tuning
(``qat``, edged.optimize.qat) of a trainable head, and the distilled student head
(``distil``). Never pass/fail; JSON on stdout, a markdown table on stderr.

Every setting is a ``[learn]`` model folder written here (``model.toml``, ``backbone.onnx``,
``head.npz``, ``model.onnx``), optimised by the same functions ``edged optimize --methods
int8-static-minmax,qat`` calls, and scored by ONNX Runtime on held-out rows it never saw:

- ``digits``: scikit-learn's bundled 8x8 digits, the head on the 64 pixels (an identity
  backbone), 10 classes;
- ``digits-mlp``: the same digits through models/digits_learn's real backbone (an MLP, taught
  on 0-4; quantised with the head), all 10 classes;
- ``cancer``: load_breast_cancer (30 features, 2 classes); ``wine``: load_wine (13, 3);
- ``blobs50``: make_classification (64 features, 50 classes, fixed seed), a deeper head
  (two hidden layers of 128).

Per setting and seed (the seed draws the split and the float head's initialisation): the
float head is trained (edged.learn.train_head, 60 epochs), then quantised with the first
``--calibration`` rows (64, ``edged optimize``'s default, and 8, a device with few stored
samples). Figures: mean and spread (min..max) of the accuracy points lost to float.

The distillation target is re-checked on ``digits_learn`` as benchmarks/optimize.py sets it up
(digits 0-4, 600 rows to calibrate/train, the rest held out), over several split seeds.

    .venv/bin/python benchmarks/optimize_heads.py [--seeds 5] [--calibration 64,8]
        [--settings digits,digits-mlp,cancer,wine,blobs50] > heads.json
"""

from __future__ import annotations

import argparse
import io
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
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.learn.graph import compose
from edged.learn.head import Head, init_head, load_head, save_head, standardiser
from edged.learn.strategies import Hyper, train_head, tuned_hyper
from edged.optimize.data import Samples, open_model
from edged.optimize.head import METHODS as HEAD_METHODS
from edged.optimize.head import params
from edged.optimize.methods import METHODS, Options
from edged.optimize.qat import train_qat

ROOT = Path(__file__).resolve().parents[1]
DIGITS_LEARN = ROOT / "models/digits_learn"

SETTINGS = {
    # name: hidden widths of the head
    "digits": (64,),
    "digits-mlp": (64,),
    "cancer": (32,),
    "wine": (16,),
    "blobs50": (128, 128),
}


def dataset(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of setting ``name``, rows shuffled by ``seed``."""
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine, make_classification

    if name in ("digits", "digits-mlp"):
        x, y = load_digits(return_X_y=True)
    elif name == "cancer":
        x, y = load_breast_cancer(return_X_y=True)
    elif name == "wine":
        x, y = load_wine(return_X_y=True)
    elif name == "blobs50":
        x, y = make_classification(n_samples=4000, n_features=64, n_informative=40,
                                   n_classes=50, n_clusters_per_class=1, class_sep=2.0,
                                   random_state=0)  # fmt: skip
    else:
        raise SystemExit(f"unknown setting {name!r} ({', '.join(SETTINGS)})")
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order].astype(np.float32), y[order].astype(np.int64)


def identity_backbone(width: int) -> onnx.ModelProto:
    """A backbone that hands its input ``features`` on unchanged: the served graph is the
    head alone."""
    value = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph([], "identity", [value], [value])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def backbone_of(name: str, width: int) -> tuple[onnx.ModelProto, str]:
    if name == "digits-mlp":
        return onnx.load(str(DIGITS_LEARN / "1/backbone.onnx")), "input"
    return identity_backbone(width), "features"


def features(backbone: onnx.ModelProto, input_name: str, x: np.ndarray) -> np.ndarray:
    if not backbone.graph.node:
        return x
    session = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["features"], {input_name: x})[0], np.float32)


def write_model(folder: Path, backbone: onnx.ModelProto, head: Head) -> Path:
    """A ``[learn]`` model's version folder; returns the model's folder."""
    version = folder / "1"
    version.mkdir(parents=True)
    onnx.save(backbone, str(version / "backbone.onnx"))
    save_head(version / "head.npz", head)
    onnx.save(compose(backbone, head), str(version / "model.onnx"))
    (folder / "model.toml").write_text(
        f'name = "{folder.name}"\nformat = "onnx"\n\n[learn]\nbackbone = "backbone.onnx"\n'
        'features = "features"\nhead = "head.npz"\nstate = "learn_state.npz"\n'
        'strategy = "replay"\n'
    )
    return folder


def accuracy(path: Path, input_name: str, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy in percent of the served graph's ``probabilities`` (as edged optimize scores)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    p = session.run(["probabilities"], {input_name: x})[0]
    return float(np.mean(np.argmax(p, axis=1) == y) * 100)


def _old_fake_quant(w: np.ndarray) -> np.ndarray:
    """The earlier QAT's weight quantiser: ``2 max|w| / 255`` per column, ``[-128, 127]``."""
    scale = np.where((m := np.abs(w).max(axis=0)) > 0, 2 * m / 255, 1).astype(np.float32)
    out: np.ndarray = (np.clip(np.round(w / scale), -128, 127) * scale).astype(np.float32)
    return out


def run_setting(name: str, seed: int, calibration: list[int], tmp: Path) -> list[dict[str, Any]]:
    x, y = dataset(name, seed)
    split = int(len(y) * 0.6)
    backbone, input_name = backbone_of(name, x.shape[1])
    f = features(backbone, input_name, x[:split])
    mean, scale = standardiser(f)
    sizes = [f.shape[1], *SETTINGS[name], int(y.max()) + 1]
    head = init_head(sizes, np.random.default_rng(seed), mean, scale)
    head = train_head(head, f, y[:split], tuned_hyper("training", epochs=60), seed=seed)
    folder = write_model(tmp / f"{name}-{seed}", backbone, head)
    served = folder / "1/model.onnx"
    held_x, held_y = x[split:], y[split:]
    for part, rows_of in (("calibration", slice(0, split)), ("holdout", slice(split, None))):
        (tmp / f"{name}-{seed}-{part}").mkdir()
        np.savez(tmp / f"{name}-{seed}-{part}/rows.npz",
                 **{input_name: x[rows_of], "labels": y[rows_of]})  # fmt: skip
    base = accuracy(served, input_name, held_x, held_y)
    rows = []
    for rows_used in calibration:
        calib = Samples({input_name: x[:split]}, labels=y[:split])
        options = Options(calibration_samples=rows_used)
        ptq_path, qat_path = tmp / f"ptq-{name}-{seed}.onnx", tmp / f"qat-{name}-{seed}.onnx"
        METHODS["int8-static-minmax"](served, ptq_path, calib, options)
        # PTQ with the per-node error sweep (the noisiest nodes left in float)
        METHODS["int8-static-excluded"](served, tmp / "excluded.onnx", calib, options)
        excluded = accuracy(tmp / "excluded.onnx", input_name, held_x, held_y)
        start = time.perf_counter()
        with open_model(folder) as source:
            made = HEAD_METHODS["qat"](source, qat_path, calib, options)
        qat_s = time.perf_counter() - start
        ptq = accuracy(ptq_path, input_name, held_x, held_y)
        qat = accuracy(qat_path, input_name, held_x, held_y)
        # ablations at qat's epochs and learning rate: what the earlier QAT did (int8 weights
        # only, 2 max|w| / 255, float features), and this QAT on the float backbone's features
        hyper = Hyper(epochs=made.notes["qat_epochs"], lr=made.notes["qat_lr"])
        ablations = {}
        for key, tuned in (
            ("qat_weights_only", train_head(head, f, y[:split], hyper, seed=0,
                                            fake_quant=_old_fake_quant)),
            ("qat_float_features", train_qat(head, f, y[:split], f[:rows_used], hyper, seed=0)),
        ):  # fmt: skip
            float_path, int8_path = tmp / f"{key}-float.onnx", tmp / f"{key}-int8.onnx"
            onnx.save(compose(backbone, tuned), str(float_path))
            METHODS["int8-static-minmax"](float_path, int8_path, calib, options)
            ablations[key] = round(base - accuracy(int8_path, input_name, held_x, held_y), 3)
        rows.append({
            "setting": name, "seed": seed, "head": sizes, "calibration_rows": rows_used,
            "train_rows": split, "held_out_rows": len(held_y), "float": round(base, 3),
            "ptq": round(ptq, 3), "qat": round(qat, 3), "ptq_drop": round(base - ptq, 3),
            "qat_drop": round(base - qat, 3), "qat_seconds": round(qat_s, 2),
            "ptq_excluded_drop": round(base - excluded, 3), "qat_lr": made.notes["qat_lr"],
            **{f"{k}_drop": v for k, v in ablations.items()},
        })  # fmt: skip
    return rows


def distillation(seeds: int, tmp: Path) -> list[dict[str, Any]]:
    """``distil`` on digits_learn as benchmarks/optimize.py sets it up, per split seed (7 is
    benchmarks/optimize.py's)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    known = data.target < 5
    x, y = data.data[known].astype(np.float32), data.target[known].astype(np.int64)
    out = []
    for seed in [7, *range(seeds - 1)]:
        order = np.random.default_rng(seed).permutation(len(y))
        xs, ys = x[order], y[order]
        calib = Samples({"input": xs[:600]}, labels=ys[:600])
        with open_model(DIGITS_LEARN) as source:
            produced = HEAD_METHODS["distil"](source, tmp / f"distil-{seed}.onnx", calib, Options())
        student = load_head(io.BytesIO(bytes(produced.files["head.npz"])))  # type: ignore[arg-type]
        teacher = load_head(DIGITS_LEARN / "1/head.npz")
        original = accuracy(DIGITS_LEARN / "1/model.onnx", "input", xs[600:], ys[600:])
        distilled = accuracy(produced.path, "input", xs[600:], ys[600:])
        out.append({
            "split_seed": seed, "teacher_params": params(teacher),
            "student_params": params(student),
            "share": round(params(student) / params(teacher), 4), "teacher": round(original, 3),
            "student": round(distilled, 3), "drop": round(original - distilled, 3),
            "held_out_rows": int(len(ys) - 600),
        })  # fmt: skip
    return out


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["calibration_rows"]), []).append(r)
    out = []
    for (name, cal), rs in groups.items():
        entry: dict[str, Any] = {
            "setting": name, "calibration_rows": cal, "seeds": len(rs), "head": rs[0]["head"],
            "held_out_rows": rs[0]["held_out_rows"],
        }  # fmt: skip
        for key in ("float", "ptq_drop", "ptq_excluded_drop", "qat_drop",
                    "qat_weights_only_drop", "qat_float_features_drop"):  # fmt: skip
            values = [r[key] for r in rs]
            entry[key] = {"mean": round(statistics.fmean(values), 3),
                          "min": min(values), "max": max(values)}  # fmt: skip
        out.append(entry)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--calibration", default="64,8")
    parser.add_argument("--no-distil", action="store_true")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the [learn] model folders and their calibration/held-out "
        ".npz files here (for `edged optimize`), not to a temporary folder",
    )
    args = parser.parse_args()
    calibration = [int(c) for c in args.calibration.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-heads-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        for name in args.settings.split(","):
            for seed in range(args.seeds):
                made = run_setting(name, seed, calibration, work)
                rows += made
                for row in made:
                    print(json.dumps(row), file=sys.stderr, flush=True)
        distilled = [] if args.no_distil else distillation(args.seeds, work)
    table = summary(rows)
    print("| setting | head | calibration rows | float % | PTQ drop | PTQ, sweep-excluded drop | "
          "QAT drop | weights-only QAT drop | QAT on float features drop |",
          file=sys.stderr)  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", file=sys.stderr)

    def cell(d: dict[str, float]) -> str:
        return f"{d['mean']:+.2f} ({d['min']:+.2f}..{d['max']:+.2f})"

    for e in table:
        print(f"| {e['setting']} | {'-'.join(map(str, e['head']))} | {e['calibration_rows']} | "
              f"{e['float']['mean']:.2f} | {cell(e['ptq_drop'])} | "
              f"{cell(e['ptq_excluded_drop'])} | {cell(e['qat_drop'])} | "
              f"{cell(e['qat_weights_only_drop'])} | {cell(e['qat_float_features_drop'])} |",
              file=sys.stderr)  # fmt: skip
    for d in distilled:
        print(f"distil split {d['split_seed']}: {d['student_params']}/{d['teacher_params']} params "
              f"({d['share']:.1%}), teacher {d['teacher']:.2f}%, student {d['student']:.2f}% "
              f"(drop {d['drop']:+.2f})", file=sys.stderr)  # fmt: skip
    json.dump({"onnxruntime": ort.__version__, "load_average": os.getloadavg(),
               "cpus": os.cpu_count(), "rows": rows, "summary": table,
               "distil": distilled}, sys.stdout, indent=1)  # fmt: skip
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
