"""The gRPC server edged runs: grpcio's threaded server, with asyncio servicers bridged to the
event loop.

One port serves everything (stock tritonclient takes one URL). Calls are answered on a pool
of handler threads: the inference calls run there end to end (``edged.frontends.grpc``), so
their per-request Python work never touches the event loop; every other call is an
``async def`` servicer method (repository, metadata, management, ...) that a handler thread
runs on the event loop (``asyncio.run_coroutine_threadsafe``) and waits for. A client that
goes away (cancel or deadline) cancels that coroutine, as grpc.aio would.

Anchor: grpc ``examples/python/helloworld/greeter_server.py`` (the threaded server) and
ADR 0014 / docs/adr/0015-grpc-sync-server.md (why not grpc.aio).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

#: an ``async def`` servicer method, as generated code registers it
AsyncBehavior = Callable[[Any, Any], Coroutine[Any, Any, Any]]


class LoopAbort(grpc.aio.AbortError):  # type: ignore[misc]  # grpc is untyped
    """What ``LoopContext.abort`` raises: the status a bridged call ends with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LoopContext:
    """What a bridged ``async def`` method sees as its ``context``: grpc.aio's
    ``abort`` (awaitable, raises), the rest read from the handler thread's context."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise LoopAbort(code, details)

    def peer(self) -> str:
        return str(self._context.peer())

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return dict(self._context.auth_context())


class LoopBridge:
    """Runs ``async def`` servicer methods on the event loop for handler threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def unary(self, behavior: AsyncBehavior) -> Callable[[Any, grpc.ServicerContext], Any]:
        """A handler-thread method running ``behavior`` on the loop and waiting for it."""
        loop = self._loop

        def on_thread(request: Any, context: grpc.ServicerContext) -> Any:
            future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
                behavior(request, LoopContext(context)), loop
            )
            if not context.add_callback(future.cancel):  # ends early: cancel the coroutine
                future.cancel()
            try:
                return future.result()
            except LoopAbort as e:
                context.abort(e.code, e.details)
            except concurrent.futures.CancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
            raise AssertionError("unreachable: abort raises")

        return on_thread

    def handler(
        self, handler: grpc.RpcMethodHandler, override: Callable[..., Any] | None = None
    ) -> grpc.RpcMethodHandler:
        """``handler`` with its behavior run on a handler thread: ``override`` (a thread-side
        implementation), else the async behavior bridged to the loop (unary calls only)."""
        if override is not None:
            kind = next(
                k
                for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k) is not None
            )
            return handler._replace(**{kind: override})
        behavior = handler.unary_unary
        if behavior is None:
            raise TypeError("only unary calls are bridged to the event loop; give an override")
        if not inspect.iscoroutinefunction(behavior):  # the generated stub of a call not served
            return handler._replace(unary_unary=_unimplemented(behavior))
        return handler._replace(unary_unary=self.unary(behavior))


def _unimplemented(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A generated servicer's method a servicer does not override: answered UNIMPLEMENTED,
    on the handler thread."""

    def on_thread(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except NotImplementedError as e:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e) or "not implemented")
        raise AssertionError("unreachable: abort raises")

    return on_thread


class _BridgedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    def __init__(
        self, inner: grpc.GenericRpcHandler, wrap: Callable[[str, grpc.RpcMethodHandler], Any]
    ) -> None:
        self._inner = inner
        self._wrap = wrap

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        return self._wrap(str(details.method).rpartition("/")[2], handler)


class Services:
    """What generated ``add_XServicer_to_server`` functions register on: an asyncio servicer's
    methods go onto the threaded server bridged to the loop, except those in ``overrides``
    (method name -> thread-side implementation)."""

    def __init__(
        self,
        server: grpc.Server,
        bridge: LoopBridge,
        overrides: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self._server = server
        self._bridge = bridge
        self._overrides = dict(overrides or {})

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._bridge.handler(handler, self._overrides.get(method))

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_BridgedGeneric(h, self._wrap) for h in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {method: self._wrap(method, h) for method, h in handlers.items()}
        )


class GrpcServer:
    """grpcio's threaded server with the asyncio lifecycle the daemon uses: ``start`` and
    ``stop(grace)`` are awaitable; ``stop`` refuses new calls at once, runs ``on_stop``
    (streams stop reading), and waits up to ``grace`` for the calls in flight."""

    def __init__(
        self,
        *,
        threads: int,
        interceptors: Sequence[grpc.ServerInterceptor],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edged-grpc")
        self.server: grpc.Server = grpc.server(
            self._pool, interceptors=list(interceptors), options=list(options)
        )
        self.bridge = LoopBridge(asyncio.get_running_loop())
        self.on_stop: list[Callable[[], None]] = []

    def services(self, overrides: Mapping[str, Callable[..., Any]] | None = None) -> Services:
        """Where an asyncio servicer registers (see ``Services``)."""
        return Services(self.server, self.bridge, overrides)

    def add_insecure_port(self, address: str) -> int:
        return int(self.server.add_insecure_port(address))

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return int(self.server.add_secure_port(address, credentials))

    async def start(self) -> None:
        self.server.start()

    async def stop(self, grace: float | None) -> None:
        stopped = self.server.stop(grace)  # new calls are refused from here on
        for hook in self.on_stop:
            hook()
        await asyncio.to_thread(stopped.wait)
        self._pool.shutdown(wait=False)
