"""edged.frontends.kserve_codec.inputs_from_proto: AddSamples' tensors decode straight into
arrays, with the same checks and the same arrays as an inference request's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.inference import grpc_service_pb2 as pb
from edged.core.errors import InvalidInputError, OverloadedError
from edged.core.limits import RequestLimits
from edged.core.types import InferRequest
from edged.frontends.kserve_codec import (
    check_input_limits,
    inputs_decode_inline,
    inputs_from_proto,
    request_from_proto,
    request_to_proto,
)

Tensor = pb.ModelInferRequest.InferInputTensor
_NAMES = st.text(alphabet="abcxyz_", min_size=1, max_size=6)
_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
)


def _samples(inputs: dict[str, np.ndarray]) -> mpb.AddSamplesRequest:
    wire = request_to_proto(InferRequest(model_name="net", inputs=inputs))
    return mpb.AddSamplesRequest(
        model="net", inputs=wire.inputs, raw_input_contents=wire.raw_input_contents, labels=[0]
    )


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_NAMES, _ARRAYS, min_size=1, max_size=4))
def test_samples_decode_as_an_inference_request_does(inputs: dict[str, np.ndarray]) -> None:
    request = _samples(inputs)
    got = inputs_from_proto(request.inputs, request.raw_input_contents)
    message = pb.ModelInferRequest(
        model_name="net", inputs=request.inputs, raw_input_contents=request.raw_input_contents
    )
    expected = request_from_proto(message).inputs
    assert list(got) == list(expected) == list(inputs)
    for name, array in inputs.items():
        assert got[name].dtype == expected[name].dtype == array.dtype
        assert got[name].tobytes() == expected[name].tobytes() == array.tobytes()


def test_bad_samples_are_refused_naming_the_tensor() -> None:
    request = _samples({"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(InvalidInputError, match="raw_input_contents has 2 entries for 1 inputs"):
        inputs_from_proto(request.inputs, [*request.raw_input_contents, b""])
    with pytest.raises(InvalidInputError, match="tensor 'x'"):
        inputs_from_proto(request.inputs, [b"\0" * 5])
    twice = [*request.inputs, *request.inputs]
    with pytest.raises(InvalidInputError, match="given more than once"):
        inputs_from_proto(twice, [*request.raw_input_contents] * 2)


def test_the_limits_and_the_inline_rule_apply_to_samples() -> None:
    tensors = [Tensor(name=f"t{i}", datatype="FP32", shape=[1]) for i in range(9)]
    with pytest.raises(OverloadedError, match=r"limits\.max_inputs"):
        check_input_limits(tensors, RequestLimits(max_inputs=8))
    check_input_limits(tensors[:8], RequestLimits(max_inputs=8))
    assert inputs_decode_inline(tensors[:8])
    assert not inputs_decode_inline(tensors)
    assert not inputs_decode_inline([Tensor(name="s", datatype="BYTES", shape=[1])])
