"""The router, and the bookkeeping of what each model serves.

``ModelManager.infer`` resolves a model name and version to a live ``ModelVersion``. What is
served changes only through serving's swap primitive (``edged.serving.swap.Swapper``): ``load``
(the repository's model.toml and ACTIVE), ``serve`` (an explicit list of versions, made durable
in ACTIVE at the switch: OTA's activation and rollback), ``unload``; executor failover, recovery
and re-planning (``edged.serving.failover``) use the same swap.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from edged.core.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    UnavailableError,
    clip,
)
from edged.core.types import InferRequest, InferResponse
from edged.core.views import IndexEntry, VersionState
from edged.serving.failover import BreakerStatus, Failover
from edged.serving.model import ModelVersion
from edged.serving.repository import ModelSpec, read_model_spec
from edged.serving.swap import Gate, Plan, ServedModel, Swapper, VersionLoader
from edged.serving.versions import (
    available_versions,
    check_versions,
    list_models,
    parse_version,
    versions_to_serve,
    write_active,
)
from hal.placement import BreakerPolicy, place
from hal.probe import probe
from hal.report import DeviceReport

log = structlog.get_logger("edged.serving")


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
        devices: Sequence[DeviceReport] | None = None,
        breaker: BreakerPolicy | None = None,
        inference_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` and ``sleep`` (monotonic seconds) time the breakers and recovery."""
        self.repository = repository
        self.accepting = True
        self.loader = VersionLoader(
            default_max_batch_size=default_max_batch_size,
            default_instances=default_instances,
            default_threads=default_threads,
            load_timeout_s=load_timeout_s,
            inference_timeout_s=inference_timeout_s,
        )
        """Loads a version beside what serves (the swap's and failover's loads)."""
        self.swapper = Swapper(self._notify, drain_timeout_s)
        self.failover = Failover(
            self.swapper, self.loader, breaker or BreakerPolicy(), clock=clock, sleep=sleep
        )
        self._models: dict[str, ServedModel] = {}
        self._listeners: list[Callable[[str, bool], None]] = []
        self._devices: list[DeviceReport] | None = None if devices is None else list(devices)
        self._probing: asyncio.Future[list[DeviceReport]] | None = None
        # (executor, reason) pairs already logged at info: the probe runs once per start, so
        # its reason for an absent kind is logged once, not once per model (repeats: debug)
        self._skips_logged: set[tuple[str, str]] = set()

    @property
    def failovers(self) -> collections.Counter[tuple[str, str, str, str]]:
        """(model, version, from, to) -> moves away from a failing executor."""
        return self.failover.failovers

    @property
    def recoveries(self) -> collections.Counter[tuple[str, str, str, str]]:
        """(model, version, from, to) -> moves back to a better executor that recovered."""
        return self.failover.recoveries

    @property
    def executor_failures(self) -> collections.Counter[tuple[str, str, str]]:
        """(model, version, executor) -> batches that failed with an executor error."""
        return self.failover.executor_failures

    def breakers(self) -> list[BreakerStatus]:
        """Every breaker of every served version (snapshots: the metrics thread calls this)."""
        return self.failover.breakers()

    # -- devices ---------------------------------------------------------------------------

    async def devices(self) -> list[DeviceReport]:
        """The probe's reports placement uses: those given to the constructor, else
        ``hal.probe()`` run once, in a worker thread (never on the event loop)."""
        if self._devices is None:
            if self._probing is None:
                self._probing = asyncio.ensure_future(asyncio.to_thread(probe))
            self._devices = await asyncio.shield(self._probing)
        return self._devices

    async def _candidates(self, spec: ModelSpec) -> tuple[str, ...]:
        """Executors that may run ``spec`` here (hal.placement over the probe's reports),
        best first; each one skipped is logged with the probe's reason (at info the first
        time a reason is given for that executor, at debug after that).

        Raises:
            ModelLoadError: none may.
        """
        plan = place(spec.executor_preference, spec.format, await self.devices())
        for kind, reason in plan.skipped:
            emit = log.debug if (kind, reason) in self._skips_logged else log.info
            self._skips_logged.add((kind, reason))
            emit("executor_skipped", model=spec.name, executor=kind, reason=reason)
        if not plan.candidates:
            raise ModelLoadError(
                f"model '{spec.name}': no executor here runs format '{spec.format}': "
                f"{plan.why_none()}"
            )
        return plan.candidates

    async def _load_fresh(self, spec: ModelSpec, version: int) -> ModelVersion:
        return await self.loader(spec, version, await self._candidates(spec))

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
        ACTIVE (else the version policy) names beside those serving, run ``gate`` on each new
        version (a self-test: it raises ModelLoadError to refuse), switch to them, then drain
        and close versions no longer served. All or nothing: if any version fails, what was
        served before stays served.

        Raises:
            ModelNotFoundError: no such model folder.
            ModelLoadError: model.toml is invalid or a version failed to load or warm up.
        """
        await self._change(name, gate, pin=False)

    async def serve(
        self, name: str, versions: Sequence[int] | None, gate: Gate | None = None
    ) -> None:
        """Serve exactly ``versions`` of ``name`` (None: whatever its version policy picks
        among the folders): the swap of ``load``, and once ``gate`` passed, ACTIVE is
        rewritten to name them (removed for None), durably, before the switch. A refusal or a
        failure leaves what was served, and ACTIVE, as they were. OTA activates and rolls back
        through here.

        Raises:
            ModelNotFoundError: no such model folder.
            ModelLoadError: a version has no folder, failed to load or warm up, the gate
                refused it, or ACTIVE could not be written.
        """
        await self._change(name, gate, pin=True, versions=versions)

    async def _change(
        self,
        name: str,
        gate: Gate | None,
        *,
        pin: bool,
        versions: Sequence[int] | None = None,
    ) -> None:
        if "/" in name or name in {"", ".", ".."} or name.startswith("."):
            raise ModelNotFoundError(f"model '{clip(name)}' is not a model name in the repository")
        model = self._models.setdefault(name, ServedModel(name))
        model_dir = self.repository / name

        def choose(spec: ModelSpec) -> list[int]:
            if not pin:
                return versions_to_serve(spec)
            if versions is not None:
                check_versions(model_dir, versions)
                return sorted(set(versions))
            chosen = spec.version_policy.select(available_versions(model_dir))
            if not chosen:
                raise ModelLoadError(
                    f"model '{name}': no version folder matches its version policy"
                )
            return chosen

        def persist() -> None:
            try:
                write_active(model_dir, versions)
            except OSError as e:
                raise ModelLoadError(f"model '{name}': cannot write ACTIVE: {e}") from e

        async def planner(current: ServedModel) -> Plan:
            current.wanted = True
            try:
                spec = await asyncio.to_thread(read_model_spec, model_dir)
                chosen = await asyncio.to_thread(choose, spec)
            except ModelNotFoundError:
                if not current.serving:
                    self._models.pop(name, None)
                raise
            keep = {v for v, mv in current.serving.items() if v in chosen and mv.spec == spec}
            return Plan(
                load={
                    v: functools.partial(self._load_fresh, spec, v) for v in chosen if v not in keep
                },
                serve=frozenset(chosen),
                spec=spec,
                persist=persist if pin else None,
                switched=functools.partial(self._switched, current),
            )

        try:
            await self.swapper.swap(model, planner, gate)
        except ModelLoadError as e:
            model.error = str(e)
            self._notify(name)
            raise

    def _switched(self, model: ServedModel, fresh: dict[int, ModelVersion]) -> None:
        model.error = ""
        self.failover.track(model, fresh)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``: drain, then close.

        Raises:
            ModelNotFoundError: the model is not known.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model '{clip(name)}' is not loaded")

        async def planner(current: ServedModel) -> Plan:
            current.wanted = False
            return Plan(serve=frozenset(), switched=lambda _: self.failover.forget(current))

        await self.swapper.swap(model, planner)

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
            raise ModelNotFoundError(f"unknown model '{clip(name)}'")
        if version:
            number = parse_version(version)
            if number is None:
                raise InvalidInputError(f"model_version '{clip(version)}' is not a version number")
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
            raise ModelNotFoundError(f"unknown model '{clip(name)}'")
        return [model.serving[v] for v in sorted(model.serving)]

    def index(self, on_disk: list[str] | None = None) -> list[IndexEntry]:
        """Every model on disk (``on_disk``: the folders, listed by the caller off the event
        loop; None lists them here) or known, with each version's state."""
        entries = []
        folders = self.models_on_disk() if on_disk is None else on_disk
        for name in sorted(set(folders) | set(self._models)):
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
        """Stop failover and recovery work, then close every version of every model."""
        await self.failover.stop()
        for name in list(self._models):
            if self._models[name].serving:
                await self.unload(name)
