"""The router and the one path that changes what is served.

``ModelManager.infer`` resolves a model name and version to a live ``ModelVersion``.
``ModelManager.load``/``unload`` are the only ways the served set changes, and both follow one
order: load and warm up the new versions (all or nothing) -> switch -> drain the old -> close.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from edged.core.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    UnavailableError,
)
from edged.core.types import InferRequest, InferResponse
from edged.serving.model import ModelVersion, load_model_version
from edged.serving.repository import (
    ModelSpec,
    list_models,
    parse_version,
    read_model_spec,
    versions_to_serve,
)

log = structlog.get_logger("edged.serving")

#: a check a freshly loaded, warmed version must pass before it takes traffic
Gate = Callable[[ModelVersion], Awaitable[None]]


class VersionState(enum.StrEnum):
    """A model version's state, as RepositoryIndex reports it."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index."""

    name: str
    version: str
    state: VersionState
    reason: str = ""


@dataclass
class _Model:
    name: str
    spec: ModelSpec | None = None
    serving: dict[int, ModelVersion] = field(default_factory=dict)
    states: dict[int, tuple[VersionState, str]] = field(default_factory=dict)
    error: str = ""
    wanted: bool = True
    """Asked to serve (loaded, or a load failed) and not unloaded since."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelManager:
    """Every model of one repository, and the requests in flight on them."""

    def __init__(
        self,
        repository: Path,
        *,
        default_max_batch_size: int = 8,
        default_instances: int = 0,
        default_threads: int = 0,
        load_timeout_s: float = 300.0,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self.repository = repository
        self.default_instances = default_instances
        self.default_threads = default_threads
        self._closing: set[asyncio.Future[None]] = set()
        self.default_max_batch_size = default_max_batch_size
        self.load_timeout_s = load_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.accepting = True
        self._models: dict[str, _Model] = {}
        self._listeners: list[Callable[[str, bool], None]] = []

    # -- what is served ------------------------------------------------------------------

    def on_change(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(model, ready)`` whenever a model's readiness may have changed."""
        self._listeners.append(listener)

    def _notify(self, name: str) -> None:
        ready = self.is_ready(name)
        for listener in self._listeners:
            listener(name, ready)

    def models_on_disk(self) -> list[str]:
        """Model folders in the repository."""
        return list_models(self.repository)

    async def load_all(self) -> dict[str, str]:
        """Load every model in the repository; return {model: error} for those that failed."""
        names = await asyncio.to_thread(self.models_on_disk)
        results = await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        failed = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failed[name] = str(result)
        return failed

    async def load(self, name: str, gate: Gate | None = None) -> None:
        """(Re)load ``name`` from the repository: read model.toml, load and warm the versions
        it should serve, run ``gate`` on each new version (a self-test: it raises
        ModelLoadError to refuse), switch to them, then drain and close versions no longer
        served. All or nothing: if any version fails, what was served before stays served.

        Raises:
            ModelNotFoundError: no such model folder.
            ModelLoadError: model.toml is invalid or a version failed to load or warm up.
        """
        if "/" in name or name in {"", ".", ".."} or name.startswith("."):
            raise ModelNotFoundError(f"model '{name}' is not a model name in the repository")
        model = self._models.setdefault(name, _Model(name))
        async with model.lock:
            model.wanted = True
            try:
                spec = await asyncio.to_thread(read_model_spec, self.repository / name)
                chosen = await asyncio.to_thread(versions_to_serve, spec)
            except ModelNotFoundError:
                if not model.serving:
                    del self._models[name]
                raise
            except ModelLoadError as e:
                model.error = str(e)
                self._notify(name)
                raise
            keep = {v: mv for v, mv in model.serving.items() if v in chosen and mv.spec == spec}
            fresh: dict[int, ModelVersion] = {}
            try:
                for version in (v for v in chosen if v not in keep):
                    model.states[version] = (VersionState.LOADING, "")
                    fresh[version] = await self._load_version(spec, version)
                    if gate is not None:
                        await gate(fresh[version])
            except ModelLoadError as e:
                for version in chosen:
                    if version not in model.serving:
                        model.states[version] = (VersionState.UNAVAILABLE, str(e))
                model.error = str(e)
                await asyncio.gather(*(mv.close() for mv in fresh.values()))
                self._notify(name)
                raise
            old = model.serving
            model.spec = spec
            model.error = ""
            model.serving = {**keep, **fresh}
            for version in model.serving:
                model.states[version] = (VersionState.READY, "")
            self._notify(name)
            retired = [mv for v, mv in old.items() if model.serving.get(v) is not mv]
            await self._retire(model, retired)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``: drain, then close.

        Raises:
            ModelNotFoundError: the model is not known.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model '{name}' is not loaded")
        async with model.lock:
            model.wanted = False
            retired = list(model.serving.values())
            model.serving = {}
            self._notify(name)
            await self._retire(model, retired)

    async def _load_version(self, spec: ModelSpec, version: int) -> ModelVersion:
        task = asyncio.ensure_future(
            asyncio.to_thread(
                load_model_version,
                spec,
                version,
                self.default_max_batch_size,
                self.default_instances,
                None,
                self.default_threads,
            )
        )
        done, _ = await asyncio.wait({task}, timeout=self.load_timeout_s)
        if not done:
            # The thread cannot be interrupted; close whatever it produces.
            task.add_done_callback(self._close_late)
            raise ModelLoadError(
                f"model '{spec.name}' version {version} took more than "
                f"{self.load_timeout_s}s to load"
            )
        mv = task.result()
        mv.start()
        return mv

    def _close_late(self, task: asyncio.Future[ModelVersion]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        closing = asyncio.ensure_future(task.result().close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _retire(self, model: _Model, versions: list[ModelVersion]) -> None:
        for mv in versions:
            model.states[mv.version] = (VersionState.UNLOADING, "")
        for mv in versions:
            drained = await mv.drain(self.drain_timeout_s)
            if not drained:
                log.warning(
                    "drain_timeout", model=mv.name, version=mv.version, in_flight=mv.in_flight
                )
            await mv.close()
            if model.serving.get(mv.version) is None:
                model.states[mv.version] = (VersionState.UNAVAILABLE, "unloaded")
            log.info("model_version_unloaded", model=mv.name, version=mv.version)

    # -- routing ---------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The live version asked for; the highest served version when ``version`` is "".

        Raises:
            ModelNotFoundError: no such model, or no such version of it.
            ModelNotReadyError: the model exists but is not serving (that version).
            InvalidInputError: ``version`` is not a number.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        if version:
            number = parse_version(version)
            if number is None:
                raise InvalidInputError(f"model_version '{version}' is not a version number")
            mv = model.serving.get(number)
            if mv is None:
                if number in model.states:
                    raise ModelNotReadyError(
                        f"model '{name}' version {version} is not ready ({model.states[number][0]})"
                    )
                raise ModelNotFoundError(f"model '{name}' has no version {version}")
            return mv
        if not model.serving:
            why = f": {model.error}" if model.error else ""
            raise ModelNotReadyError(f"model '{name}' is not ready{why}")
        return model.serving[max(model.serving)]

    async def infer(self, request: InferRequest) -> InferResponse:
        """Route ``request`` to its model version and run it.

        Raises:
            UnavailableError: the daemon is shutting down.
            plus everything ``get`` and ``ModelVersion.infer`` raise.
        """
        if not self.accepting:
            raise UnavailableError("edged is shutting down and takes no new requests")
        return await self.get(request.model_name, request.model_version).infer(request)

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (that version, or any) serves requests now."""
        try:
            self.get(name, version)
        except (ModelNotFoundError, ModelNotReadyError, InvalidInputError):
            return False
        return True

    def wanted(self) -> list[str]:
        """Models asked to serve: loaded or failed to load, and not unloaded since."""
        return sorted(name for name, model in self._models.items() if model.wanted)

    def ready_models(self) -> list[ModelVersion]:
        """Every version served now."""
        # snapshots: the metrics endpoint calls this from its own thread
        return [mv for m in list(self._models.values()) for mv in list(m.serving.values())]

    def versions(self, name: str) -> list[ModelVersion]:
        """Served versions of ``name``, ascending.

        Raises:
            ModelNotFoundError: no such model.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        return [model.serving[v] for v in sorted(model.serving)]

    def index(self) -> list[IndexEntry]:
        """Every model on disk or known, with each version's state."""
        entries = []
        for name in sorted(set(self.models_on_disk()) | set(self._models)):
            model = self._models.get(name)
            if model is None or not model.states:
                reason = model.error if model else "not loaded"
                entries.append(IndexEntry(name, "", VersionState.UNAVAILABLE, reason))
                continue
            for version in sorted(model.states):
                state, reason = model.states[version]
                entries.append(IndexEntry(name, str(version), state, reason))
        return entries

    def in_flight(self) -> int:
        """Requests running on any version now."""
        return sum(mv.in_flight for mv in self.ready_models())

    # -- shutdown --------------------------------------------------------------------------

    def stop_intake(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.accepting = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait for in-flight requests to finish; False if ``timeout_s`` passed first."""
        results = await asyncio.gather(*(mv.drain(timeout_s) for mv in self.ready_models()))
        return all(results)

    async def unload_all(self) -> None:
        """Close every version of every model."""
        for name in list(self._models):
            if self._models[name].serving:
                await self.unload(name)
