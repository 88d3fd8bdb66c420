"""Figures of one variant: size, speed and memory on each executor, and quality against the
original on held-out samples.

Speed goes through the HAL (``hal.get_executor(kind).load(...).infer``), the same path the
daemon serves through, on every present executor that runs ONNX. Quality compares the
variant's primary output with the original's:

- an integer output (a label): equal or not, element by element;
- a float output whose axis 1 has more than one entry (class scores ``[N, C]``, or a
  ``[N, C, H, W]`` map): the argmax over axis 1 (top-1), element by element;
- otherwise (one score or a one-channel map): which side of 0.5 (values in [0, 1]) or of 0
  each element lies on.

Agreement is the share of equal decisions; with labels, accuracy is the share of rows whose
decision equals the label (top-1 over ``[N, C]`` only).
"""

from __future__ import annotations

import gzip
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edged.optimize.data import Samples
from edged.optimize.errors import OptimizeError
from edged.ota import bundle
from hal import ExecutorOptions, ModelArtifact, get_executor, probe


def onnx_executors() -> list[str]:
    """The executor kinds present on this host that run ONNX models, cpu-onnx first."""
    kinds = [r.kind for r in probe() if r.present and "onnx" in r.formats]
    return sorted(kinds, key=lambda k: (k != "cpu-onnx", k))


@dataclass(frozen=True)
class Speed:
    """One variant on one executor."""

    latency_ms: float
    """Wall time of one batch-1 inference: the timed runs are split into five blocks and
    this is the lowest block median (robust to other processes taking the cores for a
    while; still noisy on a shared machine)."""
    p90_ms: float
    throughput: float
    """Samples per second at the throughput batch size."""
    peak_rss_bytes: int | None
    """Growth of the process's peak resident memory while loading and running it (Linux
    VmHWM after resetting it; None where that cannot be read)."""


def gzip_size(path: Path) -> int:
    """Bytes of ``path`` gzip-compressed at level 6 (what a .tar.gz bundle stores)."""
    return len(gzip.compress(path.read_bytes(), compresslevel=6, mtime=0))


decisions = bundle.decisions
"""The decision per element the module docstring describes: edged.ota.bundle's rule, the one
the device's check of an optimised variant uses too."""


def measure_speed(
    path: Path,
    kind: str,
    sample: Mapping[str, np.ndarray],
    batch: Mapping[str, np.ndarray],
    *,
    runs: int = 50,
    threads: int = 1,
) -> Speed:
    """Load ``path`` on executor ``kind`` (``threads`` intra-op threads), warm it up, time
    ``runs`` batch-1 inferences of ``sample`` and ``max(3, runs // 5)`` runs of ``batch``.

    Raises:
        EdgedError: the executor cannot load or run the model (its own error).
    """
    baseline = _rss()
    reset = _reset_peak()
    loaded = get_executor(kind).load(
        ModelArtifact(path, "onnx"), ExecutorOptions(intra_op_threads=threads)
    )
    try:
        for _ in range(3):
            loaded.infer(sample)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            loaded.infer(sample)
            times.append((time.perf_counter() - start) * 1000)
        size = max(1, len(times) // 5)
        blocks = [times[i : i + size] for i in range(0, len(times), size)]
        latency = min(statistics.median(block) for block in blocks)
        rows = int(next(iter(batch.values())).shape[0])
        loaded.infer(batch)
        repeats = max(3, runs // 5)
        start = time.perf_counter()
        for _ in range(repeats):
            loaded.infer(batch)
        throughput = rows * repeats / (time.perf_counter() - start)
    finally:
        loaded.close()
    peak = _peak() if reset else None
    times.sort()
    return Speed(
        latency_ms=latency,
        p90_ms=times[min(len(times) - 1, int(len(times) * 0.9))],
        throughput=throughput,
        peak_rss_bytes=None if peak is None or baseline is None else max(0, peak - baseline),
    )


def run_outputs(path: Path, samples: Samples, batch: int) -> dict[str, np.ndarray]:
    """Every output of ``path`` (cpu-onnx) on all of ``samples``, ``batch`` rows per run."""
    loaded = get_executor("cpu-onnx").load(ModelArtifact(path, "onnx"), ExecutorOptions())
    try:
        parts: dict[str, list[np.ndarray]] = {}
        for inputs in samples.batches(batch):
            for name, value in loaded.infer(inputs).items():
                parts.setdefault(name, []).append(np.asarray(value))
    finally:
        loaded.close()
    return {name: np.concatenate(values) for name, values in parts.items()}


@dataclass(frozen=True)
class Quality:
    """A variant's outputs against the original's on the held-out samples."""

    agreement: float
    """Share of equal decisions on the primary output, in [0, 1]."""
    accuracy: float | None
    """Share of held-out rows decided as labelled (None without labels)."""
    max_abs_error: float
    """Largest absolute difference over every float output."""
    rel_l2_error: float
    """``||variant - original|| / ||original||`` over every float output."""


def compare(
    original: Mapping[str, np.ndarray],
    variant: Mapping[str, np.ndarray],
    primary: str,
    labels: np.ndarray | None,
) -> Quality:
    """Quality of ``variant`` against ``original`` (outputs by name) on ``primary``."""
    want, got = decisions(original[primary]), decisions(variant[primary])
    agreement = float(np.mean(want == got)) if want.size else 1.0
    accuracy = None
    if labels is not None:
        accuracy = accuracy_of(variant[primary], labels)
    diff = 0.0
    norm = 0.0
    worst = 0.0
    for name, ref in original.items():
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        d = variant[name].astype(np.float64) - ref.astype(np.float64)
        diff += float(np.sum(d * d))
        norm += float(np.sum(ref.astype(np.float64) ** 2))
        worst = max(worst, float(np.max(np.abs(d))) if d.size else 0.0)
    return Quality(agreement, accuracy, worst, (diff**0.5) / max(norm**0.5, 1e-30))


def accuracy_of(output: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows of ``output`` (``[N, C]`` scores or ``[N]`` labels) decided as
    ``labels``."""
    decided = decisions(output)
    if decided.shape != labels.shape:
        raise ValueError(
            f"labels have shape {labels.shape}, the primary output decides {decided.shape}"
        )
    return float(np.mean(decided == labels))


def primary_output(outputs: Sequence[str], chosen: str | None) -> str:
    """``chosen`` when given, else the first output.

    Raises:
        OptimizeError: ``chosen`` is not one of ``outputs``.
    """
    if chosen is not None and chosen not in outputs:
        raise OptimizeError(f"--output {chosen!r} is not an output (outputs: {', '.join(outputs)})")
    return chosen or outputs[0]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int | None:
    return _status_kib("VmRSS")


def _peak() -> int | None:
    return _status_kib("VmHWM")


def _reset_peak() -> bool:
    """Reset the peak-RSS mark (``/proc/self/clear_refs`` 5, Linux 4.0+); False if refused."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
