"""What ``edged optimize`` tells people and tools: one record per variant, a terminal table,
JSON, and a Pareto plot (matplotlib, from the ``edged[optimize]`` extra, imported only when
the plot is drawn)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class VariantReport:
    """One variant (or the original, ``method`` "original") and its figures."""

    method: str
    path: str | None
    """Where the accepted variant was written (its version folder's model.onnx); None when
    it was not written (refused, or over budget)."""
    accepted: bool
    reason: str
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    """Size compressed as a bundle stores it (what magnitude pruning shrinks)."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Median batch-1 latency per executor kind."""
    p90_ms: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    """Samples per second per executor kind, at ``throughput_batch``."""
    throughput_batch: int = 1
    peak_rss_bytes: dict[str, int | None] = field(default_factory=dict)
    agreement: float | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    """Points of accuracy lost against the original (with labels)."""
    max_abs_error: float | None = None
    rel_l2_error: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(base: float | None, value: float | None) -> str:
    if not base or not value:
        return "-"
    return f"{base / value:.2f}x"


def table(reports: list[VariantReport], executor: str = "cpu-onnx") -> str:
    """A fixed-width table: size (and x smaller), latency on ``executor`` (and x faster),
    agreement, accuracy, accepted and why."""
    base = reports[0] if reports and reports[0].method == "original" else None
    base_size = base.size_bytes if base else None
    base_ms = base.latency_ms.get(executor) if base else None
    header = (
        f"{'method':24} {'size':>10} {'smaller':>8} {'ms@b1':>8} {'faster':>7} "
        f"{'agree':>7} {'acc':>7}  verdict"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        ms = r.latency_ms.get(executor)
        verdict = "original" if r.method == "original" else ("ACCEPTED" if r.accepted else "no")
        lines.append(
            f"{r.method:24} {_num(r.size_bytes, '{:,}'):>10} "
            f"{_ratio(base_size, r.size_bytes):>8} {_num(ms, '{:.3f}'):>8} "
            f"{_ratio(base_ms, ms):>7} "
            f"{_num(r.agreement, '{:.4f}'):>7} {_num(r.accuracy, '{:.4f}'):>7}  "
            f"{verdict}: {r.reason}"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def pareto(reports: list[VariantReport], executor: str = "cpu-onnx") -> list[str]:
    """Methods on the Pareto front: no other variant is at least as small, as fast and as
    good (agreement, or accuracy where known) and strictly better in one."""
    points = [
        (r.method, float(r.size_bytes), r.latency_ms[executor], -_quality(r))
        for r in reports
        if r.size_bytes is not None and executor in r.latency_ms
    ]
    front = []
    for name, *p in points:
        dominated = any(
            all(a <= b for a, b in zip(q, p, strict=True)) and q != p for _, *q in points
        )
        if not dominated:
            front.append(name)
    return front


def _quality(r: VariantReport) -> float:
    value = r.accuracy if r.accuracy is not None else r.agreement
    return 0.0 if value is None or math.isnan(value) else value


def plot(reports: list[VariantReport], path: Path, title: str, executor: str = "cpu-onnx") -> Path:
    """A PNG: size (x) against batch-1 latency on ``executor`` (y), colour the quality
    (accuracy where labels exist, else agreement), the Pareto front of the accepted variants
    (and the original) joined, rejected variants
    drawn as crosses.

    Raises:
        ImportError: matplotlib is not installed (the ``edged[optimize]`` extra).
    """
    import matplotlib as mpl  # noqa: PLC0415 - the plot's alone: the table needs none

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shown = [r for r in reports if r.size_bytes is not None and executor in r.latency_ms]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        qualities = [_quality(r) for r in shown]
        low = min([*qualities, 0.9])
        scatter = None
        for r, q in zip(shown, qualities, strict=True):
            x, y = r.size_bytes / 1024, r.latency_ms[executor]  # type: ignore[operator]
            rejected = not r.accepted and r.method != "original"
            scatter = ax.scatter(
                [x],
                [y],
                c=[q],
                vmin=low,
                vmax=1.0,
                cmap="viridis",
                s=70,
                marker="X" if rejected else "o",
                edgecolors="black",
                linewidths=0.6,
            )
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = set(pareto([r for r in shown if r.accepted], executor))
        line = sorted(
            ((r.size_bytes / 1024, r.latency_ms[executor]) for r in shown if r.method in front),  # type: ignore[operator]
        )
        if len(line) > 1:
            ax.plot(
                *zip(*line, strict=True),
                "--",
                color="grey",
                linewidth=0.8,
                label="Pareto front (accepted)",
            )
            ax.legend(loc="upper right", fontsize=7)
        if scatter is not None:
            label = "accuracy" if any(r.accuracy is not None for r in shown) else "top-1 agreement"
            fig.colorbar(scatter, ax=ax, label=label)
        ax.set_xlabel("size on disk (KiB)")
        ax.set_ylabel(f"median latency, batch 1, {executor} (ms)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
