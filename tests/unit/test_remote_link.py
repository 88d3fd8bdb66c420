"""The link estimator (hal.remote_link) on synthetic calls with an injected clock: round trip
from small calls, bandwidth from payloads with the round trip and the server's time taken off,
averaged over time; thread safety; and the probe against a real daemon."""

from __future__ import annotations

import threading

import grpc
import pytest

from hal.remote_link import (
    MIN_TRANSFER_BYTES,
    LinkEstimator,
    ProbeError,
    estimator_for,
    probe,
    snapshots,
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
    assert link.snapshot().rtt_s == pytest.approx(0.002)


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
