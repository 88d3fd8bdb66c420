"""Executor failover and recovery of served versions, built on serving's swap.

Each served version has a circuit breaker per executor (``hal.placement.CircuitBreaker``; the
rules are there, pure). When the breaker of the executor a version runs on opens, its
scheduler is paused (requests queue instead of failing) and the version is swapped onto the
next candidate executor that loads and warms up on the version's reference sample; the queued
requests are handed over, the failing copy is drained and closed (``executor_failover``). Once
``retry_after_s`` has passed, a better executor is tried again: a swap whose load times a few
trial runs and whose gate compares the answers with the serving copy's
(``executor_recovered``). A ``placement = "auto"`` version that nothing could time at its
warm-up is re-planned once a request gives it a reference sample (``placement_replanned``).

Every move is a ``Swapper.swap``: the same lock, the same switch and drain as a load, so a
failover and a reload of one model never interleave. Time comes from the injected ``clock``
and ``sleep`` (monotonic seconds), so tests run recovery on a fake clock.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from edged.core.errors import EdgedError, ExecutorError, ModelLoadError
from edged.serving.model import ModelVersion
from edged.serving.replan import Replanner
from edged.serving.swap import Gate, Plan, ServedModel, Swapped, Swapper, Unchanged, VersionLoader
from hal.placement import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    failover_targets,
    next_retry_at,
    outputs_disagree,
    recovery_targets,
)

#: timed runs of a recovery trial after its warm-up, each bounded by inference_timeout_s
TRIAL_RUNS = 3

log = structlog.get_logger("edged.serving")


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


class Failover:
    """Breakers, failover, recovery and re-planning of every version one manager serves."""

    def __init__(
        self,
        swapper: Swapper,
        loader: VersionLoader,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._swapper = swapper
        self._loader = loader
        self.policy = policy
        self._clock = clock
        self._sleep = sleep
        self._health: dict[str, dict[int, _Health]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.failovers: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        """(model, version, from, to) -> moves away from a failing executor."""
        self.recoveries: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        """(model, version, from, to) -> moves back to a better executor that recovered."""
        self.executor_failures: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """(model, version, executor) -> batches that failed with an executor error."""
        self.replanner = Replanner(self._move, loader, self._placement, clock=clock, sleep=sleep)
        """Re-planning of split models' cuts ([partition] replan = true), each a move."""

    # -- bookkeeping at each switch --------------------------------------------------------

    def track(self, model: ServedModel, fresh: Mapping[int, ModelVersion]) -> None:
        """At a load's switch: fresh breakers for the versions just switched to; forget the
        versions no longer served."""
        health = self._health.setdefault(model.name, {})
        for version, mv in fresh.items():
            self._forget(health, version)
            health[version] = _Health(mv.placement.candidates, self.policy)
            self._watch(model, mv)
        for version in [v for v in health if v not in model.serving]:
            self._forget(health, version)
        if not health:
            del self._health[model.name]
        self.replanner.track(model, fresh)

    def forget(self, model: ServedModel) -> None:
        """At an unload: no breakers, no recovery for ``model`` any more."""
        for version in list(self._health.get(model.name, {})):
            self._forget(self._health[model.name], version)
        self._health.pop(model.name, None)
        self.replanner.forget(model)

    def _get(self, model: ServedModel, version: int) -> _Health | None:
        return self._health.get(model.name, {}).get(version)

    def _placement(
        self, model: ServedModel, version: int
    ) -> tuple[tuple[str, ...], Mapping[str, CircuitBreaker]]:
        """The version's candidate executors and its breakers (the re-planner's view)."""
        health = self._get(model, version)
        return ((), {}) if health is None else (health.candidates, dict(health.breakers))

    @staticmethod
    def _forget(health: dict[int, _Health], version: int) -> None:
        gone = health.pop(version, None)
        if gone is not None and gone.recovery is not None:
            gone.recovery.cancel()

    def _watch(self, model: ServedModel, mv: ModelVersion) -> None:
        """Feed every batch's outcome on ``mv`` to its executor's breaker; re-plan an
        ``auto`` placement nothing could time once a request gives a reference sample."""
        mv.scheduler.on_outcome = functools.partial(self._on_outcome, model, mv)
        if mv.spec.placement == "auto" and len(mv.placement.candidates) > 1:
            mv.on_reference = functools.partial(self._on_reference, model)

    def _moved(self, model: ServedModel, fresh: Mapping[int, ModelVersion]) -> None:
        """The bookkeeping of a move's switch: the executor took the version, so its breaker
        records a success, and the new copy is watched."""
        for version, new in fresh.items():
            health = self._get(model, version)
            if health is not None:
                health.breaker(new.kind).record_success(self._clock())
            self._watch(model, new)

    # -- the background work ---------------------------------------------------------------

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

    async def idle(self) -> None:
        """Wait until no failover, recovery or re-planning runs (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Cancel failover, recovery and re-planning work, and wait for it to end."""
        await self.replanner.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- a move: one swap of one version onto another executor ------------------------------

    async def _move(
        self,
        model: ServedModel,
        old: ModelVersion,
        load: Callable[[], Awaitable[ModelVersion]],
        gate: Gate | None = None,
    ) -> Swapped | None:
        """Swap ``old``'s version onto the copy ``load`` makes (on another executor), handing the
        requests queued on ``old`` over. None when ``old`` stopped serving before the swap
        got the model (a reload or an unload came first) or the gate kept it.

        Raises:
            ModelLoadError: the new copy did not load, or the gate refused it.
        """

        async def planner(current: ServedModel) -> Plan | None:
            if current.serving.get(old.version) is not old or self._get(model, old.version) is None:
                return None
            switched = functools.partial(self._moved, model)
            return Plan(load={old.version: load}, hand_over=True, switched=switched)

        return await self._swapper.swap(model, planner, gate)

    def _on_outcome(self, model: ServedModel, mv: ModelVersion, error: EdgedError | None) -> None:
        """One batch's outcome (on the event loop, before its callers are answered). Only
        executor failures count; a request the executor refused as invalid says nothing."""
        health = self._get(model, mv.version)
        if health is None or model.serving.get(mv.version) is not mv:
            return  # draining after a move or a reload: no longer this version's concern
        if error is not None and not isinstance(error, ExecutorError):
            return
        now = self._clock()
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
            retry_after_s=self.policy.retry_after_s,
            error=str(error),
        )
        mv.scheduler.pause()  # requests queue while the model moves, instead of failing
        self._spawn(self._fail_over(model, mv, str(error)))

    async def _fail_over(self, model: ServedModel, failing: ModelVersion, reason: str) -> None:
        """Move ``failing``'s version to the next candidate that loads and warms up; if none
        does, resume it where it is (its breaker stays open) and say why."""
        try:
            await self._try_fail_over(model, failing, reason)
        finally:  # whatever happened, a version still serving must not stay paused
            if model.serving.get(failing.version) is failing:
                failing.scheduler.resume()

    async def _try_fail_over(self, model: ServedModel, failing: ModelVersion, reason: str) -> None:
        health = self._get(model, failing.version)
        if health is None:
            return
        labels = {"model": failing.name, "version": failing.version}
        started = self._clock()
        targets = failover_targets(health.candidates, failing.kind, health.breakers, started)
        refused: dict[str, str] = {}
        for kind in targets:
            load = functools.partial(
                self._loader,
                failing.spec,
                failing.version,
                [kind],
                stats=failing.stats,
                reference=failing.reference,
            )
            try:
                swapped = await self._move(model, failing, load)
            except ModelLoadError as e:
                health.breaker(kind).trip(self._clock())
                refused[kind] = str(e)
                continue
            if swapped is None:
                return
            self.failovers[(failing.name, str(failing.version), failing.kind, kind)] += 1
            log.warning(
                "executor_failover",
                **labels,
                **{"from": failing.kind, "to": kind},
                reason=reason,
                handed_over=swapped.handed_over,
                seconds=round(self._clock() - started, 4),
            )
            self._ensure_recovery(model, failing.version)
            return
        now = self._clock()
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

    def _ensure_recovery(self, model: ServedModel, version: int) -> None:
        health = self._get(model, version)
        if health is None or (health.recovery is not None and not health.recovery.done()):
            return
        health.recovery = self._spawn(self._recover(model, version, health))

    async def _recover(self, model: ServedModel, version: int, health: _Health) -> None:
        """While a better candidate's breaker is open: wait until it is half-open, then try
        it (load, warm up, timed runs, compare with the serving copy's warm-up answers);
        move the version back on success, else open the breaker again and wait."""
        while self._get(model, version) is health:
            current = model.serving.get(version)
            if current is None:
                return
            due = next_retry_at(health.candidates, current.kind, health.breakers)
            if due is None:
                return
            await self._sleep(max(0.0, due - self._clock()))
            current = model.serving.get(version)
            if current is None or self._get(model, version) is not health:
                return
            targets = recovery_targets(
                health.candidates, current.kind, health.breakers, self._clock()
            )
            for kind in targets:
                if await self._try_recover(model, current, health, kind):
                    break

    async def _try_recover(
        self, model: ServedModel, current: ModelVersion, health: _Health, kind: str
    ) -> bool:
        labels = {"model": current.name, "version": current.version}
        load = functools.partial(
            self._loader,
            current.spec,
            current.version,
            [kind],
            trial_runs=TRIAL_RUNS,
            stats=current.stats,
            reference=current.reference,
        )

        async def agrees(candidate: ModelVersion, /) -> None:
            problem = outputs_disagree(current.reference_outputs, candidate.reference_outputs)
            if problem is not None:
                raise ModelLoadError(f"{kind}: {problem}")

        try:
            swapped = await self._move(model, current, load, agrees)
        except ModelLoadError as e:
            error = str(e)
        else:
            if swapped is None:
                return True
            new = swapped.fresh[current.version]
            self.recoveries[(current.name, str(current.version), current.kind, kind)] += 1
            log.info(
                "executor_recovered",
                **labels,
                **{"from": current.kind, "to": kind},
                warm_up_ms=round(new.placement.timings_s.get(kind, 0.0) * 1000, 3),
                handed_over=swapped.handed_over,
            )
            return True
        breaker = health.breaker(kind)
        breaker.record_failure(self._clock())
        retry_at = breaker.retry_at()
        log.warning(
            "executor_retry_failed",
            **labels,
            executor=kind,
            serving_on=current.kind,
            error=error,
            retry_in_s=round(max(0.0, (retry_at or 0.0) - self._clock()), 3),
        )
        return False

    def _on_reference(self, model: ServedModel, mv: ModelVersion) -> None:
        if model.serving.get(mv.version) is mv and not mv.placement.timings_s:
            self._spawn(self._replan(model, mv))

    async def _replan(self, model: ServedModel, mv: ModelVersion) -> None:
        """``placement = "auto"`` again, timed on ``mv``'s reference sample (its warm-up had
        none that ran); move the version if another executor is faster."""
        labels = {"model": mv.name, "version": mv.version}
        load = functools.partial(
            self._loader,
            mv.spec,
            mv.version,
            mv.placement.candidates,
            stats=mv.stats,
            reference=mv.reference,
        )

        async def faster(candidate: ModelVersion, /) -> None:
            if candidate.kind == mv.kind:
                log.info(
                    "placement_replanned", **labels, executor=mv.kind, timings_ms=_ms(candidate)
                )
                raise Unchanged

        try:
            swapped = await self._move(model, mv, load, faster)
        except ModelLoadError as e:
            log.warning("placement_replan_failed", **labels, executor=mv.kind, error=str(e))
            return
        if swapped is not None:
            new = swapped.fresh[mv.version]
            log.info(
                "placement_replanned",
                **labels,
                **{"from": mv.kind, "to": new.kind},
                executor=new.kind,
                timings_ms=_ms(new),
            )

    def breakers(self) -> list[BreakerStatus]:
        """Every breaker of every served version (snapshots: the metrics thread calls this)."""
        now = self._clock()
        return [
            BreakerStatus(name, version, kind, breaker.state(now))
            for name, versions in list(self._health.items())
            for version, health in list(versions.items())
            for kind, breaker in list(health.breakers.items())
        ]


def _ms(mv: ModelVersion) -> dict[str, float]:
    return {k: round(v * 1000, 3) for k, v in mv.placement.timings_s.items()}
