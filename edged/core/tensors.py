"""Raw tensor bytes <-> numpy arrays, with every check a client's bytes need.

Shared by every frontend: the KServe gRPC ``raw_input_contents`` and the ZeroMQ tensor frames
use the same little-endian layout, and BYTES elements are each prefixed by their length as a
4-byte little-endian unsigned integer.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence

import numpy as np

from edged.core.errors import InvalidInputError, clip
from edged.core.types import Array, DataType

_LEN = struct.Struct("<I")


def element_count(shape: Sequence[int]) -> int:
    """Elements in a tensor of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


#: the most dimensions a tensor may have (numpy's limit)
MAX_DIMS = 64
#: the most elements a shape may describe, counting a 0 dimension as 1 (numpy refuses shapes
#: whose product of non-zero dimensions overflows, even when another dimension is 0)
MAX_ELEMENTS = 2**48


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as a tuple of Python ints, refusing what no tensor can have.

    Raises:
        InvalidInputError: more than ``MAX_DIMS`` dimensions, a dimension that is not an
            integer or is negative, or a shape over ``MAX_ELEMENTS`` (0 dimensions counted as
            1); names the tensor.
    """
    if len(shape) > MAX_DIMS:
        raise InvalidInputError(
            f"tensor '{clip(name)}': shape has {len(shape)} dimensions, more than {MAX_DIMS}"
        )
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise InvalidInputError(
            f"tensor '{clip(name)}': shape must be a list of integers"
        ) from None
    if any(d < 0 for d in dims):
        raise InvalidInputError(
            f"tensor '{clip(name)}': shape {clip(list(dims))} has a negative dimension"
        )
    if math.prod(max(d, 1) for d in dims) > MAX_ELEMENTS:
        raise InvalidInputError(
            f"tensor '{clip(name)}': shape {clip(list(dims))} is too large (more than "
            f"{MAX_ELEMENTS} elements, counting a 0 dimension as 1)"
        )
    return dims


def decode_raw(
    name: str, datatype: DataType, shape: Sequence[int], raw: bytes | memoryview
) -> Array:
    """A numpy array viewing ``raw`` (no copy for fixed-size types).

    Raises:
        InvalidInputError: the byte length disagrees with the shape, or a BYTES element's
            length prefix runs past the end.
    """
    dims = check_shape(name, shape)
    count = element_count(dims)
    if datatype is DataType.BYTES:
        return decode_bytes(name, dims, raw)
    expected = count * datatype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"tensor '{clip(name)}': {len(raw)} bytes of raw contents, but {datatype} with shape "
            f"{list(dims)} needs {expected}"
        )
    return view_raw(raw, datatype.numpy_dtype.newbyteorder("<"), count, dims)


def view_raw(raw: bytes | memoryview, dtype: np.dtype, count: int, dims: tuple[int, ...]) -> Array:
    """``decode_raw`` after its checks: ``raw`` (``count`` elements of the little-endian
    fixed-size ``dtype``, its length checked) viewed as an array of ``dims``."""
    array = np.frombuffer(raw, dtype=dtype, count=count)
    if dtype.kind == "b" and count and array.view(np.uint8).max() > 1:
        # Any non-zero byte is true, as in Triton (whose perf_analyzer sends random bytes);
        # normalise so that numpy and the runtimes see canonical 0/1 booleans.
        array = array.view(np.uint8) != 0
    return array.reshape(dims)


def decode_bytes(name: str, dims: tuple[int, ...], raw: bytes | memoryview) -> Array:
    """Split length-prefixed BYTES elements into an object array of ``dims``.

    Raises:
        InvalidInputError: a prefix is cut short or runs past the end, or the element count
            disagrees with the shape.
    """
    view = memoryview(raw)
    count = element_count(dims)
    items: list[bytes] = []
    offset = 0
    end = len(view)
    while offset < end:
        if len(items) == count:
            raise InvalidInputError(
                f"tensor '{clip(name)}': BYTES contents hold more than the {count} elements of "
                f"shape "
                f"{list(dims)}"
            )
        if offset + 4 > end:
            raise InvalidInputError(
                f"tensor '{clip(name)}': BYTES element {len(items)} has a length prefix cut short "
                f"at byte {offset}"
            )
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInputError(
                f"tensor '{clip(name)}': BYTES element {len(items)} declares {length} bytes but "
                "only "
                f"{end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInputError(
            f"tensor '{clip(name)}': BYTES contents hold {len(items)} elements, shape {list(dims)} "
            f"needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(dims)


def to_bytes_element(value: object) -> bytes:
    """One BYTES element as bytes (str is UTF-8 encoded)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def encode_raw(array: Array) -> bytes:
    """The raw little-endian bytes of ``array`` (length-prefixed elements for BYTES)."""
    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = to_bytes_element(item)
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()
