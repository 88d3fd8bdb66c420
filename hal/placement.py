"""Placement and failover rules: which executors may run a model, which one wins, and when
one that keeps failing is taken out of rotation.

Everything here is pure: no I/O, no clock (callers pass ``now``, a ``time.monotonic()``
reading), no threads. The serving layer (``edged.serving.manager``) does the loading, the
timing and the swapping around these rules.

- :func:`place` turns a model's preference list, its artifact format and the probe's reports
  into a :class:`Plan`: the candidates, best first, and the kinds skipped with the reason.
- :func:`rank_by_speed` orders candidates by their median warm-up time (``placement = "auto"``).
- :class:`CircuitBreaker` is the state machine kept per (model version, executor):
  closed -> open after N consecutive failures -> half-open once ``retry_after_s`` has passed
  -> closed on a successful probe (or open again on a failed one).
- :func:`failover_targets` and :func:`recovery_targets` say where a model may move next.
- :func:`outputs_disagree` compares two executors' answers to the same warm-up inputs.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edged.core.types import Array
from hal.report import DeviceReport

#: Executors to try for each artifact format when model.toml lists none, best first.
DEFAULT_EXECUTORS: Mapping[str, tuple[str, ...]] = {
    "onnx": ("cuda", "cpu-onnx"),
    "tflite": ("cpu-litert",),
    # A model compiled by edgetpu_compiler (*_edgetpu.tflite): only the Edge TPU runs its
    # edgetpu-custom-op, and cpu-litert refuses it.
    "edgetpu-tflite": ("edgetpu",),
    "pynq-bundle": ("pynq",),
}

#: model.toml's ``placement``: take the first candidate that loads and warms up, or time
#: every candidate and keep the fastest.
PLACEMENT_MODES = ("first", "auto")

#: Timed warm-up runs per candidate with ``placement = "auto"`` (after one untimed run).
AUTO_TIMED_RUNS = 5


def default_executors(fmt: str) -> tuple[str, ...]:
    """The executor kinds that run ``fmt``, best first (() for an unknown format)."""
    return DEFAULT_EXECUTORS.get(fmt, ())


@dataclass(frozen=True)
class Plan:
    """Where a model may run on this host."""

    candidates: tuple[str, ...]
    """Kinds the probe reports present and able to run the format, in preference order."""
    skipped: tuple[tuple[str, str], ...] = ()
    """(kind, reason) for each preferred kind that cannot run it here."""

    def why_none(self) -> str:
        """Every skipped kind and why, for an error message."""
        return "; ".join(f"{kind}: {reason}" for kind, reason in self.skipped) or "none listed"


def place(preference: Sequence[str], fmt: str, reports: Sequence[DeviceReport] | None) -> Plan:
    """The candidates among ``preference`` (model.toml's ``executors``, or
    :func:`default_executors`) for an artifact of format ``fmt``.

    With ``reports`` (``hal.probe()``), a kind is skipped when no report names it (no package
    registers it), when it does not run ``fmt`` (present or not), or when its report says it
    is absent (with the probe's reason). Without reports nothing is filtered: each executor's
    own ``load`` refuses what it cannot run. Duplicates keep their first place.
    """
    candidates: list[str] = []
    skipped: list[tuple[str, str]] = []
    by_kind = {r.kind: r for r in reports} if reports is not None else None
    for kind in dict.fromkeys(preference):
        if by_kind is None:
            candidates.append(kind)
            continue
        report = by_kind.get(kind)
        if report is None:
            installed = ", ".join(sorted(by_kind)) or "none"
            skipped.append((kind, f"no executor '{kind}' is installed (installed: {installed})"))
        elif report.formats and fmt not in report.formats:
            skipped.append(
                (kind, f"runs {', '.join(report.formats)}, not this model's format '{fmt}'")
            )
        elif not report.present:
            skipped.append((kind, report.reason or "the probe reports it absent"))
        else:
            candidates.append(kind)
    return Plan(tuple(candidates), tuple(skipped))


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (inf when empty)."""
    return float(statistics.median(values)) if values else math.inf


def rank_by_speed(order: Sequence[str], timings: Mapping[str, float]) -> tuple[str, ...]:
    """``order``'s kinds, those timed (``timings``: kind -> median seconds) fastest first,
    ties broken by ``order``; kinds without a timing keep their order after them."""
    position = {kind: i for i, kind in enumerate(order)}
    timed = sorted((k for k in order if k in timings), key=lambda k: (timings[k], position[k]))
    return (*timed, *(k for k in order if k not in timings))


# -- the circuit breaker --------------------------------------------------------------------


class BreakerState(enum.StrEnum):
    """A circuit breaker's state."""

    CLOSED = "closed"
    """The executor is in rotation; consecutive failures are counted."""
    OPEN = "open"
    """Out of rotation until ``retry_after_s`` has passed since it opened."""
    HALF_OPEN = "half_open"
    """The cool-down has passed: the next probe (a trial load, or a live inference where
    the model could not leave the executor) decides between closed and open."""


@dataclass(frozen=True)
class BreakerPolicy:
    """Thresholds of every breaker (config ``[executors]``)."""

    failure_threshold: int = 3
    """Consecutive failures that open a closed breaker."""
    retry_after_s: float = 60.0
    """How long an open breaker waits before it is half-open."""


class CircuitBreaker:
    """The health of one executor for one model version. Pure: every call takes ``now``.

    Failures are executor failures (``ExecutorError``, timeouts included); a success resets
    the count. ``record_*`` return the new state when it changed, else None.
    """

    def __init__(self, policy: BreakerPolicy) -> None:
        if policy.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.policy = policy
        self.failures = 0
        """Consecutive failures while closed."""
        self.opened_at: float | None = None
        """When it last opened (None while closed)."""

    def state(self, now: float) -> BreakerState:
        """The state at ``now``: open turns half-open once the cool-down has passed."""
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now >= self.opened_at + self.policy.retry_after_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_at(self) -> float | None:
        """When an open breaker turns half-open (None while closed)."""
        return None if self.opened_at is None else self.opened_at + self.policy.retry_after_s

    def allows(self, now: float) -> bool:
        """Whether the executor may be tried now: closed, or half-open."""
        return self.state(now) is not BreakerState.OPEN

    def record_success(self, now: float) -> BreakerState | None:
        """A success: closed stays closed (count reset); half-open closes; a success during
        the cool-down is ignored (only a probe after it counts)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            self.failures = 0
            return None
        if state is BreakerState.HALF_OPEN:
            self.failures = 0
            self.opened_at = None
            return BreakerState.CLOSED
        return None

    def record_failure(self, now: float) -> BreakerState | None:
        """A failure: closed opens at the threshold; half-open opens again (a new cool-down);
        a failure during the cool-down changes nothing."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.policy.failure_threshold:
                self.opened_at = now
                return BreakerState.OPEN
            return None
        if state is BreakerState.HALF_OPEN:
            self.opened_at = now
            return BreakerState.OPEN
        return None

    def trip(self, now: float) -> BreakerState | None:
        """Open now whatever the count (the executor could not even load the model)."""
        was = self.state(now)
        self.failures = max(self.failures, self.policy.failure_threshold)
        self.opened_at = now
        return BreakerState.OPEN if was is not BreakerState.OPEN else None


def failover_targets(
    candidates: Sequence[str], current: str, breakers: Mapping[str, CircuitBreaker], now: float
) -> list[str]:
    """Where a model leaving ``current`` may go, in order: every other candidate whose
    breaker allows a try (closed, or half-open). A kind without a breaker is closed."""
    return [
        k for k in candidates if k != current and (k not in breakers or breakers[k].allows(now))
    ]


def recovery_targets(
    candidates: Sequence[str], current: str, breakers: Mapping[str, CircuitBreaker], now: float
) -> list[str]:
    """Better candidates to try again: those ranked above ``current`` whose breaker is
    half-open now, best first."""
    better = candidates[: candidates.index(current)] if current in candidates else candidates
    return [k for k in better if k in breakers and breakers[k].state(now) is BreakerState.HALF_OPEN]


def next_retry_at(
    candidates: Sequence[str], current: str, breakers: Mapping[str, CircuitBreaker]
) -> float | None:
    """When the earliest open breaker ranked above ``current`` turns half-open; None when no
    better candidate is waiting (the model is where it should be)."""
    better = candidates[: candidates.index(current)] if current in candidates else candidates
    times = [t for k in better if k in breakers and (t := breakers[k].retry_at()) is not None]
    return min(times) if times else None


# -- comparing answers ----------------------------------------------------------------------

#: float outputs agree within these (an fp16 engine or another runtime's kernels differ)
FLOAT_RTOL = 1e-2
FLOAT_ATOL = 1e-3


def outputs_disagree(expected: Mapping[str, Array], actual: Mapping[str, Array]) -> str | None:
    """None when ``actual`` answers like ``expected`` (same names, dtypes, shapes; floats
    within :data:`FLOAT_RTOL`/:data:`FLOAT_ATOL`; 8-bit integers (quantised) within 1; other
    values equal), else what differs."""
    if set(expected) != set(actual):
        return f"outputs {sorted(actual)} where {sorted(expected)} were expected"
    for name, want in expected.items():
        got = actual[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            return (
                f"output '{name}' is {got.dtype}{list(got.shape)}, "
                f"expected {want.dtype}{list(want.shape)}"
            )
        if want.dtype.kind == "f":
            close = np.allclose(got, want, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, equal_nan=True)
        elif want.dtype.kind in "iu" and want.dtype.itemsize == 1:
            close = bool(np.all(np.abs(got.astype(np.int16) - want.astype(np.int16)) <= 1))
        else:
            close = bool(np.array_equal(got, want))
        if not close:
            return f"output '{name}' differs from the serving executor's answer"
    return None
