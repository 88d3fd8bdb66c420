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
    medians = profile._medians_s(runs, 3)
    assert len(medians) == 3
    assert all(m >= 0 for m in medians)
    # one warm-up each, then three rounds of one run of each
    assert calls == ["a", "b", "c"] * 4


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
