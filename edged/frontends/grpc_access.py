"""The access check on gRPC: one server interceptor, for every service of a listener.

It gathers the caller's credentials (``authorization: Bearer <token>`` metadata; the client
certificate's CN and SANs when the listener verifies client certificates; the peer), asks
``AccessControl.check`` before the handler runs, and records the outcome (for management and
learning calls, with the request's arguments that matter) after. A refusal is answered with
the code of its domain error (``edged.core.status``): UNAUTHENTICATED or PERMISSION_DENIED.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
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


class AccessInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Checks each call against ``access`` on the handler thread that answers it (grpcio's
    threaded server, ``edged.frontends.grpc_server``); ``verified_certs``: this listener
    verifies client certificates, so their names may be trusted."""

    def __init__(self, access: AccessControl, *, verified_certs: bool) -> None:
        self._access = access
        self._verified_certs = verified_certs
        #: method -> (the service's handler, its checked wrapper): built once per method
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _credentials(self, context: grpc.ServicerContext) -> Credentials:
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

    def _check(
        self, method: str, request: object, context: grpc.ServicerContext
    ) -> tuple[Decision, dict[str, Any] | None]:
        args = request_args(request) if audited(method) else None
        try:
            return self._access.check(method, self._credentials(context), args), args
        except EdgedError as e:
            context.abort(status_of(e), str(e))
            raise AssertionError("unreachable: abort raises") from e

    def _record(
        self, decision: Decision, context: grpc.ServicerContext, args: dict[str, Any] | None
    ) -> None:
        if not decision.audited:
            return
        code = context.code()
        if code is not None:
            outcome = getattr(code, "name", str(code))
        else:
            outcome = "OK" if sys.exc_info()[0] is None else "INTERNAL"
        self._access.record(decision, outcome, args)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
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
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(method, handler.stream_unary))
        if handler.unary_stream is not None:
            return handler._replace(
                unary_stream=self._streaming(method, handler.unary_stream, request_is_message=True)
            )
        return handler._replace(
            stream_stream=self._streaming(method, handler.stream_stream, request_is_message=False)
        )

    def _unary(self, method: str, behavior: Any) -> Any:
        def checked(request: object, context: grpc.ServicerContext) -> object:
            decision, args = self._check(method, request, context)
            try:
                return behavior(request, context)
            finally:
                self._record(decision, context, args)

        return checked

    def _streaming(self, method: str, behavior: Any, *, request_is_message: bool) -> Any:
        """A handler answering with a stream: a generator, or (grpc.health's Watch) a
        non-blocking one that answers through a callback, which stays non-blocking."""
        if getattr(behavior, "experimental_non_blocking", False):

            def checked_callback(request: object, context: grpc.ServicerContext, send: Any) -> Any:
                decision, args = self._check(
                    method, request if request_is_message else None, context
                )
                try:
                    return behavior(request, context, send)
                finally:
                    self._record(decision, context, args)

            checked_callback.experimental_non_blocking = True  # type: ignore[attr-defined]
            return checked_callback

        def checked(request: object, context: grpc.ServicerContext) -> Iterator[object]:
            decision, args = self._check(method, request if request_is_message else None, context)
            try:
                yield from behavior(request, context)
            finally:
                self._record(decision, context, args)

        return checked
