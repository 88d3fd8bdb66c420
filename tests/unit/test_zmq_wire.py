"""The ZeroMQ wire format: round trips for every datatype, and malformed messages refused
with the field named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged.core.errors import InvalidInputError
from edged.core.types import DataType, InferRequest, InferResponse
from edged.frontends import zmq_wire as wire


@st.composite
def tensors(draw):
    datatype = draw(st.sampled_from(list(DataType)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    if datatype is DataType.BYTES:
        count = int(np.prod(shape))
        items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    return draw(hnp.arrays(datatype.numpy_dtype, shape))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object:
        return a.shape == b.shape and a.tolist() == b.tolist()
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    )


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), tensors(), min_size=1, max_size=4))
def test_request_and_response_round_trip(inputs) -> None:
    request = InferRequest(
        "m",
        dict(inputs),
        model_version="3",
        id="r1",
        requested_outputs=("a",),
        parameters={"priority": 2},
    )
    frames = wire.encode_request("infer", "r1", request=request)
    header, decoded = wire.decode_request([bytes(f) for f in frames])
    assert header["op"] == "infer"
    assert decoded is not None
    assert decoded.model_name == "m"
    assert decoded.model_version == "3"
    assert decoded.id == "r1"
    assert decoded.requested_outputs == ("a",)
    assert decoded.parameters == {"priority": 2}
    assert decoded.inputs.keys() == inputs.keys()
    for name, array in inputs.items():
        assert _same(decoded.inputs[name], array), name

    reply = wire.encode_response("r1", InferResponse("m", "3", dict(inputs), "r1"))
    header, outputs = wire.decode_reply([bytes(f) for f in reply])
    assert header["ok"] is True
    for name, array in inputs.items():
        assert _same(outputs[name], array), name


def test_fixed_size_tensors_travel_without_a_copy() -> None:
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    frames = wire.encode_request("infer", "r", request=InferRequest("m", {"x": x}))
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float32), x)
    received = bytearray(bytes(frames[1]))
    _, request = wire.decode_request([frames[0], memoryview(received)])
    assert request is not None
    view = request.inputs["x"]
    received[0:4] = np.float32(42).tobytes()
    assert view[0, 0] == 42  # a view onto the received frame


def _header(**fields) -> bytes:
    return json.dumps({"v": 1, "op": "infer", "id": "x", "model": "m", **fields}).encode()


MALFORMED = [
    ([b"not json"], "JSON"),
    ([b"[1, 2]"], "JSON object"),
    ([json.dumps({"v": 2, "op": "live"}).encode()], "'v'"),
    ([json.dumps({"v": 1, "op": "explode"}).encode()], "'op'"),
    ([json.dumps({"v": 1, "op": "live", "id": 5}).encode()], "'id'"),
    ([json.dumps({"v": 1, "op": "live"}).encode(), b"extra"], "no tensor frames"),
    ([_header(inputs=[{"name": "a", "datatype": "FP32", "shape": [1]}])], "1 inputs but 0"),
    ([_header(inputs=[{"name": "a", "datatype": "FP8", "shape": [1]}]), b"1234"], "FP8"),
    ([_header(inputs=[{"name": "a", "datatype": "FP32", "shape": [2]}]), b"1234"], "'a'"),
    ([_header(inputs=[{"name": "a", "datatype": "FP32", "shape": "2"}]), b"1234"], "shape"),
    ([_header(inputs=[{"datatype": "FP32", "shape": [1]}]), b"1234"], "name"),
    ([_header(inputs=[{"name": "a", "datatype": "FP32", "shape": [True]}]), b"1234"], "integers"),
    ([_header(inputs=[{"name": "a", "datatype": "FP32", "shape": [-1]}]), b"1234"], "negative"),
    ([_header(inputs=[{"name": "a", "datatype": ["FP32"], "shape": [1]}]), b"1234"], "one of"),
    ([_header(inputs=["a"]), b"1234"], "'inputs[0]' must be an object"),
    (
        [_header(inputs=[{"name": "a", "datatype": "FP32", "shape": [1]}] * 2), b"1234", b"1234"],
        "more than once",
    ),
    (
        [_header(inputs=[{"name": "s", "datatype": "BYTES", "shape": [1]}]), b"\x09\x00\x00\x00ab"],
        "'s'",
    ),
    ([_header(model="", inputs=[])], "'model'"),
    ([_header(outputs="label", inputs=[])], "'outputs'"),
    ([_header(parameters=[1], inputs=[])], "'parameters'"),
    ([b"{" + b" " * wire.MAX_HEADER_BYTES + b"}"], "over"),
    ([], "header frame is required"),
]


@pytest.mark.parametrize(("frames", "words"), MALFORMED)
def test_malformed_requests_are_refused_naming_the_field(frames, words) -> None:
    with pytest.raises(InvalidInputError) as err:
        wire.decode_request(frames)
    assert words in str(err.value)


@settings(max_examples=40, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.sampled_from(["", "3"]), st.booleans())
def test_the_pre_encoded_header_is_the_full_encoders_header(
    arrays: list[np.ndarray], version: str, with_parameters: bool
) -> None:
    inputs = {f"in{i}": a for i, a in enumerate(arrays)}
    encoder = wire.RequestEncoder(token="t0k")
    parameters = {"priority": 1} if with_parameters else None
    for rid in ("a1", "a22"):  # the second call reuses the template
        frames = encoder.infer(rid, "m", inputs, ("out",), version, parameters)
        request = InferRequest(
            "m", dict(inputs), version, requested_outputs=("out",), parameters=parameters or {}
        )
        full = wire.encode_request("infer", rid, request=request, token="t0k")
        assert json.loads(bytes(frames[0])) == json.loads(bytes(full[0]))
        assert [bytes(f) for f in frames[1:]] == [bytes(f) for f in full[1:]]
        header, decoded = wire.decode_request(frames)
        assert header["id"] == rid
        assert decoded is not None
        for name, value in inputs.items():
            assert _same(decoded.inputs[name], value)


def test_frames_move_as_one_message_over_a_real_socket_pair() -> None:
    """send_frames / recv_frames / readable (the hot paths' replacements for
    send_multipart / recv_multipart and a read until zmq.Again): every frame arrives, in
    order, as one message, small ones copied and large ones by reference alike; a socket
    with nothing waiting says so, and a non-blocking read of it raises zmq.Again."""
    import zmq

    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        a.bind("inproc://frames")
        b.connect("inproc://frames")
        b.setsockopt(zmq.RCVTIMEO, 5000)
        assert not wire.readable(b)
        with pytest.raises(zmq.Again):
            wire.recv_frames(b, wire.NOBLOCK)
        large = np.arange(100_000, dtype=np.float32)  # 400 kB: sent by reference
        small = np.arange(3, dtype=np.int64)
        first = [b'{"v":1}', wire._tensor_frame(small), wire._tensor_frame(large)]
        wire.send_frames(a, first)
        wire.send_frames(a, [b"second"], wire.NOBLOCK)
        got = wire.recv_frames(b)
        assert [f.bytes for f in got] == [bytes(f) for f in first]
        assert not got[-1].more
        assert wire.readable(b)
        assert [f.bytes for f in wire.recv_frames(b, wire.NOBLOCK)] == [b"second"]
        assert not wire.readable(b)
    finally:
        a.close(0)
        b.close(0)
        context.term()


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.text(max_size=12))
def test_the_templated_reply_header_is_the_full_encoders_header(
    arrays: list[np.ndarray], rid: str
) -> None:
    """encode_response splices the id into a header encoded once per layout: the bytes are
    the compact JSON of the whole header, whatever the id holds (quotes, backslashes,
    control and non-ASCII characters), and the client reads the id back."""
    outputs = {f"out{i}": a for i, a in enumerate(arrays)}
    for request_id in (rid, "a1", rid + '"\\'):  # the later calls reuse the template
        frames = wire.encode_response(request_id, InferResponse("m", "2", dict(outputs)))
        specs = [
            {"name": n, "datatype": DataType.from_numpy(a.dtype).value, "shape": list(a.shape)}
            for n, a in outputs.items()
        ]
        full = {"v": 1, "id": request_id, "ok": True, "model": "m", "version": "2"}
        assert bytes(frames[0]) == json.dumps(
            {**full, "outputs": specs}, separators=(",", ":")
        ).encode()
        header, decoded = wire.decode_reply([bytes(f) for f in frames])
        assert header["id"] == request_id
        for name, value in outputs.items():
            assert _same(decoded[name], value)
