"""edged.ota.state: the transition table (every state x every event), the health window and
the recovery rule."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from edged.core.errors import (
    EdgedError,
    ExecutorError,
    ExecutorTimeoutError,
    InvalidInputError,
    UnavailableError,
)
from edged.ota.state import (
    AT_REST,
    RECOVERY,
    TRANSITIONS,
    Event,
    HealthPolicy,
    HealthSample,
    Kind,
    Recovery,
    State,
    TransitionError,
    UpdateRecord,
    Verdict,
    advance,
    check_requested_version,
    committed_after,
    judge_health,
    next_state,
    quantile,
    recovery_for,
    recovery_reason,
    rollback_target,
    rollback_version,
)

S, E = State, Event

#: the whole table, written out once more by hand: (state, event) -> next state
EXPECTED: dict[tuple[State, Event], State] = {
    (S.IDLE, E.START): S.DOWNLOADING,
    (S.COMMITTED, E.START): S.DOWNLOADING,
    (S.ROLLED_BACK, E.START): S.DOWNLOADING,
    (S.FAILED, E.START): S.DOWNLOADING,
    (S.IDLE, E.ROLLBACK): S.ROLLING_BACK,
    (S.COMMITTED, E.ROLLBACK): S.ROLLING_BACK,
    (S.ROLLED_BACK, E.ROLLBACK): S.ROLLING_BACK,
    (S.FAILED, E.ROLLBACK): S.ROLLING_BACK,
    (S.DOWNLOADING, E.FETCHED): S.VERIFIED,
    (S.VERIFIED, E.UNPACKED): S.STAGED,
    (S.STAGED, E.ACTIVATE): S.WARMING,
    (S.WARMING, E.SWITCHED): S.ACTIVE_TRIAL,
    (S.ACTIVE_TRIAL, E.HEALTHY): S.COMMITTED,
    (S.ACTIVE_TRIAL, E.ROLLBACK): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.ROLLED_BACK,
    (S.DOWNLOADING, E.FAIL): S.FAILED,
    (S.VERIFIED, E.FAIL): S.FAILED,
    (S.STAGED, E.FAIL): S.FAILED,
    (S.WARMING, E.FAIL): S.FAILED,
    (S.ROLLING_BACK, E.FAIL): S.FAILED,
}

ALL_PAIRS = list(itertools.product(State, Event))


def test_table_is_the_expected_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_every_state_and_event(state: State, event: Event) -> None:
    if (state, event) in EXPECTED:
        assert next_state(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(TransitionError) as info:
            next_state(state, event)
        assert info.value.state is state
        assert info.value.event is event
        assert str(state) in str(info.value)
        assert str(event) in str(info.value)


def test_every_state_is_reachable_and_every_busy_state_can_end() -> None:
    reached = {State.IDLE}
    frontier = [State.IDLE]
    while frontier:
        state = frontier.pop()
        for (s, _), target in TRANSITIONS.items():
            if s is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)
    for state in set(State) - AT_REST:
        # from every busy state some path leads to rest
        seen, todo = {state}, [state]
        while todo and not (seen & AT_REST):
            current = todo.pop()
            for (s, _), target in TRANSITIONS.items():
                if s is current and target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert seen & AT_REST, state


def _record(state: State = State.DOWNLOADING, kind: Kind = Kind.UPDATE, **kw: object):
    values: dict[str, object] = {
        "id": 1,
        "model": "digits",
        "kind": kind,
        "state": state,
        "requested": "latest",
        "from_version": 1,
        "to_version": 2,
        "started_at": 100.0,
        "updated_at": 100.0,
        **kw,
    }
    return UpdateRecord(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=[f"{s}-{e}" for s, e in ALL_PAIRS])
def test_advance_every_state_and_event(state: State, event: Event) -> None:
    record = _record(state)
    if (state, event) not in EXPECTED:
        with pytest.raises(TransitionError):
            advance(record, event, 200.0)
        return
    after = advance(record, event, 200.0, reason="because")
    assert after.state is EXPECTED[(state, event)]
    assert after.updated_at == 200.0
    assert after.started_at == 100.0
    assert after.finished_at == (200.0 if after.state in AT_REST else None)
    assert after.at_rest is (after.state in AT_REST)
    assert after.error == ("because" if event in (Event.ROLLBACK, Event.FAIL) else "")
    assert record.state is state  # records are values


def test_advance_sets_fields() -> None:
    after = advance(_record(), Event.FETCHED, 5.0, to_version=7, target_path="models/d/7.tar.gz")
    assert (after.to_version, after.target_path) == (7, "models/d/7.tar.gz")
    after = advance(_record(State.VERIFIED), Event.UNPACKED, 6.0, installed=True)
    assert after.installed


@pytest.mark.parametrize(
    ("state", "kind", "expected"),
    [
        (State.COMMITTED, Kind.UPDATE, 2),
        (State.ROLLED_BACK, Kind.UPDATE, 1),
        (State.ROLLED_BACK, Kind.ROLLBACK, 2),
        (State.FAILED, Kind.UPDATE, 1),
        (State.ACTIVE_TRIAL, Kind.UPDATE, 1),
        (State.ROLLING_BACK, Kind.ROLLBACK, 1),
        (State.FAILED, Kind.ROLLBACK, 1),
    ],
)
def test_committed_after(state: State, kind: Kind, expected: int) -> None:
    assert committed_after(_record(state, kind)) == expected


def test_rollback_target() -> None:
    assert rollback_target(_record(State.ROLLING_BACK, Kind.UPDATE)) == 1
    assert rollback_target(_record(State.ROLLING_BACK, Kind.ROLLBACK)) == 2


@pytest.mark.parametrize(
    ("requested", "committed", "rollback", "refused"),
    [
        (2, 1, False, False),
        (2, None, False, False),
        (1, None, True, False),
        (1, 2, False, True),  # a downgrade by StartUpdate
        (1, 2, True, False),  # ... is what Rollback is for
        (3, 2, True, True),  # Rollback never goes up
        (2, 2, False, True),
        (2, 2, True, True),
    ],
)
def test_check_requested_version(
    requested: int, committed: int | None, rollback: bool, refused: bool
) -> None:
    why = check_requested_version(requested, committed, rollback=rollback)
    assert (why is not None) is refused
    if why:
        assert str(requested) in why


@pytest.mark.parametrize(
    ("available", "committed", "expected"),
    [([1, 2, 3], 3, 2), ([1, 3], 3, 1), ([3], 3, None), ([1, 2], None, None), ([1, 5], 3, 1)],
)
def test_rollback_version(available: list[int], committed: int | None, expected: int) -> None:
    assert rollback_version(available, committed) == expected


# --------------------------------------------------------------------------- recovery

RECOVERY_EXPECTED = {
    S.IDLE: Recovery.NOTHING,
    S.DOWNLOADING: Recovery.DISCARD,
    S.VERIFIED: Recovery.DISCARD,
    S.STAGED: Recovery.DISCARD,
    S.WARMING: Recovery.DISCARD,
    S.ACTIVE_TRIAL: Recovery.ROLL_BACK,
    S.COMMITTED: Recovery.NOTHING,
    S.ROLLING_BACK: Recovery.FINISH_ROLLBACK,
    S.ROLLED_BACK: Recovery.NOTHING,
    S.FAILED: Recovery.NOTHING,
}


@pytest.mark.parametrize("state", list(State))
def test_recovery_for_every_state(state: State) -> None:
    record = _record(state)
    action = recovery_for(record)
    assert action is RECOVERY_EXPECTED[state]
    assert (action is Recovery.NOTHING) is (state in AT_REST)
    # each action is a legal path from that state to rest
    if action is Recovery.DISCARD:
        assert next_state(state, Event.FAIL) is State.FAILED
    elif action is Recovery.ROLL_BACK:
        assert next_state(next_state(state, Event.ROLLBACK), Event.ROLLED_BACK) in AT_REST
    elif action is Recovery.FINISH_ROLLBACK:
        assert next_state(state, Event.ROLLED_BACK) in AT_REST
    assert str(state) in recovery_reason(record)


def test_recovery_covers_every_state() -> None:
    assert set(RECOVERY) == set(State)


def test_recovered_trial_keeps_the_committed_version() -> None:
    # the trial never got committed: after the recovery's rollback, the old version is committed
    trial = _record(State.ACTIVE_TRIAL)
    back = advance(advance(trial, Event.ROLLBACK, 1.0, reason="restart"), Event.ROLLED_BACK, 2.0)
    assert committed_after(back) == 1
    assert back.error == "restart"


# --------------------------------------------------------------------------- health window

BOUNDS = (0.001, 0.01, 0.1, 1.0)


def _sample(
    ok: int, failed: dict[type[EdgedError], int] | None = None, counts=(0, 0, 0, 0, 0)
) -> HealthSample:
    return HealthSample(ok, failed or {}, BOUNDS, tuple(counts))


POLICY = HealthPolicy(window_s=10.0, min_requests=10, max_error_rate=0.05, max_p99_s=0.05)


def test_quantile() -> None:
    assert quantile(BOUNDS, (0, 0, 0, 0, 0), 0.99) == 0.0
    assert quantile(BOUNDS, (100, 0, 0, 0, 0), 0.5) == pytest.approx(0.0005)
    assert quantile(BOUNDS, (0, 100, 0, 0, 0), 0.99) == pytest.approx(0.001 + 0.009 * 0.99)
    assert quantile(BOUNDS, (98, 0, 2, 0, 0), 0.99) == pytest.approx(0.01 + 0.09 * 0.5)
    assert quantile(BOUNDS, (0, 0, 0, 0, 1), 0.99) == math.inf


@pytest.mark.parametrize(
    ("sample", "elapsed", "verdict", "words"),
    [
        pytest.param(_sample(5, counts=(5, 0, 0, 0, 0)), 1.0, Verdict.WAIT, "open", id="early"),
        pytest.param(
            _sample(100, counts=(100, 0, 0, 0, 0)), 10.0, Verdict.HEALTHY, "healthy", id="healthy"
        ),
        pytest.param(
            _sample(3, counts=(3, 0, 0, 0, 0)), 10.0, Verdict.HEALTHY, "only 3", id="too-few"
        ),
        pytest.param(
            _sample(0, {ExecutorError: 4}), 10.0, Verdict.HEALTHY, "only 4", id="few-all-failed"
        ),
        pytest.param(
            _sample(90, {ExecutorError: 10}, (90, 0, 0, 0, 0)),
            1.0,
            Verdict.UNHEALTHY,
            "error rate 10.0%",
            id="errors-fail-early",
        ),
        pytest.param(
            _sample(96, {ExecutorError: 4}, (96, 0, 0, 0, 0)),
            10.0,
            Verdict.HEALTHY,
            "healthy",
            id="errors-under-limit",
        ),
        pytest.param(
            _sample(50, {InvalidInputError: 50}, (50, 0, 0, 0, 0)),
            10.0,
            Verdict.HEALTHY,
            "healthy",
            id="client-errors-ignored",
        ),
        pytest.param(
            _sample(20, counts=(0, 0, 0, 20, 0)),
            1.0,
            Verdict.UNHEALTHY,
            "p99 latency",
            id="slow-fails-early",
        ),
        pytest.param(
            _sample(20, counts=(0, 0, 0, 0, 20)),
            1.0,
            Verdict.UNHEALTHY,
            "beyond the last bucket",
            id="slower-than-buckets",
        ),
    ],
)
def test_judge_health(sample: HealthSample, elapsed: float, verdict: Verdict, words: str) -> None:
    judgement = judge_health(POLICY, sample, elapsed)
    assert judgement.verdict is verdict
    assert words in judgement.reason


class _BadTensorError(InvalidInputError):
    """A finer kind of invalid request: still the client's fault."""


def test_failures_are_judged_by_domain_error_type() -> None:
    # the client's errors (and their subclasses) are ignored; a timeout on the executor is the
    # model's, whatever status code the wire gives it (DEADLINE_EXCEEDED)
    clients = _sample(50, {InvalidInputError: 30, _BadTensorError: 20}, (50, 0, 0, 0, 0))
    assert judge_health(POLICY, clients, 10.0).verdict is Verdict.HEALTHY
    hung = _sample(90, {ExecutorTimeoutError: 6, ExecutorError: 4}, (90, 0, 0, 0, 0))
    judgement = judge_health(POLICY, hung, 1.0)
    assert judgement.verdict is Verdict.UNHEALTHY
    assert "(ExecutorError x4, ExecutorTimeoutError x6)" in judgement.reason


def test_latency_not_judged_when_off() -> None:
    policy = dataclasses.replace(POLICY, max_p99_s=0.0)
    slow = _sample(20, counts=(0, 0, 0, 0, 20))
    assert judge_health(policy, slow, 10.0).verdict is Verdict.HEALTHY


def test_sample_minus() -> None:
    before = _sample(10, {ExecutorError: 1}, (5, 5, 0, 0, 0))
    after = _sample(30, {ExecutorError: 4, UnavailableError: 1}, (15, 5, 10, 0, 0))
    delta = after.minus(before)
    assert delta.successes == 20
    assert dict(delta.failures_by_error) == {ExecutorError: 3, UnavailableError: 1}
    assert delta.latency_counts == (10, 0, 10, 0, 0)
    assert after.minus(HealthSample()) == after
