"""The gate a fine-tuned head must pass to be published: a pure function of the job's
metrics and the two thresholds of [learn]."""

from __future__ import annotations

from dataclasses import dataclass

from edged.learn.task import JobMetrics


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def judge(metrics: JobMetrics, max_old_drop: float, min_new_gain: float) -> Verdict:
    """The gate: the candidate may lose at most ``max_old_drop`` accuracy points on held-out
    old data and must gain at least ``min_new_gain`` points on the held-out new samples.
    Without held-out old data the old side is not judged (said in the reason); without
    held-out new samples nothing passes."""
    new_before, new_after = metrics.new_accuracy_before, metrics.new_accuracy_after
    old_before, old_after = metrics.old_accuracy_before, metrics.old_accuracy_after
    if new_before is None or new_after is None:
        return Verdict(False, "no held-out new samples to judge the candidate on")
    gain = 100 * (new_after - new_before)
    new_text = f"new data {_points(new_before)} -> {_points(new_after)} ({gain:+.1f} points)"
    if old_before is None or old_after is None:
        old_text, drop = "old data not judged (no held-out old data)", 0.0
    else:
        drop = 100 * (old_before - old_after)
        old_text = f"old data {_points(old_before)} -> {_points(old_after)} ({-drop:+.1f} points)"
    if drop > max_old_drop:
        return Verdict(
            False, f"rejected: {old_text}, more than the {max_old_drop:g} allowed; {new_text}"
        )
    if gain < min_new_gain:
        return Verdict(
            False, f"rejected: {new_text}, less than the {min_new_gain:g} required; {old_text}"
        )
    return Verdict(True, f"passed: {new_text}; {old_text}")
