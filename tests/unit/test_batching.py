"""The pure half of dynamic batching: merge/split round trips, batch keys, batch sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged.core.errors import ExecutorError
from edged.core.types import DataType
from edged.serving.batching import BatchPolicy, batch_key, merge, split, take

FIXED = [dt for dt in DataType if dt is not DataType.BYTES]


def _arrays(datatype: DataType, rows: int, tail: tuple[int, ...]):
    shape = (rows, *tail)
    if datatype is DataType.BYTES:
        return st.lists(
            st.binary(max_size=6), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
        ).map(lambda items: np.array([*items, b""], dtype=object)[:-1].reshape(shape))
    return hnp.arrays(datatype.numpy_dtype, shape)


@st.composite
def ragged_requests(draw):
    """Several requests with the same inputs and non-batch dims, ragged batch sizes."""
    datatypes = draw(st.lists(st.sampled_from(list(DataType)), min_size=1, max_size=3))
    tails = [tuple(draw(st.lists(st.integers(0, 3), max_size=2))) for _ in datatypes]
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    requests = []
    for size in sizes:
        requests.append(
            {
                f"t{i}": draw(_arrays(dt, size, tail))
                for i, (dt, tail) in enumerate(zip(datatypes, tails, strict=True))
            }
        )
    return requests, sizes


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object:
        return a.shape == b.shape and a.tolist() == b.tolist()
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


@settings(max_examples=150, deadline=None)
@given(ragged_requests())
def test_split_merge_round_trip(case) -> None:
    requests, sizes = case
    assert len({batch_key(r) for r in requests}) == 1
    merged = merge(requests)
    for name, array in merged.items():
        assert array.shape[0] == sum(sizes), name
    parts = split(merged, sizes)
    assert len(parts) == len(requests)
    for part, original in zip(parts, requests, strict=True):
        assert part.keys() == original.keys()
        for name in original:
            assert _equal(part[name], original[name]), name


def test_single_request_is_not_copied() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert merge([{"x": x}])["x"] is x


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"x": np.zeros((1, 3), np.float32)}, {"x": np.zeros((1, 4), np.float32)}),
        ({"x": np.zeros((1, 3), np.float32)}, {"x": np.zeros((1, 3), np.float64)}),
        ({"x": np.zeros((1, 3), np.float32)}, {"y": np.zeros((1, 3), np.float32)}),
        ({"x": np.zeros((1, 3, 2), np.float32)}, {"x": np.zeros((1, 3), np.float32)}),
    ],
    ids=["dims", "dtype", "name", "rank"],
)
def test_different_non_batch_dims_are_not_merged(a, b) -> None:
    assert batch_key(a) != batch_key(b)


def test_same_non_batch_dims_share_a_key_whatever_the_batch() -> None:
    assert batch_key({"x": np.zeros((1, 3))}) == batch_key({"x": np.zeros((5, 3))})


def test_split_refuses_outputs_without_the_batch_on_axis_0() -> None:
    with pytest.raises(ExecutorError, match="'y'"):
        split({"y": np.zeros((3, 2))}, [2, 2])
    with pytest.raises(ExecutorError, match="'s'"):
        split({"s": np.float32(1.0)}, [1, 1])


TAKE = [
    # (policy, queued sizes, oldest waited ns, expected count)
    (BatchPolicy(0), [1, 1, 1], 0, 1),  # no batching: one at a time
    (BatchPolicy(8), [1, 1, 1], 0, 3),  # delay 0: take what is queued
    (BatchPolicy(8), [], 0, 0),
    (BatchPolicy(4), [1, 2, 2], 0, 2),  # the third would overflow
    (BatchPolicy(4), [3, 3], 0, 1),
    (BatchPolicy(8, 1000), [1, 1], 0, 0),  # wait for the delay ...
    (BatchPolicy(8, 1000), [1, 1], 1000, 2),  # ... then go
    (BatchPolicy(8, 1000), [4, 4], 0, 2),  # full: go at once
    (BatchPolicy(8, 1000, (2, 4)), [1, 1], 0, 2),  # a preferred size: go at once
    (BatchPolicy(8, 1000, (2, 4)), [1, 1, 1], 0, 0),  # 3 is not preferred: wait
    (BatchPolicy(8, 1000, (2, 4)), [1, 1, 1, 1, 1], 0, 5),  # past the largest preferred
]


@pytest.mark.parametrize(("policy", "sizes", "waited", "expected"), TAKE)
def test_take(policy, sizes, waited, expected) -> None:
    assert take(policy, sizes, waited) == expected
