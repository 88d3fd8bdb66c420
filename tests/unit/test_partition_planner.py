"""The planner (edged.partition.planner) on synthetic cost tables: the cut it picks for
each link, table-tested, and what it refuses."""

from __future__ import annotations

import pytest

from edged.core.errors import ConfigError
from edged.partition.graph import INPUTS_CUT
from edged.partition.planner import ALL_LOCAL, CutCost, Link, estimate, plan

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
