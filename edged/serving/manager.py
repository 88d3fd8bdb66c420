"""The router and the one path that changes what is served.

``ModelManager.infer`` resolves a model name and version to a live ``ModelVersion``.
``ModelManager.load``/``unload`` are the only ways the served set changes, and both follow one
order: load and warm up the new versions (all or nothing) -> switch -> drain the old -> close.

Placement and failover use the same path. Each served version has a circuit breaker per
executor (``hal.placement.CircuitBreaker``). When the breaker of the executor a version runs
on opens, its scheduler is paused (requests queue instead of failing), the version is loaded
and warmed up on the next candidate executor, the router switches to it, the queued requests
are handed over, and the failing copy is drained and closed (``executor_failover``). Once
``retry_after_s`` has passed, a better executor is tried again: load, warm up, time, compare
its answers with the serving copy's, then the same switch (``executor_recovered``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edged.core.errors import (
    EdgedError,
    ExecutorError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    UnavailableError,
    clip,
)
from edged.core.types import InferRequest, InferResponse
from edged.core.views import IndexEntry, VersionState
from edged.serving.model import ModelVersion, Sample, load_model_version
from edged.serving.repository import ModelSpec, read_model_spec
from edged.serving.stats import ModelStats
from edged.serving.versions import list_models, parse_version, versions_to_serve
from hal.placement import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    failover_targets,
    next_retry_at,
    outputs_disagree,
    place,
    recovery_targets,
)
from hal.probe import probe
from hal.report import DeviceReport

#: timed runs of a recovery trial after its warm-up, each bounded by inference_timeout_s
TRIAL_RUNS = 3

log = structlog.get_logger("edged.serving")

#: a check a freshly loaded, warmed version must pass before it takes traffic
Gate = Callable[[ModelVersion], Awaitable[None]]


@dataclass
class _Health:
    """Placement state of one served version: where it may run and a breaker per executor."""

    candidates: tuple[str, ...]
    policy: BreakerPolicy
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    recovery: asyncio.Task[None] | None = None

    def breaker(self, kind: str) -> CircuitBreaker:
        if kind not in self.breakers:
            self.breakers[kind] = CircuitBreaker(self.policy)
        return self.breakers[kind]


@dataclass(frozen=True)
class BreakerStatus:
    """One breaker, for metrics."""

    model: str
    version: int
    executor: str
    state: BreakerState


@dataclass
class _Model:
    name: str
    spec: ModelSpec | None = None
    serving: dict[int, ModelVersion] = field(default_factory=dict)
    states: dict[int, tuple[VersionState, str]] = field(default_factory=dict)
    health: dict[int, _Health] = field(default_factory=dict)
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
        devices: Sequence[DeviceReport] | None = None,
        breaker: BreakerPolicy | None = None,
        inference_timeout_s: float = 30.0,
    ) -> None:
        self.repository = repository
        self.default_instances = default_instances
        self.default_threads = default_threads
        self._closing: set[asyncio.Future[None]] = set()
        self.default_max_batch_size = default_max_batch_size
        self.load_timeout_s = load_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.breaker_policy = breaker or BreakerPolicy()
        self.inference_timeout_s = inference_timeout_s
        self.accepting = True
        self._models: dict[str, _Model] = {}
        self._listeners: list[Callable[[str, bool], None]] = []
        self._devices: list[DeviceReport] | None = None if devices is None else list(devices)
        self._probing: asyncio.Future[list[DeviceReport]] | None = None
        # (executor, reason) pairs already logged at info: the probe runs once per start, so
        # its reason for an absent kind is logged once, not once per model (repeats: debug)
        self._skips_logged: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.failovers: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        """(model, version, from, to) -> moves away from a failing executor."""
        self.recoveries: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        """(model, version, from, to) -> moves back to a better executor that recovered."""
        self.executor_failures: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """(model, version, executor) -> batches that failed with an executor error."""

    # -- devices ---------------------------------------------------------------------------

    async def devices(self) -> list[DeviceReport]:
        """The probe's reports placement uses: those given to the constructor, else
        ``hal.probe()`` run once, in a worker thread (never on the event loop)."""
        if self._devices is None:
            if self._probing is None:
                self._probing = asyncio.ensure_future(asyncio.to_thread(probe))
            self._devices = await asyncio.shield(self._probing)
        return self._devices

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
            raise ModelNotFoundError(f"model '{clip(name)}' is not a model name in the repository")
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
                wanted = [v for v in chosen if v not in keep]
                candidates = await self._candidates(spec) if wanted else ()
                for version in wanted:
                    model.states[version] = (VersionState.LOADING, "")
                    fresh[version] = await self._load_version(spec, version, candidates)
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
            self._track(model, fresh)
            self._notify(name)
            retired = [mv for v, mv in old.items() if model.serving.get(v) is not mv]
            await self._retire(model, retired)

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

    def _track(self, model: _Model, fresh: dict[int, ModelVersion]) -> None:
        """Fresh breakers for versions just switched to; forget versions no longer served."""
        for version, mv in fresh.items():
            self._forget_health(model, version)
            model.health[version] = _Health(mv.placement.candidates, self.breaker_policy)
            self._watch(model, mv)
        for version in [v for v in model.health if v not in model.serving]:
            self._forget_health(model, version)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``: drain, then close.

        Raises:
            ModelNotFoundError: the model is not known.
        """
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"model '{clip(name)}' is not loaded")
        async with model.lock:
            model.wanted = False
            retired = list(model.serving.values())
            model.serving = {}
            for version in list(model.health):
                self._forget_health(model, version)
            self._notify(name)
            await self._retire(model, retired)

    async def _load_version(
        self,
        spec: ModelSpec,
        version: int,
        candidates: Sequence[str],
        *,
        trial_runs: int = 0,
        stats: ModelStats | None = None,
        reference: Sample | None = None,
    ) -> ModelVersion:
        """Load and warm ``version`` on one of ``candidates`` (placement per model.toml) in
        a worker thread, bounded by ``load_timeout_s``, and start its scheduler;
        ``reference`` (the sample the version already ran) runs first and must succeed.

        Raises:
            ModelLoadError: no candidate loaded it in time.
        """
        task = asyncio.ensure_future(
            asyncio.to_thread(
                load_model_version,
                spec,
                version,
                self.default_max_batch_size,
                self.default_instances,
                None,
                self.default_threads,
                candidates=candidates,
                trial_runs=trial_runs,
                max_run_s=self.inference_timeout_s if trial_runs else 0.0,
                inference_timeout_s=self.inference_timeout_s,
                stats=stats,
                reference=reference,
            )
        )
        try:
            done, _ = await asyncio.wait({task}, timeout=self.load_timeout_s)
        except asyncio.CancelledError:
            task.add_done_callback(self._close_late)
            raise
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

    # -- failover --------------------------------------------------------------------------

    def _forget_health(self, model: _Model, version: int) -> None:
        health = model.health.pop(version, None)
        if health is not None and health.recovery is not None:
            health.recovery.cancel()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # a fresh context: the request whose batch opened a breaker must not tag the
        # failover's logs with its request id
        task = asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("placement_task_failed", error=f"{type(error).__name__}: {error}")

    def _watch(self, model: _Model, mv: ModelVersion) -> None:
        """Feed every batch's outcome on ``mv`` to its executor's breaker; re-plan an
        ``auto`` placement nothing could time once a request gives a reference sample."""
        mv.scheduler.on_outcome = functools.partial(self._on_outcome, model, mv)
        if mv.spec.placement == "auto" and len(mv.placement.candidates) > 1:
            mv.on_reference = functools.partial(self._on_reference, model)

    def _on_reference(self, model: _Model, mv: ModelVersion) -> None:
        if model.serving.get(mv.version) is mv and not mv.placement.timings_s:
            self._spawn(self._replan(model, mv))

    async def _replan(self, model: _Model, mv: ModelVersion) -> None:
        """``placement = "auto"`` again, timed on ``mv``'s reference sample (its warm-up had
        none that ran); move the version if another executor is faster."""
        labels = {"model": mv.name, "version": mv.version}
        try:
            new = await self._load_version(
                mv.spec, mv.version, mv.placement.candidates, stats=mv.stats, reference=mv.reference
            )
        except ModelLoadError as e:
            log.warning("placement_replan_failed", **labels, executor=mv.kind, error=str(e))
            return
        timings = {k: round(v * 1000, 3) for k, v in new.placement.timings_s.items()}
        if new.kind == mv.kind:
            await new.close()
            log.info("placement_replanned", **labels, executor=mv.kind, timings_ms=timings)
            return
        if await self._move(model, mv, new, new.kind) is not None:
            log.info(
                "placement_replanned",
                **labels,
                **{"from": mv.kind, "to": new.kind},
                executor=new.kind,
                timings_ms=timings,
            )

    def _on_outcome(self, model: _Model, mv: ModelVersion, error: EdgedError | None) -> None:
        """One batch's outcome (on the event loop, before its callers are answered). Only
        executor failures count; a request the executor refused as invalid says nothing."""
        health = model.health.get(mv.version)
        if health is None or model.serving.get(mv.version) is not mv:
            return  # draining after a move or a reload: no longer this version's concern
        if error is not None and not isinstance(error, ExecutorError):
            return
        now = time.monotonic()
        breaker = health.breaker(mv.kind)
        labels = {"model": mv.name, "version": mv.version, "executor": mv.kind}
        if error is None:
            if breaker.record_success(now) is BreakerState.CLOSED:
                log.info("executor_circuit_closed", **labels)
            return
        self.executor_failures[(mv.name, str(mv.version), mv.kind)] += 1
        if breaker.record_failure(now) is not BreakerState.OPEN:
            return
        log.warning(
            "executor_circuit_open",
            **labels,
            failures=breaker.failures,
            retry_after_s=self.breaker_policy.retry_after_s,
            error=str(error),
        )
        mv.scheduler.pause()  # requests queue while the model moves, instead of failing
        self._spawn(self._fail_over(model, mv, str(error)))

    async def _move(
        self, model: _Model, old: ModelVersion, new: ModelVersion, kind: str
    ) -> int | None:
        """Switch ``old``'s version to ``new``, hand the requests queued on ``old`` over,
        then drain and close ``old``: the tail of the one swap path. Returns how many
        requests were handed over, or None (``new`` closed) when ``old`` stopped serving
        meanwhile (a reload or an unload came first)."""
        async with model.lock:
            health = model.health.get(old.version)
            if health is None or model.serving.get(old.version) is not old:
                await new.close()
                old.scheduler.resume()
                return None
            health.breaker(kind).record_success(time.monotonic())
            model.serving = {**model.serving, old.version: new}
            model.states[old.version] = (VersionState.READY, "")
            self._watch(model, new)
            moved = old.scheduler.hand_over(new.scheduler)
            old.scheduler.resume()
            self._notify(model.name)
            await self._retire(model, [old])
            return moved

    async def _fail_over(self, model: _Model, failing: ModelVersion, reason: str) -> None:
        """Move ``failing``'s version to the next candidate that loads and warms up; if none
        does, resume it where it is (its breaker stays open) and say why."""
        try:
            await self._try_fail_over(model, failing, reason)
        finally:  # whatever happened, a version still serving must not stay paused
            if model.serving.get(failing.version) is failing:
                failing.scheduler.resume()

    async def _try_fail_over(self, model: _Model, failing: ModelVersion, reason: str) -> None:
        health = model.health.get(failing.version)
        if health is None:
            return
        labels = {"model": failing.name, "version": failing.version}
        started = time.monotonic()
        targets = failover_targets(health.candidates, failing.kind, health.breakers, started)
        refused: dict[str, str] = {}
        for kind in targets:
            try:
                new = await self._load_version(
                    failing.spec,
                    failing.version,
                    [kind],
                    stats=failing.stats,
                    reference=failing.reference,
                )
            except ModelLoadError as e:
                health.breaker(kind).trip(time.monotonic())
                refused[kind] = str(e)
                continue
            moved = await self._move(model, failing, new, kind)
            if moved is None:
                return
            self.failovers[(failing.name, str(failing.version), failing.kind, kind)] += 1
            log.warning(
                "executor_failover",
                **labels,
                **{"from": failing.kind, "to": kind},
                reason=reason,
                handed_over=moved,
                seconds=round(time.monotonic() - started, 4),
            )
            self._ensure_recovery(model, failing.version)
            return
        now = time.monotonic()
        waiting = {
            k: f"breaker open, retry in {max(0.0, (b.retry_at() or now) - now):.1f}s"
            for k, b in health.breakers.items()
            if k != failing.kind and k in health.candidates and not b.allows(now)
        }
        log.error(
            "executor_failover_failed",
            **labels,
            executor=failing.kind,
            reason=reason,
            detail="no other candidate executor"
            if not targets and not waiting
            else "no other candidate executor could take the model",
            candidates=list(health.candidates),
            refused=refused,
            waiting=waiting,
        )
        self._ensure_recovery(model, failing.version)

    def _ensure_recovery(self, model: _Model, version: int) -> None:
        health = model.health.get(version)
        if health is None or (health.recovery is not None and not health.recovery.done()):
            return
        health.recovery = self._spawn(self._recover(model, version, health))

    async def _recover(self, model: _Model, version: int, health: _Health) -> None:
        """While a better candidate's breaker is open: wait until it is half-open, then try
        it (load, warm up, timed runs, compare with the serving copy's warm-up answers);
        move the version back on success, else open the breaker again and wait."""
        while model.health.get(version) is health:
            current = model.serving.get(version)
            if current is None:
                return
            due = next_retry_at(health.candidates, current.kind, health.breakers)
            if due is None:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            current = model.serving.get(version)
            if current is None or model.health.get(version) is not health:
                return
            targets = recovery_targets(
                health.candidates, current.kind, health.breakers, time.monotonic()
            )
            for kind in targets:
                if await self._try_recover(model, current, health, kind):
                    break

    async def _try_recover(
        self, model: _Model, current: ModelVersion, health: _Health, kind: str
    ) -> bool:
        labels = {"model": current.name, "version": current.version}
        try:
            new = await self._load_version(
                current.spec,
                current.version,
                [kind],
                trial_runs=TRIAL_RUNS,
                stats=current.stats,
                reference=current.reference,
            )
        except ModelLoadError as e:
            error = str(e)
        else:
            problem = outputs_disagree(current.reference_outputs, new.reference_outputs)
            if problem is None:
                moved = await self._move(model, current, new, kind)
                if moved is None:
                    return True
                self.recoveries[(current.name, str(current.version), current.kind, kind)] += 1
                log.info(
                    "executor_recovered",
                    **labels,
                    **{"from": current.kind, "to": kind},
                    warm_up_ms=round(new.placement.timings_s.get(kind, 0.0) * 1000, 3),
                    handed_over=moved,
                )
                return True
            await new.close()
            error = f"{kind}: {problem}"
        breaker = health.breaker(kind)
        breaker.record_failure(time.monotonic())
        retry_at = breaker.retry_at()
        log.warning(
            "executor_retry_failed",
            **labels,
            executor=kind,
            serving_on=current.kind,
            error=error,
            retry_in_s=round(max(0.0, (retry_at or 0.0) - time.monotonic()), 3),
        )
        return False

    def breakers(self) -> list[BreakerStatus]:
        """Every breaker of every served version (snapshots: the metrics thread calls this)."""
        now = time.monotonic()
        return [
            BreakerStatus(model.name, version, kind, breaker.state(now))
            for model in list(self._models.values())
            for version, health in list(model.health.items())
            for kind, breaker in list(health.breakers.items())
        ]

    def _close_late(self, task: asyncio.Future[ModelVersion]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        closing = asyncio.ensure_future(task.result().close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _retire(self, model: _Model, versions: list[ModelVersion]) -> None:
        for mv in versions:
            if model.serving.get(mv.version) is None:
                model.states[mv.version] = (VersionState.UNLOADING, "")
            mv.scheduler.on_outcome = None
            mv.scheduler.resume()  # what a failover held back runs (or fails) here
        for mv in versions:
            drained = await mv.drain(self.drain_timeout_s)
            if not drained:
                log.warning(
                    "drain_timeout", model=mv.name, version=mv.version, in_flight=mv.in_flight
                )
            await mv.close()
            if model.serving.get(mv.version) is None:
                model.states[mv.version] = (VersionState.UNAVAILABLE, "unloaded")
            log.info("model_version_unloaded", model=mv.name, version=mv.version, executor=mv.kind)

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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in list(self._models):
            if self._models[name].serving:
                await self.unload(name)
