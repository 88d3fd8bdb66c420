"""A loaded model version: its instances, the threads that run them, its statistics; and
loading one on the executor that placement picks (``hal.placement`` holds the rules)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from edged.core.errors import EdgedError, ModelLoadError
from edged.core.status import code_of
from edged.core.types import Array, DataType, InferRequest, InferResponse, Signature
from edged.serving.batching import BatchPolicy
from edged.serving.repository import ModelSpec, resolve_signature
from edged.serving.scheduler import QueuePolicy, Scheduler
from edged.serving.stats import ModelStats
from edged.serving.validate import request_options, validate_request
from hal import ExecutorOptions, LoadedModel, ModelArtifact, get_executor
from hal.placement import AUTO_TIMED_RUNS, median, rank_by_speed

log = structlog.get_logger("edged.serving")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ModelVersion:
    """One version of one model, ready to serve: ``instances`` copies of the loaded model,
    each run by its own worker thread behind one scheduler (bounded queue, dynamic
    batching), so the event loop never runs inference."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        signature: Signature,
        instances: list[LoadedModel],
        batching: BatchPolicy,
        queueing: QueuePolicy,
        *,
        kind: str = "",
        placement: Placement | None = None,
        stats: ModelStats | None = None,
        inference_timeout_s: float = 0.0,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = version
        self.signature = signature
        self.kind = kind or instances[0].kind
        """The executor kind it runs on (the entry point's name)."""
        self.placement = placement or Placement(candidates=(self.kind,))
        self.instances = len(instances)
        self.batching = batching
        self.queueing = queueing
        self.stats = stats or ModelStats()
        """Kept across a move to another executor, so counters never go back."""
        self.in_flight = 0
        self._instances = instances
        self.scheduler = Scheduler(
            f"{spec.name}/{version}",
            instances,
            batching,
            queueing,
            self.stats.record_execution,
            inference_timeout_s=inference_timeout_s,
        )
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        """Start taking requests (on the running event loop)."""
        self.scheduler.start()

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate ``request``, queue it for a batch, and answer.

        Raises:
            InvalidInputError: the request does not fit the signature, or a bad parameter.
            OverloadedError: the queue is full.
            DeadlineExceededError: its timeout expired.
            ExecutorError: the executor failed.
        """
        start = time.monotonic_ns()
        self.in_flight += 1
        self._idle.clear()
        try:
            size = validate_request(request, self.signature)
            priority, timeout_ns = request_options(request.parameters)
            results, execution = await self.scheduler.submit(
                request.inputs, size, priority, timeout_ns
            )
            wanted = request.requested_outputs or tuple(t.name for t in self.signature.outputs)
            outputs = {name: results[name] for name in wanted}
            self.stats.record_success(
                time.monotonic_ns() - start,
                execution.dispatched_ns - start,
                execution.input_ns,
                execution.infer_ns,
                execution.output_ns,
            )
        except EdgedError as e:
            self.stats.record_failure(time.monotonic_ns() - start, code_of(e))
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        return InferResponse(self.name, str(self.version), outputs, request.id)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is running here; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the scheduler (failing anything still queued), then close every instance;
        one whose thread is stuck in an inference that timed out is closed when it returns."""
        loop = asyncio.get_running_loop()

        def close_late(instance: LoadedModel) -> None:
            loop.run_in_executor(None, instance.close)

        self.scheduler.on_late_release = close_late
        await self.scheduler.stop()
        stuck = self.scheduler.stuck
        for instance in self._instances:
            if instance not in stuck:
                await asyncio.to_thread(instance.close)


def warm_up_inputs(signature: Signature) -> dict[str, Array]:
    """Zeros for every input, dynamic axes (and the batch axis) set to 1."""
    inputs: dict[str, Array] = {}
    for spec in signature.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype is DataType.BYTES:
            array = np.empty(shape, dtype=object)
            array.fill(b"")
        else:
            array = np.zeros(shape, dtype=spec.datatype.numpy_dtype)
        inputs[spec.name] = array
    return inputs


def default_instances(cores: int) -> int:
    """Instances of a model when neither model.toml nor the config says: one per core, at
    most 4, each with cores / instances runtime threads. On the 2-core machine this beat one
    instance of 2 threads by 10-35% in benchmarks/serving.py (cls, concurrency 1 and 16)."""
    return max(1, min(4, cores))


def policies(spec: ModelSpec, signature: Signature) -> tuple[BatchPolicy, QueuePolicy]:
    """The scheduler's batching and queue policies from model.toml.

    Raises:
        ModelLoadError: a preferred batch size exceeds max_batch_size.
    """
    db = spec.dynamic_batching
    mbs = signature.max_batch_size if db.enabled else 0
    too_big = [s for s in db.preferred_batch_sizes if s > max(mbs, 1)]
    if mbs and too_big:
        raise ModelLoadError(
            f"model '{spec.name}': dynamic_batching.preferred_batch_sizes {too_big} exceed "
            f"max_batch_size {mbs}"
        )
    batching = BatchPolicy(
        max_batch_size=mbs,
        max_queue_delay_ns=db.max_queue_delay_us * 1000,
        preferred_batch_sizes=db.preferred_batch_sizes if mbs else (),
    )
    queueing = QueuePolicy(
        max_queue_size=db.max_queue_size,
        default_timeout_ns=db.default_timeout_us * 1000,
        priority_levels=db.priority_levels,
        default_priority=db.default_priority_level,
    )
    return batching, queueing


@dataclass(frozen=True)
class Placement:
    """How a version was placed: what it may run on, best first, and what was measured."""

    candidates: tuple[str, ...]
    """Kinds it may run on, best first: the probe's candidates in preference order (with
    ``placement = "auto"``: fastest first), less those that refused it at load."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Kinds that failed to load or warm it up, and why."""
    timings_s: Mapping[str, float] = field(default_factory=dict)
    """Median timed warm-up run per kind (``auto`` placement and recovery trials)."""
    warm_outputs: Mapping[str, Array] = field(default_factory=dict)
    """What the chosen executor answered to the warm-up inputs: the reference a recovered
    executor's answers are compared with before the model moves back to it."""


@dataclass
class _Loaded:
    kind: str
    instances: list[LoadedModel]
    signature: Signature
    warm_outputs: dict[str, Array]
    timings_s: list[float]

    def close(self) -> None:
        for instance in self.instances:
            instance.close()


def _load_on(
    kind: str,
    spec: ModelSpec,
    artifact: ModelArtifact,
    options: ExecutorOptions,
    count: int,
    default_max_batch_size: int,
    timed_runs: int,
    max_run_s: float = 0.0,
) -> _Loaded:
    """``count`` copies on ``kind`` (fewer if the executor holds fewer), each warmed up once,
    then ``timed_runs`` timed runs on the first, each within ``max_run_s`` (0: no limit).
    Closes what it loaded if anything fails.

    Raises:
        EdgedError: the executor refused the model, failed on the warm-up inputs, or a timed
            run took longer than ``max_run_s``.
    """
    executor = get_executor(kind)
    loaded = _Loaded(kind, [], Signature((), ()), {}, [])
    try:
        for _ in range(min(count, executor.max_instances or count)):
            loaded.instances.append(executor.load(artifact, options))
        loaded.signature = resolve_signature(
            loaded.instances[0].signature, spec, default_max_batch_size
        )
        warm = warm_up_inputs(loaded.signature)
        for i, instance in enumerate(loaded.instances):
            outputs = instance.infer(warm)
            if i == 0:
                loaded.warm_outputs = outputs
        for _ in range(timed_runs):
            started = time.perf_counter()
            loaded.instances[0].infer(warm)
            loaded.timings_s.append(time.perf_counter() - started)
            if max_run_s and loaded.timings_s[-1] > max_run_s:
                raise ModelLoadError(
                    f"{kind}: a warm-up run took {loaded.timings_s[-1]:.3g}s, more than "
                    f"executors.inference_timeout_s ({max_run_s:g}s)"
                )
    except BaseException:
        loaded.close()
        raise
    return loaded


def _grow(loaded: _Loaded, artifact: ModelArtifact, options: ExecutorOptions, count: int) -> None:
    """Load and warm up copies until ``loaded`` has ``count`` (bounded by max_instances).

    Raises:
        EdgedError: a copy failed to load or warm up (the copies added are closed).
    """
    executor = get_executor(loaded.kind)
    want = min(count, executor.max_instances or count)
    warm = warm_up_inputs(loaded.signature)
    added: list[LoadedModel] = []
    try:
        while len(loaded.instances) + len(added) < want:
            added.append(executor.load(artifact, options))
            added[-1].infer(warm)
    except BaseException:
        for instance in added:
            instance.close()
        raise
    loaded.instances.extend(added)


@dataclass
class _Attempts:
    """What placement tried: kinds that refused the model and why, warm-up timings."""

    spec: ModelSpec
    version: int
    refused: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def refuse(self, kind: str, error: EdgedError) -> None:
        self.refused[kind] = str(error)
        log.warning(
            "executor_refused",
            model=self.spec.name,
            version=self.version,
            executor=kind,
            error=str(error),
        )


def _place_first(
    kinds: Sequence[str], load: Callable[[str, int], _Loaded], count: int, attempts: _Attempts
) -> _Loaded | None:
    """The first of ``kinds`` that loads ``count`` warmed copies."""
    for kind in kinds:
        try:
            loaded = load(kind, count)
        except EdgedError as e:
            attempts.refuse(kind, e)
            continue
        if loaded.timings_s:
            attempts.timings_s[kind] = median(loaded.timings_s)
        return loaded
    return None


def _place_auto(
    kinds: Sequence[str],
    load: Callable[[str, int], _Loaded],
    grow: Callable[[_Loaded], None],
    attempts: _Attempts,
) -> tuple[_Loaded | None, tuple[str, ...]]:
    """One timed copy on every one of ``kinds``; the fastest (median) that can grow to the
    full instance count wins, the others are closed. Returns it and the kinds ranked."""
    timed: dict[str, _Loaded] = {}
    for kind in kinds:
        try:
            timed[kind] = load(kind, 1)
        except EdgedError as e:
            attempts.refuse(kind, e)
    attempts.timings_s.update({k: median(v.timings_s) for k, v in timed.items()})
    ranked = rank_by_speed(kinds, attempts.timings_s)
    chosen: _Loaded | None = None
    for kind in (k for k in ranked if k in timed):
        loaded = timed[kind]
        if chosen is not None:
            loaded.close()
            continue
        try:
            grow(loaded)
        except EdgedError as e:
            loaded.close()
            attempts.refuse(kind, e)
            continue
        chosen = loaded
    log.info(
        "placement_decided",
        model=attempts.spec.name,
        version=attempts.version,
        executor=chosen.kind if chosen else None,
        timings_ms={k: round(v * 1000, 3) for k, v in attempts.timings_s.items()},
        refused=attempts.refused,
    )
    return chosen, ranked


def load_model_version(
    spec: ModelSpec,
    version: int,
    default_max_batch_size: int,
    instances_default: int = 0,
    cores: int | None = None,
    threads_default: int = 0,
    *,
    candidates: Sequence[str] | None = None,
    placement: str | None = None,
    trial_runs: int = 0,
    max_run_s: float = 0.0,
    inference_timeout_s: float = 0.0,
    stats: ModelStats | None = None,
) -> ModelVersion:
    """Load ``version`` of ``spec`` on one of ``candidates`` (default: its preference list),
    one copy per instance, and warm every copy up. Blocking: call from a worker thread.

    ``placement`` (default: model.toml's): "first" takes the first candidate that loads and
    warms up; "auto" loads one copy on every candidate, times ``AUTO_TIMED_RUNS`` warm-up
    runs on each, keeps the fastest (median), and closes the others. ``trial_runs`` times
    that many more runs on the chosen copy; with ``max_run_s``, a run slower than that
    refuses the executor (a recovery trial: a device that still hangs must not get the model
    back). ``inference_timeout_s`` bounds each batch once serving.

    Instances: model.toml's ``instances``, else ``instances_default``, else
    ``default_instances(cores)``; each copy gets cores / instances runtime threads, so that
    together they do not oversubscribe the cores.

    Raises:
        ModelLoadError: no candidate could load it, or the warm-up failed.
    """
    artifact = ModelArtifact(spec.path / str(version) / spec.artifact_name, spec.format)
    cores = cores or available_cores()
    count = spec.instances or instances_default or default_instances(cores)
    options = ExecutorOptions(intra_op_threads=threads_default or max(1, cores // count))
    # (an executor with max_instances loads fewer copies; the threads stay as sized)
    kinds = tuple(dict.fromkeys(spec.executor_preference if candidates is None else candidates))
    attempts = _Attempts(spec, version)
    auto = (placement or spec.placement) == "auto" and len(kinds) > 1

    def load(kind: str, copies: int) -> _Loaded:
        runs = AUTO_TIMED_RUNS if auto else trial_runs
        return _load_on(
            kind, spec, artifact, options, copies, default_max_batch_size, runs, max_run_s
        )

    if auto:
        chosen, ranked = _place_auto(
            kinds, load, lambda loaded: _grow(loaded, artifact, options, count), attempts
        )
    else:
        chosen, ranked = _place_first(kinds, load, count, attempts), kinds
    if chosen is None:
        raise ModelLoadError(
            f"model '{spec.name}' version {version}: no executor could load it: "
            + (
                "; ".join(f"{k}: {v}" for k, v in attempts.refused.items())
                or "no candidate executor"
            )
        )
    try:
        batching, queueing = policies(spec, chosen.signature)
    except ModelLoadError:
        chosen.close()
        raise
    log.info(
        "model_version_loaded",
        model=spec.name,
        version=version,
        executor=chosen.kind,
        instances=len(chosen.instances),
        threads_per_instance=options.intra_op_threads,
        max_batch_size=chosen.signature.max_batch_size,
        dynamic_batching=batching.max_batch_size > 0,
    )
    return ModelVersion(
        spec,
        version,
        chosen.signature,
        chosen.instances,
        batching,
        queueing,
        kind=chosen.kind,
        placement=Placement(
            candidates=tuple(k for k in ranked if k not in attempts.refused),
            refused=attempts.refused,
            timings_s=attempts.timings_s,
            warm_outputs=chosen.warm_outputs,
        ),
        stats=stats,
        inference_timeout_s=inference_timeout_s,
    )
