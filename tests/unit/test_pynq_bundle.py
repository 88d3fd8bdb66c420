"""The PYNQ bundle: manifest rules (table-driven) and FINN-style fold/pack (property-tested)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged.core.errors import InvalidInputError, ModelLoadError
from edged.core.types import DataType, TensorSpec
from hal.pynq_bundle import (
    MANIFEST_NAME,
    check_range,
    fold,
    pack,
    parse_manifest,
    read_manifest,
    unfold,
    unpack,
    value_range,
)

VALID: dict[str, Any] = {
    "manifest_version": 1,
    "bitstream": "overlay.bit",
    "clock_mhz": 100,
    "batch": 8,
    "timeout_s": 2.5,
    "inputs": [
        {
            "name": "x",
            "datatype": "INT8",
            "shape": [1, 4, 16],
            "folded_shape": [1, 8, 8],
            "packed_shape": [1, 8, 4],
            "bits": 4,
            "signed": True,
            "dma": "idma0",
        }
    ],
    "outputs": [
        {
            "name": "y",
            "datatype": "UINT8",
            "shape": [1, 10],
            "folded_shape": [1, 2, 5],
            "packed_shape": [1, 2, 4],
            "bits": 3,
            "signed": False,
            "dma": "hier/odma0",
        }
    ],
}


def edited(path: str, value: Any) -> dict[str, Any]:
    """VALID with one key set (``value`` is ``...``: the key removed). ``path`` is dotted."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def test_valid_manifest() -> None:
    m = parse_manifest(VALID)
    assert m.bitstream == "overlay.bit"
    assert m.batch == 8
    assert m.clock_mhz == 100.0
    assert m.timeout_s == 2.5
    (x,) = m.inputs
    assert x.sample_shape == (4, 16)
    assert x.packed_bytes == 32
    assert x.value_range == (-8, 7)
    sig = m.signature()
    assert sig.max_batch_size == 8
    assert sig.inputs == (TensorSpec("x", DataType.INT8, (-1, 4, 16)),)
    assert sig.outputs == (TensorSpec("y", DataType.UINT8, (-1, 10)),)


def test_defaults() -> None:
    data = edited("bitstream", ...)
    del data["clock_mhz"], data["timeout_s"]
    m = parse_manifest(data)
    assert (m.bitstream, m.clock_mhz, m.timeout_s) == ("overlay.bit", None, 5.0)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("surprise", 1, "unknown key(s): 'surprise'"),
        ("manifest_version", 2, "'manifest_version' must be 1"),
        ("manifest_version", ..., "'manifest_version' must be 1"),
        ("bitstream", "../evil.bit", "'bitstream' must be a file name"),
        ("bitstream", "overlay.hwh", "'bitstream' must be a file name"),
        ("clock_mhz", 0, "'clock_mhz' must be a number in (0, 1000]"),
        ("clock_mhz", "fast", "'clock_mhz'"),
        ("batch", ..., "'batch' must be an integer from 1"),
        ("batch", 0, "'batch' must be an integer from 1"),
        ("batch", True, "'batch' must be an integer from 1"),
        ("timeout_s", -1, "'timeout_s' must be a number"),
        ("timeout_s", 601, "'timeout_s' must be a number"),
        ("inputs", [], "'inputs' must be a non-empty list"),
        ("outputs", ..., "'outputs' must be a non-empty list"),
        ("inputs.0.extra", 1, "'inputs[0]' has unknown key(s): 'extra'"),
        ("inputs.0.dma", ..., "'inputs[0]' lacks key(s): 'dma'"),
        ("inputs.0.name", "", "'inputs[0].name' must be a non-empty string"),
        ("inputs.0.datatype", "INT3", "'inputs[0].datatype' 'INT3' is not a KServe datatype"),
        ("inputs.0.datatype", "FP32", "'inputs[0].datatype' must be an integer or BOOL"),
        ("inputs.0.datatype", "UINT8", "'inputs[0].datatype' UINT8 cannot hold signed 4-bit"),
        ("outputs.0.datatype", "BOOL", "'outputs[0].datatype' BOOL cannot hold unsigned 3-bit"),
        ("outputs.0.bits", 8, "'outputs[0].packed_shape' has 4 bytes per word but 5 8-bit"),
        ("inputs.0.bits", 0, "'inputs[0].bits' must be an integer from 1 to 32"),
        ("inputs.0.bits", 33, "'inputs[0].bits' must be an integer from 1 to 32"),
        ("inputs.0.signed", "yes", "'inputs[0].signed' must be true or false"),
        ("inputs.0.shape", [4, 16], "'inputs[0].shape' must start with the batch axis"),
        ("inputs.0.shape", [1], "'inputs[0].shape' must be a list of at least two"),
        ("inputs.0.shape", [1, 0], "'inputs[0].shape' must be a list of at least two"),
        ("inputs.0.folded_shape", [1, 8, 7], "'inputs[0].folded_shape' [1, 8, 7] holds 56"),
        ("inputs.0.packed_shape", [1, 4, 4], "'inputs[0].packed_shape' [1, 4, 4] must equal"),
        ("inputs.0.packed_shape", [1, 8, 3], "has 3 bytes per word but 8 4-bit values need 4"),
        ("inputs.0.dma", "idma 0", "'inputs[0].dma' must be an IP name"),
        ("outputs.0.dma", "/odma0", "'outputs[0].dma' must be an IP name"),
    ],
)
def test_invalid_manifest_names_the_key(path: str, value: Any, message: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        parse_manifest(edited(path, value), "bundle/manifest.json")
    assert message in str(info.value)
    assert str(info.value).startswith("bundle/manifest.json: ")


def test_duplicate_names_and_shared_dmas() -> None:
    data = copy.deepcopy(VALID)
    data["inputs"].append(copy.deepcopy(data["inputs"][0]))
    with pytest.raises(ModelLoadError, match="'inputs' names 'x' more than once"):
        parse_manifest(data)
    data["inputs"][1]["name"] = "x2"
    with pytest.raises(ModelLoadError, match="both use DMA 'idma0'"):
        parse_manifest(data)
    data["inputs"][1]["dma"] = "idma1"
    assert len(parse_manifest(data).inputs) == 2


def test_one_dma_may_carry_an_input_and_an_output() -> None:
    """One axi_dma has both channels: MM2S for an input, S2MM for an output."""
    assert parse_manifest(edited("outputs.0.dma", "idma0")).outputs[0].dma == "idma0"


def test_not_an_object() -> None:
    with pytest.raises(ModelLoadError, match="must be a JSON object"):
        parse_manifest([1, 2])


def test_read_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read the bundle manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(" " * (1 << 20) + json.dumps(VALID))
    with pytest.raises(ModelLoadError, match="larger than"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(VALID))
    assert read_manifest(tmp_path).batch == 8


# ------------------------------------------------------------------------- packing: known answers


@pytest.mark.parametrize(
    ("values", "bits", "signed", "nbytes", "expected"),
    [
        # element i in bits [i*W, (i+1)*W) of a little-endian word (FINN reverse_inner+endian)
        ([1, -1, 2], 4, True, 2, [0xF1, 0x02]),
        ([3, 0, 1, 2], 2, False, 1, [0b10_01_00_11]),
        ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, False, 2, [0b1000_1101, 0b1]),
        ([0x1234, 0xBEEF], 16, False, 4, [0x34, 0x12, 0xEF, 0xBE]),
        ([-2, 3], 3, True, 1, [0b011_110]),
        ([-1], 32, True, 4, [0xFF] * 4),
        ([7], 8, False, 4, [7, 0, 0, 0]),  # zero-padded to a 32-bit stream word
    ],
)
def test_pack_known_answers(
    values: list[int], bits: int, signed: bool, nbytes: int, expected: list[int]
) -> None:
    packed = pack(np.array([values]), bits, signed, nbytes)
    assert packed.dtype == np.uint8
    assert packed[0].tolist() == expected
    back = unpack(packed, bits, signed, len(values), np.dtype(np.int64))
    assert back[0].tolist() == values


def test_pack_refuses_too_few_bytes() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        pack(np.zeros((1, 3)), 4, False, 1)
    with pytest.raises(ValueError, match="hold fewer"):
        unpack(np.zeros((1, 1), np.uint8), 4, False, 3, np.dtype(np.uint8))


def test_unpack_ignores_padding_bits() -> None:
    packed = pack(np.array([[5, 6, 7]]), 3, False, 4)
    packed[0, 1] |= 0xFE  # bits 9..15 are padding
    packed[0, 2:] = 0xFF
    assert unpack(packed, 3, False, 3, np.dtype(np.uint8)).tolist() == [[5, 6, 7]]


def test_unpack_to_bool() -> None:
    packed = pack(np.array([[True, False, True]]), 1, False, 1)
    out = unpack(packed, 1, False, 3, np.dtype(np.bool_))
    assert out.dtype == np.bool_
    assert out.tolist() == [[True, False, True]]


# ------------------------------------------------------------------------- packing: properties


@st.composite
def packable(draw: st.DrawFn) -> tuple[np.ndarray, int, bool, int]:
    """An integer array, its bit width and signedness, and a padded byte count."""
    bits = draw(st.integers(1, 32))
    signed = draw(st.booleans())
    lo, hi = value_range(bits, signed)
    lead = draw(st.lists(st.integers(1, 4), max_size=2))
    count = draw(st.integers(1, 24))
    x = draw(hnp.arrays(np.int64, (*lead, count), elements=st.integers(lo, hi)))
    nbytes = math.ceil(count * bits / 8) + draw(st.integers(0, 5))
    return x, bits, signed, nbytes


def reference_pack(row: list[int], bits: int, nbytes: int) -> list[int]:
    """The FINN layout, one Python integer per word: the specification, not the implementation."""
    word = 0
    for i, v in enumerate(row):
        word |= (v & ((1 << bits) - 1)) << (i * bits)
    return list(word.to_bytes(nbytes, "little"))


@settings(max_examples=300, deadline=None)
@given(packable())
def test_unpack_inverts_pack(case: tuple[np.ndarray, int, bool, int]) -> None:
    x, bits, signed, nbytes = case
    packed = pack(x, bits, signed, nbytes)
    assert packed.shape == (*x.shape[:-1], nbytes)
    back = unpack(packed, bits, signed, x.shape[-1], np.dtype(np.int64))
    np.testing.assert_array_equal(back, x)


@settings(max_examples=200, deadline=None)
@given(packable())
def test_pack_matches_the_reference_layout(case: tuple[np.ndarray, int, bool, int]) -> None:
    x, bits, signed, nbytes = case
    packed = pack(x, bits, signed, nbytes).reshape(-1, nbytes)
    rows = x.reshape(-1, x.shape[-1]).tolist()
    assert packed.tolist() == [reference_pack(r, bits, nbytes) for r in rows]


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, 5),
    outer=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    fold_factors=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seed=st.integers(0, 2**32 - 1),
)
def test_unfold_inverts_fold(
    batch: int, outer: list[int], fold_factors: tuple[int, int], seed: int
) -> None:
    """A FINN fold splits the sample into [..., neurons/PE-like folds, SIMD] row-major."""
    a, b = fold_factors
    shape = (1, *outer, a * b)
    folded = (1, math.prod(outer) * a, b)
    x = np.random.default_rng(seed).integers(-100, 100, size=(batch, *shape[1:]))
    f = fold(x, folded)
    assert f.shape == (batch, *folded[1:])
    np.testing.assert_array_equal(f.reshape(batch, -1), x.reshape(batch, -1))
    np.testing.assert_array_equal(unfold(f, shape), x)


def test_fold_refuses_a_different_size() -> None:
    with pytest.raises(ValueError, match="reshape"):
        fold(np.zeros((2, 6)), (1, 4, 2))


# ------------------------------------------------------------------------- range checks


@pytest.mark.parametrize(
    ("values", "bits", "signed", "bad"),
    [([0, 8], 4, True, 8), ([-9, 0], 4, True, -9), ([-1], 4, False, -1), ([16], 4, False, 16)],
)
def test_check_range_refuses(values: list[int], bits: int, signed: bool, bad: int) -> None:
    with pytest.raises(InvalidInputError, match=rf"tensor 'x': value {bad} is outside"):
        check_range("x", np.array(values), bits, signed)


def test_check_range_accepts_the_limits_and_refuses_floats() -> None:
    check_range("x", np.array([-8, 7]), 4, True)
    check_range("x", np.array([0, 15], np.uint8), 4, False)
    check_range("x", np.array([True, False]), 1, False)
    check_range("x", np.zeros((0, 3), np.int8), 4, True)
    with pytest.raises(InvalidInputError, match="takes integers, not float32"):
        check_range("x", np.zeros(3, np.float32), 4, True)
