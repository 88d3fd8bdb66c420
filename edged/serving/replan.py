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

With ``calibrate = true`` the plan runs on the profiles' costs scaled by what the served cut
measures against its profile (its head here, the server's own time on its tail there):
``Calibration``, averaged over time, forgotten as it ages where not measured, kept per cut
for the cuts served before (docs/partition.md "Served times").

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import structlog

from edged.core.errors import ConfigError, ModelLoadError
from edged.core.stats import Duration
from edged.partition.planner import ALL_LOCAL, CutCost, Link, moved, plan
from edged.serving.model import ModelVersion
from edged.serving.partition_spec import CutTarget, PartitionSpec
from edged.serving.swap import Gate, ServedModel, Swapped, VersionLoader
from hal.placement import BreakerState, CircuitBreaker, outputs_disagree
from hal.remote_link import (
    DEFAULT_HALF_LIFE_S,
    CutTimes,
    LinkEstimator,
    LinkSnapshot,
    ProbeError,
    TimeAverage,
    estimator_for,
    probe,
    sample_weight,
    served_requests,
    tail_key,
)
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


#: what an all-local cut's head times are (none)
_NO_CUT = CutTimes(None, None, None, None)
#: a served/profiled factor is kept within [1/this, this] (a stalled sample is no figure)
MAX_SCALE = 20.0
#: a factor not measured for this long is believed half as far from what it relaxes toward
#: (geometrically): the profile for a side the served cut does not run, the served cut's
#: factor for a cut served before (see ``relaxed``)
FORGET_HALF_LIFE_S = 20.0
#: the factors are moving averages over time with this half-life: one look's samples (a
#: quarter second of requests) swing 0.9x..10x under a CPU quota, and one swing planned on
#: sent the cut to the wrong end of the model; a 2x change crosses a 25 % threshold in 1.3 s
SMOOTH_HALF_LIFE_S = 2.0
#: a switch must gain this fraction of the served cut's estimate: two cuts whose estimates
#: lie within the noise of the measurements are not worth a swap at every look
SWITCH_MARGIN = 0.1


@dataclass(frozen=True)
class Scale:
    """How much slower than their profiles the two ends of a cut run as served (1.0: as
    profiled): the device's heads (and the whole model all local), the server's tails."""

    device: float = 1.0
    server: float = 1.0

    def moved(self, since: Scale, threshold: float) -> bool:
        """Whether either factor moved by more than ``threshold`` (a fraction) since ``since``."""
        return any(
            abs(now / then - 1.0) > threshold
            for now, then in ((self.device, since.device), (self.server, since.server))
        )


def scaled(
    costs: Sequence[CutCost], scale: Scale, per_cut: Mapping[str, Scale] | None = None
) -> list[CutCost]:
    """Pure: the profiled ``costs`` with the device's times times ``scale.device`` and the
    server's times ``scale.server``; a cut in ``per_cut`` by its own factors instead."""
    own = per_cut or {}
    return [
        dataclasses.replace(
            c,
            head_s=c.head_s * own.get(c.cut, scale).device,
            tail_s=c.tail_s * own.get(c.cut, scale).server,
        )
        for c in costs
    ]


def relaxed(
    factor: float, toward: float, age_s: float, half_life_s: float = FORGET_HALF_LIFE_S
) -> float:
    """Pure: a factor measured ``age_s`` ago, believed less as it ages: its ratio to
    ``toward`` shrinks geometrically, halving (in log terms) every ``half_life_s`` (8x
    becomes 2.8x after one half-life, 1.7x after two)."""
    if not age_s > 0 or not factor > 0 or not toward > 0:
        return factor
    if math.isinf(age_s):
        return toward
    return float(toward * (factor / toward) ** (0.5 ** (age_s / half_life_s)))


def smoothed(
    old: float, sample: float, since_s: float, half_life_s: float = SMOOTH_HALF_LIFE_S
) -> float:
    """Pure: a factor's moving average over time (geometric: 2x and 0.5x average to 1x):
    ``sample`` weighs what ``since_s`` seconds since the last sample leave of
    ``half_life_s``; after a long silence, the sample alone."""
    if not since_s > 0:
        return old
    weight = sample_weight(since_s, half_life_s) if math.isfinite(since_s) else 1.0
    return float(old * (sample / old) ** weight)


def _sample(seconds: float | None) -> bool:
    return seconds is not None and math.isfinite(seconds)


def _factor(measured: float | None, profiled: float, old: float) -> float:
    if measured is None or not profiled > 0 or not math.isfinite(measured):
        return old
    return min(MAX_SCALE, max(1.0 / MAX_SCALE, measured / profiled))


def served_scale(
    costs: Sequence[CutCost],
    cut: str,
    device_s: float | None,
    server_s: float | None,
    old: Scale,
) -> Scale:
    """Pure: the factors the cut served measures against its profile: ``device_s`` its
    head's time as served (all local: the whole model's), ``server_s`` the server's own time
    per request on its tail. A side not measured (None), or that the cut does not run (no
    head; no tail), keeps ``old``'s factor."""
    cost = next((c for c in costs if c.cut == cut), None)
    if cost is None:
        return old
    return Scale(
        _factor(device_s, cost.head_s, old.device), _factor(server_s, cost.tail_s, old.server)
    )


@dataclass(frozen=True)
class Calibration:
    """What the served cuts measured (pure; each look makes the next with ``measured``): the
    last factor of each side and when it was measured, and for the cuts served before, the
    factors they measured themselves and when they were left.

    Two things follow from it, both ``relaxed`` as they age (``FORGET_HALF_LIFE_S``):

    - ``scale``: the factors every cut is planned on. A side the served cut does not run (the
      server's all local, the device's all remote) is not measured: its last factor relaxes
      toward 1 (the profile), so that a server that was slow and recovered is tried again
      rather than avoided for ever; if it is still slow, the try measures it again.
    - ``per_cut``: a cut served before is planned on its own factors, relaxing toward
      ``scale``. A slowdown is rarely the same for every cut (a CPU shared by time slices or
      a quota lets short heads run at full speed and stalls long ones; a server's fixed cost
      per request weighs more on a short tail): planning the cut just left on the factor its
      successor measures brings it straight back, and the next look leaves it again.
    """

    device: float = 1.0
    device_at: float = -math.inf
    server: float = 1.0
    server_at: float = -math.inf
    cuts: tuple[tuple[str, Scale, float], ...] = ()
    """(cut, its factors as served, when) for the cuts served before, the latest last."""

    def measured(
        self,
        costs: Sequence[CutCost],
        cut: str,
        device_s: float | None,
        server_s: float | None,
        now: float,
    ) -> Calibration:
        """This look's samples of the cut served (``served_scale``'s arguments; None: not
        measured since the last look) taken in at ``now``."""
        last = Scale(self.device, self.server)
        got = served_scale(costs, cut, device_s, server_s, last)
        cost = next((c for c in costs if c.cut == cut), None)
        device, device_at = self.device, self.device_at
        server, server_at = self.server, self.server_at
        if cost is not None and _sample(device_s) and cost.head_s > 0:
            device, device_at = smoothed(self.device, got.device, now - self.device_at), now
        if cost is not None and _sample(server_s) and cost.tail_s > 0:
            server, server_at = smoothed(self.server, got.server, now - self.server_at), now
        after = dataclasses.replace(
            self, device=device, device_at=device_at, server=server, server_at=server_at
        )
        kept = tuple(c for c in self.cuts if c[0] != cut)
        return dataclasses.replace(after, cuts=(*kept, (cut, after.scale(now), now)))

    def scale(self, now: float) -> Scale:
        """The factors as believed at ``now``: each side's last, relaxed toward 1 by its age."""
        return Scale(
            relaxed(self.device, 1.0, now - self.device_at),
            relaxed(self.server, 1.0, now - self.server_at),
        )

    def per_cut(self, served: str, now: float) -> dict[str, Scale]:
        """The cuts served before ``served`` and the factors they are planned on at ``now``:
        their own, relaxed toward ``scale`` since they were left."""
        common = self.scale(now)
        return {
            cut: Scale(
                relaxed(own.device, common.device, now - at),
                relaxed(own.server, common.server, now - at),
            )
            for cut, own, at in self.cuts
            if cut != served
        }


@dataclass(frozen=True)
class Decision:
    """What one look at the link decided."""

    planned: Link | None
    """The link the last plan used, after this look (a new plan: the measured one)."""
    switch_to: str | None = None
    """The cut to switch to; None: stay."""
    scale: Scale = Scale()
    """The served/profiled factors the last plan used, after this look."""
    per_cut: Mapping[str, Scale] = dataclasses.field(default_factory=dict)
    """The cuts the last plan planned on factors of their own (``Calibration.per_cut``)."""


def factors_moved(
    spec: PartitionSpec,
    scale: Scale,
    per_cut: Mapping[str, Scale],
    planned_scale: Scale,
    planned_per_cut: Mapping[str, Scale],
) -> bool:
    """Pure: whether any cut's factors (its own in ``per_cut``, else ``scale``) moved by
    more than ``spec.threshold`` since the last plan's."""
    return any(
        per_cut.get(c.cut, scale).moved(planned_per_cut.get(c.cut, planned_scale), spec.threshold)
        for c in spec.costs
    )


def decide(
    spec: PartitionSpec,
    current: str,
    planned: Link | None,
    measured: Link,
    since_switch_s: float,
    *,
    local: bool = True,
    scale: Scale = Scale(),
    planned_scale: Scale = Scale(),
    per_cut: Mapping[str, Scale] | None = None,
    planned_per_cut: Mapping[str, Scale] | None = None,
) -> Decision:
    """Pure: whether to plan again and where to go. Plans when nothing was planned yet, the
    link ``moved`` beyond ``spec.threshold``, or the served/profiled factors of any cut
    (``scale``, see ``served_scale``, or the cut's own in ``per_cut``, see ``Calibration``;
    the last plan's: ``planned_scale``, ``planned_per_cut``) moved beyond it; the plan runs
    on the profiles' costs ``scaled`` by them. Switches when the plan picks another cut than
    ``current`` whose estimate is at least ``SWITCH_MARGIN`` below ``current``'s, and
    ``spec.min_interval_s`` has passed since the last switch (if not, the old plan stands
    and the next look tries again). ``local``: all local may be chosen (the
    model has an executor other than ``remote``)."""
    own, planned_own = per_cut or {}, planned_per_cut or {}
    factors = factors_moved(spec, scale, own, planned_scale, planned_own)
    if planned is not None and not moved(planned, measured, spec.threshold) and not factors:
        return Decision(planned, scale=planned_scale, per_cut=planned_own)
    costs = scaled([c for c in spec.costs if local or c.cut != ALL_LOCAL], scale, own)
    result = plan(costs, measured, spec.objective, spec.byte_cost_s)
    choice = result.choice.cut
    served = next((e for e in result.estimates if e.cut == current), None)
    if choice == current or (
        served is not None
        and result.choice.objective_s > served.objective_s * (1.0 - SWITCH_MARGIN)
    ):
        return Decision(measured, scale=scale, per_cut=own)
    if since_switch_s < spec.min_interval_s:
        return Decision(planned, scale=planned_scale, per_cut=planned_own)
    return Decision(measured, choice, scale, own)


def planning_link(snap: LinkSnapshot, *, least_rtt: bool = False) -> Link | None:
    """Pure: the link to plan on from ``snap`` (None: not measured yet, or nonsense). With
    ``least_rtt`` (calibrate) the round trip is the least of the last window, not the
    average: the device's waits for its CPU are in its factor, and charged again in the
    round trip they would weigh on the remote cuts alone (probes made while all local keeps
    the CPU busy read 5-50 ms on a sub-millisecond link)."""
    if snap.rtt_s is None or snap.bandwidth_bps is None:
        return None
    rtt_s = snap.least_rtt_s if least_rtt and snap.least_rtt_s is not None else snap.rtt_s
    try:
        return Link(rtt_s, snap.bandwidth_bps)
    except ConfigError:
        return None


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


class ServedTimes:
    """What the cut a version serves costs as served, read at each look (the I/O half of
    ``served_scale``; no clock of its own: the samples carry their times).

    - The device's end: a cut with a head, the head's time per call as the ``remote``
      executor measured it on the serving path (``CutTimes.head_s``, a moving average; only
      when a call came since the last look); all local, the serving path's own records
      (the version's statistics: compute time per request, the batch it ran in) since the
      last look, averaged over time like the link.
    - The server's end: the server's own time per request on the tail (its statistics since
      the last look: successful requests and their time).
    """

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        self._half_life_s = half_life_s
        self._cut: str | None = None
        self._local = TimeAverage(half_life_s)
        self._local_seen: tuple[int, int] | None = None
        self._head_seen: float | None = None
        self._server_seen: dict[str, tuple[int, int]] = {}

    def device_s(
        self, cut: str, compute_infer: Duration, head: CutTimes, now: float
    ) -> float | None:
        """The device's time for ``cut`` as served lately: ``head`` for a cut with a head,
        the version's ``compute_infer`` statistics all local (None: nothing ran since the
        last look, or no head: all remote). After a change of cut, only what ran since
        counts (the version's statistics carry over a switch)."""
        if cut != self._cut:
            self._cut = cut
            self._local = TimeAverage(self._half_life_s)
            self._local_seen = None
            self._head_seen = head.head_at
            if cut == ALL_LOCAL:
                self._local_seen = (compute_infer.count, compute_infer.ns)
            return None
        if cut != ALL_LOCAL:
            if head.head_at is None or head.head_at == self._head_seen:
                return None
            self._head_seen = head.head_at
            return head.head_s
        seen = (compute_infer.count, compute_infer.ns)
        last, self._local_seen = self._local_seen, seen
        if last is None or seen[0] <= last[0]:
            return None
        self._local.add((seen[1] - last[1]) / (seen[0] - last[0]) / 1e9, now)
        return self._local.value

    def server_s(self, tail: str, requests: int, ns: int) -> float | None:
        """The server's own time per request on ``tail`` since the last reading of its
        statistics (``requests`` answered so far, in ``ns`` in all; None: none since)."""
        last = self._server_seen.get(tail)
        self._server_seen[tail] = (requests, ns)
        if last is None or requests <= last[0] or ns < last[1]:
            return None  # the first reading, none since, or the server restarted
        return (ns - last[1]) / (requests - last[0]) / 1e9


@dataclass
class _Watch:
    task: asyncio.Task[None]
    planned: Link | None = None
    switched_at: float = -math.inf
    planned_scale: Scale = Scale()
    planned_per_cut: Mapping[str, Scale] = dataclasses.field(default_factory=dict)
    calibration: Calibration = Calibration()
    served: ServedTimes = dataclasses.field(default_factory=ServedTimes)


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
        self.statistics: Callable[
            [grpc.Channel, str, str, float, tuple[tuple[str, str], ...]], tuple[int, int]
        ] = lambda channel, model, version, timeout_s, metadata: served_requests(
            channel, model, version, timeout_s=timeout_s, metadata=metadata
        )
        """The server's (requests, nanoseconds) for a tail (hal.remote_link.served_requests);
        tests replace it."""
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
        watch = self._watches.get((model.name, current.version))
        if watch is None:
            return
        server_s = None
        if cut != ALL_LOCAL:
            server_s = await self._server_time(
                link, watch.served, partition.target(cut), channel, timeout_s, metadata
            )
        device_s: float | None = None
        if partition.calibrate:
            head = _NO_CUT
            if cut != ALL_LOCAL:
                target = partition.target(cut)
                head = link.cut_times(tail_key(target.model, target.version))
            device_s = watch.served.device_s(
                cut,
                current.stats.snapshot(current.name, current.version).compute_infer,
                head,
                self._clock(),
            )
            watch.calibration = watch.calibration.measured(
                partition.costs, cut, device_s, server_s, self._clock()
            )
        candidates, breakers = self._health(model, current.version)
        now = self._clock()
        if any(b.state(now) is not BreakerState.CLOSED for b in breakers.values()):
            return  # failover or recovery owns the placement now
        measured = planning_link(link.snapshot(), least_rtt=partition.calibrate)
        if measured is None:
            return
        local = tuple(k for k in candidates if k != REMOTE)
        scale, per_cut = Scale(), {}
        if partition.calibrate:
            scale = watch.calibration.scale(now)
            per_cut = watch.calibration.per_cut(cut, now)
        decision = decide(
            partition,
            cut,
            watch.planned,
            measured,
            now - watch.switched_at,
            local=bool(local),
            scale=scale,
            planned_scale=watch.planned_scale,
            per_cut=per_cut,
            planned_per_cut=watch.planned_per_cut,
        )
        if partition.calibrate and factors_moved(
            partition, decision.scale, decision.per_cut, watch.planned_scale, watch.planned_per_cut
        ):
            # the factors made this plan (not only the link): what they were, and its choice
            log.info(
                "partition_calibrated",
                model=current.name,
                version=current.version,
                cut=cut,
                device_scale=round(decision.scale.device, 3),
                server_scale=round(decision.scale.server, 3),
                device_ms=None if device_s is None else round(device_s * 1000, 3),
                server_ms=None if server_s is None else round(server_s * 1000, 3),
                choice=decision.switch_to or cut,
                own={c: [round(f.device, 3), round(f.server, 3)] for c, f in per_cut.items()},
            )
        watch.planned = decision.planned
        watch.planned_scale = decision.scale
        watch.planned_per_cut = decision.per_cut
        if decision.switch_to is not None:
            await self._switch(
                model, current, partition, remote, decision.switch_to, local, measured, scale
            )
            watch.switched_at = self._clock()

    async def _server_time(
        self,
        link: LinkEstimator,
        served: ServedTimes,
        target: CutTarget,
        channel: grpc.Channel,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> float | None:
        """The server's own time per request on ``target``'s tail since the last look, from
        its statistics, handed to the link estimate (so that a server that batches is not
        read as a slow link). None: not known (no request since, or refused)."""
        try:
            requests, ns = await asyncio.to_thread(
                self.statistics, channel, target.model, target.version, timeout_s, metadata
            )
        except ProbeError as e:
            log.debug("partition_server_statistics_failed", tail=target.model, error=str(e))
            return None
        tail = tail_key(target.model, target.version)
        seconds = served.server_s(tail, requests, ns)
        if seconds is not None:
            link.set_server_time(tail, seconds)
        return seconds

    async def _switch(
        self,
        model: ServedModel,
        current: ModelVersion,
        partition: PartitionSpec,
        remote: RemoteTarget,
        cut: str,
        local: tuple[str, ...],
        measured: Link,
        scale: Scale,
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
            **(
                {"device_scale": round(scale.device, 3), "server_scale": round(scale.server, 3)}
                if partition.calibrate
                else {}
            ),
            handed_over=swapped.handed_over,
            seconds=round(self._clock() - started, 4),
        )


def _finished(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("partition_replan_task_failed", error=f"{type(error).__name__}: {error}")
