"""The measurements the planner needs: per-cut head and tail latency on one executor, tensor
bytes at each cut, and the link to a server.

A profile is taken on one machine with one executor: run on the device it gives the heads'
latencies, run on the server (``edged partition MODEL --profile-out FILE`` there) the tails'.
:func:`cost_table` joins the two into the planner's table. The latencies are medians of timed
runs after a warm-up, through the HAL executor that would serve the model (cpu-onnx unless
told otherwise), so they include what the daemon's executor does per call.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edged.core.errors import ConfigError, EdgedError
from edged.core.types import Array, DataType
from edged.partition import graph
from edged.partition.planner import ALL_LOCAL, CutCost, Link

if TYPE_CHECKING:
    import grpc
    import onnx

    from hal import LoadedModel

#: timed runs per part (after one untimed warm-up run)
DEFAULT_RUNS = 5

#: what a device's head costs in the planner's table (:func:`cost_table`)
Statistic = Literal["wall", "cpu", "quota"]
STATISTICS: tuple[Statistic, ...] = ("wall", "cpu", "quota")
#: a part whose timed runs' interquartile range exceeds this fraction of their median is noisy
NOISY_SPREAD = 0.5


@dataclass(frozen=True)
class CutProfile:
    """One cut measured on one machine."""

    cut: str
    head_s: float
    """Median latency of the head here (0 for the inputs cut)."""
    tail_s: float
    """Median latency of the tail here."""
    sent_bytes: int
    """Bytes of the cut tensor(s) for the profiled input."""
    head_cpu_s: float = 0.0
    """Median CPU time of the head's runs on the calling thread (0: not recorded)."""
    tail_cpu_s: float = 0.0
    """Median CPU time of the tail's runs on the calling thread (0: not recorded)."""
    head_spread: float = 0.0
    """Interquartile range of the head's timed runs over their median (0: steady)."""


@dataclass(frozen=True)
class Profile:
    """A model's cuts measured on one machine."""

    model: str
    executor: str
    threads: int
    whole_s: float
    """Median latency of the whole model here."""
    answer_bytes: int
    """Bytes of the model's outputs."""
    cuts: tuple[CutProfile, ...]
    wire_dtype: str = ""
    """The datatype the cuts with a head were profiled sending (``--wire-dtype``; "" for
    each tensor's own): a device's and a server's profile must agree on it."""
    whole_cpu_s: float = 0.0
    """Median CPU time of the whole model's runs on the calling thread (0: not recorded)."""
    wall_per_cpu: float = 0.0
    """Wall seconds per CPU second over every timed run of the profile: how much slower than
    its CPU time this machine ran the parts, busy (a CPU quota, other work); 0: not
    recorded."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> Profile:
        """A profile written by :meth:`to_json`.

        Raises:
            ConfigError: a field is missing or of the wrong type (named, with ``where``).
        """
        try:
            cuts = tuple(CutProfile(**c) for c in data["cuts"])
            return cls(
                model=str(data["model"]),
                executor=str(data["executor"]),
                threads=int(data["threads"]),
                whole_s=float(data["whole_s"]),
                answer_bytes=int(data["answer_bytes"]),
                cuts=cuts,
                wire_dtype=str(data.get("wire_dtype", "")),
                whole_cpu_s=float(data.get("whole_cpu_s", 0.0)),
                wall_per_cpu=float(data.get("wall_per_cpu", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a partition profile: {e!r}") from e


#: parts (heads, tails, the whole model) loaded at once and timed in rounds: one run of each
#: per round, so that load from elsewhere on the machine falls on neighbouring cuts alike
ROUND_PARTS = 24


@dataclass(frozen=True)
class Timing:
    """One part's timed runs."""

    wall_s: float
    """Median wall time."""
    cpu_s: float
    """Median CPU time of the calling thread (where ONNX Runtime computes with one thread)."""
    spread: float
    """Interquartile range of the wall times over their median."""
    wall_total_s: float
    cpu_total_s: float


def _timings(runs: Sequence[Callable[[], object]], rounds: int) -> list[Timing]:
    """The timings of each of ``runs``, after one warm-up run each, timed in ``rounds``
    rounds of one run of each (interleaved, not one part after the other)."""
    for run in runs:
        run()  # warm-up
    walls: list[list[float]] = [[] for _ in runs]
    cpus: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, wall, cpu in zip(runs, walls, cpus, strict=True):
            started, started_cpu = time.perf_counter(), time.thread_time()
            run()
            cpu.append(time.thread_time() - started_cpu)
            wall.append(time.perf_counter() - started)
    return [_timing(wall, cpu) for wall, cpu in zip(walls, cpus, strict=True)]


def _timing(wall: Sequence[float], cpu: Sequence[float]) -> Timing:
    median = float(statistics.median(wall))
    spread = 0.0
    if len(wall) >= 2 and median > 0:
        low, _, high = statistics.quantiles(wall, n=4, method="inclusive")
        spread = (high - low) / median
    return Timing(median, float(statistics.median(cpu)), spread, sum(wall), sum(cpu))


class _Runner:
    """Loads ONNX models through one HAL executor kind, runs and times them, closes them."""

    def __init__(self, kind: str, threads: int, folder: Path) -> None:
        from hal import ExecutorOptions, get_executor  # noqa: PLC0415

        self.kind = kind
        self._executor = get_executor(kind)
        self._options = ExecutorOptions(intra_op_threads=threads, inter_op_threads=1)
        self._folder = folder

    def run(self, model: onnx.ModelProto, feed: Mapping[str, Array]) -> dict[str, Array]:
        loaded = self._load(model)
        try:
            return loaded.infer(feed)
        finally:
            loaded.close()

    def time(
        self, parts: Sequence[tuple[onnx.ModelProto, Mapping[str, Array]]], runs: int
    ) -> list[Timing]:
        """The timings of each of ``parts`` (a model and its input), timed in rounds
        :data:`ROUND_PARTS` parts at a time."""
        medians: list[Timing] = []
        for start in range(0, len(parts), ROUND_PARTS):
            loaded: list[LoadedModel] = []
            try:
                for model, _ in parts[start : start + ROUND_PARTS]:
                    loaded.append(self._load(model))
                feeds = [feed for _, feed in parts[start : start + ROUND_PARTS]]
                medians += _timings(
                    [partial(m.infer, f) for m, f in zip(loaded, feeds, strict=True)], runs
                )
            finally:
                for m in loaded:
                    m.close()
        return medians

    def _load(self, model: onnx.ModelProto) -> LoadedModel:
        from hal import ModelArtifact  # noqa: PLC0415

        path = self._folder / "part.onnx"
        graph.save(model, path)
        return self._executor.load(ModelArtifact(path, "onnx"), self._options)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` with ``names`` (typed intermediate tensors) added to its outputs."""
    import onnx  # noqa: PLC0415

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    infos = {v.name: v for v in copy.graph.value_info}
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present and name in infos:
            copy.graph.output.append(infos[name])
    return copy


def profile(
    path: Path,
    feed: Mapping[str, Array],
    *,
    executor: str = "cpu-onnx",
    threads: int = 1,
    runs: int = DEFAULT_RUNS,
    every: int = 1,
    progress: Callable[[str], None] | None = None,
    wire_dtype: str = "",
) -> Profile:
    """Measure every candidate cut of the model at ``path`` (every ``every``-th, plus the
    inputs cut and the last) on ``executor`` with ``threads`` threads, for the input ``feed``.
    With ``wire_dtype`` (``graph.WIRE_DTYPES``) the cuts that have a head are cut to send
    their tensor so: the parts timed and the bytes counted are those deployed.

    Raises:
        ConfigError: onnx is missing, the file is no model, or ``feed`` does not fit it.
        EdgedError: the executor refused a part or failed running it.
    """
    model = graph.load(path)
    cuts = select(graph.candidate_cuts(model), every)
    with tempfile.TemporaryDirectory(prefix="edged-partition-") as tmp:
        runner = _Runner(executor, threads, Path(tmp))
        names = [c.tensor for c in cuts if c.tensor != graph.INPUTS_CUT]
        try:
            values = runner.run(_with_outputs(model, names), feed)
        except EdgedError as e:
            raise ConfigError(f"{path}: the profiling input does not run: {e}") from e
        outputs = [o.name for o in model.graph.output]
        answer_bytes = sum(int(np.asarray(values[n]).nbytes) for n in outputs)
        parts: list[tuple[onnx.ModelProto, Mapping[str, Array]]] = [(model, feed)]
        sizes: list[int] = []
        for cut in cuts:
            if progress is not None:
                progress(cut.tensor)
            head_wire = wire_dtype if cut.tensor != graph.INPUTS_CUT else ""
            split = graph.split(model, cut.tensor, head_wire)
            middle: Mapping[str, Array] = feed
            if split.head is not None:
                value = values[cut.tensor]
                if head_wire:
                    value = np.asarray(value).astype(DataType(head_wire).numpy_dtype)
                middle = {cut.tensor: value}
            parts += (
                [(split.tail, middle)]
                if split.head is None
                else [(split.head, feed), (split.tail, middle)]
            )
            sizes.append(sum(int(np.asarray(v).nbytes) for v in middle.values()))
        timings = runner.time(parts, runs)
        timed = iter(timings)
        whole = next(timed)
        none = Timing(0.0, 0.0, 0.0, 0.0, 0.0)
        rows = []
        for cut, sent in zip(cuts, sizes, strict=True):
            head = none if cut.tensor == graph.INPUTS_CUT else next(timed)
            tail = next(timed)
            rows.append(
                CutProfile(
                    cut.tensor,
                    head.wall_s,
                    tail.wall_s,
                    sent,
                    head.cpu_s,
                    tail.cpu_s,
                    round(head.spread, 4),
                )
            )
    cpu_total = sum(t.cpu_total_s for t in timings)
    return Profile(
        path.name, executor, threads, whole.wall_s, answer_bytes, tuple(rows), wire_dtype,
        whole_cpu_s=whole.cpu_s,
        wall_per_cpu=sum(t.wall_total_s for t in timings) / cpu_total if cpu_total > 0 else 0.0,
    )  # fmt: skip


def select(cuts: Sequence[graph.Cut], every: int) -> list[graph.Cut]:
    """The inputs cut, every ``every``-th cut after it, and the last one."""
    if every < 1:
        raise ConfigError(f"--every {every}: must be at least 1")
    chosen = [c for i, c in enumerate(cuts) if i % every == 0]
    if cuts and chosen[-1] is not cuts[-1]:
        chosen.append(cuts[-1])
    return chosen


def cost_table(
    device: Profile,
    server: Profile,
    statistic: Statistic = "wall",
    *,
    request_cpu_s: float = 0.0,
    byte_cost_s: float = 0.0,
) -> list[CutCost]:
    """The planner's table: heads and bytes measured on the device, tails on the server, for
    the cuts both profiled, then all local.

    ``statistic`` is what a head (and the whole model, all local) costs: ``wall``, the median
    of its timed runs' wall time; ``cpu``, the median of their CPU time times the device's
    wall seconds per CPU second over the whole profile (:attr:`Profile.wall_per_cpu`). The
    second is for a device whose slowness comes in stalls rather than evenly (a CFS CPU
    quota: a part shorter than the quota's slice runs at full speed or waits a period, so
    its median is one or the other from run to run); it charges every part the device's
    average slowness. ``quota``: a head costs its CPU time (what it takes when the device's
    CPU limit lets it run), and each row carries the device's CPU per request,
    ``request_cpu_s`` (the daemon's own work on a request: reading it, answering it) plus
    the head's CPU time plus ``byte_cost_s`` per byte sent or answered, for the planner to
    bound by the device's :class:`~edged.partition.quota.CpuLimit`. ``cpu`` and ``quota``
    need a one-thread device profile (the runtime computes on the timed thread) that
    recorded CPU times. Tails are the server's wall medians either way.

    Raises:
        ConfigError: the two profiles share no cut (different models, or --every), or were
            taken with different wire datatypes (the heads' bytes and the tails' casts
            would not be those deployed), or ``statistic`` is unknown or ``cpu``/``quota``
            cannot be had from the device's profile, or a per-request cost is negative.
    """
    if statistic not in STATISTICS:
        raise ConfigError(f"statistic {statistic!r} is not one of {', '.join(STATISTICS)}")
    if not (request_cpu_s >= 0 and byte_cost_s >= 0):
        raise ConfigError(
            f"request CPU {request_cpu_s!r} s and byte cost {byte_cost_s!r} s must be >= 0"
        )
    if device.wire_dtype != server.wire_dtype:
        raise ConfigError(
            f"the device profile ({device.model}) sends cuts as "
            f"{device.wire_dtype or 'their own datatype'}, the server profile as "
            f"{server.wire_dtype or 'their own datatype'}: profile both with the same "
            "--wire-dtype"
        )
    head, whole = _head_costs(device, statistic)
    tails = {c.cut: c.tail_s for c in server.cuts}

    def cpu(head_cpu_s: float, wire_bytes: int) -> float | None:
        if statistic != "quota":
            return None
        return request_cpu_s + head_cpu_s + wire_bytes * byte_cost_s

    rows = [
        CutCost(
            c.cut,
            head(c),
            tails[c.cut],
            c.sent_bytes,
            device.answer_bytes,
            cpu(c.head_cpu_s, c.sent_bytes + device.answer_bytes),
        )
        for c in device.cuts
        if c.cut in tails
    ]
    if not rows:
        raise ConfigError(
            f"the device profile ({device.model}) and the server profile ({server.model}) "
            "share no cut"
        )
    return [*rows, CutCost(ALL_LOCAL, whole, 0.0, 0, 0, cpu(device.whole_cpu_s, 0))]


def _head_costs(
    device: Profile, statistic: Statistic
) -> tuple[Callable[[CutProfile], float], float]:
    """How a head costs by ``statistic``, and what the whole model costs."""
    if statistic == "wall":
        return (lambda c: c.head_s), device.whole_s
    if device.threads != 1:
        raise ConfigError(
            f"statistic {statistic} needs a device profile taken with 1 thread ({device.model} "
            f"was taken with {device.threads}: the runtime's other threads are not timed)"
        )
    if device.wall_per_cpu <= 0 or device.whole_cpu_s <= 0:
        raise ConfigError(
            f"statistic {statistic}: the device profile of {device.model} has no CPU times "
            "(taken before they were recorded): profile it again"
        )
    if statistic == "quota":
        return (lambda c: c.head_cpu_s), device.whole_cpu_s
    scale = device.wall_per_cpu
    return (lambda c: c.head_cpu_s * scale), device.whole_cpu_s * scale


def noisy_heads(device: Profile, limit: float = NOISY_SPREAD) -> list[str]:
    """The cuts whose head's timed runs disagree: interquartile range over median above
    ``limit`` (on a CFS quota, the heads near its slice: full speed in some runs, a
    period's stall in others)."""
    return [c.cut for c in device.cuts if c.head_spread > limit]


def measure_link(
    channel: grpc.Channel,
    metadata: Sequence[tuple[str, str]] = (),
    *,
    runs: int = DEFAULT_RUNS,
    max_bytes: int = 4 * 1024 * 1024,
    max_probe_s: float = 2.0,
) -> Link:
    """RTT and bandwidth of the link to a KServe v2 server, measured with ModelInfer calls on
    a model name no server has: the server reads the whole request before answering
    NOT_FOUND, so a call carrying N bytes takes the round trip plus N bytes' transfer. Works
    against edged and Triton alike, and runs no model. The payload grows (64 KiB, x4) until a
    call takes ``max_probe_s`` / 4 or ``max_bytes`` is reached.

    Raises:
        ConfigError: the server cannot be reached, or answered the probe unexpectedly.
    """
    from hal.remote_link import ProbeError, probe  # noqa: PLC0415

    def call(size: int) -> float:
        try:
            return probe(channel, size, timeout_s=max(10.0, max_probe_s * 4), metadata=metadata)
        except ProbeError as e:
            raise ConfigError(str(e)) from e

    def median(size: int) -> float:
        call(size)
        return float(statistics.median(call(size) for _ in range(runs)))

    rtt = median(0)
    size = 64 * 1024
    while True:
        took = median(size)
        if took >= max_probe_s / 4 or size * 4 > max_bytes:
            break
        size *= 4
    transfer = max(took - rtt, 1e-6)
    return Link(rtt_s=rtt, bandwidth_bps=size * 8 / transfer)
