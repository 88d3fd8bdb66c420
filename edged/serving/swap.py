"""The one switch of what a model serves: load beside -> gate -> persist -> switch -> drain.

Every change of what is served goes through ``Swapper.swap``: repository loads and unloads,
OTA activation and rollback (and so fine-tune publication, an OTA update), executor failover,
recovery and a re-planned placement. Under the model's lock, one at a time per model:

1. the caller's planner reads what serves now and says what to serve next (a ``Plan``), or
   None when the change no longer applies (the copy it meant to move was replaced meanwhile);
2. each version to load is loaded and warmed up *beside* the served ones, which keep serving;
3. the ``Gate`` (the OTA self-test, recovery's comparison with the serving copy; none for a
   plain load) runs on each freshly loaded version: a refusal closes them all, nothing else
   changes;
4. ``Plan.persist`` makes the change durable (ACTIVE, in a worker thread); a failure there
   also closes the fresh versions and changes nothing;
5. the switch: one assignment of the model's served set, on the event loop, then the caller's
   bookkeeping (breakers) and the readiness listeners; requests queued on a copy that a move
   replaces are handed over to the new copy;
6. the versions no longer served are drained (their in-flight requests finish where they
   started) and closed.

Nothing but this module assigns ``ServedModel.serving``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from edged.core.errors import ModelLoadError
from edged.core.views import VersionState
from edged.serving.model import ModelVersion, Sample, load_model_version
from edged.serving.repository import ModelSpec
from edged.serving.stats import ModelStats

log = structlog.get_logger("edged.serving")


class Gate(Protocol):
    """A check a freshly loaded, warmed version must pass before it takes traffic. It may
    infer on the candidate (which serves nobody yet). Raise ModelLoadError to refuse, or
    ``Unchanged`` to keep what serves without an error. It runs while the swap holds the
    model's lock: it must not start another swap of the same model."""

    async def __call__(self, candidate: ModelVersion, /) -> None: ...


class Unchanged(Exception):
    """A gate's answer that the candidate is no better than what serves: the swap closes it
    and changes nothing (a re-planned placement that picked the same executor)."""


#: loads and warms one version beside what serves (ModelLoadError: it cannot)
Load = Callable[[], Awaitable[ModelVersion]]


@dataclass
class ServedModel:
    """What one model serves, and the lock every swap of it holds."""

    name: str
    spec: ModelSpec | None = None
    serving: dict[int, ModelVersion] = field(default_factory=dict)
    """Version -> the live copy requests go to. Assigned only by ``Swapper.swap``."""
    states: dict[int, tuple[VersionState, str]] = field(default_factory=dict)
    """Every version this model served or tried to: its state and why."""
    error: str = ""
    """Why the last load failed ("" after one that succeeded)."""
    wanted: bool = True
    """Asked to serve (loaded, or a load failed) and not unloaded since."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class Plan:
    """What a model serves after one swap."""

    load: Mapping[int, Load] = field(default_factory=dict)
    """Versions to load beside what serves, in order; each replaces its version's served copy
    (if any) at the switch."""
    serve: frozenset[int] | None = None
    """The versions served after the switch, fresh or kept; None: those served now, plus the
    fresh ones."""
    spec: ModelSpec | None = None
    """The model's spec from the switch on; None: unchanged."""
    hand_over: bool = False
    """Requests queued on a replaced copy of the same version move to the fresh copy (a
    failover); otherwise they run on the old copy while it drains."""
    persist: Callable[[], None] | None = None
    """Makes the change durable (writes ACTIVE); blocking, run in a worker thread after the
    gate and before the switch. If it raises, nothing switches."""
    switched: Callable[[Mapping[int, ModelVersion]], None] | None = None
    """The caller's bookkeeping at the switch (its fresh versions by number), on the event
    loop, before the readiness listeners hear of it."""


@dataclass(frozen=True)
class Swapped:
    """What a swap did."""

    fresh: Mapping[int, ModelVersion]
    retired: Sequence[ModelVersion]
    handed_over: int
    """Requests queued on replaced copies that the fresh copies answered."""


#: reads the model (under its lock) and says what to serve next; None: nothing to do
Planner = Callable[[ServedModel], Awaitable[Plan | None]]


class Swapper:
    """The swap primitive of one model manager: ``swap``, and ``retire`` (drain, close)."""

    def __init__(self, notify: Callable[[str], None], drain_timeout_s: float = 30.0) -> None:
        self._notify = notify
        self.drain_timeout_s = drain_timeout_s

    async def swap(
        self, model: ServedModel, planner: Planner, gate: Gate | None = None
    ) -> Swapped | None:
        """Change what ``model`` serves to what ``planner`` says, all or nothing (see the
        module docstring). Returns None when the planner found nothing to do or the gate
        answered ``Unchanged``.

        Raises:
            ModelLoadError: a version failed to load or warm up, or the gate refused it
                (what served before still serves).
            whatever ``planner`` or ``Plan.persist`` raise (nothing changed).
        """
        async with model.lock:
            plan = await planner(model)
            if plan is None:
                return None
            fresh: dict[int, ModelVersion] = {}
            try:
                for version, load in plan.load.items():
                    if version not in model.serving:
                        model.states[version] = (VersionState.LOADING, "")
                    fresh[version] = await load()
                    if gate is not None:
                        await gate(fresh[version])
                if plan.persist is not None:
                    await asyncio.to_thread(plan.persist)
            except Unchanged:
                await asyncio.gather(*(mv.close() for mv in fresh.values()))
                return None
            except BaseException as e:
                for version in plan.load:
                    if version not in model.serving:
                        model.states[version] = (VersionState.UNAVAILABLE, str(e) or repr(e))
                await asyncio.gather(*(mv.close() for mv in fresh.values()))
                self._notify(model.name)
                raise
            return await self._switch(model, plan, fresh)

    async def _switch(
        self, model: ServedModel, plan: Plan, fresh: dict[int, ModelVersion]
    ) -> Swapped:
        old = model.serving
        serve = plan.serve if plan.serve is not None else frozenset(old) | frozenset(fresh)
        missing = [v for v in serve if v not in fresh and v not in old]
        if missing:  # a planner's mistake: nothing to serve that version with
            await asyncio.gather(*(mv.close() for mv in fresh.values()))
            raise ModelLoadError(f"model '{model.name}': no copy of version {missing[0]} to serve")
        model.serving = {v: fresh[v] if v in fresh else old[v] for v in sorted(serve)}
        if plan.spec is not None:
            model.spec = plan.spec
        for version in model.serving:
            model.states[version] = (VersionState.READY, "")
        handed_over = 0
        if plan.hand_over:
            for version, new in fresh.items():
                previous = old.get(version)
                if previous is not None:
                    handed_over += previous.scheduler.hand_over(new.scheduler)
        if plan.switched is not None:
            plan.switched(fresh)
        self._notify(model.name)
        retired = [mv for v, mv in old.items() if model.serving.get(v) is not mv]
        await self.retire(model, retired)
        return Swapped(fresh, retired, handed_over)

    async def retire(self, model: ServedModel, versions: Sequence[ModelVersion]) -> None:
        """Drain (bounded by ``drain_timeout_s``) and close ``versions``, which no longer
        serve: whatever a failover held back on them runs (or fails) here first."""
        for mv in versions:
            if model.serving.get(mv.version) is None:
                model.states[mv.version] = (VersionState.UNLOADING, "")
            mv.scheduler.on_outcome = None
            mv.scheduler.resume()
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


@dataclass
class VersionLoader:
    """Loads and warms a version beside what serves: ``load_model_version`` in a worker
    thread, bounded by ``load_timeout_s``, then its scheduler started."""

    default_max_batch_size: int = 8
    default_instances: int = 0
    default_threads: int = 0
    load_timeout_s: float = 300.0
    inference_timeout_s: float = 30.0
    _closing: set[asyncio.Future[None]] = field(default_factory=set, repr=False)

    async def __call__(
        self,
        spec: ModelSpec,
        version: int,
        candidates: Sequence[str],
        *,
        trial_runs: int = 0,
        stats: ModelStats | None = None,
        reference: Sample | None = None,
    ) -> ModelVersion:
        """Load and warm ``version`` on one of ``candidates`` (placement per model.toml);
        ``trial_runs`` timed runs after the warm-up, each bounded by inference_timeout_s (a
        recovery trial); ``stats`` carried over from the copy it replaces; ``reference``
        (the sample that copy already ran) runs first and must succeed.

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

    def _close_late(self, task: asyncio.Future[ModelVersion]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        closing = asyncio.ensure_future(task.result().close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
