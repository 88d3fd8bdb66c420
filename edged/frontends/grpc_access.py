"""The access check on gRPC: one server interceptor, for every service of a listener.

It gathers the caller's credentials (``authorization: Bearer <token>`` metadata; the client
certificate's CN and SANs when the listener verifies client certificates; the peer), asks
``AccessControl.check`` before the handler runs, and records the outcome (for management and
learning calls, with the request's arguments that matter) after. A refusal is answered with
the code of its domain error (``edged.core.status``): UNAUTHENTICATED or PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edged.core.errors import EdgedError
from edged.frontends.grpc import status_of
from edged.security.access import AccessControl, Credentials, Decision, audited
from edged.security.tls import peer_names

#: request fields never copied to the audit log (tensor payloads)
_SKIPPED_FIELDS = frozenset({"raw_input_contents", "inputs", "contents"})


def is_local(peer: str) -> bool:
    """Whether a gRPC peer string is loopback or a Unix socket."""
    if peer.startswith("unix:") or peer.startswith("unix-abstract:"):
        return True
    if peer.startswith("ipv4:127."):
        return True
    return peer.startswith("ipv6:[::1]:")


def request_args(message: object) -> dict[str, Any]:
    """A request's arguments as the audit log keeps them: its set scalar fields (strings
    shortened later), the length of its repeated ones, never tensor contents."""
    if not isinstance(message, Message):
        return {}
    args: dict[str, Any] = {}
    for f, value in message.ListFields():
        if f.name in _SKIPPED_FIELDS:
            continue
        if f.is_repeated:
            args[f"{f.name}_count"] = len(value)
        elif f.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES):
            continue
        else:
            args[f.name] = value
    return args


def bearer(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else text.strip()
    return None


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Checks each call against ``access``; ``verified_certs``: this listener verifies client
    certificates, so their names may be trusted."""

    def __init__(self, access: AccessControl, *, verified_certs: bool) -> None:
        self._access = access
        self._verified_certs = verified_certs
        #: method -> (the service's handler, its checked wrapper): built once per method
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _credentials(self, context: grpc.aio.ServicerContext) -> Credentials:
        peer = context.peer()
        names: tuple[str, ...] = ()
        if self._verified_certs:
            names = peer_names(dict(context.auth_context()))
        return Credentials(
            transport="grpc",
            peer=peer,
            local=is_local(peer),
            token=bearer(context.invocation_metadata()),
            names=names,
        )

    async def _check(
        self, method: str, request: object, context: grpc.aio.ServicerContext
    ) -> tuple[Decision, dict[str, Any] | None]:
        args = request_args(request) if audited(method) else None
        try:
            return self._access.check(method, self._credentials(context), args), args
        except EdgedError as e:
            await context.abort(status_of(e), str(e))
            raise AssertionError("unreachable: abort raises") from e

    def _record(
        self, decision: Decision, context: grpc.aio.ServicerContext, args: dict[str, Any] | None
    ) -> None:
        if not decision.audited:
            return
        code = context.code()
        if code is not None:
            outcome = getattr(code, "name", str(code))
        else:
            failed = sys.exc_info()[0]
            outcome = (
                "OK"
                if failed is None
                else "CANCELLED"
                if issubclass(failed, asyncio.CancelledError)
                else "INTERNAL"
            )
        self._access.record(decision, outcome, args)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream_stream(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method: str, behavior: Any) -> Any:
        async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
            decision, args = await self._check(method, request, context)
            try:
                return await behavior(request, context)
            finally:
                self._record(decision, context, args)

        return checked

    def _unary_stream(self, method: str, behavior: Any) -> Any:
        return self._streaming(method, behavior, request_is_message=True)

    def _stream_unary(self, method: str, behavior: Any) -> Any:
        return self._unary(method, behavior)

    def _stream_stream(self, method: str, behavior: Any) -> Any:
        return self._streaming(method, behavior, request_is_message=False)

    def _streaming(self, method: str, behavior: Any, *, request_is_message: bool) -> Any:
        """A handler answering with a stream: an async generator, or a coroutine that writes
        with ``context.write`` (grpc.health's Watch)."""
        if not inspect.isasyncgenfunction(behavior):
            return self._unary(method, behavior)

        async def checked(
            request: object, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[object]:
            decision, args = await self._check(
                method, request if request_is_message else None, context
            )
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._record(decision, context, args)

        return checked
