"""edged optimize on the example digits model and two real third-party CNNs from PyPI
wheels (the test corpus, tests/corpus.py): every variant's size, latency, throughput,
memory and quality. Never pass/fail.

Models and data (nothing from a model hub; every sample is made here):

- ``digits``: models/digits (MLP on scikit-learn's bundled 8x8 digits); calibration = the
  first 1000 digits, held out = the remaining 797, with their labels (task accuracy).
- ``digits_learn``: models/digits_learn (backbone + trainable head, taught digits 0-4): the
  head methods (qat, head-prune, distil) beside int8-static-minmax, on the digits 0-4
  (600 to train/calibrate, the other 301 held out; some of these the head was trained on,
  so compare the variants with each other and the original, not with other models).
- ``ocr_cls``: PP-OCR's text direction classifier (rapidocr-onnxruntime 1.4.4, a MobileNetV3
  CNN, input [N, 3, 48, 192]); text lines rendered with Pillow's default font, half of
  them turned 180 degrees, so the label (0 upright, 1 turned) is known: task accuracy
  (200 calibration lines, 1000 held out).
- ``ocr_det``: PP-OCRv4's text detector (a CNN with an FPN head, output a text-probability
  map [N, 1, H, W]); pages of rendered text at 320x320 (32 calibration, 64 held out), each
  line's box known as drawn and written to the held-out folder's boxes.json: ``edged
  optimize`` itself gates on detection F1 at IoU 0.5 (edged.optimize.detection: DBNet's
  post-processing, boxes matched one-to-one), at most 1 point lost; pixel agreement is
  reported but does not decide.

Budgets as the issue's targets: accuracy drop <= 1 point where labels exist (digits,
ocr_cls; ocr_det's detection F1), 1.5 points for the head methods (digits_learn).

    .venv/bin/python benchmarks/optimize.py [--models digits,digits_learn,ocr_cls,ocr_det]
        [--runs 100]
        [--methods M,...] [--out /tmp/edged-bench-optimize] > optimize.json

JSON on stdout (one object per model: the machine, every variant's record, and the
interleaved batch-1 latency of each accepted static INT8 variant against the original: one
inference of each in turn, so that load from other processes falls on both alike); a
markdown table per model on stderr, as docs/optimize.md shows them. ``--keep-all`` accepts
every variant (for timing only). ONNX Runtime runs with
one intra-op thread, as the daemon does on a small gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.optimize import gate
from edged.optimize.data import BOXES_FILE
from edged.optimize.methods import DEFAULT_METHODS, Options
from edged.optimize.report import VariantReport
from edged.optimize.run import Settings, optimize

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "edge",
    "gateway",
    "model",
    "invoice",
    "total",
    "amount",
    "paid",
    "street",
    "road",
    "north",
    "south",
    "2026",
    "42",
    "17.50",
    "EUR",
    "order",
    "number",
    "delivery",
    "date",
    "signature",
]


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "note": "shared machine (other jobs ran beside this one): latencies are noisy",
    }


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def text_lines(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` text-line images [n, 3, 48, 192] normalised as PaddleOCR does ((x/255-0.5)/0.5)
    and their labels (1: turned 180 degrees)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        background = int(rng.integers(190, 256))
        img = Image.new("RGB", (192, 48), (background,) * 3)
        draw = ImageDraw.Draw(img)
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        ink = int(rng.integers(0, 90))
        draw.text((int(rng.integers(0, 12)), int(rng.integers(2, 10))), text, fill=(ink,) * 3,
                  font=_font(int(rng.integers(20, 32))))  # fmt: skip
        turned = rng.random() < 0.5
        if turned:
            img = img.rotate(180)
        images.append(np.asarray(img, np.float32).transpose(2, 0, 1) / 255)
        labels.append(int(turned))
    return (np.stack(images) - 0.5) / 0.5, np.array(labels, np.int64)


def pages(
    n: int, seed: int, size: int = 320
) -> tuple[np.ndarray, list[list[tuple[float, float, float, float]]]]:
    """``n`` pages [n, 3, size, size] of rendered text lines, normalised with ImageNet's mean
    and deviation as RapidOCR feeds its detector, and each page's line boxes as drawn
    (Pillow's ``textbbox``: x0, y0, x1, y1 of the ink)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    out, boxes = [], []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        page: list[tuple[float, float, float, float]] = []
        y = int(rng.integers(4, 30))
        while y < size - 30:
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
            font_size = int(rng.integers(14, 30))
            x = int(rng.integers(4, 60))
            font = _font(font_size)
            draw.text((x, y), text, fill=(int(rng.integers(0, 80)),) * 3, font=font)
            x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
            page.append((float(x0), float(y0), float(min(x1, size)), float(min(y1, size))))
            y += font_size + int(rng.integers(6, 30))
        out.append(np.asarray(img, np.float32).transpose(2, 0, 1) / 255)
        boxes.append(page)
    return (np.stack(out) - mean) / std, boxes


def prepare(name: str, root: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """(model, calibration dir, holdout dir, settings overrides) for benchmark model ``name``."""
    calib, held = root / name / "calibration", root / name / "holdout"
    calib.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        x, y = data.data.astype(np.float32), data.target.astype(np.int64)
        np.savez(calib / "digits.npz", input=x[:1000], labels=y[:1000])
        np.savez(held / "digits.npz", input=x[1000:], labels=y[1000:])
        budget = gate.Budget(max_accuracy_drop=1.0)
        digits = Path(__file__).resolve().parents[1] / "models/digits"
        return digits, calib, held, {"budget": budget}
    if name == "digits_learn":  # the head methods; the head was trained on digits 0-4
        from sklearn.datasets import load_digits

        data = load_digits()
        known = data.target < 5
        x, y = data.data[known].astype(np.float32), data.target[known].astype(np.int64)
        order = np.random.default_rng(7).permutation(len(y))
        x, y = x[order], y[order]
        np.savez(calib / "digits.npz", input=x[:600], labels=y[:600])
        np.savez(held / "digits.npz", input=x[600:], labels=y[600:])
        folder = Path(__file__).resolve().parents[1] / "models/digits_learn"
        methods = ("int8-static-minmax", "qat", "head-prune", "distil")
        return folder, calib, held, {"budget": gate.Budget(max_accuracy_drop=1.5),
                                     "methods": methods}  # fmt: skip
    from tests.corpus import CORPUS, fetch

    model = fetch(next(m for m in CORPUS if m.name == name))
    if name == "ocr_cls":
        x, y = text_lines(1200, seed=1)
        np.savez(calib / "lines.npz", x=x[:200], labels=y[:200])
        np.savez(held / "lines.npz", x=x[200:], labels=y[200:])
        return model, calib, held, {"budget": gate.Budget(max_accuracy_drop=1.0)}
    if name == "ocr_det":
        x, boxes = pages(32 + DET_HELD_OUT, seed=2)
        np.save(calib / "x.npy", x[:32])
        np.save(held / "x.npy", x[32:])
        (held / BOXES_FILE).write_text(json.dumps({"boxes": boxes[32:]}))
        return model, calib, held, {"budget": gate.Budget(max_accuracy_drop=1.0)}
    raise SystemExit(f"unknown model {name!r} (digits, ocr_cls, ocr_det)")


AB_METHODS = ("int8-static", "prune-channels", "fuse-hardswish")
"""Accepted variants whose batch-1 latency is also taken interleaved with the original's."""

DET_HELD_OUT = 64
"""Held-out pages of the detector's labelled task (~8 lines each)."""


def interleaved(
    original: Path, variant: Path, sample: dict[str, np.ndarray], runs: int
) -> dict[str, float]:
    """Batch-1 latency of ``original`` and ``variant`` on cpu-onnx, run alternately (one
    inference of each in turn) so that load from other processes falls on both alike: the
    medians and their ratio."""
    from hal import ExecutorOptions, ModelArtifact, get_executor

    loaded = [
        get_executor("cpu-onnx").load(ModelArtifact(p, "onnx"), ExecutorOptions())
        for p in (original, variant)
    ]
    times: list[list[float]] = [[], []]
    try:
        for _ in range(5):
            for model in loaded:
                model.infer(sample)
        for _ in range(runs):
            for model, spent in zip(loaded, times, strict=True):
                start = time.perf_counter()
                model.infer(sample)
                spent.append((time.perf_counter() - start) * 1000)
    finally:
        for model in loaded:
            model.close()
    a, b = (statistics.median(t) for t in times)
    return {"original_ms": round(a, 4), "variant_ms": round(b, 4), "speed-up": round(a / b, 3)}


def markdown(name: str, reports: list[VariantReport]) -> str:
    base = reports[0]
    kind = "cpu-onnx"
    lines = [
        f"#### {name}",
        "",
        "| method | size (bytes) | x smaller | gzip (bytes) | ms, batch 1 | x faster | "
        "throughput (/s) | peak RSS (MiB) | agreement | accuracy | accepted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        ms = r.latency_ms.get(kind)
        rss = r.peak_rss_bytes.get(kind)
        cells = [
            r.method,
            f"{r.size_bytes:,}" if r.size_bytes else "-",
            f"{base.size_bytes / r.size_bytes:.2f}" if r.size_bytes and base.size_bytes else "-",
            f"{r.gzip_bytes:,}" if r.gzip_bytes else "-",
            f"{ms:.3f}" if ms else "-",
            f"{base.latency_ms[kind] / ms:.2f}" if ms and kind in base.latency_ms else "-",
            f"{r.throughput[kind]:.0f}" if kind in r.throughput else "-",
            f"{rss / 2**20:.1f}" if rss is not None else "-",
            f"{r.agreement:.4f}" if r.agreement is not None else "-",
            f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
            ("yes" if r.accepted else f"no: {r.reason}") if r.method != "original" else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _first_input(folder: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for file in sorted(folder.iterdir()):
        if file.suffix == ".npy":
            arrays[file.stem] = np.load(file)[:1]
        elif file.suffix == ".npz":
            with np.load(file) as archive:
                arrays.update({k: archive[k][:1] for k in archive.files if k != "labels"})
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,digits_learn,ocr_cls,ocr_det")
    parser.add_argument("--methods", default=",".join([*DEFAULT_METHODS, "prune-magnitude"]))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument(
        "--keep-all",
        action="store_true",
        help="budget min-agreement 0: every variant is written (for the interleaved timing)",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/edged-bench-optimize"))
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        model, calib, held, chosen = prepare(name, args.out / "data")
        settings = Settings(
            methods=chosen.get("methods") or tuple(args.methods.split(",")),
            budget=gate.Budget(min_agreement=0.0) if args.keep_all else chosen["budget"],
            holdout=held,
            options=Options(calibration_samples=64),
            runs=args.runs,
        )
        result = optimize(model, calib, args.out / name, settings,
                          lambda line: print(f"optimize: {line}", file=sys.stderr))  # fmt: skip
        print(markdown(name, result.reports), file=sys.stderr)
        ab = {}
        sample = {k: v[:1] for k, v in _first_input(held).items()}
        for r in result.reports[1:]:
            if r.accepted and r.path and r.method.startswith(AB_METHODS):
                ab[r.method] = interleaved(Path(result.reports[0].path or ""), Path(r.path),
                                           sample, args.runs * 2)  # fmt: skip
        print(f"{name}: interleaved batch-1 latency, original vs variant: {ab}", file=sys.stderr)
        detection = {r.method: {k: r.notes.get(k) for k in ("precision", "recall", "f1", "boxes")}
                     | {"accepted": r.accepted, "reason": r.reason}
                     for r in result.reports if r.notes.get("task") == "detection"}  # fmt: skip
        for method, fig in detection.items():
            print(f"{name}: detection at IoU 0.5: {method}: {fig}", file=sys.stderr)
        results.append({
            "model": name,
            "machine": machine(),
            "plot": str(result.plot_path),
            "variants": [r.to_json() for r in result.reports],
            "interleaved": ab,
            "detection": detection,
        })  # fmt: skip
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
