"""Clients for edged's ZeroMQ endpoint, for applications on the same host or network.

    from edged.client import ZmqClient
    with ZmqClient("tcp://127.0.0.1:5555") as client:
        outputs = client.infer("digits", {"input": images})

``ZmqClient`` is synchronous (one request at a time per client object, like a socket);
``AsyncZmqClient`` keeps many requests in flight on one connection. Both speak the wire format
in docs/zmq-protocol.md and raise ``ZmqClientError`` carrying the same status codes as gRPC.
Both take a bearer ``token`` (sent in every request header) and, for a daemon with CURVE on its
tcp:// endpoints, ``curve=CurveKeys.from_files(server_public_file, client_secret_file)``
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio

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


def _outcome(frames: Sequence[wire.Frame]) -> tuple[dict[str, Any], dict[str, Array]]:
    try:
        header, outputs = wire.decode_reply(frames)
    except InvalidInputError as e:
        raise ZmqClientError("INTERNAL", f"malformed reply: {e}") from e
    if not header.get("ok"):
        raise ZmqClientError(str(header.get("code", "UNKNOWN")), str(header.get("error", "")))
    return header, outputs


def _request(
    model: str,
    inputs: Mapping[str, Array],
    outputs: Sequence[str] | None,
    version: str,
    parameters: Mapping[str, Any] | None,
) -> InferRequest:
    return InferRequest(
        model_name=model,
        model_version=version,
        inputs=dict(inputs),
        requested_outputs=tuple(outputs or ()),
        parameters=dict(parameters or {}),
    )


class ZmqClient:
    """A synchronous client over one DEALER socket."""

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        *,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.connect(address)
        self._auth: dict[str, Any] = {"token": token} if token else {}
        self._timeout = timeout
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
        self._socket.send_multipart(frames, copy=False)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(int(left * 1000)):
                limit = self._timeout if timeout is None else timeout
                raise ZmqClientError("DEADLINE_EXCEEDED", f"no reply within {limit}s")
            reply = self._socket.recv_multipart(copy=False)
            header, outputs = _outcome([f.buffer for f in reply])
            if header.get("id") == request_id:  # replies to requests that timed out are dropped
                return header, outputs

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
        frames = wire.encode_request(
            "infer",
            rid,
            request=_request(model, inputs, outputs, version, parameters),
            **self._auth,
        )
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
        frames = wire.encode_request(
            "add_samples",
            rid,
            request=_request(model, inputs, None, "", None),
            labels=[int(v) for v in labels],
            **self._auth,
        )
        result: dict[str, Any] = self._call(frames, rid, None)[0]["result"]
        return result

    def server_metadata(self) -> dict[str, Any]:
        """Name, version and extensions of the daemon."""
        return self._op("server_metadata")


class AsyncZmqClient:
    """An asyncio client: any number of requests in flight on one DEALER socket."""

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        *,
        token: str | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self._context = zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._socket)
        self._socket.connect(address)
        self._auth: dict[str, Any] = {"token": token} if token else {}
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[list[zmq.Frame]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncZmqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader and close the socket."""
        if self._reader is not None:
            self._reader.cancel()
        self._socket.close(0)

    async def _read(self) -> None:
        while True:
            reply = await self._socket.recv_multipart(copy=False)
            try:
                header = wire.read_header(reply[0].buffer) if reply else {}
            except InvalidInputError:
                continue
            future = self._waiting.pop(str(header.get("id")), None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _call(
        self, frames: list[wire.Frame], request_id: str, timeout: float | None
    ) -> tuple[dict[str, Any], dict[str, Array]]:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        future: asyncio.Future[list[zmq.Frame]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._socket.send_multipart(frames, copy=False)
            limit = self._timeout if timeout is None else timeout
            reply = await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise ZmqClientError("DEADLINE_EXCEEDED", f"no reply within {limit}s") from None
        finally:
            self._waiting.pop(request_id, None)
        return _outcome([f.buffer for f in reply])

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
        frames = wire.encode_request(
            "infer",
            rid,
            request=_request(model, inputs, outputs, version, parameters),
            **self._auth,
        )
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
        frames = wire.encode_request(
            "add_samples",
            rid,
            request=_request(model, inputs, None, "", None),
            labels=[int(v) for v in labels],
            **self._auth,
        )
        result: dict[str, Any] = (await self._call(frames, rid, None))[0]["result"]
        return result

    async def server_metadata(self) -> dict[str, Any]:
        """See ``ZmqClient.server_metadata``."""
        return await self._op("server_metadata")
