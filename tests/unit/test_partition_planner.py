"""The planner (edged.partition.planner) on synthetic cost tables: the cut it picks for
each link, table-tested, and what it refuses."""

from __future__ import annotations

import pytest

from edged.core.errors import ConfigError
from edged.partition.graph import INPUTS_CUT
from edged.partition.planner import ALL_LOCAL, CutCost, Link, estimate, moved, plan

MB = 1_000_000

# A CNN-like shape: the early activations are big, a late one small; the device is 10x slower.
CNN = (
    CutCost(INPUTS_CUT, head_s=0.0, tail_s=0.010, sent_bytes=600_000, answer_bytes=4_000),
    CutCost("conv1", head_s=0.020, tail_s=0.008, sent_bytes=3_200_000, answer_bytes=4_000),
    CutCost("pool3", head_s=0.030, tail_s=0.004, sent_bytes=50_000, answer_bytes=4_000),
    CutCost("fc", head_s=0.078, tail_s=0.0005, sent_bytes=4_000, answer_bytes=4_000),
    CutCost(ALL_LOCAL, head_s=0.080, tail_s=0.0, sent_bytes=0),
)


@pytest.mark.parametrize(
    ("rtt_ms", "mbit_s", "chosen"),
    [
        (1, 1000, INPUTS_CUT),  # a fast LAN: send the input, the server is 10x faster
        (5, 100, "pool3"),  # 100 Mbit/s: the input costs 48 ms, pool3 4 ms
        (20, 10, ALL_LOCAL),  # 10 Mbit/s: pool3 costs 43 ms of transfer
        (200, 1000, ALL_LOCAL),  # far away: the round trip alone is slower than the device
    ],
)
def test_the_cut_of_least_latency_is_chosen(rtt_ms: float, mbit_s: float, chosen: str) -> None:
    link = Link(rtt_s=rtt_ms / 1000, bandwidth_bps=mbit_s * MB)
    result = plan(CNN, link)
    assert result.choice.cut == chosen
    assert [e.cut for e in result.estimates] == [c.cut for c in CNN]  # every row, in order
    assert result.choice.total_s == min(e.total_s for e in result.estimates)


def test_an_estimate_adds_head_round_trip_transfers_and_tail() -> None:
    link = Link(rtt_s=0.002, bandwidth_bps=8 * MB)  # 1 MB/s
    row = estimate(
        CutCost("x", head_s=0.01, tail_s=0.03, sent_bytes=5_000, answer_bytes=1_000), link
    )
    assert row.transfer_s == pytest.approx(0.002 + 0.006)
    assert row.total_s == pytest.approx(0.01 + 0.008 + 0.03)
    local = estimate(CutCost(ALL_LOCAL, head_s=0.05, tail_s=0.0, sent_bytes=0), link)
    assert (local.transfer_s, local.total_s) == (0.0, 0.05)


def test_ties_go_to_all_local_then_to_fewer_bytes() -> None:
    link = Link(rtt_s=0.0, bandwidth_bps=8)  # one byte a second: exact sums
    tie = (
        CutCost("a", head_s=0.0, tail_s=0.5, sent_bytes=1),  # 1 s + 0.5 s
        CutCost("b", head_s=0.5, tail_s=0.0, sent_bytes=0, answer_bytes=1),  # 0.5 s + 1 s
        CutCost(ALL_LOCAL, head_s=1.5, tail_s=0.0, sent_bytes=0),
    )
    assert plan(tie, link).choice.cut == ALL_LOCAL
    assert plan(tie[:2], link).choice.cut == "b"


def test_a_table_with_only_remote_cuts_still_chooses() -> None:
    link = Link(rtt_s=1.0, bandwidth_bps=1)  # dreadful, but nothing else is offered
    assert plan(CNN[:1], link).choice.cut == INPUTS_CUT


@pytest.mark.parametrize(
    ("costs", "message"),
    [
        ((), "no cut to choose from"),
        ((CNN[0], CNN[0]), "listed twice"),
        ((CutCost("x", head_s=-1.0, tail_s=0.0, sent_bytes=0),), "negative cost"),
    ],
)
def test_bad_tables_are_refused(costs: tuple[CutCost, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(costs, Link(0.001, MB))


@pytest.mark.parametrize(("rtt", "bandwidth"), [(-0.1, 1.0), (float("nan"), 1.0), (0.0, 0.0)])
def test_a_bad_link_is_refused(rtt: float, bandwidth: float) -> None:
    with pytest.raises(ConfigError, match="link"):
        Link(rtt, bandwidth)


# -- the device_cpu objective: head CPU plus a serialisation cost per byte ----------------

NS = 1e-9


@pytest.mark.parametrize(
    ("byte_cost_ns", "chosen"),
    [
        (0, INPUTS_CUT),  # bytes are free: send the input, the device computes nothing
        (20, INPUTS_CUT),  # 20 ns/byte: the input costs 12 ms of CPU, pool3 30 + 1.1 ms
        (100, "pool3"),  # 100 ns/byte: input 60 ms, pool3 30 + 5.4 ms, fc 78 + 0.8 ms
        (1000, ALL_LOCAL),  # 1 us/byte: pool3 30 + 54 ms, fc 78 + 8 ms, the model 80 ms
    ],
)
def test_device_cpu_minimises_head_time_plus_bytes_serialised(
    byte_cost_ns: float, chosen: str
) -> None:
    link = Link(rtt_s=0.001, bandwidth_bps=1000 * MB)
    result = plan(CNN, link, "device_cpu", byte_cost_ns * NS)
    assert result.choice.cut == chosen
    assert result.objective == "device_cpu"
    assert result.choice.objective_s == min(e.objective_s for e in result.estimates)


def test_device_cpu_ignores_the_link_speed_and_the_servers_time() -> None:
    slow = plan(CNN, Link(rtt_s=0.5, bandwidth_bps=MB), "device_cpu", 100 * NS)
    fast = plan(CNN, Link(rtt_s=0.0001, bandwidth_bps=1000 * MB), "device_cpu", 100 * NS)
    assert slow.choice.cut == fast.choice.cut == "pool3"
    assert plan(CNN, Link(rtt_s=0.5, bandwidth_bps=MB)).choice.cut == ALL_LOCAL  # latency
    # the latency is still estimated, for the table
    assert slow.choice.total_s > fast.choice.total_s


def test_a_rows_cpu_cost_is_head_plus_bytes() -> None:
    row = estimate(
        CutCost("x", head_s=0.01, tail_s=0.5, sent_bytes=1000, answer_bytes=24),
        Link(0.1, MB),
        "device_cpu",
        1e-6,
    )
    assert row.objective_s == pytest.approx(0.01 + 1024 * 1e-6)
    latency = estimate(CutCost("x", head_s=0.01, tail_s=0.5, sent_bytes=1000), Link(0.1, MB))
    assert latency.cost_s is None
    assert latency.objective_s == latency.total_s


@pytest.mark.parametrize(
    ("objective", "byte_cost_s", "message"),
    [
        ("energy", 0.0, "objective 'energy'"),
        ("device_cpu", -1.0, "byte cost"),
        ("device_cpu", float("inf"), "byte cost"),
    ],
)
def test_a_bad_objective_is_refused(objective: str, byte_cost_s: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(CNN, Link(0.001, MB), objective, byte_cost_s)  # type: ignore[arg-type]


# -- when the link has moved enough to plan again ------------------------------------------


@pytest.mark.parametrize(
    ("planned", "measured", "threshold", "again"),
    [
        ((0.005, 100), (0.005, 100), 0.2, False),  # unchanged
        ((0.005, 100), (0.005, 85), 0.2, False),  # -15 % bandwidth: within the threshold
        ((0.005, 100), (0.005, 75), 0.2, True),  # -25 %
        ((0.005, 100), (0.005, 125), 0.2, True),  # +25 %: up counts as much as down
        ((0.005, 10), (0.005, 100), 0.2, True),  # 10x
        ((0.010, 100), (0.0125, 100), 0.2, True),  # +25 % round trip, 2.5 ms > the floor
        ((0.0002, 100), (0.0009, 100), 0.2, False),  # +350 % but 0.7 ms: loopback jitter
        ((0.010, 100), (0.0115, 100), 0.2, False),  # +15 % round trip
        ((0.005, 100), (0.005, 75), 0.5, False),  # a looser threshold
    ],
)
def test_the_link_moved_beyond_the_threshold(
    planned: tuple[float, float], measured: tuple[float, float], threshold: float, again: bool
) -> None:
    old = Link(planned[0], planned[1] * MB)
    new = Link(measured[0], measured[1] * MB)
    assert moved(old, new, threshold) is again


# The early cut's estimate is 10 % under all local's; the late one's 2 % under.
CLOSE = (
    CutCost(INPUTS_CUT, head_s=0.0, tail_s=0.010, sent_bytes=1_000_000),  # 90 ms at 100 Mbit/s
    CutCost("early", head_s=0.010, tail_s=0.012, sent_bytes=100_000),  # 10 + 8 + 12 = 30 ms
    CutCost("late", head_s=0.030, tail_s=0.0017, sent_bytes=2_000),  # 30 + 0.16 + 1.7
    CutCost(ALL_LOCAL, head_s=0.0333, tail_s=0.0, sent_bytes=0),
)


@pytest.mark.parametrize(
    ("costs", "margin", "chosen"),
    [
        (CLOSE, 0.0, "early"),  # no margin: the least estimate
        (CLOSE, 0.05, "early"),  # 30 ms beats 33.3 by 10 %: more than the margin
        (CLOSE, 0.15, ALL_LOCAL),  # by less than the margin: the better of local and remote
        (CLOSE[2:], 0.01, "late"),  # 31.9 ms beats 33.3 by 4 %
        (CLOSE[2:], 0.05, ALL_LOCAL),
        (CLOSE[:2], 0.75, INPUTS_CUT),  # no all local: 30 ms is not 75 % under all remote
        (CLOSE[1:3], 0.5, "early"),  # neither all local nor all remote: nothing to fall back to
    ],
)
def test_a_split_must_beat_local_and_remote_by_the_margin(
    costs: tuple[CutCost, ...], margin: float, chosen: str
) -> None:
    link = Link(rtt_s=0.0, bandwidth_bps=100 * MB)
    assert plan(costs, link, margin=margin).choice.cut == chosen


def test_the_margin_never_moves_a_choice_of_all_local_or_all_remote() -> None:
    fast = Link(rtt_s=0.0, bandwidth_bps=100_000 * MB)  # the inputs cost nothing to send
    assert plan(CLOSE, fast, margin=0.9).choice.cut == INPUTS_CUT
    assert plan(CLOSE, fast).choice.cut == INPUTS_CUT
    with pytest.raises(ConfigError, match=r"margin 1\.0 must be in"):
        plan(CLOSE, fast, margin=1.0)


def test_a_cpu_limit_bounds_each_cut_by_its_cpu_per_request() -> None:
    """Under 1 ms of CPU per 8 ms, a cut whose request needs 4.1 ms of device CPU waits four
    periods where one needing 3.9 ms waits three: the plan sees it though the parts' sums
    say otherwise (the shape measured in docs/partition.md, Run 6)."""
    from edged.partition.quota import CpuLimit

    link = Link(rtt_s=0.005, bandwidth_bps=80 * MB)
    costs = (
        # sends more, a shorter head: 3.9 ms of device CPU a request
        CutCost("early", head_s=0.0007, tail_s=0.0065, sent_bytes=110_000, device_cpu_s=0.0039),
        # sends less, a longer head: 4.1 ms
        CutCost("late", head_s=0.0014, tail_s=0.0055, sent_bytes=55_000, device_cpu_s=0.0041),
        CutCost(ALL_LOCAL, head_s=0.006, tail_s=0.0, sent_bytes=0, device_cpu_s=0.009),
    )
    assert plan(costs, link).choice.cut == ALL_LOCAL  # no limit: the sums (6 ms)
    limit = CpuLimit(0.001, 0.008)
    bounded = plan(costs, link, cpu_limit=limit)
    rows = {e.cut: e for e in bounded.estimates}
    assert rows["early"].bound_s == pytest.approx(0.0249)
    assert rows["late"].bound_s == pytest.approx(0.0321)
    assert rows[ALL_LOCAL].total_s == pytest.approx(0.065)
    assert rows["early"].total_s == pytest.approx(0.0249)  # the bound, not the sum (23.2)
    assert bounded.choice.cut == "early"
    # without a CPU figure a row is not bounded; a negative one is refused
    unknown = plan((CutCost("x", 0.001, 0.001, 10),), link, cpu_limit=limit)
    assert unknown.choice.bound_s == 0.0
    with pytest.raises(ConfigError, match="negative cost"):
        plan((CutCost("x", 0.001, 0.001, 10, device_cpu_s=-1.0),), link, cpu_limit=limit)
