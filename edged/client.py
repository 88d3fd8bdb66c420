"""Clients for edged's ZeroMQ endpoint, for applications on the same host or network.

    from edged.client import ZmqClient
    with ZmqClient("tcp://127.0.0.1:5555") as client:
        outputs = client.infer("digits", {"input": images})

``ZmqClient`` is synchronous (one request at a time per client object, like a socket);
``AsyncZmqClient`` keeps many requests in flight on one connection. Both speak the wire format
in docs/zmq-protocol.md and raise ``ZmqClientError`` carrying the same status codes as gRPC.
Both take a bearer ``token`` (sent in every request header) and, for a daemon with CURVE on its
tcp:// endpoints, ``curve=CurveKeys.from_files(server_public_file, client_secret_file)``
(docs/security.md). An input tensor up to ``COPY_THRESHOLD`` bytes is copied when the request
is sent; a larger one is sent from the caller's array, which must stay unchanged until the
call returns.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from edged.core.errors import InvalidInputError
from edged.core.types import Array, InferRequest
from edged.frontends import zmq_wire as wire
from edged.security.curve import CurveKeys

__all__ = ["AsyncZmqClient", "CurveKeys", "ZmqClient", "ZmqClientError"]


class ZmqClientError(Exception):
    """The daemon refused or failed a request; ``code`` is the status code name
    (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _outcome(
    reader: wire.ReplyReader, frames: Sequence[wire.Frame]
) -> tuple[dict[str, Any], dict[str, Array]]:
    try:
        header, outputs = reader.read(frames)
    except InvalidInputError as e:
        raise ZmqClientError("INTERNAL", f"malformed reply: {e}") from e
    if not header.get("ok"):
        raise ZmqClientError(str(header.get("code", "UNKNOWN")), str(header.get("error", "")))
    return header, outputs


def _samples(
    request_id: str,
    model: str,
    inputs: Mapping[str, Array],
    labels: Sequence[int],
    auth: Mapping[str, Any],
) -> list[wire.Frame]:
    request = InferRequest(model_name=model, inputs=dict(inputs))
    return wire.encode_request(
        "add_samples", request_id, request=request, labels=[int(v) for v in labels], **auth
    )


#: frames smaller than this are copied into the message when sent, larger ones go by
#: reference (``zmq_wire.COPY_THRESHOLD``, the daemon's replies alike): a zero-copy frame is
#: released on pyzmq's garbage-collector thread (an inproc message and a GIL hand-off per
#: frame, ~50 us of CPU); copying 256 KiB costs ~6 us (docs/performance.md)
COPY_THRESHOLD = wire.COPY_THRESHOLD


def _socket(
    context: zmq.Context[zmq.Socket[bytes]], address: str, curve: CurveKeys | None
) -> zmq.Socket[bytes]:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.copy_threshold = COPY_THRESHOLD
    if curve is not None:
        curve.apply(socket)
    socket.connect(address)
    return socket


class ZmqClient:
    """A synchronous client over one DEALER socket: no event loop, no threads; an infer
    request's header is encoded once per model and input layout (only its id changes)."""

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        *,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._socket: zmq.Socket[bytes] = _socket(zmq.Context.instance(), address, curve)
        self._auth: dict[str, Any] = {"token": token} if token else {}
        self._encoder = wire.RequestEncoder(**self._auth)
        self._replies = wire.ReplyReader()
        self._timeout = timeout
        self._receive_ms = -2  # RCVTIMEO now set on the socket (-2: not yet)
        self._ids = itertools.count(1)

    def __enter__(self) -> ZmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self._socket.close(0)

    def _call(
        self, frames: list[wire.Frame], request_id: str, timeout: float | None
    ) -> tuple[dict[str, Any], dict[str, Array]]:
        limit = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        wait_ms = max(0, int(limit * 1000))
        try:
            wire.send_frames(self._socket, frames, wire.NOBLOCK)
        except zmq.Again:  # no peer to queue for (a refused handshake drops it) or queue full
            self._send_by(frames, deadline, limit)
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
        while True:
            if wait_ms != self._receive_ms:  # the same timeout call after call: set once
                self._socket.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._receive_ms = wait_ms
            try:
                reply = wire.recv_frames(self._socket)
            except zmq.Again:
                raise ZmqClientError("DEADLINE_EXCEEDED", f"no reply within {limit}s") from None
            header, outputs = _outcome(self._replies, [f.buffer for f in reply])
            if header.get("id") == request_id:  # replies to requests that timed out are dropped
                return header, outputs
            # a stale reply: wait for what is left of this request's time
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))

    def _send_by(self, frames: list[wire.Frame], deadline: float, limit: float) -> None:
        """Send once the socket can take the message, or fail at ``deadline``: a DEALER
        whose only peer refused the CURVE handshake has no pipe left and would block."""
        while True:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not wait_ms or not self._socket.poll(wait_ms, zmq.POLLOUT):
                raise ZmqClientError("DEADLINE_EXCEEDED", f"could not send within {limit}s")
            try:
                wire.send_frames(self._socket, frames, wire.NOBLOCK)
                return
            except zmq.Again:
                continue

    def _next_id(self) -> str:
        return f"c{next(self._ids)}"

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] | None = None,
        version: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Array]:
        """Run ``model`` on ``inputs``; return its outputs (all, or those named).

        Raises:
            ZmqClientError: the daemon refused or failed the request, or no reply in time.
        """
        rid = self._next_id()
        frames = self._encoder.infer(rid, model, inputs, outputs or (), version, parameters)
        return self._call(frames, rid, timeout)[1]

    def _op(self, op: str, **fields: Any) -> dict[str, Any]:
        rid = self._next_id()
        result: dict[str, Any] = self._call(
            wire.encode_request(op, rid, **fields, **self._auth), rid, None
        )[0]["result"]
        return result

    def is_live(self) -> bool:
        """ServerLive."""
        return bool(self._op("live")["live"])

    def is_ready(self) -> bool:
        """ServerReady."""
        return bool(self._op("ready")["ready"])

    def is_model_ready(self, model: str, version: str = "") -> bool:
        """ModelReady."""
        return bool(self._op("model_ready", model=model, version=version)["ready"])

    def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        """Name, versions, platform, max_batch_size, inputs and outputs of a model."""
        return self._op("model_metadata", model=model, version=version)

    def add_samples(
        self, model: str, inputs: Mapping[str, Array], labels: Sequence[int]
    ) -> dict[str, Any]:
        """Give a trainable model labelled samples (one label per row of the inputs' batch
        axis); returns accepted, pending, stored, stored_bytes and triggered_job (a job id or
        None). See docs/learning.md.

        Raises:
            ZmqClientError: the daemon refused the samples, or no reply in time.
        """
        rid = self._next_id()
        frames = _samples(rid, model, inputs, labels, self._auth)
        result: dict[str, Any] = self._call(frames, rid, None)[0]["result"]
        return result

    def server_metadata(self) -> dict[str, Any]:
        """Name, version and extensions of the daemon."""
        return self._op("server_metadata")


class AsyncZmqClient:
    """An asyncio client: any number of requests in flight on one DEALER socket.

    A plain socket watched by the event loop (``add_reader`` on its descriptor): a send
    goes straight out, and every reply that arrived is read at once and settles its
    request's future. Timeouts cost no timer per request: one timer per client fires at the
    earliest deadline of the requests waiting then, fails those that are late, and is set
    again for the next."""

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        *,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._socket: zmq.Socket[bytes] = _socket(zmq.Context.instance(), address, curve)
        self._auth: dict[str, Any] = {"token": token} if token else {}
        self._encoder = wire.RequestEncoder(**self._auth)
        self._replies = wire.ReplyReader()
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[tuple[dict[str, Any], dict[str, Array]]]] = {}
        self._deadlines: dict[str, float] = {}  # by request id, in the loop's time
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1

    async def __aenter__(self) -> AsyncZmqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop watching the socket and close it."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep, self._sweep_at = None, math.inf
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        self._deadlines.clear()
        self._socket.close(0)

    def _watch(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop since
            self._loop = loop
            self._sweep, self._sweep_at = None, math.inf  # the old loop's timer is gone
            self._fd = int(self._socket.getsockopt(zmq.FD))
            loop.add_reader(self._fd, self._read)
        return loop

    def _read(self) -> None:
        """Every reply that has arrived, decoded, each to the request waiting for it (the
        socket's descriptor is edge-triggered: read until there is none). Once no request
        waits, what is left (replies to requests that timed out) is read by the next
        request's send, not now: the caller just answered runs a look at the socket sooner."""
        socket = self._socket
        waiting = self._waiting
        while wire.readable(socket):
            self._settle(wire.recv_frames(socket, wire.NOBLOCK))
            if not waiting:
                return

    def _settle(self, reply: list[zmq.Frame]) -> None:
        """Answer the request ``reply`` is for: its header and outputs, or the error it
        carries (a malformed reply: INTERNAL); nothing when no one waits for it."""
        try:
            header, outputs = self._replies.read([f.buffer for f in reply])
        except InvalidInputError as e:
            future = self._waiting.pop(_reply_id(reply), None)
            if future is not None and not future.done():
                future.set_exception(ZmqClientError("INTERNAL", f"malformed reply: {e}"))
            return
        rid = header.get("id")
        future = self._waiting.pop(rid if isinstance(rid, str) else "", None)
        if future is None or future.done():
            return
        if header.get("ok"):
            future.set_result((header, outputs))
        else:
            code, message = header.get("code", "UNKNOWN"), header.get("error", "")
            future.set_exception(ZmqClientError(str(code), str(message)))

    async def _call(
        self, frames: list[wire.Frame], request_id: str, timeout: float | None
    ) -> tuple[dict[str, Any], dict[str, Array]]:
        loop = self._watch()
        future: asyncio.Future[tuple[dict[str, Any], dict[str, Array]]] = loop.create_future()
        key = request_id
        self._waiting[key] = future
        limit = self._timeout if timeout is None else timeout
        deadline = loop.time() + limit
        self._deadlines[key] = deadline
        if deadline < self._sweep_at:
            self._sweep_after(loop, deadline)
        try:
            while True:
                try:
                    wire.send_frames(self._socket, frames, wire.NOBLOCK)
                    break
                except zmq.Again:  # queue full (let replies drain) or no peer: until the deadline
                    if future.done():  # failed by the sweep: its deadline has passed
                        break
                    await asyncio.sleep(0.001)
            # a reply may have arrived while sending; the descriptor may not signal it
            self._read()
            return await future
        except TimeoutError:
            raise ZmqClientError("DEADLINE_EXCEEDED", f"no reply within {limit}s") from None
        finally:
            self._waiting.pop(key, None)
            self._deadlines.pop(key, None)

    def _sweep_after(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = loop.call_at(when, self._expire_late, loop)

    def _expire_late(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the requests past their deadline; set the timer for the next one."""
        self._sweep, self._sweep_at = None, math.inf
        now = loop.time()
        following = math.inf
        for key, deadline in list(self._deadlines.items()):
            if deadline > now:
                following = min(following, deadline)
                continue
            future = self._waiting.get(key)
            if future is not None and not future.done():
                future.set_exception(TimeoutError())
        if following < math.inf:
            self._sweep_after(loop, following)

    def _next_id(self) -> str:
        return f"a{next(self._ids)}"

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] | None = None,
        version: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Array]:
        """Run ``model`` on ``inputs``; see ``ZmqClient.infer``."""
        rid = self._next_id()
        frames = self._encoder.infer(rid, model, inputs, outputs or (), version, parameters)
        return (await self._call(frames, rid, timeout))[1]

    async def _op(self, op: str, **fields: Any) -> dict[str, Any]:
        rid = self._next_id()
        header = (
            await self._call(wire.encode_request(op, rid, **fields, **self._auth), rid, None)
        )[0]
        result: dict[str, Any] = header["result"]
        return result

    async def is_live(self) -> bool:
        """ServerLive."""
        return bool((await self._op("live"))["live"])

    async def is_ready(self) -> bool:
        """ServerReady."""
        return bool((await self._op("ready"))["ready"])

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        """ModelReady."""
        return bool((await self._op("model_ready", model=model, version=version))["ready"])

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        """See ``ZmqClient.model_metadata``."""
        return await self._op("model_metadata", model=model, version=version)

    async def add_samples(
        self, model: str, inputs: Mapping[str, Array], labels: Sequence[int]
    ) -> dict[str, Any]:
        """See ``ZmqClient.add_samples``."""
        rid = self._next_id()
        frames = _samples(rid, model, inputs, labels, self._auth)
        result: dict[str, Any] = (await self._call(frames, rid, None))[0]["result"]
        return result

    async def server_metadata(self) -> dict[str, Any]:
        """See ``ZmqClient.server_metadata``."""
        return await self._op("server_metadata")


def _reply_id(reply: Sequence[zmq.Frame]) -> str:
    """The request id of a reply that cannot be decoded: from its header if that parses,
    else from the header's head as edged writes it (``"id":"..."``, compact); "" when it
    has none."""
    if not reply:
        return ""
    try:
        rid = wire.read_header(reply[0].buffer).get("id")
        return rid if isinstance(rid, str) else ""
    except InvalidInputError:
        pass
    head = reply[0].bytes[:256]
    start = head.find(b'"id":"')
    if start < 0:
        return ""
    end = head.find(b'"', start + 6)
    return head[start + 6 : end].decode(errors="replace") if end > 0 else ""
