"""The failure ``edged optimize`` names: a model, calibration set or budget it cannot use."""

from __future__ import annotations

from edged.core.errors import EdgedError


class OptimizeError(EdgedError):
    """The model, the calibration data, a method or the budget cannot be used; the message
    names the file, input or option and says why."""
