"""The KServe v2 gRPC frontend (GRPCInferenceService), grpc.health.v1 and reflection.

A thin servicer: protobuf in -> edged.core types -> the data plane -> protobuf out. Domain
errors become gRPC status codes in one place, ``edged.core.status.CODE_BY_ERROR``.

The server is grpcio's threaded one (``edged.frontends.grpc_server``, one port): ModelInfer
and ModelStreamInfer run on its handler threads end to end (``ThreadInference``: decode, hand
the request to the model's batcher with ``DataPlane.submit`` -- a lone request on an idle
model runs right there, on the handler thread -- wait, encode); every other call is an
``async def`` method of ``InferenceServicer`` run on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edged._proto import POOL
from edged._proto._pool import add_serialized_file
from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from edged.core import errors
from edged.core.stats import Duration, StatisticsSnapshot
from edged.core.status import code_of
from edged.core.types import InferRequest, InferResponse
from edged.frontends import kserve_codec as codec
from edged.frontends.grpc_server import GrpcServer, Services
from edged.serving.dataplane import DataPlane, SharedMemoryRegistry, Span

log = structlog.get_logger("edged.grpc")


#: what ServerMetadata lists as implemented (plus "system_shared_memory" when it is on)
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
SHARED_MEMORY_EXTENSION = "system_shared_memory"
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def status_of(error: errors.EdgedError) -> grpc.StatusCode:
    """The gRPC status of a domain error (``edged.core.status`` holds the one table)."""
    return grpc.StatusCode[code_of(error)]


def handle_errors(
    rpc: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Answer domain errors with their status and message, anything else with INTERNAL."""

    @functools.wraps(rpc)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await rpc(self, request, context)
        except errors.EdgedError as e:
            await context.abort(status_of(e), errors.clip_message(str(e)))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("rpc_failed", rpc=rpc.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                errors.clip_message(f"internal error: {type(e).__name__}: {e}"),
            )
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(stats: StatisticsSnapshot) -> pb.ModelStatistics:
    message = pb.ModelStatistics(
        name=stats.name,
        version=str(stats.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    s = message.inference_stats
    s.success.CopyFrom(_duration(stats.success))
    s.fail.CopyFrom(_duration(stats.fail))
    s.queue.CopyFrom(_duration(stats.queue))
    s.compute_input.CopyFrom(_duration(stats.compute_input))
    s.compute_infer.CopyFrom(_duration(stats.compute_infer))
    s.compute_output.CopyFrom(_duration(stats.compute_output))
    for size in sorted(stats.batches):
        b = stats.batches[size]
        message.batch_stats.add(
            batch_size=size,
            compute_input=_duration(b.compute_input),
            compute_infer=_duration(b.compute_infer),
            compute_output=_duration(b.compute_output),
        )
    return message


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over the data plane, on the event loop (asyncio). ``build_server``
    serves ModelInfer and ModelStreamInfer from ``ThreadInference`` instead; ``ModelInfer``
    here is the asyncio form (decoding large requests on a worker thread), kept for a
    grpc.aio server and its tests."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._regions = plane.shared_memory
        self._limits = plane.limits

    # -- health ----------------------------------------------------------------------------

    @handle_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @handle_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    @handle_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    # -- metadata --------------------------------------------------------------------------

    @handle_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        extensions: tuple[str, ...] = EXTENSIONS
        if self._regions is not None:
            extensions = (*extensions, SHARED_MEMORY_EXTENSION)
        meta = self._plane.server_metadata(extensions)
        return pb.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=list(meta.extensions)
        )

    @handle_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return codec.metadata_to_proto(self._plane.model_metadata(request.name, request.version))

    @handle_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        config = self._plane.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=codec.config_to_proto(config))

    @handle_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse(
            model_stats=[
                _statistics(s) for s in self._plane.statistics(request.name, request.version)
            ]
        )

    # -- inference -------------------------------------------------------------------------

    @staticmethod
    def _stream_error(message: pb.ModelInferRequest, error: str) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(
            error_message=error,
            infer_response=pb.ModelInferResponse(
                model_name=errors.clip(message.model_name, 256),
                model_version=errors.clip(message.model_version, 256),
                id=errors.clip(message.id, 256),
            ),
        )

    # -- repository ------------------------------------------------------------------------

    @handle_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = await self._plane.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state.value, reason=e.reason
                )
                for e in entries
            ]
        )

    @handle_errors
    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RepositoryModelLoadResponse:
        await self._plane.load(
            request.model_name, request.repository_name, dict(request.parameters)
        )
        return pb.RepositoryModelLoadResponse()

    @handle_errors
    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.RepositoryModelUnloadResponse:
        await self._plane.unload(request.model_name, request.repository_name)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory --------------------------------------------------------------

    def _registry(self) -> SharedMemoryRegistry:
        if self._regions is None:
            raise errors.UnsupportedError("system shared memory is not enabled")
        return self._regions

    @handle_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await asyncio.to_thread(
            self._registry().register,
            request.name,
            request.key,
            request.offset,
            request.byte_size,
            context.peer(),
        )
        log.info(
            "shm_registered",
            region=errors.clip(request.name),
            key=errors.clip(request.key),
            byte_size=request.byte_size,
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @handle_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self._registry().status(request.name):
            status = reply.regions[region.name]
            status.name = region.name
            status.key = region.key
            status.offset = region.offset
            status.byte_size = region.byte_size
        return reply

    @handle_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await asyncio.to_thread(self._registry().unregister, request.name)
        log.info("shm_unregistered", region=errors.clip(request.name) or "*")
        return pb.SystemSharedMemoryUnregisterResponse()


class _Answer:
    """A handler thread's wait for one request's reply (``DataPlane.submit``'s ``reply``):
    a lock held until the reply (or the caller's departure, ``GONE``) is in."""

    __slots__ = ("lock", "outcome")

    GONE = object()

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.outcome: InferResponse | errors.EdgedError | object | None = None

    def __call__(self, outcome: InferResponse | errors.EdgedError | object) -> None:
        self.outcome = outcome
        self.lock.release()

    def wait(self, withdraw: Callable[[], bool], context: grpc.ServicerContext) -> object:
        """The outcome, once in; a call that ends first (cancelled, past its deadline)
        withdraws the request if it is still queued."""
        if self.outcome is None:

            def gone() -> None:
                if self.outcome is None and withdraw():
                    self(self.GONE)

            if not context.add_callback(gone):  # the call has ended already
                gone()
            self.lock.acquire()
        return self.outcome


_END = object()  # a stream's reader is done
_CLOSING = object()  # the server is stopping: a stream stops reading


class ThreadInference:
    """ModelInfer and ModelStreamInfer on the gRPC server's handler threads.

    A request is checked against the limits (counts only), decoded, and handed to its
    model's batcher (``DataPlane.submit``): a lone request on an idle model runs on this
    thread, others are answered by a worker thread and this one waits. A call that ends
    first (client cancel, deadline) drops its request if still queued. Streams answer
    concurrently (``stream_max_in_flight`` each), errors as ``error_message``; at shutdown
    (``close_streams``) a stream stops reading, answers what is in flight, and ends OK.
    """

    def __init__(self, plane: DataPlane, *, stream_max_in_flight: int = 64) -> None:
        self._plane = plane
        self._regions = plane.shared_memory
        self._limits = plane.limits
        self._stream_max_in_flight = stream_max_in_flight
        self._lock = threading.Lock()
        self._streams: set[queue.SimpleQueue[object]] = set()
        self._closing = False

    def _decode(self, message: pb.ModelInferRequest) -> tuple[InferRequest, dict[str, Span]]:
        codec.check_limits(message, self._limits)
        return (
            codec.request_from_proto(message, self._regions),
            codec.output_spans(message, self._regions),
        )

    @staticmethod
    def _refused(message: pb.ModelInferRequest, error: errors.EdgedError) -> None:
        log.info(
            "infer_refused",
            model=errors.clip(message.model_name),
            version=errors.clip(message.model_version),
            request_id=errors.clip(message.id),
            error=errors.clip_message(str(error)),
            status=status_of(error).name,
        )

    def ModelInfer(
        self, message: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            request, spans = self._decode(message)
            answer = _Answer()
            withdraw = self._plane.submit(request, answer, inline=True)
            outcome = answer.wait(withdraw, context)
            if isinstance(outcome, InferResponse):
                return codec.response_to_proto(outcome, spans)
            if isinstance(outcome, errors.EdgedError):
                raise outcome
            code, details = grpc.StatusCode.CANCELLED, "the call ended before its answer"
        except errors.EdgedError as e:
            self._refused(message, e)
            code, details = status_of(e), errors.clip_message(str(e))
        except Exception as e:
            log.exception("rpc_failed", rpc="ModelInfer")
            code = grpc.StatusCode.INTERNAL
            details = errors.clip_message(f"internal error: {type(e).__name__}: {e}")
        context.abort(code, details)
        raise AssertionError("unreachable: abort raises")

    def close_streams(self) -> None:
        """Shutdown: every stream stops reading, answers what it has in flight, and ends."""
        with self._lock:
            self._closing = True
            streams = list(self._streams)
        for results in streams:
            results.put(_CLOSING)

    def ModelStreamInfer(
        self, requests: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Read on a thread of the stream's own, answer on this one (see the class)."""
        stream = _Stream(self, requests, self._stream_max_in_flight)
        with self._lock:
            closing = self._closing
            self._streams.add(stream.results)
        if closing:
            stream.results.put(_CLOSING)
        if not context.add_callback(stream.ended):
            stream.ended()
        threading.Thread(target=stream.read, name="edged-grpc-stream", daemon=True).start()
        try:
            yield from stream.answers()
        finally:
            with self._lock:
                self._streams.discard(stream.results)

    def _stream_answer(
        self,
        message: pb.ModelInferRequest,
        outcome: InferResponse | errors.EdgedError,
        spans: dict[str, Span],
    ) -> pb.ModelStreamInferResponse:
        try:
            if isinstance(outcome, errors.EdgedError):
                raise outcome
            return pb.ModelStreamInferResponse(
                infer_response=codec.response_to_proto(outcome, spans)
            )
        except errors.EdgedError as e:
            self._refused(message, e)
            return InferenceServicer._stream_error(message, errors.clip_message(str(e)))
        except Exception as e:
            log.exception("stream_infer_failed")
            return InferenceServicer._stream_error(
                message, errors.clip_message(f"internal error: {e}")
            )


#: a stream's answered request: the message, its outcome, where its outputs go
_Answered = tuple[pb.ModelInferRequest, InferResponse | errors.EdgedError, dict[str, Span]]


class _Stream:
    """One ModelStreamInfer call: ``read`` (its own thread) submits each request; its
    replies, ``None`` for one withdrawn, ``_END`` and ``_CLOSING`` meet in ``results``,
    which ``answers`` (the handler thread) turns into the responses."""

    def __init__(
        self, owner: ThreadInference, requests: Iterator[pb.ModelInferRequest], slots: int
    ) -> None:
        self._owner = owner
        self._requests = requests
        self.results: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()  # guards the four below
        self._withdraws: dict[int, Callable[[], bool]] = {}
        self._in_flight = 0
        self._closing = False
        self._ended = False

    def read(self) -> None:
        n = 0
        try:
            for message in self._requests:
                self._slots.acquire()
                with self._lock:
                    if self._closing or self._ended:
                        self._slots.release()
                        break
                    self._in_flight += 1
                n += 1
                self._submit(n, message)
        except Exception:  # noqa: S110 - the call ended (cancelled): nothing more to read
            pass
        finally:
            self.results.put(_END)

    def _submit(self, n: int, message: pb.ModelInferRequest) -> None:
        answered = False
        spans: dict[str, Span] = {}

        def reply(outcome: InferResponse | errors.EdgedError) -> None:
            nonlocal answered
            with self._lock:
                answered = True
                self._withdraws.pop(n, None)
            self.results.put((message, outcome, spans))

        try:
            request, spans = self._owner._decode(message)
            withdraw = self._owner._plane.submit(request, reply)
        except errors.EdgedError as e:
            self.results.put((message, e, spans))
            return
        with self._lock:
            if answered:
                return
            if not self._ended:
                self._withdraws[n] = withdraw
                return
        if withdraw():  # the call ended meanwhile
            self.results.put(None)

    def ended(self) -> None:
        """The call is over (answered, cancelled, past its deadline): drop what is queued."""
        with self._lock:
            self._ended = True
            waiting = list(self._withdraws.values())
            self._withdraws.clear()
        for withdraw in waiting:
            if withdraw():
                self.results.put(None)

    def answers(self) -> Iterator[pb.ModelStreamInferResponse]:
        reading = True
        while True:
            item = self.results.get()
            if item is _END:
                reading = False
            elif item is _CLOSING:
                with self._lock:
                    self._closing = True
                    in_flight = self._in_flight
                if reading:
                    log.info("stream_closed_for_shutdown", in_flight=in_flight)
                reading = False
            else:
                with self._lock:
                    self._in_flight -= 1
                self._slots.release()
                if isinstance(item, tuple):
                    yield self._owner._stream_answer(*item)
            with self._lock:
                if not reading and self._in_flight == 0:
                    return


class HealthPublisher:
    """Keeps grpc.health.v1 in step: "" for the server, one service name per model. The
    servicer is grpcio's threaded one (a Watch holds no thread); a status change is sent
    to its watchers from a worker thread, in order, never from the event loop."""

    def __init__(self, servicer: HealthServicer) -> None:
        self.servicer = servicer
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: asyncio.Task[None] | None = None

    def _set(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        previous = self._last

        async def apply() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await asyncio.to_thread(self.servicer.set, service, status)

        self._last = task = asyncio.get_running_loop().create_task(apply())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def model_changed(self, model: str, ready: bool) -> None:
        """ModelManager listener."""
        self._set(model, ready)

    def server_changed(self, ready: bool) -> None:
        """The daemon's readiness changed."""
        self._set("", ready)

    async def shutdown(self) -> None:
        """Every service NOT_SERVING from now on."""
        await asyncio.gather(*self._tasks)
        await asyncio.to_thread(self.servicer.enter_graceful_shutdown)


#: handler threads of a gRPC listener by default (``server.grpc_threads``)
DEFAULT_THREADS = 64


def build_server(
    plane: DataPlane,
    *,
    max_request_bytes: int,
    stream_max_in_flight: int,
    threads: int = DEFAULT_THREADS,
    services: Sequence[tuple[str, Callable[[Services], None]]] = (),
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    health: HealthPublisher | None = None,
) -> tuple[GrpcServer, HealthPublisher]:
    """A gRPC server (not yet bound; call on the event loop) with the inference service,
    health and reflection, plus ``services``: (full service name, function adding its
    asyncio servicer), every call passing ``interceptors`` (the access check) on one of
    ``threads`` handler threads. A second listener of the same daemon passes the first one's
    ``health``, so both answer grpc.health.v1 alike."""
    server = GrpcServer(
        threads=threads,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0),
        ],
    )
    threaded = ThreadInference(plane, stream_max_in_flight=stream_max_in_flight)
    server.on_stop.append(threaded.close_streams)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(plane),
        server.services(
            {"ModelInfer": threaded.ModelInfer, "ModelStreamInfer": threaded.ModelStreamInfer}
        ),
    )
    for _, add_to_server in services:
        add_to_server(server.services())
    if health is None:
        health = HealthPublisher(HealthServicer())
        plane.on_model_change(health.model_changed)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server.server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            *(name for name, _ in services),
            reflection.SERVICE_NAME,
        ),
        server.server,
        pool=_reflection_pool(),
    )
    return server, health


def _reflection_pool() -> object:
    """edged's own descriptor pool (see edged._proto), plus health and reflection."""
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            add_serialized_file(module.DESCRIPTOR.serialized_pb)
    return POOL
