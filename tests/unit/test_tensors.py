"""edged.core.tensors and edged.core.types: raw wire bytes <-> numpy arrays, and datatypes."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged.core.errors import InvalidInputError
from edged.core.tensors import check_shape, decode_raw, element_count, encode_raw
from edged.core.types import Array, DataType

FIXED_TYPES = [dt for dt in DataType if dt is not DataType.BYTES]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _bytes_array(items: list[bytes], shape: tuple[int, ...]) -> Array:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


# --------------------------------------------------------------------------- round trips


@st.composite
def fixed_arrays(draw: st.DrawFn) -> tuple[DataType, Array]:
    datatype = draw(st.sampled_from(FIXED_TYPES))
    array = draw(hnp.arrays(datatype.numpy_dtype, SHAPES))  # floats include NaN and inf
    return datatype, array


@st.composite
def bytes_arrays(draw: st.DrawFn) -> Array:
    shape = draw(SHAPES)
    # any bytes: empty elements, NUL bytes and sequences that are not UTF-8
    items = draw(
        st.lists(
            st.binary(max_size=12), min_size=element_count(shape), max_size=element_count(shape)
        )
    )
    return _bytes_array(items, shape)


@settings(max_examples=300, deadline=None)
@given(fixed_arrays())
def test_fixed_size_round_trip(case: tuple[DataType, Array]) -> None:
    datatype, array = case
    raw = encode_raw(array)
    assert len(raw) == array.size * datatype.itemsize
    decoded = decode_raw("t", datatype, list(array.shape), raw)
    assert decoded.dtype == datatype.numpy_dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)  # NaN-aware: NaN equals NaN in place
    assert decoded.tobytes() == array.tobytes()  # bit-exact, NaN payloads and -0.0 included


@settings(max_examples=200, deadline=None)
@given(bytes_arrays())
def test_bytes_round_trip(array: Array) -> None:
    decoded = decode_raw("t", DataType.BYTES, list(array.shape), encode_raw(array))
    assert decoded.dtype == np.dtype(object)
    assert decoded.shape == array.shape
    assert all(type(item) is bytes for item in decoded.reshape(-1))
    assert decoded.tolist() == array.tolist()


@settings(max_examples=100, deadline=None)
@given(fixed_arrays())
def test_big_endian_arrays_encode_as_little_endian(case: tuple[DataType, Array]) -> None:
    _, array = case
    big = array.astype(array.dtype.newbyteorder(">"))
    assert encode_raw(big) == array.astype(array.dtype.newbyteorder("<")).tobytes()


@settings(max_examples=50, deadline=None)
@given(fixed_arrays())
def test_non_contiguous_arrays_encode_in_c_order(case: tuple[DataType, Array]) -> None:
    _, array = case
    transposed = array.T
    assert encode_raw(transposed) == np.ascontiguousarray(transposed).tobytes()


@pytest.mark.parametrize(
    ("array", "items"),
    [
        (np.array([b"ab", b""], dtype="S2"), [b"ab", b""]),
        (np.array(["h\u00e9", ""]), ["h\u00e9".encode(), b""]),
        (_bytes_array([b"\xff\xfe", b"x"], (2,)), [b"\xff\xfe", b"x"]),
    ],
    ids=["numpy-bytes", "numpy-str-utf8", "object-non-utf8"],
)
def test_encode_raw_bytes_kinds(array: Array, items: list[bytes]) -> None:
    assert encode_raw(array) == _prefixed(*items)


def test_rank_zero_tensors() -> None:
    assert element_count(()) == 1
    scalar = decode_raw("s", DataType.FP32, [], np.float32(2.5).tobytes())
    assert scalar.shape == ()
    assert scalar == np.float32(2.5)
    word = decode_raw("w", DataType.BYTES, [], _prefixed(b"hi"))
    assert word.shape == ()
    assert word.item() == b"hi"


@pytest.mark.parametrize("datatype", list(DataType))
def test_zero_size_tensor_decodes_from_no_bytes(datatype: DataType) -> None:
    array = decode_raw("z", datatype, [3, 0, 2], b"")
    assert array.shape == (3, 0, 2)
    assert array.dtype == datatype.numpy_dtype


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x00\x01", [False, True]),
        (b"\x02\x00", [True, False]),
        (b"\xff\x80", [True, True]),
    ],
)
def test_bool_any_nonzero_byte_is_true(raw: bytes, expected: list[bool]) -> None:
    # as in Triton: perf_analyzer sends random bytes for BOOL inputs
    array = decode_raw("mask", DataType.BOOL, [2], raw)
    assert array.dtype == np.bool_
    assert array.tolist() == expected
    assert encode_raw(array) == bytes(expected)  # canonical 0/1 after decoding


def test_decode_raw_accepts_memoryview_without_copying() -> None:
    buffer = bytearray(np.arange(4, dtype="<i4").tobytes())
    array = decode_raw("v", DataType.INT32, [2, 2], memoryview(buffer))
    buffer[0] = 9
    assert array[0, 0] == 9


# --------------------------------------------------------------------------- decode errors


DECODE_ERRORS = [
    pytest.param("FP32", [2, 2], b"\x00" * 15, "15 bytes", id="fixed-too-short"),
    pytest.param("FP32", [2, 2], b"\x00" * 17, "17 bytes", id="fixed-too-long"),
    pytest.param("INT64", [], b"\x00" * 4, "needs 8", id="fixed-scalar-too-short"),
    pytest.param("UINT8", [0], b"\x00", "needs 0", id="fixed-zero-size-with-bytes"),
    pytest.param("BYTES", [1], b"\x01\x00\x00", "cut short", id="bytes-truncated-prefix"),
    pytest.param(
        "BYTES",
        [2],
        _prefixed(b"ab") + b"\x01\x00",
        "cut short",
        id="bytes-second-prefix-truncated",
    ),
    pytest.param(
        "BYTES", [1], struct.pack("<I", 5) + b"abc", "declares 5 bytes", id="bytes-prefix-past-end"
    ),
    pytest.param(
        "BYTES", [1], struct.pack("<I", 0xFFFFFFFF), "declares 4294967295", id="bytes-huge-prefix"
    ),
    pytest.param(
        "BYTES",
        [2],
        _prefixed(b"a", b"b", b"c"),
        "more than the 2 elements",
        id="bytes-more-elements",
    ),
    pytest.param(
        "BYTES", [0], _prefixed(b""), "more than the 0 elements", id="bytes-zero-size-with-element"
    ),
    pytest.param("BYTES", [3], _prefixed(b"a", b"b"), "hold 2 elements", id="bytes-fewer-elements"),
    pytest.param("BYTES", [], b"", "hold 0 elements", id="bytes-scalar-missing"),
    pytest.param("BOOL", [3], b"\x00\x01", "needs 3", id="bool-too-short"),
    pytest.param("INT32", [2, -1], b"", "negative dimension", id="negative-dim"),
    pytest.param("BYTES", [-1], b"", "negative dimension", id="bytes-negative-dim"),
]


@pytest.mark.parametrize(("datatype", "shape", "raw", "match"), DECODE_ERRORS)
def test_decode_raw_errors(datatype: str, shape: list[int], raw: bytes, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        decode_raw("input__0", DataType(datatype), shape, raw)
    assert "'input__0'" in str(info.value)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [([], ()), ([0], (0,)), ([1, 2, 3], (1, 2, 3)), ((np.int64(4),), (4,))],
)
def test_check_shape_accepts(shape: Any, expected: tuple[int, ...]) -> None:
    dims = check_shape("x", shape)
    assert dims == expected
    assert all(type(d) is int for d in dims)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [0, -1, 4]])
def test_check_shape_refuses_negative_dims(shape: list[int]) -> None:
    with pytest.raises(InvalidInputError, match=r"'my/tensor'.*negative"):
        check_shape("my/tensor", shape)


# --------------------------------------------------------------------------- DataType


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        (np.bool_, DataType.BOOL),
        (np.uint8, DataType.UINT8),
        (np.uint16, DataType.UINT16),
        (np.uint32, DataType.UINT32),
        (np.uint64, DataType.UINT64),
        (np.int8, DataType.INT8),
        (np.int16, DataType.INT16),
        (np.int32, DataType.INT32),
        (np.int64, DataType.INT64),
        (np.float16, DataType.FP16),
        (np.float32, DataType.FP32),
        (np.float64, DataType.FP64),
        (object, DataType.BYTES),
        (np.bytes_, DataType.BYTES),
        ("S7", DataType.BYTES),
        (np.str_, DataType.BYTES),
        ("U3", DataType.BYTES),
        ("<i4", DataType.INT32),
        ("=f8", DataType.FP64),
    ],
)
def test_from_numpy(dtype: Any, datatype: DataType) -> None:
    assert DataType.from_numpy(dtype) is datatype
    assert DataType.from_numpy(np.dtype(dtype)) is datatype


@pytest.mark.parametrize("datatype", list(DataType))
def test_from_numpy_inverts_numpy_dtype(datatype: DataType) -> None:
    assert DataType.from_numpy(datatype.numpy_dtype) is datatype
    assert DataType(datatype.value) is datatype


@pytest.mark.parametrize(
    "dtype", [np.complex64, np.complex128, "datetime64[s]", "timedelta64[s]", "V4"]
)
def test_from_numpy_refuses_types_without_datatype(dtype: Any) -> None:
    with pytest.raises(ValueError, match="no KServe datatype"):
        DataType.from_numpy(dtype)


@pytest.mark.parametrize("datatype", FIXED_TYPES)
def test_from_numpy_big_endian(datatype: DataType) -> None:
    assert DataType.from_numpy(datatype.numpy_dtype.newbyteorder(">")) is datatype


@pytest.mark.parametrize(
    ("datatype", "itemsize"),
    [
        (DataType.BOOL, 1),
        (DataType.UINT16, 2),
        (DataType.FP16, 2),
        (DataType.INT32, 4),
        (DataType.FP64, 8),
        (DataType.UINT64, 8),
        (DataType.BYTES, 0),
    ],
)
def test_itemsize(datatype: DataType, itemsize: int) -> None:
    assert datatype.itemsize == itemsize
