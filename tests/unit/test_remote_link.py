"""The link estimator (hal.remote_link) on synthetic calls with an injected clock: round trip
from small calls (their transfer at the known bandwidth taken off), bandwidth from payloads
with the round trip and the server's time (profiled, or the server's own from its statistics)
taken off, averaged over time; the head's time as served; thread safety; and the probe and the
statistics call against a real daemon."""

from __future__ import annotations

import threading

import grpc
import pytest

from hal.remote_link import (
    MIN_RTT_WINDOW_S,
    MIN_TRANSFER_BYTES,
    CutTimes,
    LinkEstimator,
    ProbeError,
    estimator_for,
    probe,
    served_requests,
    snapshots,
    tail_key,
)
from tests.daemon_process import DaemonProcess

MBIT = 1e6


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def call_s(n_bytes: int, rtt_s: float, mbit: float, server_s: float = 0.0) -> float:
    """How long a call carrying ``n_bytes`` takes on a link of ``rtt_s`` and ``mbit``."""
    return rtt_s + n_bytes * 8 / (mbit * MBIT) + server_s


def test_nothing_measured_yet() -> None:
    snap = LinkEstimator("h:1").snapshot()
    assert (snap.rtt_s, snap.bandwidth_bps, snap.calls, snap.updated_at) == (None, None, 0, None)


def test_small_calls_give_the_round_trip_and_payloads_the_bandwidth() -> None:
    clock = Clock()
    link = LinkEstimator("h:1", clock=clock)
    for _ in range(5):
        clock.now += 0.1
        link.record(0, 0, call_s(0, 0.004, 10))
    for _ in range(5):
        clock.now += 0.1
        link.record(100_000, 2_000, call_s(102_000, 0.004, 10))
    snap = link.snapshot()
    assert snap.rtt_s == pytest.approx(0.004)
    assert snap.bandwidth_bps == pytest.approx(10 * MBIT)
    assert (snap.calls, snap.bytes_sent, snap.bytes_received) == (10, 500_000, 10_000)
    assert snap.seconds == pytest.approx(5 * 0.004 + 5 * call_s(102_000, 0.004, 10))
    assert snap.updated_at == clock.now
    assert snap.bandwidth_at == clock.now
    clock.now += 1
    link.record(0, 0, 0.004)  # a round-trip sample says nothing new of the bandwidth
    assert link.snapshot().bandwidth_at == clock.now - 1


def test_a_round_trip_that_waited_for_the_cpu_is_not_taken_off_a_payload() -> None:
    """Probes and small calls that waited for a busy CPU (or a queue) read round trips of
    9 ms where the link's is 1 ms; a payload call made while the device waits for it pays
    1 ms. Taking the *average* round trip off (5 ms) left 4.4 ms of a 55 KB call's 5.4 for
    its transfer at 100 Mbit/s: 100 read as 500. The least round trip of the last
    MIN_RTT_WINDOW_S is taken off instead; the average is still the round trip."""
    clock = Clock()
    link = LinkEstimator("h:1", clock=clock)
    for i in range(20):
        clock.now += 0.05
        link.record(0, 0, 0.009 if i % 2 else 0.001)
        link.record(55_296, 16, call_s(55_312, 0.001, 100))
    snap = link.snapshot()
    assert snap.bandwidth_bps == pytest.approx(100 * MBIT)
    assert 0.003 < (snap.rtt_s or 0) < 0.007
    assert snap.least_rtt_s == pytest.approx(0.001)
    # no round-trip sample in the window (no probes): the average stands in, as before
    clock.now += MIN_RTT_WINDOW_S + 1
    link.record(55_296, 16, call_s(55_312, 0.001, 100))
    fallback = link.snapshot().bandwidth_bps
    assert fallback is not None
    assert fallback > 110 * MBIT
    assert link.snapshot().least_rtt_s is None


def test_the_servers_time_is_not_link_time() -> None:
    clock = Clock()
    link = LinkEstimator("h:1", clock=clock)
    link.record(0, 0, 0.002)
    clock.now += 0.1
    # the tail took 30 ms on the server: 100 Mbit/s, not the 20 Mbit/s the raw time says
    link.record(50_000, 0, call_s(50_000, 0.002, 100, server_s=0.030), server_s=0.030)
    assert link.snapshot().bandwidth_bps == pytest.approx(100 * MBIT)
    # and a small call's server time is not round trip either
    clock.now += 10
    link.record(10, 10, 0.002 + 0.030, server_s=0.030)
    # (nor is its 20 bytes' transfer)
    assert link.snapshot().rtt_s == pytest.approx(0.002 - 20 * 8 / (100 * MBIT))


@pytest.mark.parametrize(
    ("elapsed_s", "expected_weight"),
    [(0.0, 0.0), (0.5, 0.5), (1.0, 0.75), (5.0, 1 - 0.5**10)],
)
def test_the_average_is_over_time_with_its_half_life(
    elapsed_s: float, expected_weight: float
) -> None:
    clock = Clock()
    link = LinkEstimator("h:1", half_life_s=0.5, clock=clock)
    link.record(0, 0, 0.010)
    clock.now += elapsed_s
    link.record(0, 0, 0.020)
    rtt = link.snapshot().rtt_s
    assert rtt == pytest.approx(0.010 + expected_weight * 0.010)


def test_a_bandwidth_change_is_followed_within_a_few_half_lives() -> None:
    clock = Clock()
    link = LinkEstimator("h:1", half_life_s=0.5, clock=clock)
    link.record(0, 0, 0.001)
    for _ in range(50):  # 100 Mbit/s for 5 s, a call every 0.1 s
        clock.now += 0.1
        link.record(20_000, 0, call_s(20_000, 0.001, 100))
    assert link.snapshot().bandwidth_bps == pytest.approx(100 * MBIT)
    for _ in range(20):  # then 10 Mbit/s for 2 s (4 half-lives)
        clock.now += 0.1
        link.record(20_000, 0, call_s(20_000, 0.001, 10))
    # within 10 % of the new figure: the old one weighs 1/16 of seconds-per-bit
    assert link.snapshot().bandwidth_bps == pytest.approx(10 * MBIT, rel=0.1)


def test_a_transfer_that_rounds_to_nothing_does_not_make_the_bandwidth_infinite() -> None:
    clock = Clock()
    link = LinkEstimator("h:1", clock=clock)
    link.record(0, 0, 0.005)
    clock.now += 1
    link.record(MIN_TRANSFER_BYTES, 0, 0.004)  # faster than the round trip: noise
    bandwidth = link.snapshot().bandwidth_bps
    assert bandwidth is not None
    assert 0 < bandwidth < float("inf")


def test_nonsense_samples_are_ignored() -> None:
    link = LinkEstimator("h:1")
    link.record(10, 10, -1.0)
    link.record(10, 10, float("nan"))
    assert link.snapshot().calls == 0
    with pytest.raises(ValueError, match="half_life_s"):
        LinkEstimator("h:1", half_life_s=0)


def test_threads_record_without_losing_a_call() -> None:
    link = LinkEstimator("h:1")

    def work() -> None:
        for _ in range(1000):
            link.record(10_000, 100, 0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = link.snapshot()
    assert (snap.calls, snap.bytes_sent, snap.bytes_received) == (4000, 40_000_000, 400_000)


def test_one_estimator_per_address_listed_for_metrics() -> None:
    a = estimator_for("test-remote-link-a:1")
    assert estimator_for("test-remote-link-a:1") is a
    assert estimator_for("test-remote-link-b:1") is not a
    addresses = [s.address for s in snapshots()]
    assert "test-remote-link-a:1" in addresses
    assert addresses == sorted(addresses)


@pytest.mark.slow
def test_a_probe_is_answered_not_found_by_a_real_daemon(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        empty = probe(channel)
        loaded = probe(channel, 256 * 1024)
    assert empty > 0
    assert loaded > 0


def test_a_probe_of_an_unreachable_server_says_so() -> None:
    with (
        grpc.insecure_channel("127.0.0.1:9") as channel,
        pytest.raises(ProbeError, match="UNAVAILABLE"),
    ):
        probe(channel, timeout_s=2)


def test_a_small_calls_transfer_at_the_known_bandwidth_is_not_round_trip() -> None:
    clock = Clock()
    link = LinkEstimator("h:1", clock=clock)
    link.record(0, 0, 0.010)
    clock.now += 0.1
    link.record(100_000, 0, call_s(100_000, 0.010, 0.1))  # 0.1 Mbit/s: 8 s
    clock.now += 10
    # 4,000 bytes under the payload floor take 0.32 s at 0.1 Mbit/s: still a 10 ms round trip
    assert MIN_TRANSFER_BYTES > 4_000
    link.record(4_000, 0, call_s(4_000, 0.010, 0.1))
    assert link.snapshot().rtt_s == pytest.approx(0.010)


def test_the_servers_measured_time_replaces_the_profiled_one_for_its_tail() -> None:
    """A server that batches our calls with others' spends 40 ms per call where the tail's
    profile says 5 ms: with the profile alone the link reads slow; with the time the server
    reports for that tail (``set_server_time``), right."""
    clock = Clock()
    profiled = LinkEstimator("h:1", clock=clock)
    measured = LinkEstimator("h:2", clock=clock)
    measured.set_server_time(tail_key("tail", "2"), 0.040)
    for link in (profiled, measured):
        link.record(0, 0, 0.002)
    for _ in range(10):
        clock.now += 0.1
        took = call_s(200_000, 0.002, 50, server_s=0.040)
        for link in (profiled, measured):
            link.record(200_000, 0, took, 0.005, tail=tail_key("tail", "2"), head_s=0.003)
    slow = profiled.snapshot().bandwidth_bps
    assert slow is not None
    assert slow < 0.6 * 50 * MBIT  # 32 + 35 ms of "transfer" instead of 32
    assert measured.snapshot().bandwidth_bps == pytest.approx(50 * MBIT)
    # another tail on the same server keeps its profiled time
    clock.now += 10
    measured.record(200_000, 0, call_s(200_000, 0.002, 50, server_s=0.005), 0.005, tail="other")
    assert measured.snapshot().bandwidth_bps == pytest.approx(50 * MBIT)


def test_both_ends_of_a_cut_as_served() -> None:
    clock = Clock()
    link = LinkEstimator("h:1", clock=clock)
    assert link.cut_times("tail") == CutTimes(None, None, None, None)
    for head_s in (0.004, 0.006):
        clock.now += 10  # each sample outweighs the last completely
        link.record(0, 0, 0.002, tail="tail", head_s=head_s)
    link.set_server_time("tail", 0.012)
    times = link.cut_times("tail")
    assert times.head_s == pytest.approx(0.006)
    assert (times.head_at, times.server_s, times.server_at) == (clock.now, 0.012, clock.now)
    link.set_server_time("tail", float("nan"))  # ignored
    assert link.cut_times("tail").server_s == 0.012


@pytest.mark.slow
def test_the_servers_own_time_is_read_from_its_statistics(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        count, ns = served_requests(channel, "simple_static")
        assert count >= 0
        assert ns >= 0
        with pytest.raises(ProbeError, match="NOT_FOUND"):
            served_requests(channel, "no-such-model", timeout_s=5)
