"""The budget a variant must meet to be written as a version. Pure: no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edged.optimize.errors import OptimizeError

DEFAULT_MIN_AGREEMENT = 0.99
"""The budget when none is given: top-1 agreement with the original of at least 99%."""

DEFAULT_MAX_F1_DROP = 1.0
"""The budget when none is given and the held-out samples carry a detector's boxes
(boxes.json): at most 1 point of detection F1 lost. Pixel agreement does not judge a
detector: an FP16 PP-OCR detector kept 0.962 of its pixels and lost 59.8 points of F1."""


@dataclass(frozen=True)
class Budget:
    """At most ``max_accuracy_drop`` points of accuracy lost (with labels; without them, of
    agreement with the original), or at least ``min_agreement`` of the original's top-1
    decisions kept. Exactly one is set."""

    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    default: bool = False
    """Nobody chose it (:meth:`of` with neither): :meth:`for_task` may swap it for the
    task's own default."""

    def __post_init__(self) -> None:
        if (self.max_accuracy_drop is None) == (self.min_agreement is None):
            raise OptimizeError("give one budget: --max-accuracy-drop P or --min-agreement F")
        drop = self.max_accuracy_drop
        if drop is not None and not (math.isfinite(drop) and 0 <= drop <= 100):
            raise OptimizeError(f"--max-accuracy-drop must be 0..100 points, got {drop}")
        agree = self.min_agreement
        if agree is not None and not (math.isfinite(agree) and 0 <= agree <= 1):
            raise OptimizeError(f"--min-agreement must be between 0 and 1, got {agree}")

    @classmethod
    def of(cls, max_accuracy_drop: float | None, min_agreement: float | None) -> Budget:
        """The budget given on the command line; the default when neither is
        (:data:`DEFAULT_MIN_AGREEMENT`, which :meth:`for_task` turns into
        :data:`DEFAULT_MAX_F1_DROP` points of F1 for a detector)."""
        if max_accuracy_drop is None and min_agreement is None:
            return cls(min_agreement=DEFAULT_MIN_AGREEMENT, default=True)
        return cls(max_accuracy_drop, min_agreement)

    def for_task(self, detection: bool) -> Budget:
        """The budget to judge with: a default budget becomes ``--max-accuracy-drop``
        :data:`DEFAULT_MAX_F1_DROP` (points of detection F1) when ``detection`` (the
        held-out samples carry boxes); a chosen one stays as it is."""
        if self.default and detection:
            return Budget(max_accuracy_drop=DEFAULT_MAX_F1_DROP, default=True)
        return self

    def describe(self) -> str:
        if self.max_accuracy_drop is not None:
            return f"accuracy drop <= {self.max_accuracy_drop:g} points"
        return f"top-1 agreement >= {self.min_agreement:g}"


def judge(
    budget: Budget,
    agreement: float,
    accuracy: float | None,
    original_accuracy: float | None,
    metric: str = "accuracy",
) -> tuple[bool, str]:
    """(accepted, reason): whether a variant with these figures is within ``budget``, and
    the figure that decided it; ``metric`` names what ``accuracy`` is (a detector's F1)."""
    if budget.max_accuracy_drop is not None:
        if accuracy is not None and original_accuracy is not None:
            drop = (original_accuracy - accuracy) * 100
            what = f"{metric} drop {drop:.2f} points"
        else:
            drop = (1 - agreement) * 100
            what = f"no labels: disagreement with the original {drop:.2f} points"
        ok = drop <= budget.max_accuracy_drop + 1e-9
        sign = "<=" if ok else ">"
        return ok, f"{what} {sign} {budget.max_accuracy_drop:g}"
    assert budget.min_agreement is not None
    ok = agreement >= budget.min_agreement - 1e-12
    sign = ">=" if ok else "<"
    return ok, f"agreement {agreement:.4f} {sign} {budget.min_agreement:g}"
