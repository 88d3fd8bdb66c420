"""The ZeroMQ frontend: a ROUTER socket (tcp:// and ipc://) carrying the wire format of
``edged.frontends.zmq_wire``, many requests in flight per connection.

Thin like the gRPC frontend: frames in -> edged.core types -> the data plane (or, for
"add_samples", the control plane) -> frames out, with the same status codes
(``edged.core.status``). Every message passes the access check (``edged.security.access``)
as ``zmq/<op>`` once its header is read, before its tensors are decoded; the bearer token
rides in the header's ``token``. With CURVE configured, tcp:// endpoints are served by a
CURVE socket (clients named ``curve:<public key>``) and ipc:// endpoints by a plain one.

The hot path is off the event loop. One I/O thread owns the sockets (ROUTER sockets are not
thread-safe) and polls them with ``zmq.Poller``; an "infer" request whose tensors decode
cheaply is decoded there and handed straight to the model's batcher
(``DataPlane.submit``). A lone request on an idle model runs right there, on the I/O thread;
under load requests queue and the model's instance threads batch them. Replies from other
threads come back through a queue and a wake-up pipe the poller watches (an instance thread
writes it at most once per batch, after queueing the batch's replies), and leave as
zero-copy frames. Everything else (health, metadata, add_samples, requests whose tensors
are costly to decode) is answered on the event loop, as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq

from edged.controlplane import ControlPlane
from edged.core.errors import (
    ConfigError,
    EdgedError,
    InvalidInputError,
    clip,
    clip_message,
)
from edged.core.status import code_of
from edged.core.types import InferResponse
from edged.frontends import zmq_wire as wire
from edged.security.access import AccessControl, Credentials, Decision, audited
from edged.security.curve import IDENTITY_PREFIX, CurveServer
from edged.serving.dataplane import DataPlane, after_answers

log = structlog.get_logger("edged.zmq")

#: messages read from one socket per poll before the others get a turn
READ_BURST = 64
#: reply frames smaller than this are copied into the message, larger ones sent by reference
#: (``zmq_wire.COPY_THRESHOLD``; benchmarks/zmq_copy_threshold.py varies it)
REPLY_COPY_THRESHOLD = wire.COPY_THRESHOLD

Socket = zmq.Socket[bytes]


def bindable(address: str) -> str:
    """ZeroMQ's spelling of ``address``: port 0 becomes the wildcard ``*``."""
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-1] + "*"
    return address


def error_reply(request_id: str, error: BaseException) -> tuple[str, list[wire.Frame]]:
    """The status code and reply frames for ``error``: the one place this frontend maps
    errors to its wire (an EdgedError to its code, anything else to INTERNAL, logged)."""
    if isinstance(error, EdgedError):
        code = code_of(error)
        message = clip_message(str(error))
        log.info("zmq_refused", request_id=clip(request_id), error=message, status=code)
        return code, wire.encode_error(request_id, code, message)
    log.error("zmq_failed", request_id=clip(request_id), exc_info=error)
    return "INTERNAL", wire.encode_error(
        request_id, "INTERNAL", clip_message(f"internal error: {type(error).__name__}: {error}")
    )


class _Message:
    """One request between its receipt and its reply."""

    __slots__ = ("args", "decision", "envelope", "request_id", "sock")

    def __init__(self, sock: Socket, envelope: list[Any]) -> None:
        self.sock = sock
        self.envelope = envelope
        self.request_id = ""
        self.decision: Decision | None = None
        self.args: dict[str, Any] | None = None


class ZmqFrontend:
    """Serves one ROUTER socket per transport kind, bound to every configured address."""

    def __init__(
        self,
        plane: DataPlane,
        addresses: Sequence[str],
        *,
        max_message_bytes: int,
        max_in_flight: int,
        control: ControlPlane | None = None,
        access: AccessControl | None = None,
        curve: tuple[Path, Path] | None = None,
    ) -> None:
        self._access = access or AccessControl()
        self._curve_files = curve
        self.curve: CurveServer | None = None
        self._plane = plane
        self._limits = plane.limits
        self._reader = wire.RequestReader(plane.limits)  # the I/O thread's
        self._control = control or ControlPlane()
        self._addresses = list(addresses)
        self._max_message_bytes = max_message_bytes
        self._max_in_flight = max_in_flight
        self._context: zmq.Context[Socket] | None = None
        self._sockets: list[Socket] = []
        self._kinds: dict[Socket, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._io_thread = 0  # the I/O thread's ident
        # replies made on other threads, for the I/O thread to send
        self._outbox: collections.deque[tuple[_Message, list[wire.Frame]]] = collections.deque()
        self._wake_r, self._wake_w = -1, -1
        self._awake = True  # the I/O thread is awake, or a wake-up byte is on its way
        self._in_flight = 0  # requests read and not answered yet (I/O thread only)
        self._reading = True
        self._stopping = False
        self._quiet = threading.Event()  # set once nothing is in flight after reading stopped
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoints: list[str] = []

    def start(self) -> list[str]:
        """Bind every address and start the I/O thread; return the endpoints actually bound
        (ports resolved). Call on the event loop (non-hot requests are answered there).

        Raises:
            ConfigError: an address cannot be bound, or a CURVE key file is bad.
        """
        self._loop = asyncio.get_running_loop()
        self._context = zmq.Context()
        if self._curve_files is not None:
            self.curve = CurveServer(self._context, *self._curve_files)
            self.curve.start()
        # tcp:// and ipc:// on sockets of their own: CURVE is a socket option, and a
        # message's socket tells whether its peer is on this host
        tcp = [a for a in self._addresses if a.startswith("tcp://")]
        ipc = [a for a in self._addresses if not a.startswith("tcp://")]
        groups = [(tcp, "curve" if self.curve else "tcp"), (ipc, "ipc")]
        if self._addresses and not self._addresses[0].startswith("tcp://"):
            groups.reverse()  # endpoints listed in the configured order, ipc:// first here
        for addresses, kind in groups:
            if not addresses:
                continue
            sock = self._bind(addresses, kind == "curve")
            self._sockets.append(sock)
            self._kinds[sock] = kind
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._serve, name="edged-zmq-io", daemon=True)
        self._thread.start()
        return self.endpoints

    def _bind(self, addresses: Sequence[str], curve: bool) -> Socket:
        assert self._context is not None
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.copy_threshold = REPLY_COPY_THRESHOLD
        if curve:
            assert self.curve is not None
            self.curve.apply(sock)
        for address in addresses:
            if address.startswith("ipc://"):
                Path(address[len("ipc://") :]).parent.mkdir(parents=True, exist_ok=True)
            try:
                sock.bind(bindable(address))
            except zmq.ZMQError as e:
                sock.close(0)
                raise ConfigError(f"config key 'zmq.addresses': cannot bind {address}: {e}") from e
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if endpoint.startswith("ipc://"):
                os.chmod(endpoint[len("ipc://") :], 0o660)
            self.endpoints.append(endpoint)
        return sock

    # -- the I/O thread --------------------------------------------------------------------

    def _serve(self) -> None:
        self._io_thread = threading.get_ident()
        reading = zmq.Poller()
        for sock in self._sockets:
            reading.register(sock, zmq.POLLIN)
        reading.register(self._wake_r, zmq.POLLIN)
        replying = zmq.Poller()  # at the in-flight bound, or stopping: replies only
        replying.register(self._wake_r, zmq.POLLIN)
        while not self._stopping:
            # replies queued while this thread was awake need no wake-up byte: it looks at
            # the outbox after saying it may sleep, and before sleeping
            self._awake = False
            if self._outbox:
                self._awake = True
                self._flush()
                continue
            if not self._reading and not self._in_flight:
                self._quiet.set()
            accepting = self._reading and self._in_flight < self._max_in_flight
            events = (reading if accepting else replying).poll()
            self._awake = True
            received: list[tuple[Socket, list[zmq.Frame]]] = []
            for sock, _ in events:
                if sock == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif accepting:
                    self._read(sock, received)
            # a message alone in this round (and on the endpoint) may run inline; with
            # company, they batch
            lone = len(received) == 1
            for sock, frames in received:
                self._handle(sock, frames, inline=lone)
            self._flush()
        self._flush()

    def _read(self, sock: Socket, received: list[tuple[Socket, list[zmq.Frame]]]) -> None:
        room = min(READ_BURST, self._max_in_flight - self._in_flight - len(received))
        # the poller saw a whole message: the first read needs no look. After it, asking
        # the socket whether another waits costs a fraction of the zmq.Again a read past
        # the last one raises (a few microseconds against tens, every round)
        for i in range(room):
            if i and not wire.readable(sock):
                return
            try:
                received.append((sock, wire.recv_frames(sock, wire.NOBLOCK)))
            except zmq.Again:  # not expected: this thread is the socket's only reader
                return

    def _wake(self, *, force: bool = False) -> None:
        """From another thread, after queueing a reply: wake the I/O thread unless it is
        awake (it reads the outbox before it sleeps) or a byte is on its way. ``force``:
        always (stopping: the I/O thread checks its flags only once per round)."""
        if force or not self._awake:
            self._awake = True
            # a full pipe: the I/O thread is awake anyway
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _flush(self) -> None:
        outbox = self._outbox
        while outbox:
            message, frames = outbox.popleft()
            self._send(message, frames)

    def _send(self, message: _Message, frames: list[wire.Frame]) -> None:
        """On the I/O thread: send a reply (zero-copy) and count its request out."""
        self._in_flight -= 1
        try:
            wire.send_frames(message.sock, [*message.envelope, *frames])
        except zmq.ZMQError as e:  # the peer went away; nothing to answer
            log.info("zmq_reply_dropped", request_id=clip(message.request_id), error=str(e))

    def _reply(self, message: _Message, outcome: str, frames: list[wire.Frame]) -> None:
        """From any thread: record the outcome and send the reply (through the I/O
        thread's outbox unless on it)."""
        if message.decision is not None:
            self._access.record(message.decision, outcome, message.args)
        if threading.get_ident() == self._io_thread:
            self._send(message, frames)
        else:
            self._outbox.append((message, frames))
            # once per batch, after the thread's work on it (see ``after_answers``)
            if not after_answers(self._wake):
                self._wake()

    def _handle(self, sock: Socket, frames: list[zmq.Frame], *, inline: bool) -> None:
        # ROUTER: [identity, (empty delimiter from a REQ socket), header, tensors...]
        envelope: list[Any] = [frames[0]]
        body = frames[1:]
        if body and len(body[0].buffer) == 0:
            envelope.append(b"")
            body = body[1:]
        message = _Message(sock, envelope)
        self._in_flight += 1
        try:
            if not body:
                raise InvalidInputError("empty message: a header frame is required")
            header, seen = self._reader.header(body[0].buffer)
            message.request_id = wire.request_id(header)
            op = header.get("op")
            call = f"zmq/{op}"
            message.args = self._audit_args(header) if audited(call) else None
            if op in wire.OPS:
                message.decision = self._decide(
                    call, body[0], self._kinds[sock], header, message.args
                )
            tensors = [f.buffer for f in body[1:]]
            if op == "infer" and self._reader.inline(header, seen):
                request = self._reader.body(header, tensors, seen)
                assert request is not None
                rid = header["id"]

                def answered(outcome: InferResponse | EdgedError) -> None:
                    if isinstance(outcome, InferResponse):
                        try:
                            self._reply(message, "OK", wire.encode_response(rid, outcome))
                            return
                        except Exception as e:  # answered as INTERNAL
                            self._reply(message, *error_reply(rid, e))
                            return
                    self._reply(message, *error_reply(rid, outcome))

                # inline only when nothing else is in flight on this endpoint: under load a
                # request that runs here would keep the I/O thread from reading the others
                self._plane.submit(request, answered, inline=inline and self._in_flight == 1)
                return
        except Exception as e:  # every failure is answered (error_reply)
            self._reply(message, *error_reply(message.request_id, e))
            return
        # everything else is answered on the event loop
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._spawn, message, header, tensors)

    def _spawn(self, message: _Message, header: dict[str, Any], tensors: list[Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._handle_async(message, header, tensors))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _decide(
        self,
        call: str,
        frame: zmq.Frame,
        kind: str,
        header: dict[str, Any],
        args: dict[str, Any] | None,
    ) -> Decision:
        """The access check; a caller without a token allowed before, known by its socket,
        address and CURVE key, is not checked again (``AccessControl.cached``)."""
        caller: Any = None
        if not isinstance(header.get("token"), str):
            if kind == "ipc":
                caller = kind
            elif kind == "curve":
                caller = (kind, frame.get("Peer-Address"), frame.get("User-Id"))
            else:
                caller = (kind, frame.get("Peer-Address"))
            decision = self._access.cached(call, caller)
            if decision is not None:
                return decision
        credentials = self._credentials(frame, kind, header)
        return self._access.check(call, credentials, args, caller=caller)

    @staticmethod
    def _credentials(frame: zmq.Frame, kind: str, header: dict[str, Any]) -> Credentials:
        """``kind``: the socket's, "tcp", "curve" (tcp:// with CURVE) or "ipc"."""
        token = header.get("token")
        token = token if isinstance(token, str) else None
        if kind == "ipc":
            return Credentials(transport="zmq", peer="ipc", local=True, token=token)
        address = str(frame.get("Peer-Address"))
        names: tuple[str, ...] = ()
        if kind == "curve":
            names = (IDENTITY_PREFIX + str(frame.get("User-Id")),)
        return Credentials(
            transport="zmq",
            peer=f"tcp:{address}",
            local=kind == "tcp" and (address.startswith("127.") or address == "::1"),
            token=token,
            names=names,
        )

    @staticmethod
    def _audit_args(header: dict[str, Any]) -> dict[str, Any]:
        args = {k: header[k] for k in ("model", "version") if isinstance(header.get(k), str)}
        if isinstance(header.get("labels"), list):
            args["labels_count"] = len(header["labels"])
        return args

    # -- on the event loop -----------------------------------------------------------------

    async def _handle_async(
        self, message: _Message, header: dict[str, Any], tensors: list[Any]
    ) -> None:
        try:
            if wire.decodes_inline(header):
                request = wire.decode_body(header, tensors, self._limits)
            else:
                request = await asyncio.to_thread(wire.decode_body, header, tensors, self._limits)
            reply = await self._answer(header, request)
        except Exception as e:  # every failure is answered (error_reply)
            self._reply(message, *error_reply(message.request_id, e))
            return
        self._reply(message, "OK", reply)

    async def _tensor_op(
        self, op: str, rid: str, header: dict[str, Any], request: Any
    ) -> list[wire.Frame]:
        if op == "infer":
            with structlog.contextvars.bound_contextvars(
                model=clip(request.model_name),
                version=clip(request.model_version),
                request_id=clip(rid),
            ):
                response = await self._plane.infer(request)
            return wire.encode_response(rid, response)
        if op == "add_samples":
            with structlog.contextvars.bound_contextvars(
                model=clip(request.model_name), request_id=clip(rid)
            ):
                added = await self._control.add_samples(
                    request.model_name,
                    request.inputs,
                    np.array(header["labels"], dtype=np.int64),
                )
            return wire.encode_value(
                rid,
                {
                    "accepted": added.accepted,
                    "pending": added.counts.pending,
                    "stored": added.counts.stored,
                    "stored_bytes": added.counts.stored_bytes,
                    "triggered_job": None if added.triggered is None else added.triggered.id,
                },
            )
        raise InvalidInputError(f"op '{op}' carries no tensors")  # not reached: TENSOR_OPS

    async def _answer(self, header: dict[str, Any], request: Any) -> list[wire.Frame]:
        op = header["op"]
        rid = header["id"]
        if op in wire.TENSOR_OPS:
            return await self._tensor_op(op, rid, header, request)
        if op == "live":
            return wire.encode_value(rid, {"live": True})
        if op == "ready":
            return wire.encode_value(rid, {"ready": self._plane.ready()})
        if op == "server_metadata":
            meta = self._plane.server_metadata(("zmq",))
            return wire.encode_value(
                rid,
                {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)},
            )
        model = header.get("model")
        version = header.get("version", "")
        if not isinstance(model, str) or not isinstance(version, str):
            raise InvalidInputError("header 'model' and 'version' must be strings")
        if op == "model_ready":
            return wire.encode_value(rid, {"ready": self._plane.model_ready(model, version)})
        info = self._plane.model_metadata(model, version)  # model_metadata
        return wire.encode_value(
            rid,
            {
                "name": info.name,
                "versions": list(info.versions),
                "platform": info.platform,
                "executor": info.executor,
                "max_batch_size": info.max_batch_size,
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in info.inputs
                ],
                "outputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in info.outputs
                ],
            },
        )

    # -- stopping --------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """Stop receiving, let running requests answer (bounded), close the sockets."""
        if self._thread is not None:
            self._reading = False
            self._wake(force=True)
            await asyncio.to_thread(self._quiet.wait, grace_s)
            self._stopping = True
            self._wake(force=True)
            await asyncio.to_thread(self._thread.join)
        for task in list(self._tasks):
            task.cancel()
        for sock in self._sockets:
            sock.close(0)
        if self._wake_r >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        if self.curve is not None:
            self.curve.stop()
        if self._context is not None:
            self._context.term()
        for endpoint in self.endpoints:
            if endpoint.startswith("ipc://"):
                await asyncio.to_thread(Path(endpoint[len("ipc://") :]).unlink, missing_ok=True)
