"""edged.serving.validate: a decoded request (validate_request), or input tensors alone
(validate_inputs, what AddSamples checks), against a model's signature."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edged.core.errors import InvalidInputError
from edged.core.types import Array, DataType, InferRequest, Signature, TensorSpec
from edged.serving.validate import validate_inputs, validate_request

FP32 = DataType.FP32
INT64 = DataType.INT64
BYTES = DataType.BYTES

# batches up to 4: "image" is [batch, 3, dynamic], "ids" is [batch], "text" is [batch, 2]
BATCHING = Signature(
    inputs=(
        TensorSpec("image", FP32, (-1, 3, -1)),
        TensorSpec("ids", INT64, (-1,)),
        TensorSpec("text", BYTES, (-1, 2)),
    ),
    outputs=(TensorSpec("scores", FP32, (-1, 10)), TensorSpec("labels", BYTES, (-1,))),
    max_batch_size=4,
)
# does not batch: shapes are the model's full shapes, a dynamic axis 0 is not a batch axis
FIXED = Signature(
    inputs=(TensorSpec("scale", FP32, ()), TensorSpec("x", FP32, (-1, 3))),
    outputs=(TensorSpec("y", FP32, (-1, 3)),),
    max_batch_size=0,
)


def _text(*shape: int) -> Array:
    array = np.empty(shape, dtype=object)
    array.reshape(-1)[:] = [b"w"] * array.size
    return array


def _batch(n: int, **replace: Array) -> dict[str, Array]:
    inputs = {
        "image": np.zeros((n, 3, 5), np.float32),
        "ids": np.zeros((n,), np.int64),
        "text": _text(n, 2),
    }
    inputs.update(replace)
    return inputs


def _request(inputs: dict[str, Array], outputs: tuple[str, ...] = ()) -> InferRequest:
    return InferRequest(model_name="net", inputs=inputs, requested_outputs=outputs)


VALID = [
    pytest.param(BATCHING, _batch(1), (), 1, id="batch-1"),
    pytest.param(BATCHING, _batch(4), ("labels", "scores"), 4, id="batch-max"),
    pytest.param(
        BATCHING,
        _batch(3, image=np.zeros((3, 3, 0), np.float32)),
        (),
        3,
        id="zero-size-dynamic-dim",
    ),
    pytest.param(
        BATCHING,
        _batch(2, text=np.array([["a", "b"], ["c", "d"]])),
        (),
        2,
        id="str-array-is-bytes",
    ),
    pytest.param(
        BATCHING,
        _batch(2, text=np.array([[b"a", b"b"], [b"c", b""]])),
        (),
        2,
        id="numpy-bytes-array-is-bytes",
    ),
    pytest.param(
        FIXED,
        {"scale": np.float32(2.0) * np.ones((), np.float32), "x": np.zeros((7, 3), np.float32)},
        ("y",),
        1,
        id="non-batching-returns-1",
    ),
    pytest.param(
        FIXED,
        {"x": np.zeros((0, 3), np.float32), "scale": np.zeros((), np.float32)},
        (),
        1,
        id="non-batching-any-order-empty-axis",
    ),
]


@pytest.mark.parametrize(("signature", "inputs", "outputs", "batch"), VALID)
def test_valid_requests(
    signature: Signature, inputs: dict[str, Array], outputs: tuple[str, ...], batch: int
) -> None:
    assert validate_request(_request(inputs, outputs), signature) == batch


INVALID = [
    pytest.param(
        BATCHING,
        {**_batch(1), "mask": np.zeros((1,), np.bool_)},
        (),
        "mask",
        "unknown input",
        id="unknown-input",
    ),
    pytest.param(
        BATCHING,
        {k: v for k, v in _batch(1).items() if k != "ids"},
        (),
        "ids",
        "missing input",
        id="missing-input",
    ),
    pytest.param(
        FIXED,
        {"x": np.zeros((1, 3), np.float32)},
        (),
        "scale",
        "missing input",
        id="missing-scalar-input",
    ),
    pytest.param(
        BATCHING,
        _batch(1, ids=np.zeros((1,), np.int32)),
        (),
        "ids",
        "datatype INT32 does not match the model's INT64",
        id="dtype-mismatch",
    ),
    pytest.param(
        BATCHING,
        _batch(1, image=np.zeros((1, 3, 5), np.float64)),
        (),
        "image",
        "datatype",
        id="dtype-fp64-for-fp32",
    ),
    pytest.param(
        BATCHING,
        _batch(1, text=np.zeros((1, 2), np.uint8)),
        (),
        "text",
        "datatype",
        id="dtype-numbers-for-bytes",
    ),
    pytest.param(
        BATCHING,
        _batch(1, image=np.zeros((1, 3), np.float32)),
        (),
        "image",
        "shape",
        id="rank-too-small",
    ),
    pytest.param(
        BATCHING,
        _batch(1, image=np.zeros((1, 3, 5, 1), np.float32)),
        (),
        "image",
        "shape",
        id="rank-too-large",
    ),
    pytest.param(
        FIXED,
        {"scale": np.zeros((1,), np.float32), "x": np.zeros((1, 3), np.float32)},
        (),
        "scale",
        "shape",
        id="rank-1-for-scalar",
    ),
    pytest.param(
        BATCHING,
        _batch(1, image=np.zeros((1, 4, 5), np.float32)),
        (),
        "image",
        "shape [1, 4, 5] does not match the model's [-1, 3, -1]",
        id="dim-mismatch",
    ),
    pytest.param(
        FIXED,
        {"scale": np.zeros((), np.float32), "x": np.zeros((2, 2), np.float32)},
        (),
        "x",
        "shape",
        id="non-batching-dim-mismatch",
    ),
    pytest.param(BATCHING, _batch(0), (), "image", "batch size 0", id="batch-0"),
    pytest.param(
        BATCHING, _batch(5), (), "image", "batch size 5 is outside 1..4", id="batch-over-max"
    ),
    pytest.param(
        BATCHING,
        _batch(2, ids=np.zeros((3,), np.int64)),
        (),
        "ids",
        "differs from input 'image'",
        id="inconsistent-batch",
    ),
    pytest.param(
        BATCHING,
        _batch(2, text=_text(1, 2)),
        (),
        "text",
        "differs",
        id="inconsistent-batch-last-input",
    ),
    pytest.param(
        BATCHING, _batch(1), ("scores", "logits"), "logits", "unknown output", id="unknown-output"
    ),
    pytest.param(
        BATCHING, _batch(1), ("image",), "image", "unknown output", id="input-requested-as-output"
    ),
]


@pytest.mark.parametrize(("signature", "inputs", "outputs", "tensor", "match"), INVALID)
def test_invalid_requests(
    signature: Signature,
    inputs: dict[str, Array],
    outputs: tuple[str, ...],
    tensor: str,
    match: str,
) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(match)) as info:
        validate_request(_request(inputs, outputs), signature)
    assert f"'{tensor}'" in str(info.value)


def test_array_without_datatype_is_invalid_input() -> None:
    inputs = _batch(1, image=np.zeros((1, 3, 5), np.complex64))
    with pytest.raises(InvalidInputError, match="'image'"):
        validate_request(_request(inputs), BATCHING)


def test_big_endian_input_validates() -> None:
    inputs = _batch(2, image=np.zeros((2, 3, 5), ">f4"))
    assert validate_request(_request(inputs), BATCHING) == 2


# -- the inputs alone (AddSamples): the same checks, the same messages ---------------------


@pytest.mark.parametrize(("signature", "inputs", "outputs", "batch"), VALID)
def test_valid_inputs_give_the_requests_batch(
    signature: Signature, inputs: dict[str, Array], outputs: tuple[str, ...], batch: int
) -> None:
    assert validate_inputs("net", inputs, signature) == batch


INPUT_ERRORS = [case for case in INVALID if not case.values[2]]  # no requested outputs


@pytest.mark.parametrize(("signature", "inputs", "outputs", "tensor", "match"), INPUT_ERRORS)
def test_invalid_inputs_are_refused_as_in_a_request(
    signature: Signature,
    inputs: dict[str, Array],
    outputs: tuple[str, ...],
    tensor: str,
    match: str,
) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(match)) as alone:
        validate_inputs("net", inputs, signature)
    assert f"'{tensor}'" in str(alone.value)
    with pytest.raises(InvalidInputError) as in_request:
        validate_request(_request(inputs, outputs), signature)
    assert str(alone.value) == str(in_request.value)


def test_inputs_name_the_model_they_were_meant_for() -> None:
    inputs = {**_batch(1), "mask": np.zeros((1,), np.bool_)}
    with pytest.raises(InvalidInputError, match="unknown input tensor 'mask' for model 'digits'"):
        validate_inputs("digits", inputs, BATCHING)
