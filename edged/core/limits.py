"""Bounds on the work one request may cause, checked by every frontend before it decodes
anything expensive (``limits.*`` in the configuration)."""

from __future__ import annotations

from dataclasses import dataclass

from edged.core.errors import OverloadedError


@dataclass(frozen=True)
class RequestLimits:
    """Counts a request may not pass (``limits.max_*``); passing one is RESOURCE_EXHAUSTED."""

    max_inputs: int = 256
    max_outputs: int = 256
    max_parameters: int = 64

    def check(self, *, inputs: int, outputs: int, parameters: int) -> None:
        """Check a request's counts of inputs, requested outputs and parameters.

        Raises:
            OverloadedError: a count is over its limit; names the limit's key.
        """
        for count, cap, what, key in (
            (inputs, self.max_inputs, "input tensors", "limits.max_inputs"),
            (outputs, self.max_outputs, "requested outputs", "limits.max_outputs"),
            (parameters, self.max_parameters, "parameters", "limits.max_parameters"),
        ):
            if count > cap:
                raise OverloadedError(
                    f"the request has {count} {what}, over the limit of {cap} ({key})"
                )

    def check_tensor_parameters(self, what: str, count: int) -> None:
        """Check the parameter count of one tensor, named ``what``.

        Raises:
            OverloadedError: over ``max_parameters``.
        """
        if count > self.max_parameters:
            raise OverloadedError(
                f"{what} has {count} parameters, over the limit of {self.max_parameters} "
                "(limits.max_parameters)"
            )
