"""Re-planning a split model's cut as the measured link changes (Neurosurgeon's dynamic
partitioning), each change one zero-downtime swap.

For every served version of a model whose model.toml has ``[partition] replan = true``, a
task probes the link to the server every ``probe_interval_ms`` (an empty call: the round
trip; also a ``probe_bytes`` call, the bandwidth, when no real call carried a payload in the
last four intervals: always while the model runs all local, as no traffic crosses the link
then) and reads the link's estimate, which the ``remote`` executor
feeds from every real call (hal.remote_link). When the bandwidth, or the round trip, has moved
by more than ``threshold`` since the last plan, the pure planner (edged.partition.planner)
runs again on the cost table of ``[partition]``'s profiles; if it picks another cut, and
``min_interval_ms`` has passed since the last switch, the version is swapped onto it:

- a cut with a head: the ``remote`` executor with that head here and that tail there;
- ``<local>``: the whole model on the next executor of the model's list (e.g. cpu-onnx).

The swap is the failover's move (serving's ``Swapper.swap``): the new copy loads and warms up
beside the serving one, its answers to the version's reference sample must agree with the
serving copy's (the gate), the requests queued on the old copy are handed over, the old copy
drains its in-flight requests and closes. No request fails for a switch.

While a breaker of the version is not closed, failover and recovery own its placement and
re-planning waits. Time comes from the injected ``clock``/``sleep``; the probe is an attribute
(tests replace it).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc
import structlog

from edged.core.errors import ConfigError, ModelLoadError
from edged.partition.planner import ALL_LOCAL, Link, moved, plan
from edged.serving.model import ModelVersion
from edged.serving.partition_spec import PartitionSpec
from edged.serving.swap import Gate, ServedModel, Swapped, VersionLoader
from hal.placement import BreakerState, CircuitBreaker, outputs_disagree
from hal.remote_link import LinkEstimator, ProbeError, estimator_for, probe
from hal.remote_target import RemoteTarget

log = structlog.get_logger("edged.serving")

REMOTE = "remote"
#: probe the bandwidth when no real call carried a payload in this many probe intervals
STALE_PROBES = 4

#: moves one version onto the copy a load makes, gated (the failover's ``_move``)
Move = Callable[
    [ServedModel, ModelVersion, Callable[[], Awaitable[ModelVersion]], Gate | None],
    Awaitable[Swapped | None],
]


@dataclass(frozen=True)
class Decision:
    """What one look at the link decided."""

    planned: Link | None
    """The link the last plan used, after this look (a new plan: the measured one)."""
    switch_to: str | None = None
    """The cut to switch to; None: stay."""


def decide(
    spec: PartitionSpec,
    current: str,
    planned: Link | None,
    measured: Link,
    since_switch_s: float,
    *,
    local: bool = True,
) -> Decision:
    """Pure: whether to plan again and where to go. Plans when nothing was planned yet or
    the link ``moved`` beyond ``spec.threshold``; switches when the plan picks another cut
    than ``current`` and ``spec.min_interval_s`` has passed since the last switch (if not,
    the old plan stands and the next look tries again). ``local``: all local may be chosen
    (the model has an executor other than ``remote``)."""
    if planned is not None and not moved(planned, measured, spec.threshold):
        return Decision(planned)
    costs = [c for c in spec.costs if local or c.cut != ALL_LOCAL]
    choice = plan(costs, measured, spec.objective, spec.byte_cost_s).choice.cut
    if choice == current:
        return Decision(measured)
    if since_switch_s < spec.min_interval_s:
        return Decision(planned)
    return Decision(measured, choice)


def target_for(spec: PartitionSpec, remote: RemoteTarget, cut: str) -> RemoteTarget:
    """``remote`` pointed at ``cut``'s head and tail, with the tail's profiled time (so the
    link estimate does not count the server's work as link time)."""
    t = spec.target(cut)
    tail_s = next(c.tail_s for c in spec.costs if c.cut == cut)
    return dataclasses.replace(
        remote, head=t.head, model=t.model, version=t.version, server_s=tail_s
    )


def cut_of(mv: ModelVersion) -> str:
    """The cut ``mv`` serves: the one its ``[remote]`` names on the remote executor, else
    all local."""
    partition, remote = mv.spec.partition, mv.spec.remote
    if mv.kind != REMOTE or partition is None or remote is None:
        return ALL_LOCAL
    for c in partition.cuts:
        if (c.head, c.model, c.version) == (remote.head, remote.model, remote.version):
            return c.cut
    return ALL_LOCAL


@dataclass
class _Watch:
    task: asyncio.Task[None]
    planned: Link | None = None
    switched_at: float = -math.inf


@dataclass(frozen=True)
class CutStatus:
    """The cut one version serves, for metrics."""

    model: str
    version: int
    cut: str


class Replanner:
    """The re-planning tasks of every served split model of one manager."""

    def __init__(
        self,
        move: Move,
        loader: VersionLoader,
        health: Callable[[ServedModel, int], tuple[tuple[str, ...], Mapping[str, CircuitBreaker]]],
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._move = move
        self._loader = loader
        self._health = health
        self._clock = clock
        self._sleep = sleep
        self._watches: dict[tuple[str, int], _Watch] = {}
        self.probe: Callable[[grpc.Channel, int, float, tuple[tuple[str, str], ...]], float] = (
            lambda channel, size, timeout_s, metadata: probe(
                channel, size, timeout_s=timeout_s, metadata=metadata
            )
        )
        """One probe call (hal.remote_link.probe); tests replace it."""
        self.link_for: Callable[[str], LinkEstimator] = estimator_for
        """The estimate of the link to an address (hal.remote_link); tests replace it."""
        self._served: dict[tuple[str, int], str] = {}
        self.replans: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        """(model, version, from cut, to cut) -> switches of cut."""

    def track(self, model: ServedModel, fresh: Mapping[int, ModelVersion]) -> None:
        """At a load's switch: watch the link of the fresh versions that re-plan."""
        for version, mv in fresh.items():
            self._stop(model.name, version)
            partition = mv.spec.partition
            if partition is not None and partition.replan and mv.spec.remote is not None:
                # a fresh context: the request of the load must not tag the task's logs
                task = asyncio.get_running_loop().create_task(
                    self._watch(model, version, partition, mv.spec.remote),
                    context=contextvars.Context(),
                )
                task.add_done_callback(_finished)
                self._watches[(model.name, version)] = _Watch(task)
        for name, version in list(self._watches):
            if name == model.name and version not in model.serving:
                self._stop(name, version)

    def forget(self, model: ServedModel) -> None:
        """At an unload: no re-planning of ``model`` any more."""
        for name, version in list(self._watches):
            if name == model.name:
                self._stop(name, version)

    async def stop(self) -> None:
        """Cancel every re-planning task and wait for them to end."""
        tasks = [w.task for w in self._watches.values()]
        self._watches.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop(self, name: str, version: int) -> None:
        watch = self._watches.pop((name, version), None)
        if watch is not None:
            watch.task.cancel()

    def cuts(self) -> list[CutStatus]:
        """The cut each re-planned version serves (snapshots: the metrics thread calls this)."""
        return [
            CutStatus(name, version, cut) for (name, version), cut in list(self._served.items())
        ]

    async def _watch(
        self, model: ServedModel, version: int, partition: PartitionSpec, remote: RemoteTarget
    ) -> None:
        # deferred: the remote executor loads ONNX Runtime (the head), needed with a split model
        from hal.remote import channel_for, token_metadata  # noqa: PLC0415

        key = (model.name, version)
        link = self.link_for(remote.address)
        try:
            channel = await asyncio.to_thread(channel_for, remote)
            metadata = await asyncio.to_thread(token_metadata, remote)
        except ModelLoadError as e:
            log.error("partition_replan_off", model=model.name, version=version, error=str(e))
            return
        try:
            while (current := model.serving.get(version)) is not None:
                self._served[key] = cut_of(current)
                await self._sleep(partition.probe_interval_s)
                current = model.serving.get(version)
                if current is None:
                    return
                await self._look(model, current, partition, remote, link, channel, metadata)
        finally:
            self._served.pop(key, None)
            channel.close()

    async def _look(
        self,
        model: ServedModel,
        current: ModelVersion,
        partition: PartitionSpec,
        remote: RemoteTarget,
        link: LinkEstimator,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        """One probe, one look at the link, and the switch it calls for."""
        cut = cut_of(current)
        # a payload probe when no real call carried one lately (all local: none at all)
        seen = link.snapshot().bandwidth_at
        stale = seen is None or self._clock() - seen > STALE_PROBES * partition.probe_interval_s
        sizes = [0, partition.probe_bytes] if cut == ALL_LOCAL or stale else [0]
        timeout_s = max(remote.timeout_s, partition.probe_interval_s)
        for size in sizes:
            try:
                seconds = await asyncio.to_thread(self.probe, channel, size, timeout_s, metadata)
            except ProbeError as e:
                log.debug("partition_probe_failed", model=current.name, error=str(e))
                return
            link.record(size, 0, seconds)
        candidates, breakers = self._health(model, current.version)
        now = self._clock()
        if any(b.state(now) is not BreakerState.CLOSED for b in breakers.values()):
            return  # failover or recovery owns the placement now
        snap = link.snapshot()
        if snap.rtt_s is None or snap.bandwidth_bps is None:
            return
        watch = self._watches.get((model.name, current.version))
        if watch is None:
            return
        try:
            measured = Link(snap.rtt_s, snap.bandwidth_bps)
        except ConfigError:
            return
        local = tuple(k for k in candidates if k != REMOTE)
        decision = decide(
            partition, cut, watch.planned, measured, now - watch.switched_at, local=bool(local)
        )
        watch.planned = decision.planned
        if decision.switch_to is not None:
            await self._switch(
                model, current, partition, remote, decision.switch_to, local, measured
            )
            watch.switched_at = self._clock()

    async def _switch(
        self,
        model: ServedModel,
        current: ModelVersion,
        partition: PartitionSpec,
        remote: RemoteTarget,
        cut: str,
        local: tuple[str, ...],
        measured: Link,
    ) -> None:
        before = cut_of(current)
        labels = {"model": current.name, "version": current.version}
        if cut == ALL_LOCAL:
            spec, candidates = current.spec, local
        else:
            spec = dataclasses.replace(current.spec, remote=target_for(partition, remote, cut))
            candidates = (REMOTE,)
        load = functools.partial(
            self._loader,
            spec,
            current.version,
            candidates,
            stats=current.stats,
            reference=current.reference,
        )

        async def agrees(candidate: ModelVersion, /) -> None:
            problem = outputs_disagree(current.reference_outputs, candidate.reference_outputs)
            if problem is not None:
                raise ModelLoadError(f"cut {cut}: {problem}")

        started = self._clock()
        try:
            swapped = await self._move(model, current, load, agrees)
        except ModelLoadError as e:
            log.warning("partition_replan_failed", **labels, cut=cut, error=str(e))
            return
        if swapped is None:
            return
        self.replans[(current.name, str(current.version), before, cut)] += 1
        self._served[(current.name, current.version)] = cut
        log.info(
            "partition_replanned",
            **labels,
            **{"from": before, "to": cut},
            rtt_ms=round(measured.rtt_s * 1000, 3),
            bandwidth_mbit=round(measured.bandwidth_bps / 1e6, 3),
            objective=partition.objective,
            handed_over=swapped.handed_over,
            seconds=round(self._clock() - started, 4),
        )


def _finished(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("partition_replan_task_failed", error=f"{type(error).__name__}: {error}")
