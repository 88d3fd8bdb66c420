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


def _decoded_alike(got: InferRequest | None, want: InferRequest | None) -> None:
    assert got is not None
    assert want is not None
    assert (got.model_name, got.model_version, got.id) == (
        want.model_name,
        want.model_version,
        want.id,
    )
    assert (got.requested_outputs, got.parameters) == (want.requested_outputs, want.parameters)
    assert got.inputs.keys() == want.inputs.keys()
    for name, value in want.inputs.items():
        assert _same(got.inputs[name], value), name


# ids a reader must take from the JSON, not from the bytes: escapes, non-ASCII, quotes
AWKWARD_IDS = ["", "a1", "x y", 'q"uote', "back\\slash", "é", "tab\there", "\u2028"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(tensors(), min_size=1, max_size=3),
    st.lists(st.sampled_from(AWKWARD_IDS) | st.text(max_size=6), min_size=2, max_size=5),
    st.booleans(),
)
def test_a_request_reader_decodes_as_decode_request_message_after_message(
    arrays: list[np.ndarray], ids: list[str], with_parameters: bool
) -> None:
    """RequestReader reads an "infer" header once per layout and views the tensor frames
    of the next messages by the plan made then: whatever the ids, message after message
    it decodes exactly what read_header + decode_body decode."""
    inputs = {f"in{i}": a for i, a in enumerate(arrays)}
    parameters = {"priority": 1} if with_parameters else None
    reader = wire.RequestReader()
    for rid in ids:
        request = InferRequest("m", dict(inputs), parameters=parameters or {})
        frames = [bytes(f) for f in wire.encode_request("infer", rid, request=request, token="t")]
        header, seen = reader.header(frames[0])
        assert header == wire.read_header(frames[0])
        assert reader.inline(header, seen) == wire.decodes_inline(header)
        got = reader.body(header, frames[1:], seen)
        _, want = wire.decode_request(frames)
        _decoded_alike(got, want)


def test_a_request_reader_parses_a_header_once_per_layout(monkeypatch) -> None:
    """Two requests that differ only in their plain ids: the second header is not parsed
    again; its id and tensors are its own (the first one's frames are not kept)."""
    parsed: list[bytes] = []
    full = wire.read_header
    monkeypatch.setattr(wire, "read_header", lambda frame: parsed.append(frame) or full(frame))
    reader = wire.RequestReader()
    encoder = wire.RequestEncoder()
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    second = first * 10
    requests = []
    for rid, x in (("c1", first), ("c2", second)):
        frames = encoder.infer(rid, "m", {"x": x}, ("y",), "2")
        header, seen = reader.header(frames[0])
        requests.append(reader.body(header, [bytearray(bytes(frames[1]))], seen))
    assert len(parsed) == 1
    assert [r.id for r in requests] == ["c1", "c2"]
    assert requests[1].inputs["x"].tolist() == second.tolist()
    assert requests[1].requested_outputs == ("y",)
    assert requests[1].model_version == "2"
    assert requests[0].parameters is not requests[1].parameters


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (b"12345678", "'x': 8 bytes of raw contents"),  # one float short
        (None, "1 inputs but 0 tensor frames"),
    ],
)
def test_a_remembered_layout_refuses_bad_frames_as_decode_body_does(tensor, words) -> None:
    reader = wire.RequestReader()
    encoder = wire.RequestEncoder()
    x = np.zeros(3, dtype=np.float32)
    good = encoder.infer("c1", "m", {"x": x})
    header, seen = reader.header(good[0])
    reader.body(header, good[1:], seen)
    bad = encoder.infer("c2", "m", {"x": x})
    header, seen = reader.header(bad[0])
    with pytest.raises(InvalidInputError) as err:
        reader.body(header, [] if tensor is None else [tensor], seen)
    assert words in str(err.value)


def test_a_remembered_bool_layout_still_normalises_true_bytes() -> None:
    reader = wire.RequestReader()
    encoder = wire.RequestEncoder()
    flags = np.array([True, False, True])
    for rid, raw in (("c1", b"\x01\x00\x01"), ("c2", b"\x07\x00\xff")):
        frames = encoder.infer(rid, "m", {"b": flags})
        header, seen = reader.header(frames[0])
        request = reader.body(header, [raw], seen)
        assert request is not None
        assert request.inputs["b"].tolist() == [True, False, True]
        assert request.inputs["b"].view(np.uint8).tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "text",
    [
        # "id" twice (the last wins in JSON), nested, or a key that only contains it
        b'{"v":1,"op":"infer","id":"a","model":"m","inputs":[],"id":"b"}',
        b'{"v":1,"op":"infer","model":"m","inputs":[],"parameters":{"id":"p"}}',
        b'{"v":1,"op":"infer","model":"m","inputs":[],"parameters":{"id":"p"},"id":"q"}',
        b'{"v":1,"op":"infer","model":"m","inputs":[],"xid":"r","id":"s"}',
        b'{"v": 1, "op": "infer", "model": "m", "inputs": [], "id": "t"}',
        b'{"v":1,"op":"infer","id":"\\u0075","model":"m","inputs":[]}',
    ],
)
def test_a_request_reader_reads_odd_headers_as_json_does(text: bytes) -> None:
    reader = wire.RequestReader()
    for _ in range(3):  # a remembered layout (if any) must give the same
        header, seen = reader.header(text)
        assert header == json.loads(text)
        request = reader.body(header, [], seen)
        assert request is not None
        assert request.id == json.loads(text).get("id", "")


@settings(max_examples=40, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.lists(st.text(max_size=6), min_size=2))
def test_a_reply_reader_decodes_as_decode_reply(arrays: list[np.ndarray], ids: list[str]) -> None:
    outputs = {f"out{i}": a for i, a in enumerate(arrays)}
    reader = wire.ReplyReader()
    replies = [wire.encode_response(rid, InferResponse("m", "1", dict(outputs))) for rid in ids]
    replies += [wire.encode_error("e", "NOT_FOUND", "no model"), wire.encode_value("v", {"a": 1})]
    for reply in replies:
        frames = [bytes(f) for f in reply]
        header, got = reader.read(frames)
        want_header, want = wire.decode_reply(frames)
        assert header == want_header
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert _same(got[name], value)


def test_a_request_reader_is_not_fooled_by_an_id_that_occurs_twice() -> None:
    """A nested "id" equal to the top-level one in the first message: a layout remembered
    around the wrong one would give the next message a wrong id and stale parameters."""
    reader = wire.RequestReader()
    for nested, top in (("p", "p"), ("z", "p"), ("p", "z")):
        text = json.dumps(
            {"v": 1, "op": "infer", "model": "m", "inputs": [], "parameters": {"id": nested}}
        )[:-1]
        text = (text + f', "id": "{top}"}}').encode()
        header, seen = reader.header(text)
        assert header == json.loads(text)
        request = reader.body(header, [], seen)
        assert request is not None
        assert (request.id, request.parameters) == (top, {"id": nested})
