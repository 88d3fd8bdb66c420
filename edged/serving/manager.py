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
from edged.serving.pipeline import PIPELINE_VERSION, Pipeline, plan_pipeline
from edged.serving.repository import ModelSpec, is_pipeline, read_model_spec
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
        self._pipelines: dict[str, Pipeline] = {}
        """Pipelines loaded (edged.serving.pipeline): served beside the models, never
        through the swap (they hold no instances; their steps route at each request)."""
        self._pipeline_errors: dict[str, str] = {}
        """Pipelines asked to serve whose load failed, and why."""
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
        for pipeline in list(self._pipelines.values()):
            if name in pipeline.models and pipeline.name != name:
                self._notify(pipeline.name)  # its readiness follows its steps' models

    def models_on_disk(self) -> list[str]:
        """Model folders in the repository."""
        return list_models(self.repository)

    async def load_all(self) -> dict[str, str]:
        """Load every model in the repository; return {model: error} for those that failed."""
        names = await asyncio.to_thread(self.models_on_disk)
        pipelines = await asyncio.to_thread(
            lambda: {n for n in names if is_pipeline(self.repository / n)}
        )
        failed = {}
        # models first: a pipeline's load checks its steps against the models served
        for batch in ([n for n in names if n not in pipelines], sorted(pipelines)):
            results = await asyncio.gather(*(self.load(n) for n in batch), return_exceptions=True)
            for name, result in zip(batch, results, strict=True):
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
            ModelLoadError: model.toml is invalid or a version failed to load or warm up;
                for a pipeline: a step that does not fit its model (naming step and tensor).
        """
        _check_name(name)
        if await asyncio.to_thread(is_pipeline, self.repository / name):
            await self._load_pipeline(name)
            return
        if name in self._pipelines or name in self._pipeline_errors:
            self._drop_pipeline(name)  # the folder is a model now
        await self._change(name, gate, pin=False)

    def _drop_pipeline(self, name: str) -> None:
        self._pipelines.pop(name, None)
        self._pipeline_errors.pop(name, None)
        self._notify(name)

    async def _load_pipeline(self, name: str) -> None:
        """(Re)load pipeline ``name``: check its steps against the models served now and
        serve it (replacing the pipeline served before, which finishes what it runs). A
        failure leaves the pipeline served before, if any, as it was.

        Raises:
            ModelLoadError: model.toml is invalid, or a step names a model that does not
                serve, is itself a pipeline, or does not fit (naming step and tensor).
        """
        try:
            spec = await asyncio.to_thread(read_model_spec, self.repository / name)
            if spec.pipeline is None:  # pragma: no cover - the file changed meanwhile
                raise ModelLoadError(f"model '{name}': model.toml has no [pipeline] any more")
            signatures = {}
            for step in spec.pipeline.steps:
                where = f"pipeline '{name}' step '{step.name}'"
                if step.model in self._pipelines or step.model == name:
                    raise ModelLoadError(f"{where}: '{step.model}' is a pipeline, not a model")
                try:
                    mv = self.get(step.model, str(step.version or ""))
                except (ModelNotFoundError, ModelNotReadyError) as e:
                    raise ModelLoadError(
                        f"{where}: model '{step.model}' does not serve: {e}"
                    ) from e
                signatures[step.name] = mv.signature
            plan = plan_pipeline(spec, signatures)
        except ModelLoadError as e:
            self._pipeline_errors[name] = str(e)
            self._notify(name)
            raise
        if name in self._models:  # the folder held a model before
            if self._models[name].serving:
                await self.unload(name)
            self._models.pop(name, None)
        self._pipelines[name] = Pipeline(spec, plan, self.get)
        self._pipeline_errors.pop(name, None)
        log.info(
            "pipeline_loaded",
            model=name,
            steps=[s.step.name for s in plan.steps],
            models=sorted({s.step.model for s in plan.steps}),
        )
        self._notify(name)

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
        _check_name(name)
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
        if name in self._pipelines or name in self._pipeline_errors:
            # requests running go on: each holds the pipeline and its steps route as usual
            self._drop_pipeline(name)
            log.info("pipeline_unloaded", model=name)
            return
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model '{clip(name)}' is not loaded")

        async def planner(current: ServedModel) -> Plan:
            current.wanted = False
            return Plan(serve=frozenset(), switched=lambda _: self.failover.forget(current))

        await self.swapper.swap(model, planner)

    # -- routing ---------------------------------------------------------------------------

    def pipeline(self, name: str, version: str = "") -> Pipeline | None:
        """The pipeline ``name`` (None when ``name`` is not a loaded pipeline).

        Raises:
            ModelNotFoundError: a pipeline, but ``version`` is not its one version.
        """
        pipeline = self._pipelines.get(name)
        if pipeline is not None and version not in ("", str(PIPELINE_VERSION)):
            raise ModelNotFoundError(
                f"pipeline '{name}' has no version {clip(version)} (it serves {PIPELINE_VERSION})"
            )
        return pipeline

    def pipelines(self) -> list[Pipeline]:
        """Every pipeline loaded (a snapshot)."""
        return list(self._pipelines.values())

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
        pipeline = self.pipeline(request.model_name, request.model_version)
        if pipeline is not None:
            return await pipeline.infer(request)
        return await self.get(request.model_name, request.model_version).infer(request)

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (that version, or any) serves requests now (a pipeline: every
        step's model serves the tensors the pipeline was checked against)."""
        try:
            pipeline = self.pipeline(name, version)
            if pipeline is not None:
                return not pipeline.unready()
            self.get(name, version)
        except (ModelNotFoundError, ModelNotReadyError, InvalidInputError):
            return False
        return True

    def wanted(self) -> list[str]:
        """Models asked to serve: loaded or failed to load, and not unloaded since."""
        models = {name for name, model in self._models.items() if model.wanted}
        return sorted(models | set(self._pipelines) | set(self._pipeline_errors))

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
        for name in sorted(set(folders) | set(self._models) | set(self._pipelines)):
            pipeline = self._pipelines.get(name)
            if pipeline is not None or name in self._pipeline_errors:
                why = pipeline.unready() if pipeline else self._pipeline_errors[name]
                state = VersionState.UNAVAILABLE if why else VersionState.READY
                shown = str(PIPELINE_VERSION) if pipeline else ""
                entries.append(IndexEntry(name, shown, state, why))
                continue
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
        results = await asyncio.gather(
            *(p.drain(timeout_s) for p in self.pipelines()),
            *(mv.drain(timeout_s) for mv in self.ready_models()),
        )
        return all(results)

    async def unload_all(self) -> None:
        """Stop failover and recovery work, then close every version of every model."""
        await self.failover.stop()
        self._pipelines.clear()
        for name in list(self._models):
            if self._models[name].serving:
                await self.unload(name)


def _check_name(name: str) -> None:
    """Raises:
    ModelNotFoundError: ``name`` could not be a folder of the repository.
    """
    if "/" in name or name in {"", ".", ".."} or name.startswith("."):
        raise ModelNotFoundError(f"model '{clip(name)}' is not a model name in the repository")
