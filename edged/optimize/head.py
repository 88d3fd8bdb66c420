"""Methods on a model's trainable head (a ``[learn]`` model: frozen backbone + head.npz):
structured pruning with a re-fit, distillation into a smaller student, and
quantisation-aware fine-tuning. Training is edged.learn's NumPy code."""

from __future__ import annotations

from collections.abc import Callable

from edged.optimize.data import ModelSource, Samples
from edged.optimize.methods import Options, Produced

HeadMethod = Callable[[ModelSource, "object", Samples, Options], Produced]

METHODS: dict[str, Callable[..., Produced]] = {}
