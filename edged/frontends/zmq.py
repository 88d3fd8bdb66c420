"""The ZeroMQ frontend: a ROUTER socket (tcp:// and ipc://) carrying the wire format of
``edged.frontends.zmq_wire``, many requests in flight per connection.

Thin like the gRPC frontend: frames in -> edged.core types -> the data plane (or, for
"add_samples", the control plane) -> frames out, with the same status codes
(``edged.core.status``). Every message passes the access check (``edged.security.access``)
as ``zmq/<op>`` once its header is read, before its tensors are decoded; the bearer token
rides in the header's ``token``. With CURVE configured, tcp:// endpoints are served by a
CURVE socket (clients named ``curve:<public key>``) and ipc:// endpoints by a plain one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq
import zmq.asyncio

from edged.controlplane import ControlPlane
from edged.core.errors import (
    ConfigError,
    EdgedError,
    InvalidInputError,
    clip,
    clip_message,
)
from edged.core.status import code_of
from edged.frontends import zmq_wire as wire
from edged.security.access import AccessControl, Credentials, Decision, audited
from edged.security.curve import IDENTITY_PREFIX, CurveServer
from edged.serving.dataplane import DataPlane

log = structlog.get_logger("edged.zmq")


def bindable(address: str) -> str:
    """ZeroMQ's spelling of ``address``: port 0 becomes the wildcard ``*``."""
    if address.startswith("tcp://") and address.endswith(":0"):
        return address[:-1] + "*"
    return address


class ZmqFrontend:
    """Serves one ROUTER socket bound to every configured address."""

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
        self._control = control or ControlPlane()
        self._addresses = list(addresses)
        self._max_message_bytes = max_message_bytes
        self._slots = asyncio.Semaphore(max_in_flight)
        self._context: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._receivers: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.endpoints: list[str] = []

    def start(self) -> list[str]:
        """Bind every address; return the endpoints actually bound (ports resolved).

        Raises:
            ConfigError: an address cannot be bound, or a CURVE key file is bad.
        """
        self._context = zmq.asyncio.Context()
        if self._curve_files is not None:
            self.curve = CurveServer(self._context, *self._curve_files)
            self.curve.start()
        # tcp:// and ipc:// on sockets of their own: CURVE is a socket option, and a
        # message's socket tells whether its peer is on this host
        tcp = [a for a in self._addresses if a.startswith("tcp://")]
        ipc = [a for a in self._addresses if not a.startswith("tcp://")]
        loop = asyncio.get_running_loop()
        groups = [(tcp, "curve" if self.curve else "tcp"), (ipc, "ipc")]
        if self._addresses and not self._addresses[0].startswith("tcp://"):
            groups.reverse()  # endpoints listed in the configured order, ipc:// first here
        for addresses, kind in groups:
            if not addresses:
                continue
            sock = self._bind(addresses, kind == "curve")
            self._sockets.append(sock)
            self._receivers.append(loop.create_task(self._receive(sock, kind), name="zmq"))
        return self.endpoints

    def _bind(self, addresses: Sequence[str], curve: bool) -> zmq.asyncio.Socket:
        assert self._context is not None
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
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

    async def _receive(self, sock: zmq.asyncio.Socket, kind: str) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._handle(sock, kind, frames))
            self._handlers.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()

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

    async def _handle(self, sock: zmq.asyncio.Socket, kind: str, frames: list[zmq.Frame]) -> None:
        # ROUTER: [identity, (empty delimiter from a REQ socket), header, tensors...]
        envelope: list[Any] = [frames[0]]
        body = frames[1:]
        if body and len(body[0].buffer) == 0:
            envelope.append(b"")
            body = body[1:]
        request_id = ""
        decision: Decision | None = None
        args: dict[str, Any] | None = None
        outcome = "OK"
        try:
            if not body:
                raise InvalidInputError("empty message: a header frame is required")
            header = wire.read_header(body[0].buffer)
            request_id = wire.request_id(header)
            call = f"zmq/{header.get('op')}"
            args = self._audit_args(header) if audited(call) else None
            if header.get("op") in wire.OPS:
                decision = self._access.check(call, self._credentials(body[0], kind, header), args)
            tensors = [f.buffer for f in body[1:]]
            if wire.decodes_inline(header):
                request = wire.decode_body(header, tensors, self._limits)
            else:
                request = await asyncio.to_thread(wire.decode_body, header, tensors, self._limits)
            reply = await self._answer(header, request)
        except EdgedError as e:
            outcome = code_of(e)
            message = clip_message(str(e))
            log.info("zmq_refused", request_id=clip(request_id), error=message, status=outcome)
            reply = wire.encode_error(request_id, outcome, message)
        except Exception as e:
            outcome = "INTERNAL"
            log.exception("zmq_failed", request_id=clip(request_id))
            reply = wire.encode_error(
                request_id, "INTERNAL", clip_message(f"internal error: {type(e).__name__}: {e}")
            )
        if decision is not None:
            self._access.record(decision, outcome, args)
        try:
            await sock.send_multipart([*envelope, *reply], copy=False)
        except zmq.ZMQError as e:  # the peer went away; nothing to answer
            log.info("zmq_reply_dropped", request_id=clip(request_id), error=str(e))

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

    async def stop(self, grace_s: float) -> None:
        """Stop receiving, let running requests answer (bounded), close the sockets."""
        for receiver in self._receivers:
            receiver.cancel()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=grace_s)
        for sock in self._sockets:
            sock.close(0)
        if self.curve is not None:
            self.curve.stop()
        if self._context is not None:
            self._context.term()
        for endpoint in self.endpoints:
            if endpoint.startswith("ipc://"):
                await asyncio.to_thread(Path(endpoint[len("ipc://") :]).unlink, missing_ok=True)
