"""edged.frontends.kserve_codec: KServe v2 protobuf messages <-> edged requests and responses."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import model_config_pb2 as mc
from edged.core.errors import InvalidInputError, UnsupportedError
from edged.core.types import Array, DataType, InferRequest, InferResponse, Signature, TensorSpec
from edged.frontends import kserve_codec as codec
from edged.frontends.kserve_codec import (
    output_spans,
    request_from_proto,
    request_to_proto,
    response_from_proto,
    response_to_proto,
)

Tensor = pb.ModelInferRequest.InferInputTensor
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def _tensor(name: str, datatype: str, shape: list[int], **contents: Any) -> Tensor:
    tensor = Tensor(name=name, datatype=datatype, shape=shape)
    if contents:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    return tensor


def _message(
    *tensors: Tensor, raw: list[bytes] | None = None, model: str = "net"
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, inputs=tensors)
    if raw is not None:
        message.raw_input_contents.extend(raw)
    return message


def _wire(message: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """The message as the server receives it: serialized and parsed again."""
    return pb.ModelInferRequest.FromString(message.SerializeToString())


def _bytes_array(items: list[bytes], shape: tuple[int, ...]) -> Array:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


# --------------------------------------------------------------------------- typed contents


TYPED = [
    pytest.param(
        "BOOL",
        [3],
        {"bool_contents": [True, False, True]},
        np.array([True, False, True]),
        id="bool",
    ),
    pytest.param(
        "INT8",
        [2, 2],
        {"int_contents": [-128, 127, 0, -1]},
        np.array([[-128, 127], [0, -1]], np.int8),
        id="int8",
    ),
    pytest.param(
        "INT16",
        [2],
        {"int_contents": [-32768, 32767]},
        np.array([-32768, 32767], np.int16),
        id="int16",
    ),
    pytest.param(
        "INT32",
        [2],
        {"int_contents": [-(2**31), 2**31 - 1]},
        np.array([-(2**31), 2**31 - 1], np.int32),
        id="int32",
    ),
    pytest.param(
        "INT64",
        [2],
        {"int64_contents": [-(2**63), 2**63 - 1]},
        np.array([-(2**63), 2**63 - 1], np.int64),
        id="int64",
    ),
    pytest.param(
        "UINT8", [2], {"uint_contents": [0, 255]}, np.array([0, 255], np.uint8), id="uint8"
    ),
    pytest.param(
        "UINT16",
        [3],
        {"uint_contents": [0, 1, 65535]},
        np.array([0, 1, 65535], np.uint16),
        id="uint16",
    ),
    pytest.param(
        "UINT32", [1], {"uint_contents": [2**32 - 1]}, np.array([2**32 - 1], np.uint32), id="uint32"
    ),
    pytest.param(
        "UINT64",
        [2],
        {"uint64_contents": [0, 2**64 - 1]},
        np.array([0, 2**64 - 1], np.uint64),
        id="uint64",
    ),
    pytest.param(
        "FP32",
        [2, 1],
        {"fp32_contents": [1.5, -2.25]},
        np.array([[1.5], [-2.25]], np.float32),
        id="fp32",
    ),
    pytest.param(
        "FP64",
        [3],
        {"fp64_contents": [0.1, -1e300, math.inf]},
        np.array([0.1, -1e300, math.inf], np.float64),
        id="fp64",
    ),
    pytest.param(
        "BYTES",
        [3],
        {"bytes_contents": [b"", b"\xff\x00", "h\u00e9".encode()]},
        _bytes_array([b"", b"\xff\x00", "h\u00e9".encode()], (3,)),
        id="bytes",
    ),
    pytest.param("FP32", [], {"fp32_contents": [4.0]}, np.array(4.0, np.float32), id="scalar"),
    pytest.param("INT32", [2, 0], {}, np.zeros((2, 0), np.int32), id="zero-size-no-data"),
    pytest.param("BYTES", [0], {}, _bytes_array([], (0,)), id="zero-size-bytes-no-data"),
    pytest.param("FP16", [0], {}, np.zeros((0,), np.float16), id="zero-size-fp16-no-data"),
]


@pytest.mark.parametrize(("datatype", "shape", "contents", "expected"), TYPED)
def test_typed_contents(
    datatype: str, shape: list[int], contents: dict[str, list[Any]], expected: Array
) -> None:
    request = request_from_proto(_wire(_message(_tensor("x", datatype, shape, **contents))))
    array = request.inputs["x"]
    assert array.dtype == expected.dtype
    assert array.shape == expected.shape
    assert array.tolist() == expected.tolist()


def test_typed_fp32_nan() -> None:
    request = request_from_proto(_message(_tensor("x", "FP32", [1], fp32_contents=[math.nan])))
    assert np.isnan(request.inputs["x"][0])


def test_raw_contents_and_request_fields() -> None:
    message = _message(
        _tensor("a", "INT32", [2]),
        _tensor("b", "BYTES", [1]),
        _tensor("c", "BOOL", [2]),
        raw=[np.array([7, -7], "<i4").tobytes(), struct.pack("<I", 2) + b"hi", b"\x01\x05"],
    )
    message.model_version = "3"
    message.id = "req-1"
    message.parameters["priority"].int64_param = 2
    message.parameters["tag"].string_param = "t"
    message.outputs.add(name="y")
    message.outputs.add(name="z")
    message.outputs.add(name="y")
    request = request_from_proto(_wire(message))
    assert request.model_name == "net"
    assert request.model_version == "3"
    assert request.id == "req-1"
    assert dict(request.parameters) == {"priority": 2, "tag": "t"}
    assert request.requested_outputs == ("y", "z")  # duplicates requested once
    assert request.inputs["a"].tolist() == [7, -7]
    assert request.inputs["b"].tolist() == [b"hi"]
    assert request.inputs["c"].tolist() == [True, True]  # any non-zero byte is true


# --------------------------------------------------------------------------- refusals


def _shm(tensor: Tensor) -> Tensor:
    tensor.parameters["shared_memory_region"].string_param = "region0"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    return tensor


def _with_output_parameter(key: str) -> pb.ModelInferRequest:
    message = _message(_tensor("x", "FP32", [1], fp32_contents=[1.0]))
    out = message.outputs.add(name="y")
    out.parameters[key].int64_param = 1
    return message


INVALID = [
    pytest.param(
        _message(_tensor("x", "INT8", [2], int_contents=[1, 128])),
        "x",
        "range of INT8",
        id="int8-above-range",
    ),
    pytest.param(
        _message(_tensor("x", "INT8", [1], int_contents=[-129])),
        "x",
        "range of INT8",
        id="int8-below-range",
    ),
    pytest.param(
        _message(_tensor("x", "UINT8", [1], uint_contents=[256])),
        "x",
        "range of UINT8",
        id="uint8-above-range",
    ),
    pytest.param(
        _message(_tensor("x", "INT16", [1], int_contents=[2**15])),
        "x",
        "range of INT16",
        id="int16-above-range",
    ),
    pytest.param(
        _message(_tensor("x", "UINT16", [1], uint_contents=[2**16])),
        "x",
        "range of UINT16",
        id="uint16-above-range",
    ),
    pytest.param(
        _message(_tensor("x", "INT32", [2], fp32_contents=[1.0, 2.0])),
        "x",
        "not contents.fp32_contents",
        id="int32-in-fp32-field",
    ),
    pytest.param(
        _message(_tensor("x", "INT64", [1], int_contents=[1])),
        "x",
        "contents.int64_contents, not contents.int_contents",
        id="int64-in-int-field",
    ),
    pytest.param(
        _message(_tensor("x", "UINT8", [1], int_contents=[1])),
        "x",
        "not contents.int_contents",
        id="uint8-in-int-field",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [1], fp32_contents=[1.0], fp64_contents=[1.0])),
        "x",
        "not contents.fp64_contents",
        id="two-fields",
    ),
    pytest.param(
        _message(_tensor("x", "BYTES", [1], int_contents=[1])),
        "x",
        "contents.bytes_contents",
        id="bytes-in-int-field",
    ),
    pytest.param(
        _message(_tensor("x", "FP16", [1], fp32_contents=[1.0])),
        "x",
        "FP16 has no typed contents",
        id="fp16-typed",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [2, 2], fp32_contents=[1.0, 2.0, 3.0])),
        "x",
        "holds 3 elements",
        id="too-few-typed",
    ),
    pytest.param(
        _message(_tensor("x", "BOOL", [1], bool_contents=[True, False])),
        "x",
        "holds 2 elements",
        id="too-many-typed",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [], fp32_contents=[1.0, 2.0])),
        "x",
        "holds 2 elements",
        id="too-many-typed-scalar",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [1], fp32_contents=[1.0]), raw=[b"\x00" * 4]),
        "x",
        "both raw",
        id="raw-and-typed",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [1]), _tensor("y", "FP32", [1]), raw=[b"\x00" * 4]),
        "2 inputs",
        "one per input",
        id="raw-too-few",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [1]), raw=[b"\x00" * 4, b"\x00" * 4]),
        "2 entries",
        "one per input",
        id="raw-too-many",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [2]), raw=[b"\x00" * 4]),
        "x",
        "needs 8",
        id="raw-wrong-length",
    ),
    pytest.param(
        _message(_tensor("x", "BYTES", [1]), raw=[b"\x05\x00\x00\x00ab"]),
        "x",
        "declares 5 bytes",
        id="raw-bytes-prefix-past-end",
    ),
    pytest.param(
        _message(
            _tensor("x", "FP32", [1], fp32_contents=[1.0]),
            _tensor("x", "FP32", [1], fp32_contents=[2.0]),
        ),
        "x",
        "more than once",
        id="duplicate-input",
    ),
    pytest.param(
        _message(_tensor("x", "FLOAT32", [1], fp32_contents=[1.0])),
        "x",
        "datatype 'FLOAT32'",
        id="unknown-datatype",
    ),
    pytest.param(
        _message(_tensor("x", "fp32", [1], fp32_contents=[1.0])),
        "x",
        "datatype 'fp32'",
        id="lower-case-datatype",
    ),
    pytest.param(
        _message(_tensor("x", "", [1], fp32_contents=[1.0])),
        "x",
        "datatype ''",
        id="empty-datatype",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [1, -1], fp32_contents=[1.0])),
        "x",
        "negative dimension",
        id="negative-dim",
    ),
    pytest.param(_message(_tensor("x", "FP32", [2])), "x", "no data", id="no-data"),
    pytest.param(
        _message(_tensor("x", "FP32", [1], fp32_contents=[])), "x", "no data", id="empty-contents"
    ),
    pytest.param(
        _message(_tensor("", "FP32", [1], fp32_contents=[1.0])),
        "inputs[0]",
        "no name",
        id="no-name",
    ),
    pytest.param(
        _message(_tensor("x", "FP32", [1], fp32_contents=[1.0]), model=""),
        "model_name",
        "empty",
        id="empty-model-name",
    ),
]


@pytest.mark.parametrize(("message", "names", "match"), INVALID)
def test_request_from_proto_refuses(message: pb.ModelInferRequest, names: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        request_from_proto(_wire(message))
    assert names in str(info.value)


@pytest.mark.parametrize(
    ("message", "names"),
    [
        pytest.param(_message(_shm(_tensor("x", "FP32", [4]))), "'x'", id="shm-input"),
        pytest.param(
            _message(_shm(_tensor("x", "FP32", [1], fp32_contents=[1.0]))),
            "'x'",
            id="shm-input-with-contents",
        ),
        pytest.param(_with_output_parameter("shared_memory_region"), "'y'", id="shm-output"),
        pytest.param(_with_output_parameter("classification"), "'y'", id="classification"),
    ],
)
def test_request_from_proto_unsupported(message: pb.ModelInferRequest, names: str) -> None:
    wire = _wire(message)
    with pytest.raises(UnsupportedError) as info:  # noqa: PT012 - inputs or outputs refuse
        request_from_proto(wire)
        output_spans(wire, None)
    assert names in str(info.value)


# --------------------------------------------------------------------------- round trips


DATATYPES = list(DataType)


@st.composite
def tensors(draw: st.DrawFn) -> Array:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(SHAPES)
    if datatype is DataType.BYTES:
        count = math.prod(shape)
        items = draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
        return _bytes_array(items, shape)
    return draw(hnp.arrays(datatype.numpy_dtype, shape))


NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)


def _assert_same(decoded: dict[str, Array], original: dict[str, Array]) -> None:
    assert list(decoded) == list(original)
    for name, array in original.items():
        got = decoded[name]
        assert got.dtype == array.dtype, name
        assert got.shape == array.shape, name
        if array.dtype == object:
            assert got.tolist() == array.tolist(), name
        else:
            assert got.tobytes() == array.tobytes(), name  # bit-exact, NaN included


@settings(max_examples=200, deadline=None)
@given(
    inputs=st.dictionaries(NAMES, tensors(), min_size=1, max_size=4),
    outputs=st.lists(NAMES, max_size=3, unique=True),
    version=st.sampled_from(["", "1", "42"]),
    request_id=st.text(max_size=8),
)
def test_request_round_trip(
    inputs: dict[str, Array], outputs: list[str], version: str, request_id: str
) -> None:
    request = InferRequest(
        model_name="net",
        inputs=inputs,
        model_version=version,
        id=request_id,
        requested_outputs=tuple(outputs),
    )
    decoded = request_from_proto(_wire(request_to_proto(request)))
    assert decoded.model_name == "net"
    assert decoded.model_version == version
    assert decoded.id == request_id
    assert decoded.requested_outputs == tuple(outputs)
    _assert_same(decoded.inputs, inputs)


@settings(max_examples=100, deadline=None)
@given(outputs=st.dictionaries(NAMES, tensors(), max_size=4))
def test_response_round_trip(outputs: dict[str, Array]) -> None:
    response = InferResponse(model_name="net", model_version="2", outputs=outputs, id="r")
    message = response_to_proto(response)
    assert len(message.raw_output_contents) == len(message.outputs) == len(outputs)
    wire = pb.ModelInferResponse.FromString(message.SerializeToString())
    decoded = response_from_proto(wire)
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("net", "2", "r")
    _assert_same(decoded.outputs, outputs)


@pytest.mark.parametrize(
    ("array", "items"),
    [
        (np.array(["h\u00e9", ""]), ["h\u00e9".encode(), b""]),
        (np.array([b"a", b"bc"], dtype="S2"), [b"a", b"bc"]),
    ],
    ids=["str", "numpy-bytes"],
)
def test_request_to_proto_encodes_str_and_bytes_arrays(array: Array, items: list[bytes]) -> None:
    message = request_to_proto(InferRequest(model_name="net", inputs={"t": array}))
    assert message.inputs[0].datatype == "BYTES"
    decoded = request_from_proto(message)
    assert decoded.inputs["t"].tolist() == items


def test_big_endian_request_encodes_little_endian() -> None:
    array = np.array([[1, 2, 3]], ">i4")
    message = request_to_proto(InferRequest(model_name="net", inputs={"t": array}))
    assert message.inputs[0].datatype == "INT32"
    assert list(message.inputs[0].shape) == [1, 3]
    assert message.raw_input_contents[0] == np.array([[1, 2, 3]], "<i4").tobytes()


def test_response_to_proto_layout() -> None:
    response = InferResponse(
        "net",
        "1",
        {
            "scores": np.array([[0.5, 1.5]], np.float32),
            "label": _bytes_array([b"cat"], ()),
        },
    )
    message = response_to_proto(response)
    assert [(o.name, o.datatype, list(o.shape)) for o in message.outputs] == [
        ("scores", "FP32", [1, 2]),
        ("label", "BYTES", []),
    ]
    assert message.raw_output_contents[0] == np.array([0.5, 1.5], "<f4").tobytes()
    assert message.raw_output_contents[1] == struct.pack("<I", 3) + b"cat"


def _response(datatype: str, shape: list[int], raw: list[bytes]) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name="net")
    message.outputs.add(name="y", datatype=datatype, shape=shape)
    message.raw_output_contents.extend(raw)
    return message


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(_response("FP32", [2], [b"\x00" * 4]), id="wrong-length"),
        pytest.param(_response("FP32", [1], []), id="missing-raw"),
        pytest.param(_response("FLOAT", [1], [b"\x00" * 4]), id="unknown-datatype"),
    ],
)
def test_response_from_proto_refuses(message: pb.ModelInferResponse) -> None:
    with pytest.raises(InvalidInputError, match="'y'"):
        response_from_proto(message)


# -- where a model runs, in ModelConfig ---------------------------------------------------------

EXECUTOR_KINDS = [
    ("cpu-onnx", "KIND_CPU"),
    ("cpu-litert", "KIND_CPU"),
    ("cuda", "KIND_GPU"),
    ("edgetpu", "KIND_MODEL"),
    ("pynq", "KIND_MODEL"),
    ("flaky-sim", "KIND_MODEL"),  # a vendor's device: placement is the executor's own
    ("cpu-vendor", "KIND_CPU"),
]


@pytest.mark.parametrize(("executor", "kind"), EXECUTOR_KINDS)
def test_model_config_says_where_the_model_runs(executor: str, kind: str) -> None:
    sig = Signature((TensorSpec("x", DataType.FP32, (-1, 4)),), (), 8)
    config = codec.model_config("m", sig, "onnxruntime_onnx", "onnxruntime", 2, [1], executor)
    (group,) = config.instance_group
    assert mc.ModelInstanceGroup.Kind.Name(group.kind) == kind
    assert group.count == 2
    assert list(group.gpus) == ([0] if kind == "KIND_GPU" else [])
    assert config.parameters["executor"].string_value == executor
