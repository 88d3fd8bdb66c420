"""The rules of ``edged-fleet rollout`` (edged/fleet/rollout.py), with no I/O, table-driven; and
the command's usage errors (exit 2, naming the flag)."""

from __future__ import annotations

import pytest

from edged import fleet
from edged.fleet.rollout import (
    DeviceResult,
    Outcome,
    Rollout,
    UpdateView,
    already,
    parse_device,
    refused,
    settle,
    timed_out,
)

DEVICES = [f"10.0.0.{i}:50051" for i in range(1, 8)]  # seven devices


# -- waves -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "canary", "wave_size", "waves"),
    [
        (1, 1, None, [[0]]),
        (3, 1, None, [[0], [1], [2]]),  # default wave size: the canary's
        (3, 3, None, [[0, 1, 2]]),  # everything is the canary
        (7, 2, None, [[0, 1], [2, 3], [4, 5], [6]]),
        (7, 1, 3, [[0], [1, 2, 3], [4, 5, 6]]),
        (7, 1, 10, [[0], [1, 2, 3, 4, 5, 6]]),  # the rest at once
        (7, 3, 2, [[0, 1, 2], [3, 4], [5, 6]]),
    ],
)
def test_waves_are_the_canary_then_slices_in_order(
    n: int, canary: int, wave_size: int | None, waves: list[list[int]]
) -> None:
    plan = Rollout(DEVICES[:n], canary=canary, wave_size=wave_size)
    assert plan.waves == [[DEVICES[i] for i in wave] for wave in waves]


# -- halt or go on, and the verdict ------------------------------------------------------------

OK, BAD, ERR, LATE, SAME = (
    Outcome.COMMITTED,
    Outcome.FAILED,
    Outcome.ERROR,
    Outcome.TIMED_OUT,
    Outcome.ALREADY,
)


def drive(plan: Rollout, outcomes: dict[int, Outcome]) -> list[list[int]]:
    """Run ``plan`` with device i coming to ``outcomes.get(i, COMMITTED)``; returns the
    waves it started, as device indexes."""
    started = []
    while wave := plan.next_wave():
        started.append([DEVICES.index(d) for d in wave])
        plan.record(
            DeviceResult(d, outcomes.get(DEVICES.index(d), OK), "1", "2") for d in reversed(wave)
        )
    return started


@pytest.mark.parametrize(
    ("n", "canary", "wave_size", "k", "outcomes", "started", "status", "counts"),
    [
        # every device commits
        (3, 1, None, 0, {}, [[0], [1], [2]], "completed", (3, 0, 0)),
        # a failing canary halts at once; the rest are never asked
        (3, 1, None, 0, {0: BAD}, [[0]], "halted", (0, 1, 2)),
        (5, 2, 3, 0, {1: Outcome.ROLLED_BACK}, [[0, 1]], "halted", (1, 1, 3)),
        # ... unless the budget allows it
        (3, 1, None, 1, {0: BAD}, [[0], [1], [2]], "completed", (2, 1, 0)),
        # the canary passes, a later wave crosses the threshold: the waves after it are skipped
        (3, 1, None, 0, {1: BAD}, [[0], [1]], "halted", (1, 1, 1)),
        (7, 1, 2, 1, {2: ERR, 4: LATE}, [[0], [1, 2], [3, 4]], "halted", (3, 2, 2)),
        # a whole wave is judged: two failures in one wave both count
        (7, 1, 3, 1, {1: BAD, 2: BAD}, [[0], [1, 2, 3]], "halted", (2, 2, 3)),
        # exactly at the limit goes on
        (7, 1, 3, 2, {1: BAD, 2: BAD}, [[0], [1, 2, 3], [4, 5, 6]], "completed", (5, 2, 0)),
        # the last wave crosses the threshold: nothing to skip, but the rollout failed
        (3, 1, None, 0, {2: BAD}, [[0], [1], [2]], "failed", (2, 1, 0)),
        # "already at version" is a success
        (3, 1, None, 0, {0: SAME, 2: SAME}, [[0], [1], [2]], "completed", (3, 0, 0)),
    ],
)
def test_halt_or_go_on(
    n: int,
    canary: int,
    wave_size: int | None,
    k: int,
    outcomes: dict[int, Outcome],
    started: list[list[int]],
    status: str,
    counts: tuple[int, int, int],
) -> None:
    plan = Rollout(DEVICES[:n], canary=canary, wave_size=wave_size, max_failures=k)
    assert drive(plan, outcomes) == started
    verdict = plan.verdict()
    assert verdict.status == status
    assert (verdict.succeeded, verdict.failed, verdict.skipped) == counts
    assert verdict.exit_code == (0 if status == "completed" else 1)
    assert verdict.waves == len(started)
    assert plan.next_wave() == []  # over
    results = plan.results()
    assert [r.device for r in results] == DEVICES[:n]  # the order given
    asked = {i for wave in started for i in wave}
    for i, r in enumerate(results):
        if i in asked:
            assert r.outcome == outcomes.get(i, OK)
            assert r.wave == next(w + 1 for w, wave in enumerate(started) if i in wave)
        else:
            assert (r.outcome, r.wave, r.from_version, r.to_version) == (Outcome.SKIPPED, 0, "", "")


@pytest.mark.parametrize(
    ("outcomes", "summary"),
    [
        ({}, "rollout completed: 3 of 3 devices succeeded, 0 failed (at most 0 allowed)"),
        (
            {0: BAD},
            "rollout halted after the canary wave of 3: 1 failed (at most 0 allowed); "
            "0 succeeded, 2 not started",
        ),
        (
            {1: BAD},
            "rollout halted after wave 2 of 3: 1 failed (at most 0 allowed); "
            "1 succeeded, 1 not started",
        ),
        (
            {2: BAD},
            "rollout failed: 1 failed (at most 0 allowed); 2 succeeded, every device was asked",
        ),
    ],
)
def test_verdict_summary(outcomes: dict[int, Outcome], summary: str) -> None:
    plan = Rollout(DEVICES[:3])
    drive(plan, outcomes)
    assert plan.verdict().summary == summary


def test_a_verdict_before_the_end_is_unfinished() -> None:
    plan = Rollout(DEVICES[:3])
    plan.record([DeviceResult(d, OK) for d in plan.next_wave()])
    verdict = plan.verdict()
    assert (verdict.status, verdict.exit_code, verdict.skipped) == ("unfinished", 1, 2)


def test_next_wave_waits_for_the_previous_wave() -> None:
    plan = Rollout(DEVICES[:3])
    first = plan.next_wave()
    with pytest.raises(RuntimeError, match="not recorded yet"):
        plan.next_wave()
    with pytest.raises(RuntimeError, match="lacks results"):
        plan.record([])
    with pytest.raises(ValueError, match="not an open device"):
        plan.record([DeviceResult(DEVICES[2], OK)])
    with pytest.raises(ValueError, match="cannot be SKIPPED"):
        plan.record([DeviceResult(first[0], Outcome.SKIPPED)])
    plan.record([DeviceResult(first[0], OK)])
    assert plan.next_wave() == [DEVICES[1]]


@pytest.mark.parametrize(
    ("devices", "kwargs", "message"),
    [
        ([], {}, "no devices"),
        ([DEVICES[0], DEVICES[0]], {}, "listed twice"),
        (DEVICES[:2], {"canary": 0}, "canary must be from 1 to the number of devices"),
        (DEVICES[:2], {"canary": 3}, r"\(2\), not 3"),
        (DEVICES[:2], {"wave_size": 0}, "wave size must be at least 1"),
        (DEVICES[:2], {"max_failures": -1}, "max failures must be 0 or more"),
    ],
)
def test_bad_plans_are_refused(devices: list[str], kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rollout(devices, **kwargs)


# -- one device ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ("DOWNLOADING", None),
        ("VERIFIED", None),
        ("STAGED", None),
        ("WARMING", None),
        ("ACTIVE_TRIAL", None),
        ("ROLLING_BACK", None),
        ("COMMITTED", Outcome.COMMITTED),
        ("FAILED", Outcome.FAILED),
        ("ROLLED_BACK", Outcome.ROLLED_BACK),
    ],
)
def test_settle_waits_for_rest(state: str, outcome: Outcome | None) -> None:
    now = UpdateView(7, state, "1", "2", "1", "SelfTestError: x" if outcome else "")
    result = settle("d:1", 7, now)
    if outcome is None:
        assert result is None
    else:
        assert result == DeviceResult("d:1", outcome, "1", "2", now.last_error)


def test_settle_notices_another_update() -> None:
    result = settle("d:1", 7, UpdateView(8, "DOWNLOADING", "1", "3"))
    assert result is not None
    assert result.outcome is Outcome.ERROR
    assert "update 7 was superseded by update 8 (DOWNLOADING)" in result.last_error


def test_already_refused_and_timed_out() -> None:
    view = UpdateView(0, "IDLE", committed_version="2")
    assert already("d:1", view, "version 2 is the committed version already") == DeviceResult(
        "d:1", Outcome.ALREADY, "2", "2", note="version 2 is the committed version already"
    )
    assert refused("d:1", "StartUpdate: UNAVAILABLE: x") == DeviceResult(
        "d:1", Outcome.ERROR, last_error="StartUpdate: UNAVAILABLE: x"
    )
    late = timed_out("d:1", UpdateView(3, "ACTIVE_TRIAL", "1", "2"), 30, "UNAVAILABLE: gone")
    assert (late.outcome, late.from_version, late.to_version) == (Outcome.TIMED_OUT, "1", "2")
    assert late.last_error == (
        "not at rest within the health timeout (30 s): still ACTIVE_TRIAL; "
        "last status call failed: UNAVAILABLE: gone"
    )
    assert Outcome.TIMED_OUT.failed
    assert not Outcome.SKIPPED.failed
    assert not Outcome.SKIPPED.succeeded


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("10.0.0.7:50051", True),
        ("gw-3.lan:50051", True),
        (" gw:1 ", True),
        ("[::1]:50051", True),
        ("gw", False),
        (":50051", False),
        ("gw:", False),
        ("gw:0", False),
        ("gw:65536", False),
        ("gw:5x", False),
        ("::1:50051", False),
        ("[::1:50051", False),
        ("g w:1", False),
    ],
)
def test_parse_device(text: str, ok: bool) -> None:
    if ok:
        assert parse_device(text) == text.strip()
    else:
        with pytest.raises(ValueError, match=r"HOST:PORT|port"):
            parse_device(text)


# -- usage errors ------------------------------------------------------------------------------

GOOD = ["rollout", "--devices", "a:1,b:2", "--model", "digits", "--version", "2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--devices": "a:1,b"}, "argument --devices: 'b' is not HOST:PORT"),
        ({"--devices": "a:1,,b:2"}, "argument --devices: 'a:1,,b:2': an empty entry"),
        ({"--devices": "a:1,a:1"}, "argument --devices: a:1 is listed twice"),
        ({"--devices": "a:99999"}, "argument --devices: 'a:99999': the port must be"),
        ({"--model": " "}, "argument --model: the model name is empty"),
        ({"--version": "v2"}, "argument --version: 'v2' is neither a version number"),
        ({"--canary": "0"}, "argument --canary: '0': must be 1 or more"),
        ({"--canary": "3"}, "argument --canary: 3 is more than the 2 devices in --devices"),
        ({"--wave-size": "0"}, "argument --wave-size: '0': must be 1 or more"),
        ({"--max-failures": "-1"}, "argument --max-failures: '-1': must be 0 or more"),
        ({"--max-failures": "x"}, "argument --max-failures: 'x' is not a whole number"),
        ({"--health-timeout": "0"}, "argument --health-timeout: '0': seconds must be > 0"),
        ({"--poll-interval": "soon"}, "argument --poll-interval: 'soon' is not a number"),
    ],
)
def test_usage_errors_name_the_flag(
    change: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = list(GOOD)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as info:
        fleet.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "edged-fleet rollout: error: " in err
    assert message in err


def test_missing_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        fleet.main(["rollout", "--devices", "a:1"])
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err
