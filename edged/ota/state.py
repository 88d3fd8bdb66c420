"""The rules of an over-the-air update, with no I/O: states, the transition table, the
health-window verdict and what to do after a crash.

The updater (``edged.ota.updater``) does the I/O and asks this module what is allowed; the store
(``edged.ota.store``) persists every record ``advance`` returns before the next stage starts.
Compare python-tuf's ``trusted_metadata_set.py`` (rules) beside ``updater.py`` (I/O)::

    IDLE|COMMITTED|ROLLED_BACK|FAILED --START--> DOWNLOADING --FETCHED--> VERIFIED
        --UNPACKED--> STAGED --ACTIVATE--> WARMING --SWITCHED--> ACTIVE_TRIAL
        --HEALTHY--> COMMITTED
        --ROLLBACK--> ROLLING_BACK --ROLLED_BACK--> ROLLED_BACK
    DOWNLOADING|VERIFIED|STAGED|WARMING|ROLLING_BACK --FAIL--> FAILED
    IDLE|COMMITTED|ROLLED_BACK|FAILED --ROLLBACK--> ROLLING_BACK   (an explicit Rollback)
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edged.core.errors import EdgedError, InvalidInputError


class State(enum.StrEnum):
    """Where one update of one model stands."""

    IDLE = "IDLE"
    """No update has run for the model."""
    DOWNLOADING = "DOWNLOADING"
    """Refreshing TUF metadata and downloading the target."""
    VERIFIED = "VERIFIED"
    """The downloaded target matches the length and hashes its signed metadata gives."""
    STAGED = "STAGED"
    """The bundle is unpacked and checked; its version folder is in the repository."""
    WARMING = "WARMING"
    """ACTIVE names the new version, which loads, warms up and runs its self-test."""
    ACTIVE_TRIAL = "ACTIVE_TRIAL"
    """The new version serves; its health window is open."""
    COMMITTED = "COMMITTED"
    """The new version passed and is the committed version."""
    ROLLING_BACK = "ROLLING_BACK"
    """Going back to the committed version (or, for a Rollback, the version asked for)."""
    ROLLED_BACK = "ROLLED_BACK"
    """Back on the earlier version."""
    FAILED = "FAILED"
    """Stopped before the new version served; the committed version serves."""


class Event(enum.StrEnum):
    """What happened to an update."""

    START = "START"
    """An update begins."""
    FETCHED = "FETCHED"
    """The target was downloaded and TUF verified it."""
    UNPACKED = "UNPACKED"
    """The bundle was unpacked, checked, and its version folder renamed into place."""
    ACTIVATE = "ACTIVATE"
    """About to write ACTIVE naming the new version and load it."""
    SWITCHED = "SWITCHED"
    """The new version passed its self-test and took over the traffic."""
    HEALTHY = "HEALTHY"
    """The health window passed."""
    ROLLBACK = "ROLLBACK"
    """The health window failed, or a Rollback was asked for."""
    ROLLED_BACK = "ROLLED_BACK"
    """The earlier version serves again."""
    FAIL = "FAIL"
    """A stage before the switch failed (or a rollback could not finish)."""


class Kind(enum.StrEnum):
    """What an update record is for."""

    UPDATE = "update"
    """Install and switch to a new version."""
    ROLLBACK = "rollback"
    """Go back to an earlier version already in the repository."""
    FINE_TUNE = "fine-tune"
    """Install and switch to a version made on the device by a fine-tune job: the states of
    an update, with DOWNLOADING standing for taking the job's output."""


#: states an update can rest in; a new update or rollback may start from each
AT_REST = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED})

#: (state, event) -> next state; every pair not listed is refused
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    **{(s, Event.START): State.DOWNLOADING for s in AT_REST},
    **{(s, Event.ROLLBACK): State.ROLLING_BACK for s in AT_REST},
    (State.DOWNLOADING, Event.FETCHED): State.VERIFIED,
    (State.VERIFIED, Event.UNPACKED): State.STAGED,
    (State.STAGED, Event.ACTIVATE): State.WARMING,
    (State.WARMING, Event.SWITCHED): State.ACTIVE_TRIAL,
    (State.ACTIVE_TRIAL, Event.HEALTHY): State.COMMITTED,
    (State.ACTIVE_TRIAL, Event.ROLLBACK): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.ROLLED_BACK,
    (State.DOWNLOADING, Event.FAIL): State.FAILED,
    (State.VERIFIED, Event.FAIL): State.FAILED,
    (State.STAGED, Event.FAIL): State.FAILED,
    (State.WARMING, Event.FAIL): State.FAILED,
    (State.ROLLING_BACK, Event.FAIL): State.FAILED,
}


class TransitionError(Exception):
    """An event that the current state does not allow (a bug in the caller, or a request
    that arrived at the wrong time)."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"event {event} is not allowed in state {state}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``.

    Raises:
        TransitionError: the table has no such transition.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(state, event) from None


@dataclass(frozen=True)
class Transition:
    """One step of an update's history."""

    state: State
    at: float
    """Wall-clock seconds since the epoch."""
    reason: str = ""


@dataclass(frozen=True)
class UpdateRecord:
    """One update (or rollback) of one model, as persisted after each transition."""

    id: int
    model: str
    kind: Kind
    state: State
    requested: str
    """What was asked for: a version number or "latest"."""
    from_version: int | None
    """The committed version when the update started (None: the model served nothing)."""
    to_version: int | None
    """The version installed or rolled back to; None until "latest" is resolved."""
    started_at: float
    updated_at: float
    finished_at: float | None = None
    error: str = ""
    installed: bool = False
    """This update created the version folder (so undoing the update removes it)."""
    target_path: str = ""
    """The TUF target path once resolved (models/<name>/<version>.tar.gz)."""

    @property
    def at_rest(self) -> bool:
        """The update is over: nothing is in progress for this model."""
        return self.state in AT_REST


def advance(
    record: UpdateRecord,
    event: Event,
    at: float,
    *,
    reason: str = "",
    **changes: object,
) -> UpdateRecord:
    """The record after ``event`` at time ``at``; ``reason`` becomes the record's error for
    ROLLBACK and FAIL; ``changes`` set other fields (``to_version``, ``installed``, ...).

    Raises:
        TransitionError: the event is not allowed in the record's state.
    """
    state = next_state(record.state, event)
    fields: dict[str, object] = {"state": state, "updated_at": at, **changes}
    if event in (Event.ROLLBACK, Event.FAIL) and reason:
        fields["error"] = reason
    if state in AT_REST:
        fields["finished_at"] = at
    return dataclasses.replace(record, **fields)  # type: ignore[arg-type]


def rollback_target(record: UpdateRecord) -> int | None:
    """The version a rollback of ``record`` ends on: the one asked for by a Rollback, else
    the version committed before the update."""
    return record.to_version if record.kind is Kind.ROLLBACK else record.from_version


def committed_after(record: UpdateRecord) -> int | None:
    """The committed version once ``record`` is in its state: the new version after COMMITTED,
    the rollback target after ROLLED_BACK, else the version committed before."""
    if record.state is State.COMMITTED:
        return record.to_version
    if record.state is State.ROLLED_BACK:
        return rollback_target(record)
    return record.from_version


def check_requested_version(requested: int, committed: int | None, *, rollback: bool) -> str | None:
    """Why ``requested`` may not be installed over ``committed``, or None when it may.

    An update never goes below the committed version (the repository's signed metadata is
    never older than what the device had, and neither are its models); a Rollback does, and
    only it does. Asking for the committed version itself is refused by both: nothing would
    change.
    """
    if committed is None:
        return None
    if requested == committed:
        return f"version {requested} is the committed version already"
    if rollback and requested > committed:
        return (
            f"a rollback goes to an earlier version; {requested} is above the committed "
            f"version {committed} (use StartUpdate)"
        )
    if not rollback and requested < committed:
        return (
            f"version {requested} is below the committed version {committed}; "
            "only Rollback goes back"
        )
    return None


def rollback_version(available: Sequence[int], committed: int | None) -> int | None:
    """What a Rollback without a version goes back to: the highest version folder below the
    committed version (``available`` are the folders in the repository), or None."""
    if committed is None:
        return None
    below = [v for v in available if v < committed]
    return max(below) if below else None


# -- the health window ---------------------------------------------------------------------


@dataclass(frozen=True)
class HealthPolicy:
    """What the new version must show during its health window."""

    window_s: float
    """How long the window stays open."""
    min_requests: int
    """Fewest requests the rates are judged on; with fewer by the end of the window the
    version is committed on the strength of its self-test."""
    max_error_rate: float
    """Highest share of failed requests (0..1)."""
    max_p99_s: float
    """Highest 99th-percentile request latency; 0: not judged."""
    ignored_errors: tuple[type[EdgedError], ...] = (InvalidInputError,)
    """Failures that are the client's fault, not the model's: these domain error types and
    their subclasses (a request the model could not take says nothing of the model)."""


@dataclass(frozen=True)
class HealthSample:
    """What a version did during (part of) its window: counts and a latency histogram."""

    successes: int = 0
    failures_by_error: Mapping[type[EdgedError], int] = dataclasses.field(default_factory=dict)
    """Failed requests by the domain error they failed with."""
    latency_bounds: tuple[float, ...] = ()
    """Upper bounds (seconds) of the latency buckets; a last bucket (+Inf) follows them."""
    latency_counts: tuple[int, ...] = ()
    """Requests per bucket (not cumulative), len(latency_bounds) + 1 of them."""

    def minus(self, earlier: HealthSample) -> HealthSample:
        """What happened between ``earlier`` and this sample (both cumulative)."""
        failed = {
            error: count - earlier.failures_by_error.get(error, 0)
            for error, count in self.failures_by_error.items()
        }
        counts = self.latency_counts
        if earlier.latency_counts:
            counts = tuple(
                a - b for a, b in zip(self.latency_counts, earlier.latency_counts, strict=True)
            )
        return HealthSample(
            successes=self.successes - earlier.successes,
            failures_by_error={e: n for e, n in failed.items() if n},
            latency_bounds=self.latency_bounds,
            latency_counts=counts,
        )


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float:
    """The ``q`` quantile of a bucketed distribution, interpolated linearly inside its bucket
    (as Prometheus' histogram_quantile); ``inf`` when it falls in the last (+Inf) bucket; 0
    for no observations."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    running = 0
    for i, count in enumerate(counts):
        if count and running + count >= rank:
            if i >= len(bounds):
                return math.inf
            low = bounds[i - 1] if i > 0 else 0.0
            return low + (bounds[i] - low) * (rank - running) / count
        running += count
    return math.inf


class Verdict(enum.StrEnum):
    """The health window's answer so far."""

    WAIT = "WAIT"
    """The window is open and nothing is wrong yet."""
    HEALTHY = "HEALTHY"
    """Commit."""
    UNHEALTHY = "UNHEALTHY"
    """Roll back."""


@dataclass(frozen=True)
class HealthJudgement:
    """A verdict and why."""

    verdict: Verdict
    reason: str
    requests: int = 0
    error_rate: float = 0.0
    p99_s: float = 0.0


def judge_health(policy: HealthPolicy, sample: HealthSample, elapsed_s: float) -> HealthJudgement:
    """Judge the new version on what it did during the first ``elapsed_s`` of its window.

    UNHEALTHY as soon as at least ``min_requests`` requests show an error rate or a p99
    latency above the limits (no need to wait out the window for a broken model); HEALTHY once
    the window is over and no limit was broken (or too few requests came to judge); WAIT
    otherwise.
    """
    counted = {
        error: n
        for error, n in sample.failures_by_error.items()
        if not issubclass(error, policy.ignored_errors)
    }
    failures = sum(counted.values())
    requests = sample.successes + failures
    error_rate = failures / requests if requests else 0.0
    p99 = quantile(sample.latency_bounds, sample.latency_counts, 0.99)

    def judged(verdict: Verdict, reason: str) -> HealthJudgement:
        return HealthJudgement(verdict, reason, requests, error_rate, p99)

    enough = requests >= max(policy.min_requests, 1)
    if enough and error_rate > policy.max_error_rate:
        errors = ", ".join(sorted(f"{error.__name__} x{n}" for error, n in counted.items()))
        return judged(
            Verdict.UNHEALTHY,
            f"error rate {error_rate:.1%} over {requests} requests is above "
            f"{policy.max_error_rate:.1%} ({errors})",
        )
    if enough and policy.max_p99_s > 0 and p99 > policy.max_p99_s:
        shown = "beyond the last bucket" if math.isinf(p99) else f"{p99 * 1000:.0f} ms"
        return judged(
            Verdict.UNHEALTHY,
            f"p99 latency {shown} over {requests} requests is above "
            f"{policy.max_p99_s * 1000:.0f} ms",
        )
    if elapsed_s < policy.window_s:
        return judged(Verdict.WAIT, "window open")
    if not enough:
        return judged(
            Verdict.HEALTHY,
            f"only {requests} requests in the window (fewer than {policy.min_requests}): "
            "committed on its self-test",
        )
    return judged(Verdict.HEALTHY, "healthy")


# -- recovery after a crash ----------------------------------------------------------------


class Recovery(enum.StrEnum):
    """What a starting daemon does about an update that was in progress."""

    NOTHING = "NOTHING"
    """The update was at rest."""
    DISCARD = "DISCARD"
    """The new version never served: remove what was staged, ACTIVE back to the committed
    version, FAIL."""
    ROLL_BACK = "ROLL_BACK"
    """The new version was on trial and never committed: ROLLBACK to the committed version."""
    FINISH_ROLLBACK = "FINISH_ROLLBACK"
    """A rollback was under way: ACTIVE to its target, ROLLED_BACK."""


RECOVERY: Mapping[State, Recovery] = {
    State.IDLE: Recovery.NOTHING,
    State.DOWNLOADING: Recovery.DISCARD,
    State.VERIFIED: Recovery.DISCARD,
    State.STAGED: Recovery.DISCARD,
    State.WARMING: Recovery.DISCARD,
    State.ACTIVE_TRIAL: Recovery.ROLL_BACK,
    State.COMMITTED: Recovery.NOTHING,
    State.ROLLING_BACK: Recovery.FINISH_ROLLBACK,
    State.ROLLED_BACK: Recovery.NOTHING,
    State.FAILED: Recovery.NOTHING,
}


def recovery_for(record: UpdateRecord) -> Recovery:
    """What to do at start-up about ``record``, the model's latest update."""
    return RECOVERY[record.state]


def recovery_reason(record: UpdateRecord) -> str:
    """The error recorded for an update a restart interrupted."""
    return f"interrupted in {record.state} by a daemon restart"
