"""The ZeroMQ frontend: a ROUTER socket (tcp:// and ipc://) carrying the wire format of
``edged.frontends.zmq_wire``, many requests in flight per connection.

Thin like the gRPC frontend: frames in -> edged.core types -> the ModelManager (or, for
"add_samples", the LearnManager) -> frames out, with the same status codes
(``edged.core.status``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import zmq
import zmq.asyncio

from edged import __version__
from edged.core.errors import (
    ConfigError,
    EdgedError,
    InvalidInputError,
    UnavailableError,
    clip,
    clip_message,
)
from edged.core.limits import RequestLimits
from edged.core.status import code_of
from edged.frontends import zmq_wire as wire
from edged.learn.jobs import LEARNING_OFF, LearnManager
from edged.serving.manager import ModelManager
from edged.serving.repository import PLATFORMS

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
        manager: ModelManager,
        addresses: Sequence[str],
        *,
        is_ready: Callable[[], bool],
        max_message_bytes: int,
        max_in_flight: int,
        learn: LearnManager | None = None,
        limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
    ) -> None:
        self._manager = manager
        self._limits = limits
        self._learn = learn
        self._addresses = list(addresses)
        self._is_ready = is_ready
        self._max_message_bytes = max_message_bytes
        self._slots = asyncio.Semaphore(max_in_flight)
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.endpoints: list[str] = []

    def start(self) -> list[str]:
        """Bind every address; return the endpoints actually bound (ports resolved).

        Raises:
            ConfigError: an address cannot be bound.
        """
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        for address in self._addresses:
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
        self._socket = sock
        self._receiver = asyncio.get_running_loop().create_task(self._receive(), name="zmq")
        return self.endpoints

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._handle(frames))
            self._handlers.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()

    async def _handle(self, frames: list[zmq.Frame]) -> None:
        # ROUTER: [identity, (empty delimiter from a REQ socket), header, tensors...]
        envelope: list[Any] = [frames[0]]
        body = frames[1:]
        if body and len(body[0].buffer) == 0:
            envelope.append(b"")
            body = body[1:]
        request_id = ""
        try:
            if not body:
                raise InvalidInputError("empty message: a header frame is required")
            header = wire.read_header(body[0].buffer)
            request_id = wire.request_id(header)
            tensors = [f.buffer for f in body[1:]]
            if wire.decodes_inline(header):
                request = wire.decode_body(header, tensors, self._limits)
            else:
                request = await asyncio.to_thread(wire.decode_body, header, tensors, self._limits)
            reply = await self._answer(header, request)
        except EdgedError as e:
            message = clip_message(str(e))
            log.info("zmq_refused", request_id=clip(request_id), error=message, status=code_of(e))
            reply = wire.encode_error(request_id, code_of(e), message)
        except Exception as e:
            log.exception("zmq_failed", request_id=clip(request_id))
            reply = wire.encode_error(
                request_id, "INTERNAL", clip_message(f"internal error: {type(e).__name__}: {e}")
            )
        assert self._socket is not None
        try:
            await self._socket.send_multipart([*envelope, *reply], copy=False)
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
                response = await self._manager.infer(request)
            return wire.encode_response(rid, response)
        if op == "add_samples":
            if self._learn is None:
                raise UnavailableError(LEARNING_OFF)
            with structlog.contextvars.bound_contextvars(
                model=clip(request.model_name), request_id=clip(rid)
            ):
                accepted, counts, job = await self._learn.add_samples(
                    request.model_name,
                    request.inputs,
                    np.array(header["labels"], dtype=np.int64),
                )
            return wire.encode_value(
                rid,
                {
                    "accepted": accepted,
                    "pending": counts.pending,
                    "stored": counts.stored,
                    "stored_bytes": counts.stored_bytes,
                    "triggered_job": None if job is None else job.id,
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
            return wire.encode_value(rid, {"ready": self._is_ready()})
        if op == "server_metadata":
            return wire.encode_value(
                rid, {"name": "edged", "version": __version__, "extensions": ["zmq"]}
            )
        model = header.get("model")
        version = header.get("version", "")
        if not isinstance(model, str) or not isinstance(version, str):
            raise InvalidInputError("header 'model' and 'version' must be strings")
        if op == "model_ready":
            ready = self._manager.accepting and self._manager.is_ready(model, version)
            return wire.encode_value(rid, {"ready": ready})
        mv = self._manager.get(model, version)  # model_metadata
        sig = mv.signature
        return wire.encode_value(
            rid,
            {
                "name": mv.name,
                "versions": [str(v.version) for v in self._manager.versions(mv.name)],
                "platform": PLATFORMS[mv.spec.format][0],
                "executor": mv.kind,
                "max_batch_size": sig.max_batch_size,
                "inputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype.value,
                        "shape": list(sig.client_shape(t)),
                    }
                    for t in sig.inputs
                ],
                "outputs": [
                    {
                        "name": t.name,
                        "datatype": t.datatype.value,
                        "shape": list(sig.client_shape(t)),
                    }
                    for t in sig.outputs
                ],
            },
        )

    async def stop(self, grace_s: float) -> None:
        """Stop receiving, let running requests answer (bounded), close the socket."""
        if self._receiver is not None:
            self._receiver.cancel()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=grace_s)
        if self._socket is not None:
            self._socket.close(0)
        if self._context is not None:
            self._context.term()
        for endpoint in self.endpoints:
            if endpoint.startswith("ipc://"):
                await asyncio.to_thread(Path(endpoint[len("ipc://") :]).unlink, missing_ok=True)
