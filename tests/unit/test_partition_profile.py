"""Profiling a model's cuts (edged.partition.profile): every part is timed in rounds, one run
of each part a round, so that load from elsewhere falls on neighbouring cuts alike; the
bytes counted at a cut are those deployed (half with FP16 on the wire)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import ConfigError
from edged.partition import graph, profile

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models/digits/1/model.onnx"


def test_parts_are_timed_in_rounds_not_one_after_the_other() -> None:
    calls: list[str] = []
    runs = [lambda name=name: calls.append(name) for name in ("a", "b", "c")]
    timings = profile._timings(runs, 3)
    assert len(timings) == 3
    assert all(t.wall_s >= 0 and t.cpu_s >= 0 for t in timings)
    # one warm-up each, then three rounds of one run of each
    assert calls == ["a", "b", "c"] * 4


def test_a_timing_keeps_the_median_cpu_and_the_spread_of_the_runs() -> None:
    steady = profile._timing([0.010, 0.011, 0.010, 0.010, 0.012], [0.009] * 5)
    assert (steady.wall_s, steady.cpu_s) == (0.010, 0.009)
    assert steady.spread <= 0.1
    assert (steady.wall_total_s, steady.cpu_total_s) == pytest.approx((0.053, 0.045))
    # a CFS quota's head: full speed in some runs, a period's stall in others
    bimodal = profile._timing([0.001, 0.009, 0.001, 0.009, 0.009], [0.001] * 5)
    assert bimodal.wall_s == 0.009
    assert bimodal.spread > profile.NOISY_SPREAD
    assert profile._timing([0.002], [0.001]).spread == 0.0


def _measured(threads: int = 1, wall_per_cpu: float = 4.0, cpu: bool = True) -> profile.Profile:
    """A device profile under a 25 % quota, made up: ``head_s`` medians one mode or the
    other, CPU times steady."""
    rows = (
        profile.CutProfile(graph.INPUTS_CUT, 0.0, 0.010, 600_000),
        # wall median caught at full speed (1 ms) though it averages 4 ms; noisy runs
        profile.CutProfile("early", 0.001, 0.009, 50_000, 0.001 * cpu, 0.009, 3.2),
        # wall median caught stalled (10 ms) though it averages 4.4 ms
        profile.CutProfile("also_early", 0.010, 0.009, 50_000, 0.0011 * cpu, 0.009, 2.5),
        profile.CutProfile("late", 0.060, 0.001, 4_000, 0.015 * cpu, 0.001, 0.05),
    )
    return profile.Profile(
        "m.onnx", "cpu-onnx", threads, 0.070, 8, rows,
        whole_cpu_s=0.018 * cpu, wall_per_cpu=wall_per_cpu if cpu else 0.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("statistic", "heads", "whole"),
    [
        # the medians as timed: "early" looks ten times cheaper than "also_early"
        ("wall", {"early": 0.001, "also_early": 0.010, "late": 0.060}, 0.070),
        # CPU time x 4 wall s per CPU s: both early heads cost what they average
        ("cpu", {"early": 0.004, "also_early": 0.0044, "late": 0.060}, 0.072),
    ],
)
def test_the_cost_table_charges_heads_by_the_statistic(
    statistic: profile.Statistic, heads: dict[str, float], whole: float
) -> None:
    device = _measured()
    table = {c.cut: c for c in profile.cost_table(device, device, statistic)}
    assert table[graph.INPUTS_CUT].head_s == 0.0
    for cut, want in heads.items():
        assert table[cut].head_s == pytest.approx(want), cut
        assert table[cut].tail_s == {"early": 0.009, "also_early": 0.009, "late": 0.001}[cut]
    assert table["<local>"].head_s == pytest.approx(whole)


def test_the_quota_statistic_charges_cpu_and_carries_the_cpu_per_request() -> None:
    device = _measured()
    table = {
        c.cut: c
        for c in profile.cost_table(device, device, "quota", request_cpu_s=0.003, byte_cost_s=1e-9)
    }
    # a head costs its CPU time; the request's device CPU adds the daemon's and the bytes'
    assert table["early"].head_s == pytest.approx(0.001)
    assert table["early"].device_cpu_s == pytest.approx(0.003 + 0.001 + (50_000 + 8) * 1e-9)
    assert table[graph.INPUTS_CUT].device_cpu_s == pytest.approx(0.003 + 600_008e-9)
    assert table["<local>"].head_s == pytest.approx(0.018)
    assert table["<local>"].device_cpu_s == pytest.approx(0.021)
    # the other statistics carry none: nothing for a limit to bound
    assert all(c.device_cpu_s is None for c in profile.cost_table(device, device, "cpu"))
    with pytest.raises(ConfigError, match="must be >= 0"):
        profile.cost_table(device, device, "quota", request_cpu_s=-0.001)
    with pytest.raises(ConfigError, match="statistic quota needs a device profile taken"):
        profile.cost_table(_measured(threads=2), device, "quota")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (_measured(threads=2), "needs a device profile taken with 1 thread"),
        (_measured(cpu=False), "has no CPU times"),
    ],
)
def test_the_cpu_statistic_is_refused_where_it_cannot_be_had(
    device: profile.Profile, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        profile.cost_table(device, device, "cpu")
    assert len(profile.cost_table(device, device)) == 5  # wall: always
    with pytest.raises(ConfigError, match="statistic 'mean' is not one of wall, cpu"):
        profile.cost_table(device, device, "mean")  # type: ignore[arg-type]


def test_noisy_heads_are_named() -> None:
    assert profile.noisy_heads(_measured()) == ["early", "also_early"]
    assert profile.noisy_heads(_measured(), limit=3.0) == ["early"]


def test_a_profile_records_cpu_times_and_reads_back() -> None:
    x = np.random.default_rng(4).random((2, 64), dtype=np.float32) * 16
    measured = profile.profile(DIGITS, {"input": x}, runs=3)
    assert measured.whole_cpu_s > 0
    assert measured.wall_per_cpu > 0
    assert all(c.head_cpu_s > 0 for c in measured.cuts if c.cut != graph.INPUTS_CUT)
    assert profile.Profile.from_json(measured.to_json(), "p.json") == measured
    # a profile written before CPU times were recorded reads with none
    old = measured.to_json()
    for key in ("whole_cpu_s", "wall_per_cpu"):
        del old[key]
    for row in old["cuts"]:
        for key in ("head_cpu_s", "tail_cpu_s", "head_spread"):
            del row[key]
    again = profile.Profile.from_json(old, "old.json")
    assert (again.wall_per_cpu, again.cuts[1].head_cpu_s) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="has no CPU times"):
        profile.cost_table(again, again, "cpu")


@pytest.mark.parametrize("round_parts", [1, 2, profile.ROUND_PARTS])
def test_every_cut_is_profiled_whatever_the_round_size(
    monkeypatch: pytest.MonkeyPatch, round_parts: int
) -> None:
    monkeypatch.setattr(profile, "ROUND_PARTS", round_parts)
    x = np.random.default_rng(0).random((2, 64), dtype=np.float32) * 16
    measured = profile.profile(DIGITS, {"input": x}, runs=2)
    cuts = [c.tensor for c in graph.candidate_cuts(graph.load(DIGITS))]
    assert [c.cut for c in measured.cuts] == cuts
    rows = {c.cut: c for c in measured.cuts}
    assert rows[graph.INPUTS_CUT].head_s == 0.0
    assert rows[graph.INPUTS_CUT].sent_bytes == x.nbytes
    assert all(c.tail_s > 0 for c in measured.cuts)
    assert all(c.head_s > 0 for c in measured.cuts if c.cut != graph.INPUTS_CUT)
    assert measured.whole_s > 0


def test_fp16_on_the_wire_halves_the_bytes_of_every_cut_with_a_head() -> None:
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32) * 16
    fp32 = {c.cut: c.sent_bytes for c in profile.profile(DIGITS, {"input": x}, runs=1).cuts}
    fp16 = profile.profile(DIGITS, {"input": x}, runs=1, wire_dtype="FP16")
    for row in fp16.cuts:
        want = fp32[row.cut] if row.cut == graph.INPUTS_CUT else fp32[row.cut] // 2
        assert row.sent_bytes == want, row.cut


def test_profiles_taken_with_different_wire_datatypes_are_not_joined() -> None:
    x = np.random.default_rng(2).random((2, 64), dtype=np.float32) * 16
    fp32 = profile.profile(DIGITS, {"input": x}, runs=1)
    fp16 = profile.profile(DIGITS, {"input": x}, runs=1, wire_dtype="FP16")
    assert fp16.wire_dtype == "FP16"
    again = profile.Profile.from_json(fp16.to_json(), "fp16.json")
    assert again == fp16
    with pytest.raises(ConfigError, match="sends cuts as FP16, the server profile as their own"):
        profile.cost_table(fp16, fp32)
    assert len(profile.cost_table(fp16, again)) == len(fp16.cuts) + 1
    # a profile written before the field existed reads as the tensors' own datatype
    old = {k: v for k, v in fp32.to_json().items() if k != "wire_dtype"}
    assert profile.Profile.from_json(old, "old.json").wire_dtype == ""
