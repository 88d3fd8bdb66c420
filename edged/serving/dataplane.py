"""The data plane: the one object every frontend (gRPC, ZeroMQ, HTTP/REST, metrics) talks to.

Infer, liveness and readiness, server and model metadata, model configuration, statistics
snapshots, the repository index, repository load/unload and the executor/breaker views, all
answered in ``edged.core`` types (``edged.core.views``, ``edged.core.stats``): a frontend
never reads a ``ModelVersion``, a scheduler, a stats lock or a hal type, so a new frontend is
a codec plus routes. Anchor: MLServer's ``mlserver/handlers/dataplane.py``.

Blocking work (listing the repository folder) runs on a worker thread; everything else only
reads the manager's in-memory state on the event loop, or copies it under serving's own locks
from the metrics thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping

import structlog

from edged import __version__
from edged.core import errors
from edged.core.limits import RequestLimits
from edged.core.stats import StatisticsSnapshot
from edged.core.types import InferRequest, InferResponse
from edged.core.views import (
    BreakerView,
    CutView,
    IndexEntry,
    LinkView,
    ModelConfiguration,
    ModelMetadata,
    PlacementCounters,
    ServedVersion,
    ServerMetadata,
    TensorMetadata,
    VersionState,
)
from edged.serving.manager import ModelManager
from edged.serving.pipeline import (
    PIPELINE_EXECUTOR,
    PIPELINE_PLATFORM,
    Pipeline,
    pipeline_toml_text,
    step_views,
)
from edged.serving.repository import PLATFORMS, model_toml_text
from edged.serving.scheduler import after_answers
from edged.serving.shared_memory import SharedMemoryRegistry, Span
from hal.remote_link import snapshots as link_snapshots

__all__ = [
    "MAX_MODEL_NAME_BYTES",
    "SERVER_NAME",
    "DataPlane",
    "SharedMemoryRegistry",
    "Span",
    "after_answers",
]

log = structlog.get_logger("edged.serving")

SERVER_NAME = "edged"
#: the longest model name (a folder name: NAME_MAX)
MAX_MODEL_NAME_BYTES = 255
#: the one repository edged serves (KServe's repository_name; "" means it too)
REPOSITORY_NAME = "models"
#: what metadata says a pipeline's platform and executor are
_PIPELINE = (PIPELINE_PLATFORM, PIPELINE_EXECUTOR)


def check_model_name(name: str) -> None:
    """A name that could be a model folder's: a plain file name.

    Raises:
        InvalidInputError: empty, too long, a path, a NUL byte or a hidden name.
    """
    if (
        not name
        or len(name.encode(errors="surrogatepass")) > MAX_MODEL_NAME_BYTES
        or not name.isprintable()
        or "/" in name
        or name.startswith(".")
    ):
        raise errors.InvalidInputError(
            f"model name '{errors.clip(name)}' is not a model folder name (a plain name of "
            f"at most {MAX_MODEL_NAME_BYTES} bytes, no '/', no control characters, not "
            "starting with '.')"
        )


def check_repository(name: str) -> None:
    """Raises:
    ModelNotFoundError: ``name`` is not edged's one repository.
    """
    if name not in ("", REPOSITORY_NAME):
        raise errors.ModelNotFoundError(
            f"unknown repository '{errors.clip(name)}' (edged serves one, "
            f"'{REPOSITORY_NAME}'; leave repository_name empty)"
        )


class DataPlane:
    """Serving as the frontends see it."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        is_ready: Callable[[], bool],
        regions: SharedMemoryRegistry | None = None,
        limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
    ) -> None:
        self._manager = manager
        self._is_ready = is_ready
        self.limits = limits
        #: the system shared-memory registry (None: the extension is off)
        self.shared_memory = regions

    # -- health ----------------------------------------------------------------------------

    @staticmethod
    def live() -> bool:
        """The process answers (ServerLive)."""
        return True

    def ready(self) -> bool:
        """Start-up loading is done and, with strict readiness, every wanted model serves."""
        return self._is_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        """``name`` (that version, or any) takes requests now."""
        return self._manager.accepting and self._manager.is_ready(name, version)

    def on_model_change(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(model, ready)`` whenever a model's readiness may have changed."""
        self._manager.on_change(listener)

    # -- metadata and configuration --------------------------------------------------------

    @staticmethod
    def server_metadata(extensions: tuple[str, ...]) -> ServerMetadata:
        """The server's name and version, with the extensions the asking frontend speaks."""
        return ServerMetadata(SERVER_NAME, __version__, extensions)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Raises:
        ModelNotFoundError, ModelNotReadyError, InvalidInputError: as ``ModelManager.get``.
        """
        pipeline = self._manager.pipeline(name, version)
        mv = pipeline or self._manager.get(name, version)
        sig = mv.signature
        versions: tuple[str, ...]
        if pipeline is not None:
            versions, platform, executor = (str(pipeline.version),), *_PIPELINE
        else:
            assert not isinstance(mv, Pipeline)
            versions = tuple(str(v.version) for v in self._manager.versions(mv.name))
            platform, executor = PLATFORMS[mv.spec.format][0], mv.kind
        return ModelMetadata(
            name=mv.name,
            versions=versions,
            platform=platform,
            executor=executor,
            max_batch_size=sig.max_batch_size,
            inputs=tuple(
                TensorMetadata(t.name, t.datatype.value, tuple(sig.client_shape(t)))
                for t in sig.inputs
            ),
            outputs=tuple(
                TensorMetadata(t.name, t.datatype.value, tuple(sig.client_shape(t)))
                for t in sig.outputs
            ),
        )

    def model_config(self, name: str, version: str = "") -> ModelConfiguration:
        """Raises:
        ModelNotFoundError, ModelNotReadyError, InvalidInputError: as ``ModelManager.get``.
        """
        pipeline = self._manager.pipeline(name, version)
        if pipeline is not None:
            return ModelConfiguration(
                name=pipeline.name,
                signature=pipeline.signature,
                platform=PIPELINE_PLATFORM,
                backend="",
                executor=PIPELINE_EXECUTOR,
                instances=0,
                versions=(pipeline.version,),
                model_toml=pipeline_toml_text(pipeline.spec, pipeline.signature),
                steps=step_views(pipeline.spec),
            )
        mv = self._manager.get(name, version)
        platform, backend = PLATFORMS[mv.spec.format]
        config = ModelConfiguration(
            name=mv.name,
            signature=mv.signature,
            platform=platform,
            backend=backend,
            executor=mv.kind,
            instances=mv.instances,
            versions=tuple(v.version for v in self._manager.versions(mv.name)),
            model_toml=model_toml_text(mv.spec, mv.signature),
        )
        if mv.batching.max_batch_size <= 0:
            return config
        q = mv.queueing
        return dataclasses.replace(
            config,
            dynamic_batching=True,
            max_queue_delay_us=mv.batching.max_queue_delay_ns // 1000,
            preferred_batch_sizes=tuple(mv.batching.preferred_batch_sizes),
            priority_levels=q.priority_levels,
            default_priority=q.default_priority,
            max_queue_size=q.max_queue_size,
            default_timeout_us=q.default_timeout_ns // 1000,
        )

    # -- statistics and executor views ------------------------------------------------------

    def statistics(self, name: str = "", version: str = "") -> list[StatisticsSnapshot]:
        """Snapshots of one version, every served version of ``name``, or (``name`` empty)
        every served version.

        Raises:
            ModelNotFoundError, ModelNotReadyError, InvalidInputError: as ``ModelManager.get``.
        """
        pipeline = self._manager.pipeline(name, version) if name else None
        if pipeline is not None:
            return [pipeline.stats.snapshot(pipeline.name, pipeline.version)]
        if name and version:
            versions = [self._manager.get(name, version)]
        elif name:
            versions = self._manager.versions(name)
        else:
            versions = self._manager.ready_models()
        snapshots = [mv.stats.snapshot(mv.name, mv.version) for mv in versions]
        if not name:
            snapshots += [p.stats.snapshot(p.name, p.version) for p in self._manager.pipelines()]
        return snapshots

    def served(self) -> list[tuple[ServedVersion, StatisticsSnapshot]]:
        """Every version served now with its statistics, pipelines included (safe from the
        metrics thread)."""
        pipelines = [
            (
                ServedVersion(
                    p.name,
                    p.version,
                    PIPELINE_EXECUTOR,
                    0,
                    p.signature.max_batch_size,
                    0,  # a pipeline queues nothing itself: its steps queue on their models
                    p.in_flight,
                ),
                p.stats.snapshot(p.name, p.version),
            )
            for p in self._manager.pipelines()
        ]
        return pipelines + [
            (
                ServedVersion(
                    mv.name,
                    mv.version,
                    mv.kind,
                    mv.instances,
                    mv.signature.max_batch_size,
                    mv.scheduler.queue_depth,
                    mv.in_flight,
                ),
                mv.stats.snapshot(mv.name, mv.version),
            )
            for mv in self._manager.ready_models()
        ]

    def breakers(self) -> list[BreakerView]:
        """Every breaker of every served version (safe from the metrics thread)."""
        return [
            BreakerView(b.model, b.version, b.executor, str(b.state))
            for b in self._manager.breakers()
        ]

    def placement_counters(self) -> PlacementCounters:
        """Failovers, recoveries and executor failures counted so far (copies)."""
        m = self._manager
        return PlacementCounters(
            dict(m.failovers.copy()),
            dict(m.recoveries.copy()),
            dict(m.executor_failures.copy()),
            dict(m.failover.replanner.replans.copy()),
        )

    @staticmethod
    def links() -> list[LinkView]:
        """Every remote server's link as measured from the calls made to it (safe from the
        metrics thread)."""
        return [
            LinkView(
                s.address,
                s.rtt_s,
                s.bandwidth_bps,
                s.calls,
                s.bytes_sent,
                s.bytes_received,
                s.seconds,
            )
            for s in link_snapshots()
        ]

    def cuts(self) -> list[CutView]:
        """The cut each re-planned split model version serves (safe from the metrics thread)."""
        return [CutView(c.model, c.version, c.cut) for c in self._manager.failover.replanner.cuts()]

    # -- inference -------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Route ``request`` to its model version and run it.

        Raises:
            UnavailableError, ModelNotFoundError, ModelNotReadyError, InvalidInputError,
            OverloadedError, ExecutorError, ...: as ``ModelManager.infer``.
        """
        return await self._manager.infer(request)

    def submit(
        self,
        request: InferRequest,
        reply: Callable[[InferResponse | errors.EdgedError], None],
        *,
        inline: bool = False,
    ) -> Callable[[], bool]:
        """``infer`` for a frontend on its own thread (ZeroMQ's I/O thread, gRPC's handler
        threads): route ``request`` here, then ``reply`` is called once, on whichever thread
        answers it, with the response or the error. With ``inline``, a lone request on an
        idle model runs on this thread before ``submit`` returns (see ``Scheduler.post``).
        Returns ``withdraw``: called when the caller went away, it drops the request if it
        is still queued (True; ``reply`` is then never called).

        Raises:
            UnavailableError, ModelNotFoundError, ModelNotReadyError, InvalidInputError:
                routing failed (nothing was queued; ``reply`` is not called).
        """
        manager = self._manager
        if not manager.accepting:
            raise errors.UnavailableError("edged is shutting down and takes no new requests")
        pipeline = manager.pipeline(request.model_name, request.model_version)
        if pipeline is not None:
            # its steps queue on their models' schedulers, each posted from the reply of
            # the step before it
            return pipeline.submit(request, reply, inline=inline)
        mv = manager.get(request.model_name, request.model_version)
        if not mv.enter():
            # a swap switched away from ``mv`` and is draining it: route again (the same
            # version comes back only when the daemon drains everything to stop)
            again = manager.get(request.model_name, request.model_version)
            again.enter(force=True)
            mv = again
        return mv.submit(request, reply, inline=inline)

    # -- repository ------------------------------------------------------------------------

    async def repository_index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every model on disk or known, with each version's state (the folder is listed on
        a worker thread)."""
        on_disk = await asyncio.to_thread(self._manager.models_on_disk)
        entries = self._manager.index(on_disk)
        if ready_only:
            entries = [e for e in entries if e.state is VersionState.READY]
        return entries

    async def load(
        self, name: str, repository: str = "", parameters: Mapping[str, object] | None = None
    ) -> None:
        """Load (or reload) model folder ``name``; checked before anything is marked wanted,
        so a bad name leaves readiness alone.

        Raises:
            ModelNotFoundError: an unknown repository or no such model folder.
            InvalidInputError: not a plain folder name.
            UnsupportedError: load parameters (edit model.toml instead).
            ModelLoadError: as ``ModelManager.load``.
        """
        check_repository(repository)
        check_model_name(name)
        if name not in await asyncio.to_thread(self._manager.models_on_disk):
            raise errors.ModelNotFoundError(
                f"'{errors.clip(name)}' is not a model folder in the repository"
            )
        if parameters:
            names = errors.clip(", ".join(sorted(parameters)), 200)
            raise errors.UnsupportedError(
                f"load parameters are not supported ({names}); "
                "edit model.toml in the repository instead"
            )
        started = time.monotonic()
        await self._manager.load(name)
        log.info("model_loaded", model=name, seconds=round(time.monotonic() - started, 3))

    async def unload(self, name: str, repository: str = "") -> None:
        """Stop serving ``name`` (draining what is in flight).

        Raises:
            ModelNotFoundError: an unknown repository; as ``ModelManager.unload``.
            InvalidInputError: not a plain folder name.
        """
        check_repository(repository)
        check_model_name(name)
        await self._manager.unload(name)
