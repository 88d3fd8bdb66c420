"""The KServe v2 gRPC frontend (GRPCInferenceService), grpc.health.v1 and reflection.

A thin servicer: protobuf in -> edged.core types -> the data plane -> protobuf out. Domain
errors become gRPC status codes in one place, ``edged.core.status.CODE_BY_ERROR``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edged._proto import POOL
from edged._proto._pool import add_serialized_file
from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from edged.core import errors
from edged.core.stats import Duration, StatisticsSnapshot
from edged.core.status import code_of
from edged.core.types import InferRequest
from edged.frontends import kserve_codec as codec
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
    """GRPCInferenceService over the data plane."""

    def __init__(
        self,
        plane: DataPlane,
        *,
        stream_max_in_flight: int = 64,
        closing: asyncio.Event | None = None,
    ) -> None:
        self._plane = plane
        self._regions = plane.shared_memory
        self._limits = plane.limits
        self._closing = closing
        self._readers: set[asyncio.Task[None]] = set()
        self._stream_watch: asyncio.Task[None] | None = None
        self._stream_max_in_flight = stream_max_in_flight

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

    def _decode(self, message: pb.ModelInferRequest) -> tuple[InferRequest, dict[str, Span]]:
        return (
            codec.request_from_proto(message, self._regions),
            codec.output_spans(message, self._regions),
        )

    async def _infer(self, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Limits first (counts only), then decode (on a worker thread unless cheap), infer,
        encode (likewise)."""
        with structlog.contextvars.bound_contextvars(
            model=errors.clip(message.model_name),
            version=errors.clip(message.model_version),
            request_id=errors.clip(message.id),
        ):
            try:
                codec.check_limits(message, self._limits)
                if codec.decodes_inline(message):
                    request, spans = self._decode(message)
                else:
                    request, spans = await asyncio.to_thread(self._decode, message)
                response = await self._plane.infer(request)
                if codec.encodes_inline(response, spans):
                    return codec.response_to_proto(response, spans)
                return await asyncio.to_thread(codec.response_to_proto, response, spans)
            except errors.EdgedError as e:
                log.info(
                    "infer_refused",
                    error=errors.clip_message(str(e)),
                    status=status_of(e).name,
                )
                raise

    @handle_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request)

    def _watch_streams(self) -> None:
        """Once ``closing`` is set (shutdown), every stream stops reading new requests."""
        if self._closing is None or self._stream_watch is not None:
            return
        closing = self._closing

        async def watch() -> None:
            await closing.wait()
            for reader in list(self._readers):
                reader.cancel()

        self._stream_watch = asyncio.get_running_loop().create_task(watch())

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (bounded); each answer, or its error as
        ``error_message``, goes back as it completes. An error never ends the stream. At
        shutdown the stream stops reading, answers the requests in flight, and ends (OK)."""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self._stream_max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        closing = self._closing

        async def answer(message: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(message)
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except errors.EdgedError as e:
                results.put_nowait(self._stream_error(message, errors.clip_message(str(e))))
            except Exception as e:
                log.exception("stream_infer_failed")
                results.put_nowait(
                    self._stream_error(message, errors.clip_message(f"internal error: {e}"))
                )
            finally:
                slots.release()

        async def read() -> None:
            try:
                try:
                    async for message in request_iterator:
                        await slots.acquire()
                        task = asyncio.create_task(answer(message))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                except asyncio.CancelledError:
                    if closing is None or not closing.is_set():
                        raise
                    log.info("stream_closed_for_shutdown", in_flight=len(tasks))
                while tasks:  # answer what is in flight; a shutdown does not cut it short
                    try:
                        await asyncio.wait(set(tasks))
                    except asyncio.CancelledError:
                        if closing is None or not closing.is_set():
                            raise
            finally:
                results.put_nowait(None)

        self._watch_streams()
        reader = asyncio.create_task(read())
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

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


class HealthPublisher:
    """Keeps grpc.health.v1 in step: "" for the server, one service name per model."""

    def __init__(self, servicer: HealthServicer) -> None:
        self.servicer = servicer
        self._tasks: set[asyncio.Task[None]] = set()

    def _set(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self.servicer.set(service, status))
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
        await self.servicer.enter_graceful_shutdown()


def build_server(
    plane: DataPlane,
    *,
    max_request_bytes: int,
    stream_max_in_flight: int,
    closing: asyncio.Event | None = None,
    services: Sequence[tuple[str, Callable[[grpc.aio.Server], None]]] = (),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    health: HealthPublisher | None = None,
) -> tuple[grpc.aio.Server, HealthPublisher]:
    """A gRPC server with the inference service, health and reflection (not yet bound), plus
    ``services``: (full service name, function adding its servicer to a server), every call
    passing ``interceptors`` (the access check). A second listener of the same daemon passes
    the first one's ``health``, so both answer grpc.health.v1 alike."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(plane, stream_max_in_flight=stream_max_in_flight, closing=closing),
        server,
    )
    for _, add_to_server in services:
        add_to_server(server)
    if health is None:
        health = HealthPublisher(HealthServicer())
        plane.on_model_change(health.model_changed)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            *(name for name, _ in services),
            reflection.SERVICE_NAME,
        ),
        server,
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
