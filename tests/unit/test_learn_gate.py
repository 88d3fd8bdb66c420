"""edged.learn.gate.judge: the gate a fine-tuned head must pass to be published."""

from __future__ import annotations

import pytest

from edged.learn.gate import judge
from edged.learn.task import JobMetrics


def _m(old: tuple[float, float] | None, new: tuple[float, float] | None) -> JobMetrics:
    return JobMetrics(
        old_accuracy_before=old[0] if old else None,
        old_accuracy_after=old[1] if old else None,
        new_accuracy_before=new[0] if new else None,
        new_accuracy_after=new[1] if new else None,
        old_holdout=0,
        new_holdout=0,
        trained_samples=0,
        train_seconds=0.0,
    )


@pytest.mark.parametrize(
    ("metrics", "passed", "words"),
    [
        (_m((0.95, 0.94), (0.10, 0.80)), True, "passed: new data 10.0% -> 80.0% (+70.0 points)"),
        (_m((0.95, 0.93), (0.10, 0.16)), True, "old data 95.0% -> 93.0% (-2.0 points)"),
        (_m((0.95, 0.92), (0.10, 0.90)), False, "more than the 2 allowed"),
        (_m((0.95, 0.95), (0.10, 0.14)), False, "less than the 5 required"),
        (_m((0.95, 0.99), (0.50, 0.40)), False, "(-10.0 points), less than the 5 required"),
        (_m(None, (0.1, 0.9)), True, "old data not judged"),
        (_m((0.9, 0.9), None), False, "no held-out new samples"),
    ],
)
def test_gate(metrics: JobMetrics, passed: bool, words: str) -> None:
    verdict = judge(metrics, max_old_drop=2.0, min_new_gain=5.0)
    assert verdict.passed is passed
    assert words in verdict.reason


def test_negative_gain_requirement_allows_a_small_loss_on_new_data() -> None:
    assert judge(_m((0.9, 0.9), (0.5, 0.48)), max_old_drop=0.0, min_new_gain=-5.0).passed
