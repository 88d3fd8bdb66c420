"""The ZeroMQ wire format (docs/zmq-protocol.md), encode and decode; no sockets here.

A message is a header frame (UTF-8 JSON object) followed by one frame per tensor holding its
raw little-endian bytes (BYTES: 4-byte little-endian length before each element), in the
order the header lists the tensors. Tensor frames are viewed, not copied.

No sockets are made here; ``send_frames`` and ``recv_frames`` move a message's frames on a
socket the caller owns, for the hot paths of the server's I/O thread and the clients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from edged.core.errors import InvalidInputError, clip
from edged.core.limits import RequestLimits
from edged.core.tensors import decode_raw, encode_raw, view_raw
from edged.core.types import Array, DataType, InferRequest, InferResponse

VERSION = 1
OPS = frozenset(
    {"infer", "live", "ready", "model_ready", "server_metadata", "model_metadata", "add_samples"}
)
#: ops whose header lists tensors carried in the frames that follow it
TENSOR_OPS = frozenset({"infer", "add_samples"})
#: the largest header accepted, in bytes
MAX_HEADER_BYTES = 64 * 1024
#: a request listing more tensors than this, or any BYTES tensor, is decoded on a worker thread
INLINE_MAX_TENSORS = 8
#: frames smaller than this are copied into the message when sent, larger ones go by
#: reference (pyzmq's default: 64 KiB), by the clients and the daemon's reply sockets. A frame
#: sent by reference is released on pyzmq's garbage-collector thread (an inproc message, a
#: wake-up and a GIL hand-off per frame): copying costs less up to about 256 KiB, more above
#: (docs/performance.md, "Reply copy threshold")
COPY_THRESHOLD = 256 * 1024

Frame = bytes | memoryview

# pyzmq's options and flags are enums: combining or converting them costs a few microseconds
# a call, and ``recv_multipart`` asks the socket for RCVMORE (an enum option) per frame.
# The hot paths use plain ints and ``Frame.more`` instead (docs/performance.md).
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)


def readable(socket: zmq.Socket[bytes]) -> bool:
    """Whether a whole message waits on ``socket`` (its EVENTS, no exception when none)."""
    return bool(int(socket.getsockopt(_EVENTS)) & _POLLIN)


def recv_frames(socket: zmq.Socket[bytes], flags: int = 0) -> list[zmq.Frame]:
    """Every frame of the next message, by reference (``recv_multipart(copy=False)``).

    Raises:
        zmq.Again: with ``NOBLOCK``, no message waits.
    """
    frame = socket.recv(flags, copy=False)
    frames = [frame]
    while frame.more:  # the parts of a message arrive together: no wait after the first
        frame = socket.recv(flags, copy=False)
        frames.append(frame)
    return frames


def send_frames(socket: zmq.Socket[bytes], frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` (bytes, memoryviews or zmq.Frames) as one message, each by reference
    above the socket's ``copy_threshold`` (``send_multipart(copy=False)``). A message is
    queued whole or not at all: with ``NOBLOCK``, zmq.Again can only come from the first.

    Raises:
        zmq.Again: with ``NOBLOCK``, the message cannot be queued now.
        zmq.ZMQError: the socket refused it.
    """
    more = flags | _SNDMORE
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        socket.send(frame, flags if i == last else more, copy=False)


#: the most digits a JSON integer in a header may have (int64 has 19)
MAX_INT_DIGITS = 20


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidInputError(
            f"header holds an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are allowed"
        )
    return int(text)


def _no_constant(text: str) -> Any:
    raise InvalidInputError(f"header holds {text}, which is not JSON")


#: datatypes by wire name, and by numpy dtype (the hot paths' lookups)
_DATATYPES: dict[Any, DataType] = {d.value: d for d in DataType}
_DATATYPE_BY_DTYPE: dict[Any, str] = {}

_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def read_header(frame: Frame) -> dict[str, Any]:
    """The header frame as a dict (version checked, nothing else).

    Raises:
        InvalidInputError: not a JSON object, too big, or another wire version.
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise InvalidInputError(f"header frame is {len(frame)} bytes, over {MAX_HEADER_BYTES}")
    try:
        raw = bytes(frame)
        # json.loads's decoding of the bytes, with a decoder made once (loads makes one a call)
        header = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"header frame is not a JSON object: {clip(e, 200)}") from e
    except RecursionError:
        raise InvalidInputError("header frame nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise InvalidInputError("header frame is not a JSON object")
    if header.get("v") != VERSION:
        raise InvalidInputError(
            f"header 'v' is {clip(repr(header.get('v')))}; this server speaks {VERSION}"
        )
    return header


def _string(header: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = header.get(key, default)
    if not isinstance(value, str):
        raise InvalidInputError(f"header '{key}' must be a string")
    return value


def _tensors(header: Mapping[str, Any], key: str, frames: Sequence[Frame]) -> dict[str, Array]:
    specs = header.get(key, [])
    if not isinstance(specs, list):
        raise InvalidInputError(f"header '{key}' must be a list")
    if len(specs) != len(frames):
        raise InvalidInputError(
            f"header lists {len(specs)} {key} but {len(frames)} tensor frames follow it"
        )
    tensors: dict[str, Array] = {}
    for i, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        if not isinstance(spec, dict):
            raise InvalidInputError(f"header '{key}[{i}]' must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"header '{key}[{i}].name' must be a non-empty string")
        if name in tensors:
            raise InvalidInputError(f"tensor '{clip(name)}' is given more than once")
        wire_type = spec.get("datatype")  # a dict lookup: DataType(...) costs more per call
        datatype = _DATATYPES.get(wire_type) if isinstance(wire_type, str) else None
        if datatype is None:
            raise InvalidInputError(
                f"tensor '{clip(name)}': datatype {clip(repr(spec.get('datatype')))} is not one of "
                f"{', '.join(DataType)}"
            )
        shape = spec.get("shape")
        # JSON numbers decode to exact ints (true and false to bools, refused here)
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise InvalidInputError(f"tensor '{clip(name)}': shape must be a list of integers")
        tensors[name] = decode_raw(name, datatype, shape, frame)  # it checks the shape first
    return tensors


def _tensor_frame(array: Array) -> Frame:
    """The raw contents of ``array``: a view when it is native-order, contiguous, fixed-size."""
    if array.dtype.kind in "OSU" or array.dtype.byteorder == ">" or not array.flags.c_contiguous:
        return encode_raw(array)
    return memoryview(array.data).cast("B") if array.size else b""


def _datatype_name(dtype: Any) -> str:
    """The KServe datatype of a numpy dtype (``DataType.from_numpy``, kept per dtype)."""
    name = _DATATYPE_BY_DTYPE.get(dtype)
    if name is None:
        name = DataType.from_numpy(dtype).value
        if len(_DATATYPE_BY_DTYPE) < ENCODER_CACHE:
            _DATATYPE_BY_DTYPE[dtype] = name
    return name


def _tensor_frames(tensors: Mapping[str, Array]) -> tuple[list[dict[str, Any]], list[Frame]]:
    specs = [
        {"name": name, "datatype": _datatype_name(a.dtype), "shape": list(a.shape)}
        for name, a in tensors.items()
    ]
    return specs, [_tensor_frame(a) for a in tensors.values()]


def _dump(header: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(header).encode()


# -- requests ------------------------------------------------------------------------------


def encode_request(op: str, request_id: str = "", **fields: Any) -> list[Frame]:
    """A request for ``op``; for "infer" pass ``request=InferRequest``, for "add_samples"
    ``request=InferRequest`` (model and inputs) and ``labels=[...]``."""
    request: InferRequest | None = fields.pop("request", None)
    header: dict[str, Any] = {"v": VERSION, "op": op, "id": request_id, **fields}
    frames: list[Frame] = []
    if request is not None:
        specs, frames = _tensor_frames(request.inputs)
        header.update(model=request.model_name, version=request.model_version, inputs=specs)
        if request.requested_outputs:
            header["outputs"] = list(request.requested_outputs)
        if request.parameters:
            header["parameters"] = dict(request.parameters)
    return [_dump(header), *frames]


#: header templates one ``RequestEncoder`` keeps (one per model and input layout)
ENCODER_CACHE = 64
_ID_MARK = "\x00id\x00"  # stands for the request id in a header template
_ID_MARK_JSON = json.dumps(_ID_MARK).encode()


class RequestEncoder:
    """Infer requests for a client, their headers encoded once per model, version, input
    names, types and shapes and requested outputs: per call only the request id is spliced
    in (ids must be plain JSON strings: letters and digits). ``fields`` (a bearer token)
    ride in every header. A request with parameters is encoded in full."""

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._templates: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}

    def infer(
        self,
        request_id: str,
        model: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] = (),
        version: str = "",
        parameters: Mapping[str, Any] | None = None,
    ) -> list[Frame]:
        """The frames of an "infer" request (as ``encode_request``)."""
        if parameters:
            request = InferRequest(
                model,
                dict(inputs),
                version,
                requested_outputs=tuple(outputs),
                parameters=parameters,
            )
            return encode_request("infer", request_id, request=request, **self._fields)
        key = (
            model,
            version,
            tuple(outputs),
            *[(name, a.dtype.str, a.shape) for name, a in inputs.items()],
        )
        template = self._templates.get(key)
        if template is None:
            request = InferRequest(model, dict(inputs), version, requested_outputs=tuple(outputs))
            header = encode_request("infer", _ID_MARK, request=request, **self._fields)[0]
            head, _, tail = bytes(header).partition(_ID_MARK_JSON)
            if len(self._templates) >= ENCODER_CACHE:
                self._templates.clear()
            template = self._templates[key] = (head + b'"', b'"' + tail)
        header = b"".join((template[0], request_id.encode(), template[1]))
        return [header, *map(_tensor_frame, inputs.values())]


def decode_request(frames: Sequence[Frame]) -> tuple[dict[str, Any], InferRequest | None]:
    """The header, and for "infer" and "add_samples" the request (for "add_samples", the
    model and inputs; the labels stay in the header).

    Raises:
        InvalidInputError: a malformed header or tensor, naming the field.
    """
    if not frames:
        raise InvalidInputError("empty message: a header frame is required")
    header = read_header(frames[0])
    return header, decode_body(header, frames[1:])


def request_id(header: Mapping[str, Any]) -> str:
    """The header's request id, or "" when it has none usable."""
    rid = header.get("id", "")
    return rid if isinstance(rid, str) else ""


def decodes_inline(header: Mapping[str, Any]) -> bool:
    """Whether decoding the tensors ``header`` lists is cheap enough for the event loop: a
    few, none BYTES (split element by element)."""
    specs = header.get("inputs", [])
    if not isinstance(specs, list) or len(specs) > INLINE_MAX_TENSORS:
        return False
    return not any(isinstance(t, dict) and t.get("datatype") == "BYTES" for t in specs)


def decode_body(
    header: dict[str, Any],
    frames: Sequence[Frame],
    limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
) -> InferRequest | None:
    """Check the header read by ``read_header`` and, for "infer" and "add_samples", decode
    the tensor ``frames`` that follow it into the request (counts checked against ``limits``
    before any tensor is decoded).

    Raises:
        InvalidInputError: a malformed header or tensor, naming the field.
        OverloadedError: more inputs, outputs or parameters than ``limits`` allow.
    """
    op = _string(header, "op")
    if op not in OPS:
        raise InvalidInputError(
            f"header 'op' {clip(repr(op))} is not one of {', '.join(sorted(OPS))}"
        )
    header["id"] = _string(header, "id", "")
    if op not in TENSOR_OPS:
        if frames:
            raise InvalidInputError(f"op '{op}' takes no tensor frames")
        return None
    if op == "add_samples":
        labels = header.get("labels")
        if not isinstance(labels, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31 for v in labels
        ):
            raise InvalidInputError("header 'labels' must be a list of integers (class numbers)")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise InvalidInputError("header 'outputs' must be a list of output names")
    parameters = header.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInputError("header 'parameters' must be an object")
    specs = header.get("inputs", [])
    limits.check(
        inputs=len(specs) if isinstance(specs, list) else 0,
        outputs=len(outputs),
        parameters=len(parameters),
    )
    request = InferRequest(
        model_name=_string(header, "model"),
        model_version=_string(header, "version", ""),
        id=header["id"],
        inputs=_tensors(header, "inputs", frames),
        requested_outputs=tuple(dict.fromkeys(outputs)),
        parameters=parameters,
    )
    if not request.model_name:
        raise InvalidInputError("header 'model' is empty")
    return request


# -- headers read once per layout ----------------------------------------------------------

#: headers up to this size are remembered by layout (``RequestReader``, ``ReplyReader``)
LAYOUT_MAX_BYTES = 4096
#: layouts one reader keeps (cleared when full)
LAYOUT_CACHE = 64
#: a request id that needs no JSON unescaping: printable ASCII but the quote and backslash
_PLAIN_ID = re.compile(rb"[ !#-\[\]-~]*")


def _split_id(raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """A header's bytes around its request id, (head, id, tail), when the string "id"
    occurs in it once, as a key followed by a plain string (``_PLAIN_ID``); else None. In
    valid JSON a quoted "id" is a whole string token (a quote inside a string is escaped),
    so two valid headers with the same head and tail differ in nothing but that string."""
    if raw.count(b'"id"') != 1:
        return None
    start = raw.find(b'"id":') + 5
    if start < 5:
        return None
    if raw[start : start + 1] == b" ":
        start += 1
    if raw[start : start + 1] != b'"':
        return None
    end = raw.find(b'"', start + 1)
    if end < 0 or not _PLAIN_ID.fullmatch(raw, start + 1, end):
        return None
    return raw[: start + 1], raw[start + 1 : end], raw[end:]


class _Layout:
    """A header read before (all but its id), and how to view its tensor frames."""

    __slots__ = ("header", "inline", "known", "tensors")

    def __init__(
        self, header: dict[str, Any], tensors: Mapping[str, Array], known: Any = None
    ) -> None:
        self.header = header  # shared: never changed (each message gets a copy)
        # (name, little-endian dtype, element count, byte length, dims) per tensor frame
        self.tensors = tuple(
            (name, a.dtype.newbyteorder("<"), a.size, a.nbytes, a.shape)
            for name, a in tensors.items()
        )
        self.inline = decodes_inline(header)
        self.known = known  # the rest of what the first message decoded to

    @staticmethod
    def fits(tensors: Mapping[str, Array]) -> bool:
        """Whether a plan can view these tensors: fixed-size types only (a BYTES tensor's
        frame is split element by element)."""
        return all(a.dtype.kind not in "OSUV" for a in tensors.values())

    def view(self, frames: Sequence[Frame]) -> dict[str, Array] | None:
        """The tensors, viewing ``frames``; None when their number or a frame's length is
        not the layout's (the full decoding then says what is wrong)."""
        if len(frames) != len(self.tensors):
            return None
        tensors: dict[str, Array] = {}
        for (name, dtype, count, nbytes, dims), frame in zip(self.tensors, frames, strict=True):
            if len(frame) != nbytes:
                return None
            tensors[name] = view_raw(frame, dtype, count, dims)
        return tensors


Seen = _Layout | tuple[bytes, bytes] | None


class _Layouts:
    """Layouts by a header's bytes around its id; bounded (cleared when full)."""

    def __init__(self) -> None:
        self._known: dict[tuple[bytes, bytes], _Layout] = {}

    def read(self, frame: Frame) -> tuple[dict[str, Any], Seen]:
        """``read_header(frame)``; with it, the layout when one is known (the header is then
        a copy of the layout's, with this message's id), else the key to remember its layout
        under (None: it cannot be remembered)."""
        if len(frame) > LAYOUT_MAX_BYTES:
            return read_header(frame), None
        raw = bytes(frame)
        split = _split_id(raw)
        if split is None:
            return read_header(raw), None
        head, rid, tail = split
        layout = self._known.get((head, tail))
        if layout is not None:
            header = layout.header.copy()
            header["id"] = rid.decode()
            return header, layout
        header = read_header(raw)
        return header, (head, tail) if header.get("id") == rid.decode() else None

    def remember(self, key: Seen, layout: _Layout) -> None:
        if not isinstance(key, tuple):
            return
        if len(self._known) >= LAYOUT_CACHE:
            self._known.clear()
        self._known[key] = layout


class RequestReader:
    """``read_header`` and ``decode_body`` for a server, "infer" headers read once per
    layout (model, version, the inputs' names, types and shapes, outputs, parameters,
    token): a header that differs from one read before only in its request id (a plain
    string) is not parsed again, and its tensor frames are viewed by the plan made the
    first time, only their number and lengths checked. Anything else is decoded in full,
    so a bad message is refused with the same error as by ``decode_body``."""

    def __init__(self, limits: RequestLimits = RequestLimits()) -> None:  # noqa: B008 - frozen
        self._limits = limits
        self._layouts = _Layouts()

    def header(self, frame: Frame) -> tuple[dict[str, Any], Seen]:
        """The header (``read_header``), and what ``body`` needs with it.

        Raises:
            InvalidInputError: not a JSON object, too big, or another wire version.
        """
        return self._layouts.read(frame)

    @staticmethod
    def inline(header: dict[str, Any], seen: Seen) -> bool:
        """``decodes_inline(header)``, known for a layout read before."""
        return seen.inline if isinstance(seen, _Layout) else decodes_inline(header)

    def body(
        self, header: dict[str, Any], frames: Sequence[Frame], seen: Seen
    ) -> InferRequest | None:
        """``decode_body(header, frames)``; ``seen``: what ``header`` returned with it.

        Raises:
            InvalidInputError: a malformed header or tensor, naming the field.
            OverloadedError: more inputs, outputs or parameters than the limits allow.
        """
        if isinstance(seen, _Layout):
            inputs = seen.view(frames)
            if inputs is not None:
                model, version, outputs, parameters = seen.known
                return InferRequest(model, inputs, version, header["id"], outputs, dict(parameters))
        request = decode_body(header, frames, self._limits)
        if (
            request is not None
            and isinstance(seen, tuple)
            and header["op"] == "infer"
            and _Layout.fits(request.inputs)
        ):
            # not the request itself: its tensors view this message's frames
            known = (
                request.model_name,
                request.model_version,
                request.requested_outputs,
                dict(request.parameters),
            )
            self._layouts.remember(seen, _Layout(header.copy(), request.inputs, known))
        return request


# -- replies -------------------------------------------------------------------------------


#: reply header templates kept (one per model version and output layout)
_REPLY_TEMPLATES: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}


def _json_string(text: str) -> bytes:
    """``text`` as a JSON string; a plain one (printable ASCII, no quote or backslash, as
    ids usually are) without the encoder."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return b'"' + text.encode() + b'"'
    return _ENCODER.encode(text).encode()


def encode_response(request_id: str, response: InferResponse) -> list[Frame]:
    """A successful infer reply. Its header is encoded once per model, version and output
    layout; per reply only the request id is spliced in."""
    outputs = response.outputs
    key = (
        response.model_name,
        response.model_version,
        *[(name, a.dtype, a.shape) for name, a in outputs.items()],
    )
    template = _REPLY_TEMPLATES.get(key)
    if template is None:
        specs, _ = _tensor_frames(outputs)
        header = {
            "v": VERSION,
            "id": _ID_MARK,
            "ok": True,
            "model": response.model_name,
            "version": response.model_version,
            "outputs": specs,
        }
        head, _, tail = _dump(header).partition(_ID_MARK_JSON)
        if len(_REPLY_TEMPLATES) >= ENCODER_CACHE:
            _REPLY_TEMPLATES.clear()
        template = _REPLY_TEMPLATES[key] = (head, tail)
    return [
        b"".join((template[0], _json_string(request_id), template[1])),
        *map(_tensor_frame, outputs.values()),
    ]


def encode_value(request_id: str, value: Mapping[str, Any]) -> list[Frame]:
    """A successful reply to any other op: the answer under ``result``."""
    return [_dump({"v": VERSION, "id": request_id, "ok": True, "result": dict(value)})]


def encode_error(request_id: str, code: str, message: str) -> list[Frame]:
    """A failed reply: a status code name (as gRPC's) and a message."""
    return [_dump({"v": VERSION, "id": request_id, "ok": False, "code": code, "error": message})]


def decode_reply(frames: Sequence[Frame]) -> tuple[dict[str, Any], dict[str, Array]]:
    """The reply header and its output tensors (empty for errors and non-infer ops).

    Raises:
        InvalidInputError: a malformed reply.
    """
    if not frames:
        raise InvalidInputError("empty reply")
    header = read_header(frames[0])
    if not header.get("ok") or "result" in header:
        return header, {}
    return header, _tensors(header, "outputs", frames[1:])


class ReplyReader:
    """``decode_reply`` for a client, infer replies read once per layout (as
    ``RequestReader``: a reply header that differs from one read before only in its id is
    not parsed again; its output frames are viewed by the plan made the first time)."""

    def __init__(self) -> None:
        self._layouts = _Layouts()

    def read(self, frames: Sequence[Frame]) -> tuple[dict[str, Any], dict[str, Array]]:
        """``decode_reply(frames)``.

        Raises:
            InvalidInputError: a malformed reply.
        """
        if not frames:
            raise InvalidInputError("empty reply")
        header, seen = self._layouts.read(frames[0])
        if not header.get("ok") or "result" in header:
            return header, {}
        if isinstance(seen, _Layout):
            outputs = seen.view(frames[1:])
            if outputs is not None:
                return header, outputs
        outputs = _tensors(header, "outputs", frames[1:])
        if isinstance(seen, tuple) and _Layout.fits(outputs):
            self._layouts.remember(seen, _Layout(header.copy(), outputs))
        return header, outputs
