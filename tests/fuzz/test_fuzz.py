"""The fuzz harnesses in `make test`: every seed of the checked-in corpus replayed, then a short
hypothesis run per harness (arbitrary bytes, and seeds with bytes flipped, inserted and cut).
Long runs: `make fuzz` (atheris where it installs, else hypothesis at length)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harnesses import HARNESSES

CORPUS = Path(__file__).resolve().parent / "corpus"
#: examples per harness and strategy in `make test` (FUZZ_EXAMPLES raises it)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))


def seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).iterdir())]


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A seed with a few bytes flipped, inserted, deleted or the tail cut."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "interesting"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and at < len(data):
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "cut":
            del data[at:]
        elif kind == "interesting" and at < len(data):
            value = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00", b"\x7f", b"\x80"]))
            data[at : at + len(value)] = value
    return bytes(data)


def _run(harness: Callable[[bytes], None], strategy: st.SearchStrategy[bytes]) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def run(data: bytes) -> None:
        harness(data)

    run()


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_seed_corpus_replays(target: str) -> None:
    for seed in seeds(target):
        HARNESSES[target](seed)


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_mutated_seeds(target: str) -> None:
    _run(HARNESSES[target], mutated(seeds(target)))


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_arbitrary_bytes(target: str) -> None:
    _run(HARNESSES[target], st.binary(max_size=2048))
