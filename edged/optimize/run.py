"""``edged optimize``: make each variant, measure it, gate it, write only what passes.

For every method a variant is made in a temporary folder, measured against the original
(edged.optimize.measure) and judged (edged.optimize.gate). An accepted variant becomes a
model folder ``OUT/<method>/<model>/``, named as the original model so that ``edged-fleet
bundle OUT/<method>/<model> --version V --source OUT/<method>/<model>/1`` makes a new
version of the same model: the original's ``model.toml`` (if it had one) and
``1/model.onnx`` beside ``1/optimize.json``, the lineage
(parent model's SHA-256, method, calibration set's SHA-256, budget, figures) that travels in
the bundle. A rejected or refused variant is never written. ``OUT/report.json`` holds every
record, ``OUT/pareto.png`` the plot.

The task decides what "accuracy" is: with ``labels`` in the held-out data, the share of rows
decided as labelled; with ``boxes.json`` (a text detector's known boxes, edged.optimize.data),
detection F1 at IoU 0.5 of the boxes DBNet's post-processing finds in the primary output, a
probability map ``[N, 1, H, W]`` (edged.optimize.detection). ``--max-accuracy-drop`` is then
in points of F1, and without a budget given the gate is at most
:data:`edged.optimize.gate.DEFAULT_MAX_F1_DROP` points of F1 lost (pixel agreement misses a
detector's broken boxes); ``--min-agreement`` still gates on agreement when given (F1 is
reported beside it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.core.errors import EdgedError
from edged.optimize import gate, measure
from edged.optimize import head as head_methods
from edged.optimize.data import (
    ModelSource,
    Samples,
    StoreRows,
    load_samples,
    load_store,
    open_model,
    split,
)
from edged.optimize.detection import Detection, evaluate
from edged.optimize.errors import OptimizeError
from edged.optimize.methods import DEFAULT_METHODS, METHODS, Options, Produced, Refused
from edged.optimize.report import VariantReport, plot
from edged.storage import write_atomic
from hal import ExecutorOptions, ModelArtifact, get_executor

LINEAGE_FILE = "optimize.json"
DATA_FREE = frozenset(
    {"int8-dynamic", "fp16", "fuse-hardswish", "litert-int8", "prune-magnitude", "prune-structured"}
)
"""Graph methods that need no calibration inputs: with samples from a learning store (which
keeps features, not model inputs) only these and the head methods that train on features
(``head-prune``, ``distil``) run; the others are refused, naming why."""
FEATURE_METHODS = frozenset({"head-prune", "distil"})
REPORT_FILE = "report.json"
PLOT_FILE = "pareto.png"
TASKS = ("auto", "detection")
"""``--task``: auto (detection when the held-out data has boxes.json, else classification
with labels, else agreement), or detection (boxes.json required)."""


@dataclass
class Settings:
    """Everything ``edged optimize`` takes besides the model and the folders."""

    methods: Sequence[str] = DEFAULT_METHODS
    budget: gate.Budget = field(default_factory=lambda: gate.Budget.of(None, None))
    """The budget asked for; a default one follows the task (``Budget.for_task``)."""
    holdout: Path | None = None
    """Held-out samples apart from the calibration folder; else a share is split off."""
    holdout_share: float = 0.25
    output: str | None = None
    """The output quality is judged on (default: the model's first)."""
    options: Options = field(default_factory=Options)
    runs: int = 50
    """Batch-1 inferences timed per variant and executor."""
    threads: int = 1
    executors: Sequence[str] | None = None
    """Executor kinds to time on (default: every present one that runs ONNX)."""
    plot: bool = True
    seed: int = 0
    calibration_store: Path | None = None
    """A device's learning store (learn.sqlite3) to calibrate with instead of a folder: its
    backbone features train the head methods; --holdout judges every variant."""
    store_model: str | None = None
    """Whose rows of the store (default: the model's name)."""
    task: str = "auto"
    """One of :data:`TASKS`."""


@dataclass
class Result:
    reports: list[VariantReport]
    report_path: Path
    plot_path: Path | None
    name: str = ""
    """The model's name (each accepted variant is ``OUT/<method>/<name>/``)."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """What every accepted variant's optimize.json shares: parent, calibration, held-out
    and budget."""
    held: Samples | None = None
    """The held-out samples the variants were judged on (never used for calibration)."""
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    """The original's outputs on ``held``."""
    primary: str = ""
    """The output quality was judged on."""
    batch: int = 1
    """Rows per inference the model takes (1 when its batch axis is fixed)."""
    budget: gate.Budget | None = None
    """The budget the variants were judged by (the task's default when none was asked)."""


def optimize(
    model: Path,
    calibration: Path | None,
    out: Path,
    settings: Settings,
    progress: Callable[[str], None] = lambda _: None,
) -> Result:
    """Run ``settings.methods`` on ``model`` and write what passes the budget into ``out``.
    ``calibration``: the sample folder; None with ``settings.calibration_store``.

    Raises:
        OptimizeError: an unknown method, an unusable model, sample folder or store, or
            neither or both of a folder and a store (named).
    """
    if (calibration is None) == (settings.calibration_store is None):
        raise OptimizeError(
            "give one of --calibration DIR and --calibration-store PATH (the samples to "
            "calibrate with)"
        )
    unknown = [m for m in settings.methods if m not in METHODS and m not in head_methods.METHODS]
    if unknown:
        known = sorted([*METHODS, *head_methods.METHODS])
        raise OptimizeError(f"unknown method {', '.join(unknown)} (methods: {', '.join(known)})")
    out.mkdir(parents=True, exist_ok=True)
    with open_model(model) as source:
        signature = _signature(source.path)
        names = [spec.name for spec in signature.inputs]
        calib, held, store = _data(calibration, names, source.name, settings, progress)
        dynamic = all(spec.shape and spec.shape[0] == -1 for spec in signature.inputs)
        batch = 16 if dynamic else 1
        primary = measure.primary_output([s.name for s in signature.outputs], settings.output)
        executors = list(settings.executors or measure.onnx_executors())
        progress(
            f"{source.name}: {len(calib)} calibration, {len(held)} held-out samples; "
            f"timing on {', '.join(executors)}"
        )
        reference = measure.run_outputs(source.path, held, batch)
        original_acc, base_detection = _original_score(reference[primary], held, primary, settings)
        budget = settings.budget.for_task(held.boxes is not None)
        timing = _Timing(held, batch if dynamic else 1, executors, settings)
        base = VariantReport("original", str(source.path), True, "the model as given")
        base.agreement = 1.0
        base.accuracy = original_acc
        if base_detection is not None:
            base.notes.update(detection_notes(base_detection))
        timing.fill(base, source.path)
        reports = [base]
        lineage = {
            "parent": {"name": source.name, "sha256": source.sha256(), "path": str(source.path)},
            "calibration": {
                "sha256": calib.sha256(),
                "samples": len(calib),
                **({} if store is None else {"store": store.to_json()}),
            },
            "holdout": {"sha256": held.sha256(), "samples": len(held)},
            "budget": budget.describe(),
        }
        with tempfile.TemporaryDirectory(prefix="edged-optimize-") as tmp:
            for method in settings.methods:
                progress(f"{method} ...")
                report, files = _variant(
                    method,
                    source,
                    Path(tmp),
                    calib,
                    held,
                    reference,
                    primary,
                    original_acc,
                    batch,
                    timing,
                    settings,
                    budget,
                )
                if report.accepted:
                    made = Path(report.path or "")
                    report.path = str(out / method / source.name / "1" / "model.onnx")
                    _publish(
                        out,
                        source,
                        method,
                        made,
                        {**head_methods.learn_files(source), **files},
                        {**lineage, "method": method, "figures": report.to_json()},
                    )
                else:
                    report.path = None
                    shutil.rmtree(out / method, ignore_errors=True)  # a stale earlier pass
                reports.append(report)
                progress(
                    f"{method}: {'accepted' if report.accepted else 'not written'}: {report.reason}"
                )
    report_path = out / REPORT_FILE
    data = json.dumps([r.to_json() for r in reports], indent=2, default=_jsonable).encode()
    write_atomic(report_path, lambda f: f.write(data + b"\n"))
    plot_path = None
    if settings.plot:
        kind = executors[0] if executors else "cpu-onnx"
        plot_path = plot(reports, out / PLOT_FILE, f"{source.name}: {budget.describe()}", kind)
    return Result(
        reports,
        report_path,
        plot_path,
        name=source.name,
        lineage=lineage,
        held=held,
        reference=reference,
        primary=primary,
        batch=batch,
        budget=budget,
    )


def _data(
    calibration: Path | None,
    names: list[str],
    model: str,
    settings: Settings,
    progress: Callable[[str], None],
) -> tuple[Samples, Samples, StoreRows | None]:
    """(calibration, held-out, the store rows used when they came from a learning store)."""
    if settings.calibration_store is not None:
        if settings.holdout is None:
            raise OptimizeError(
                "--calibration-store needs --holdout DIR: the learning store keeps backbone "
                "features, not model inputs, and variants are judged on inputs"
            )
        calib, store = load_store(settings.calibration_store, settings.store_model or model)
        progress(store.describe())
        return calib, load_samples(settings.holdout, names, "--holdout"), store
    assert calibration is not None
    samples = load_samples(calibration, names)
    if settings.holdout is not None:
        return samples, load_samples(settings.holdout, names, "--holdout"), None
    calib, held = split(samples, settings.holdout_share, settings.seed)
    return calib, held, None


def _signature(path: Path) -> Any:
    try:
        loaded = get_executor("cpu-onnx").load(ModelArtifact(path, "onnx"), ExecutorOptions())
    except EdgedError as e:
        raise OptimizeError(f"{path}: cannot load it with cpu-onnx: {e}") from e
    try:
        return loaded.signature
    finally:
        loaded.close()


class _Timing:
    def __init__(
        self, held: Samples, batch: int, executors: Sequence[str], settings: Settings
    ) -> None:
        self.sample = next(held.batches(1))
        self.batch = next(held.batches(batch))
        self.batch_rows = int(next(iter(self.batch.values())).shape[0])
        self.executors = executors
        self.settings = settings

    def fill(self, report: VariantReport, path: Path) -> None:
        report.size_bytes = path.stat().st_size
        report.gzip_bytes = measure.gzip_size(path)
        report.throughput_batch = self.batch_rows
        for kind in self.executors:
            try:
                speed = measure.measure_speed(
                    path,
                    kind,
                    self.sample,
                    self.batch,
                    runs=self.settings.runs,
                    threads=self.settings.threads,
                )
            except EdgedError as e:
                report.notes[f"{kind}_error"] = str(e)
                continue
            report.latency_ms[kind] = round(speed.latency_ms, 4)
            report.p90_ms[kind] = round(speed.p90_ms, 4)
            report.throughput[kind] = round(speed.throughput, 1)
            report.peak_rss_bytes[kind] = speed.peak_rss_bytes


def _variant(
    method: str,
    source: ModelSource,
    tmp: Path,
    calib: Samples,
    held: Samples,
    reference: dict[str, np.ndarray],
    primary: str,
    original_acc: float | None,
    batch: int,
    timing: _Timing,
    settings: Settings,
    budget: gate.Budget,
) -> tuple[VariantReport, dict[str, bytes | Path]]:
    target = tmp / f"{method}.onnx"
    if not calib.inputs and method not in DATA_FREE | FEATURE_METHODS:
        reason = (
            "needs the model's inputs to calibrate, and the learning store keeps backbone "
            "features only (docs/learning.md): calibrate it with --calibration DIR"
        )
        return VariantReport(method, None, False, reason), {}
    # onnxruntime.quantization print()s its progress: keep stdout for --json
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if method in METHODS:
                produced: Produced = METHODS[method](source.path, target, calib, settings.options)
            else:
                produced = head_methods.METHODS[method](source, target, calib, settings.options)
    except Refused as e:
        return VariantReport(method, None, False, str(e)), {}
    try:
        outputs = measure.run_outputs(produced.path, held, batch)
    except EdgedError as e:
        reason = f"the variant does not run on cpu-onnx: {e}"
        return VariantReport(method, None, False, reason), {}
    quality = measure.compare(reference, outputs, primary, held.labels)
    accuracy, metric, notes = quality.accuracy, "accuracy", dict(produced.notes)
    if held.boxes is not None:
        found = detection_of(outputs[primary], held, primary)
        accuracy, metric = found.f1, "detection F1"
        notes.update(detection_notes(found))
    accepted, reason = gate.judge(budget, quality.agreement, accuracy, original_acc, metric)
    report = VariantReport(method, str(produced.path), accepted, reason, notes=notes)
    report.agreement = round(quality.agreement, 6)
    report.accuracy = accuracy
    if accuracy is not None and original_acc is not None:
        report.accuracy_drop = round((original_acc - accuracy) * 100, 4)
    report.max_abs_error = quality.max_abs_error
    report.rel_l2_error = quality.rel_l2_error
    timing.fill(report, produced.path)
    return report, produced.files


def _original_score(
    output: np.ndarray, held: Samples, primary: str, settings: Settings
) -> tuple[float | None, Detection | None]:
    """The original's task score on ``held`` (accuracy, detection F1, or None without task
    labels) and its detection figures (with boxes)."""
    if settings.task not in TASKS:
        raise OptimizeError(f"--task must be one of {', '.join(TASKS)}, got {settings.task!r}")
    if held.boxes is not None:
        found = detection_of(output, held, primary)
        return found.f1, found
    if settings.task == "detection":
        raise OptimizeError(
            "--task detection: the held-out samples have no boxes.json (each sample's "
            "known boxes: docs/optimize.md)"
        )
    return (None if held.labels is None else measure.accuracy_of(output, held.labels)), None


def detection_of(output: np.ndarray, held: Samples, name: str) -> Detection:
    """Detection figures of probability maps ``output`` (output ``name``) against the
    held-out samples' boxes.

    Raises:
        OptimizeError: the output is not a one-channel map ``[N, 1, H, W]`` or ``[N, H, W]``.
    """
    assert held.boxes is not None
    if not (output.ndim == 3 or (output.ndim == 4 and output.shape[1] == 1)):
        raise OptimizeError(
            f"boxes.json: output {name!r} has shape {list(output.shape)}, not a text "
            "detector's probability map [N, 1, H, W] (--output names another)"
        )
    return evaluate(output, held.boxes)


def detection_notes(found: Detection) -> dict[str, Any]:
    """A report's record of detection figures."""
    return {
        "task": "detection",
        "precision": round(found.precision, 6),
        "recall": round(found.recall, 6),
        "f1": round(found.f1, 6),
        "boxes": [found.matched, found.found, found.known],
    }


def _publish(
    out: Path,
    source: ModelSource,
    method: str,
    artifact: Path,
    files: dict[str, bytes | Path],
    lineage: dict[str, Any],
) -> None:
    """Write ``OUT/<method>/`` (see the module docstring) with ``files`` beside the model,
    next to any old one, then swap it in by rename."""
    final = out / method
    staging = out / f".{method}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    version = staging / source.name / "1"
    version.mkdir(parents=True)
    if source.model_toml:
        text = source.model_toml.encode()
        write_atomic(staging / source.name / "model.toml", lambda f: f.write(text))
    data = artifact.read_bytes()
    write_atomic(version / "model.onnx", lambda f: f.write(data))
    for name, content in files.items():
        _write(version / name, content.read_bytes() if isinstance(content, Path) else content)
    record = json.dumps(lineage, indent=2, sort_keys=True, default=_jsonable).encode()
    write_atomic(version / LINEAGE_FILE, lambda f: f.write(record + b"\n"))
    if final.exists():
        old = out / f".{method}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def _write(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
