"""The PYNQ model bundle: its manifest's rules, and the FINN-style fold and pack of tensors.

A bundle is a version folder::

    <model>/<version>/overlay.bit       the bitstream (or overlay.xclbin)
    <model>/<version>/overlay.hwh       its hardware handoff, same stem (pynq finds it by stem)
    <model>/<version>/manifest.json     what this module reads

``manifest.json`` (every key is checked; unknown keys are refused)::

    {
      "manifest_version": 1,
      "bitstream": "overlay.bit",        optional, default "overlay.bit" (.bit, .bin or .xclbin)
      "clock_mhz": 100.0,                optional: PL clock 0 set after download, as FINN does
      "batch": 8,                        most samples one transfer carries (buffers are sized so)
      "timeout_s": 5.0,                  optional: longest a transfer may take (then: hung)
      "inputs":  [TENSOR, ...],
      "outputs": [TENSOR, ...]
    }

    TENSOR = {
      "name": "input",
      "datatype": "INT8",                the KServe datatype clients send or get back
      "shape": [1, 64],                  FINN's ishape_normal: batch axis first, written 1
      "folded_shape": [1, 8, 8],         FINN's ishape_folded: same elements, innermost = SIMD/PE
      "packed_shape": [1, 8, 4],         FINN's ishape_packed: innermost = bytes per stream word
      "bits": 4, "signed": true,         the accelerator's integer width and signedness
      "dma": "idma0"                     the axi_dma whose MM2S (input) or S2MM (output) it uses
    }

Packing follows FINN's driver (``finnpy_to_packed_bytearray(..., reverse_endian=True,
reverse_inner=True)``): along the innermost folded axis, element ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of one little-endian integer, two's complement when signed, and the
word is zero-padded up to ``packed_shape[-1]`` bytes (a byte boundary, or a wider stream word).

Everything here is pure: no I/O except :func:`read_manifest`, which reads the manifest file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from edged.core.errors import InvalidInputError, ModelLoadError
from edged.core.types import Array, DataType, Signature, TensorSpec

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_BITSTREAM = "overlay.bit"
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 600.0
MAX_BATCH = 65536
MAX_BITS = 32
MAX_MANIFEST_BYTES = 1 << 20
BITSTREAM_SUFFIXES = (".bit", ".bin", ".xclbin")

_TOP_KEYS = frozenset(
    {"manifest_version", "bitstream", "clock_mhz", "batch", "timeout_s", "inputs", "outputs"}
)
_TENSOR_KEYS = frozenset(
    {"name", "datatype", "shape", "folded_shape", "packed_shape", "bits", "signed", "dma"}
)
_REQUIRED_TENSOR_KEYS = _TENSOR_KEYS
#: an IP's full path in the block design: names separated by "/"
_IP_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")
_BITSTREAM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_INTEGER_DATATYPES = frozenset(
    {
        DataType.BOOL,
        DataType.UINT8,
        DataType.UINT16,
        DataType.UINT32,
        DataType.UINT64,
        DataType.INT8,
        DataType.INT16,
        DataType.INT32,
        DataType.INT64,
    }
)


@dataclass(frozen=True)
class StreamTensor:
    """One input or output, streamed through one DMA channel."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    """Normal shape, batch axis first (1 in the manifest)."""
    folded_shape: tuple[int, ...]
    packed_shape: tuple[int, ...]
    bits: int
    signed: bool
    dma: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (without the batch axis)."""
        return self.shape[1:]

    @property
    def packed_bytes(self) -> int:
        """Bytes of one packed sample, as the DMA moves it."""
        return math.prod(self.packed_shape[1:])

    @property
    def value_range(self) -> tuple[int, int]:
        """The smallest and largest value ``bits`` and ``signed`` can hold."""
        return value_range(self.bits, self.signed)


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json``."""

    bitstream: str
    clock_mhz: float | None
    batch: int
    timeout_s: float
    inputs: tuple[StreamTensor, ...]
    outputs: tuple[StreamTensor, ...]

    def signature(self) -> Signature:
        """What the bundle takes and returns: the batch axis dynamic, up to ``batch``."""
        return Signature(
            inputs=tuple(_spec(t) for t in self.inputs),
            outputs=tuple(_spec(t) for t in self.outputs),
            max_batch_size=self.batch,
        )


def _spec(t: StreamTensor) -> TensorSpec:
    return TensorSpec(t.name, t.datatype, (-1, *t.sample_shape))


def value_range(bits: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest integer of ``bits`` bits (two's complement when signed)."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


# ---------------------------------------------------------------------------- manifest


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate ``bundle/manifest.json``.

    Raises:
        ModelLoadError: the file is missing, too large, not JSON, or breaks a rule (the
            message names the key).
    """
    path = bundle / MANIFEST_NAME
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the bundle manifest: {e}") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelLoadError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from e
    return parse_manifest(data, str(path))


def parse_manifest(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded manifest.

    Raises:
        ModelLoadError: a key is unknown, missing or has a bad value; the message names it.
    """

    def fail(message: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: {message}")

    if not isinstance(data, Mapping):
        raise fail("the manifest must be a JSON object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise fail(f"unknown key(s): {', '.join(map(repr, unknown))}")
    version = data.get("manifest_version")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise fail(f"'manifest_version' must be {MANIFEST_VERSION}, not {version!r}")

    bitstream = data.get("bitstream", DEFAULT_BITSTREAM)
    if (
        not isinstance(bitstream, str)
        or not _BITSTREAM_NAME.match(bitstream)
        or not bitstream.endswith(BITSTREAM_SUFFIXES)
    ):
        raise fail(
            f"'bitstream' must be a file name in the bundle ending in "
            f"{', '.join(BITSTREAM_SUFFIXES)}, not {bitstream!r}"
        )

    clock = data.get("clock_mhz")
    if clock is not None and (not _is_number(clock) or not 0 < float(clock) <= 1000):
        raise fail(f"'clock_mhz' must be a number in (0, 1000], not {clock!r}")

    batch = data.get("batch")
    if not _is_int(batch) or not 1 <= batch <= MAX_BATCH:
        raise fail(f"'batch' must be an integer from 1 to {MAX_BATCH}, not {batch!r}")

    timeout = data.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not _is_number(timeout) or not 0 < float(timeout) <= MAX_TIMEOUT_S:
        raise fail(f"'timeout_s' must be a number in (0, {MAX_TIMEOUT_S:g}], not {timeout!r}")

    inputs = _tensors(data, "inputs", fail)
    outputs = _tensors(data, "outputs", fail)
    _check_dmas(inputs, "inputs", fail)
    _check_dmas(outputs, "outputs", fail)
    return Manifest(
        bitstream=bitstream,
        clock_mhz=None if clock is None else float(clock),
        batch=batch,
        timeout_s=float(timeout),
        inputs=inputs,
        outputs=outputs,
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _tensors(data: Mapping[str, Any], key: str, fail: Any) -> tuple[StreamTensor, ...]:
    raw = data.get(key)
    if not isinstance(raw, list) or not raw:
        raise fail(f"'{key}' must be a non-empty list of tensors")
    tensors = tuple(_tensor(item, f"{key}[{i}]", fail) for i, item in enumerate(raw))
    names = [t.name for t in tensors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise fail(f"'{key}' names {', '.join(map(repr, duplicates))} more than once")
    return tensors


def _shape(raw: Any, where: str, fail: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) < 2 or not all(_is_int(d) and d >= 1 for d in raw):
        raise fail(f"'{where}' must be a list of at least two positive integers, not {raw!r}")
    if raw[0] != 1:
        raise fail(f"'{where}' must start with the batch axis written as 1, not {raw[0]}")
    return tuple(raw)


def _tensor(raw: Any, where: str, fail: Any) -> StreamTensor:
    if not isinstance(raw, Mapping):
        raise fail(f"'{where}' must be an object")
    unknown = sorted(set(raw) - _TENSOR_KEYS)
    if unknown:
        raise fail(f"'{where}' has unknown key(s): {', '.join(map(repr, unknown))}")
    missing = sorted(_REQUIRED_TENSOR_KEYS - set(raw))
    if missing:
        raise fail(f"'{where}' lacks key(s): {', '.join(map(repr, missing))}")

    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise fail(f"'{where}.name' must be a non-empty string")
    try:
        datatype = DataType(raw["datatype"])
    except ValueError:
        raise fail(f"'{where}.datatype' {raw['datatype']!r} is not a KServe datatype") from None
    if datatype not in _INTEGER_DATATYPES:
        raise fail(f"'{where}.datatype' must be an integer or BOOL datatype, not {datatype}")
    bits = raw["bits"]
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise fail(f"'{where}.bits' must be an integer from 1 to {MAX_BITS}, not {bits!r}")
    signed = raw["signed"]
    if not isinstance(signed, bool):
        raise fail(f"'{where}.signed' must be true or false")
    if signed and bits < 2:
        raise fail(f"'{where}.bits' must be at least 2 for a signed tensor")
    if not _holds(datatype, bits, signed):
        raise fail(
            f"'{where}.datatype' {datatype} cannot hold {'signed' if signed else 'unsigned'} "
            f"{bits}-bit values"
        )

    shape, folded, packed = _shapes(raw, where, bits, fail)
    dma = raw["dma"]
    if not isinstance(dma, str) or not _IP_PATH.match(dma):
        raise fail(f"'{where}.dma' must be an IP name such as 'idma0', not {dma!r}")
    return StreamTensor(name, datatype, shape, folded, packed, bits, signed, dma)


def _shapes(
    raw: Mapping[str, Any], where: str, bits: int, fail: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    shape = _shape(raw["shape"], f"{where}.shape", fail)
    folded = _shape(raw["folded_shape"], f"{where}.folded_shape", fail)
    packed = _shape(raw["packed_shape"], f"{where}.packed_shape", fail)
    if math.prod(folded) != math.prod(shape):
        raise fail(
            f"'{where}.folded_shape' {list(folded)} holds {math.prod(folded)} elements but "
            f"'shape' {list(shape)} holds {math.prod(shape)}"
        )
    if packed[:-1] != folded[:-1]:
        raise fail(
            f"'{where}.packed_shape' {list(packed)} must equal 'folded_shape' {list(folded)} "
            f"on every axis but the last"
        )
    need = math.ceil(folded[-1] * bits / 8)
    if packed[-1] < need:
        raise fail(
            f"'{where}.packed_shape' has {packed[-1]} bytes per word but {folded[-1]} "
            f"{bits}-bit values need {need}"
        )
    return shape, folded, packed


def _holds(datatype: DataType, bits: int, signed: bool) -> bool:
    if datatype is DataType.BOOL:
        return bits == 1 and not signed
    width = datatype.itemsize * 8
    if datatype.numpy_dtype.kind == "i":
        return bits <= width if signed else bits < width
    return not signed and bits <= width


def _check_dmas(tensors: Sequence[StreamTensor], key: str, fail: Any) -> None:
    seen: dict[str, str] = {}
    for t in tensors:
        if t.dma in seen:
            raise fail(
                f"'{key}' tensors {seen[t.dma]!r} and {t.name!r} both use DMA {t.dma!r}; "
                f"each needs its own channel"
            )
        seen[t.dma] = t.name


# ---------------------------------------------------------------------------- fold / pack


def fold(x: Array, folded_shape: Sequence[int]) -> Array:
    """Reshape a batch ``[N, ...]`` to ``[N, *folded_shape[1:]]`` (FINN's ``fold_input``).

    Raises:
        ValueError: the sample size differs from the folded shape's.
    """
    return x.reshape((x.shape[0], *folded_shape[1:]))


def unfold(x: Array, shape: Sequence[int]) -> Array:
    """Reshape a folded batch back to ``[N, *shape[1:]]`` (FINN's ``unfold_output``)."""
    return x.reshape((x.shape[0], *shape[1:]))


def check_range(name: str, x: Array, bits: int, signed: bool) -> None:
    """Refuse values the accelerator's ``bits``-bit integers cannot hold.

    Raises:
        InvalidInputError: a value is out of range, or the tensor is not of integers.
    """
    if x.dtype.kind not in "biu":
        raise InvalidInputError(f"tensor '{name}': the accelerator takes integers, not {x.dtype}")
    if x.size == 0 or x.dtype.kind == "b":
        return
    lo, hi = value_range(bits, signed)
    smallest, largest = int(x.min()), int(x.max())
    if smallest < lo or largest > hi:
        bad = smallest if smallest < lo else largest
        raise InvalidInputError(
            f"tensor '{name}': value {bad} is outside [{lo}, {hi}], the range of the "
            f"accelerator's {'signed' if signed else 'unsigned'} {bits}-bit input"
        )


def pack(x: Array, bits: int, signed: bool, nbytes: int) -> Array:
    """Pack the innermost axis of integer ``x`` into ``nbytes`` little-endian bytes.

    Element ``i`` of the innermost axis lands in bits ``[i*bits, (i+1)*bits)``; signed values
    are written in two's complement; the word is zero-padded to ``nbytes``. Values must be in
    range (see :func:`check_range`): out-of-range bits are masked off.

    Raises:
        ValueError: ``nbytes`` is too small for the innermost axis, or ``bits`` is out of 1..32.
    """
    del signed  # two's complement masking is the same operation for both
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be 1..{MAX_BITS}, not {bits}")
    count = x.shape[-1]
    if count * bits > nbytes * 8:
        raise ValueError(f"{count} values of {bits} bits do not fit in {nbytes} bytes")
    lead = x.shape[:-1]
    words = (np.asarray(x).astype(np.int64) & ((1 << bits) - 1)).astype("<u4")
    if bits % 8 == 0:
        # whole bytes: each value's low bytes, in order
        data = words.view(np.uint8).reshape((*lead, count, 4))[..., : bits // 8]
        data = data.reshape((*lead, count * bits // 8))
    else:
        unpacked = np.unpackbits(
            words.view(np.uint8).reshape((*lead, count, 4)), axis=-1, bitorder="little"
        )[..., :bits]
        data = np.packbits(unpacked.reshape((*lead, count * bits)), axis=-1, bitorder="little")
    out = np.zeros((*lead, nbytes), dtype=np.uint8)
    out[..., : data.shape[-1]] = data
    return out


def unpack(packed: Array, bits: int, signed: bool, count: int, dtype: np.dtype[Any]) -> Array:
    """Unpack ``count`` values of ``bits`` bits from the innermost axis of uint8 ``packed``.

    The inverse of :func:`pack`; padding bits are ignored. Signed values are sign-extended.

    Raises:
        ValueError: the innermost axis holds fewer than ``count * bits`` bits, or ``bits`` is
            out of 1..32.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be 1..{MAX_BITS}, not {bits}")
    if packed.dtype != np.uint8:
        raise ValueError(f"packed data must be uint8, not {packed.dtype}")
    nbytes = packed.shape[-1]
    if count * bits > nbytes * 8:
        raise ValueError(f"{nbytes} bytes hold fewer than {count} values of {bits} bits")
    lead = packed.shape[:-1]
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits]
    fields = np.zeros((*lead, count, 32), dtype=np.uint8)
    fields[..., :bits] = stream.reshape((*lead, count, bits))
    words = np.packbits(fields, axis=-1, bitorder="little").view("<u4")[..., 0]
    values = words.astype(np.int64)
    if signed:
        values -= (values >> (bits - 1) & 1) << bits
    result: Array = values != 0 if np.dtype(dtype) == np.bool_ else values.astype(dtype)
    return result
