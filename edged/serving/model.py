"""A loaded model version: its instances, the threads that run them, its statistics; and
loading one on the executor that placement picks (``hal.placement`` holds the rules)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog

from edged.core.errors import EdgedError, ModelLoadError
from edged.core.types import Array, DataType, InferRequest, InferResponse, Signature, TensorSpec
from edged.serving.batching import BatchPolicy
from edged.serving.repository import (
    MODEL_TOML,
    WARMUP_DIR,
    ModelSpec,
    WarmupInput,
    WarmupSpec,
    resolve_signature,
)
from edged.serving.scheduler import QueuePolicy, Result, Scheduler
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
        self.reference: Sample | None = self.placement.reference
        """The sample failover, recovery and the OTA self-test run: the first warm-up
        sample that ran, else (set once) the first request that succeeded; kept in memory."""
        self.reference_outputs: Mapping[str, Array] = self.placement.warm_outputs
        """What this version answered to ``reference``."""
        self.on_reference: Callable[[ModelVersion], None] | None = None
        """Called once when a request becomes the reference (the manager re-plans
        ``placement = "auto"`` with it)."""
        self.in_flight = 0
        """Requests counted in and not answered yet (any thread: under ``_counting``)."""
        self._counting = threading.Lock()
        self._draining = False
        self._drained: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._instances = instances
        self.scheduler = Scheduler(
            f"{spec.name}/{version}",
            instances,
            batching,
            queueing,
            self.stats.record_execution,
            inference_timeout_s=inference_timeout_s,
        )

    def start(self) -> None:
        """Start taking requests (on the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()

    def enter(self, *, force: bool = False) -> bool:
        """Count a request in (any thread); False, without counting it, once ``drain`` has
        begun (the caller routes again: a swap has switched to another version), unless
        ``force``."""
        with self._counting:
            if self._draining and not force:
                return False
            self.in_flight += 1
            return True

    def _leave(self) -> None:
        with self._counting:
            self.in_flight -= 1
            if self.in_flight or not self._drained:
                return
            waiters, self._drained = self._drained, []
        loop = self._loop
        for future in waiters:
            if loop is None:  # pragma: no cover - drain runs on the loop that started us
                break
            loop.call_soon_threadsafe(_wake, future)

    def submit(
        self,
        request: InferRequest,
        reply: Callable[[InferResponse | EdgedError], None],
        *,
        inline: bool = False,
    ) -> Callable[[], bool]:
        """``infer`` for a caller on any thread (the ZeroMQ I/O thread, gRPC's handler
        threads), counted in by ``enter`` first: validate, queue, and call ``reply`` once with
        the response or the error (on the thread that settled it; with ``inline``, a lone
        request on an idle version runs and is answered on this thread before ``submit``
        returns). Returns ``withdraw``: for a caller that went away, it drops the request if
        it is still queued (True; ``reply`` is then never called)."""
        start = time.monotonic_ns()

        def done(outcome: Result | EdgedError) -> None:
            try:
                response = self._answered(request, start, outcome, on_loop=False)
            except EdgedError as e:
                self._leave()
                reply(e)
                return
            self._leave()
            reply(response)

        try:
            size = validate_request(request, self.signature)
            priority, timeout_ns = request_options(request.parameters)
            pending = self.scheduler.post(
                request.inputs, size, priority, timeout_ns, done, inline=inline
            )
        except EdgedError as e:
            done(e)
            return _answered_already

        def withdraw() -> bool:
            if self.scheduler.withdraw(pending):
                self._leave()
                return True
            return False

        return withdraw

    def _answered(
        self, request: InferRequest, start: int, outcome: Result | EdgedError, *, on_loop: bool
    ) -> InferResponse:
        """The response to ``request`` from its batch's ``outcome``, counted in the
        statistics (a request that succeeded first becomes the reference sample).

        Raises:
            EdgedError: the outcome's error, or a requested output the model lacks.
        """
        try:
            if isinstance(outcome, EdgedError):
                raise outcome
            results, execution = outcome
            wanted = request.requested_outputs or tuple(t.name for t in self.signature.outputs)
            outputs = {name: results[name] for name in wanted}
        except EdgedError as e:
            self.stats.record_failure(time.monotonic_ns() - start, type(e))
            raise
        if self.reference is None:
            if on_loop or self._loop is None:
                self._take_reference(request, results)
            else:
                self._loop.call_soon_threadsafe(self._take_reference, request, results)
        self.stats.record_success(
            time.monotonic_ns() - start,
            execution.dispatched_ns - start,
            execution.input_ns,
            execution.infer_ns,
            execution.output_ns,
        )
        return InferResponse(self.name, str(self.version), outputs, request.id)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate ``request``, queue it for a batch, and answer.

        Raises:
            InvalidInputError: the request does not fit the signature, or a bad parameter.
            OverloadedError: the queue is full.
            DeadlineExceededError: its timeout expired.
            ExecutorError: the executor failed.
        """
        start = time.monotonic_ns()
        self.enter(force=True)
        try:
            try:
                size = validate_request(request, self.signature)
                priority, timeout_ns = request_options(request.parameters)
                outcome: Result | EdgedError = await self.scheduler.submit(
                    request.inputs, size, priority, timeout_ns
                )
            except EdgedError as e:
                outcome = e
            return self._answered(request, start, outcome, on_loop=True)
        finally:
            self._leave()

    def _take_reference(self, request: InferRequest, results: Mapping[str, Array]) -> None:
        """Keep a copy of the first request that succeeded, and every output it got, as the
        reference sample (the warm-up had none that ran). On the event loop."""
        if self.reference is not None:  # another request got there first
            return
        self.reference = Sample(
            {k: np.array(v, copy=True) for k, v in request.inputs.items()},
            f"request {request.id or '(no id)'}",
        )
        self.reference_outputs = {k: np.array(v, copy=True) for k, v in results.items()}
        log.info(
            "reference_sample_taken",
            model=self.name,
            version=self.version,
            executor=self.kind,
            request_id=request.id,
        )
        if self.on_reference is not None:
            self.on_reference(self)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is running here; False if ``timeout_s`` passed first.
        From now on ``enter`` refuses new requests unless forced (the router sends them to
        the version that replaced this one)."""
        with self._counting:
            self._draining = True
            if not self.in_flight:
                return True
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drained.append(future)
        try:
            await asyncio.wait_for(future, timeout_s)
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


def _answered_already() -> bool:
    """``withdraw`` of a request answered before ``submit`` returned: nothing to drop."""
    return False


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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


@dataclass(frozen=True)
class Sample:
    """Inputs of one warm-up or reference run (one request's worth), and their origin."""

    inputs: Mapping[str, Array]
    source: str
    """"warmup/a.npz", "[[warmup]] 'name'", "synthetic zeros", "request <id>"."""


def _random(shape: tuple[int, ...], spec: TensorSpec, rng: np.random.Generator) -> Array:
    if spec.datatype is DataType.BYTES:
        array = np.empty(shape, dtype=object)
        array.fill(b"")
        return array
    dtype = spec.datatype.numpy_dtype
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    return rng.integers(0, 10, shape).astype(dtype)


def _fits(dims: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(dims) == len(declared) and all(
        d in (-1, x) for x, d in zip(dims, declared, strict=True)
    )


def _warmup_input(
    spec: ModelSpec, key: str, decl: WarmupInput, tensor: TensorSpec, declared: tuple[int, ...]
) -> Array:
    """One sample's value of one input (without the batch axis when the model batches)."""
    where = spec.path / MODEL_TOML
    if decl.data == "input_data_file":
        file = spec.path / decl.file
        try:
            value: Array | None = np.asarray(np.load(file, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"{where}: '{key}.input_data_file' {file} is not a readable .npy: {e}"
            ) from e
        assert value is not None
        if value.dtype.kind == "S" and tensor.datatype is DataType.BYTES:
            value = value.astype(object)
        elif value.dtype != tensor.datatype.numpy_dtype:
            raise ModelLoadError(
                f"{where}: '{key}.input_data_file' holds {value.dtype}, the input is "
                f"{tensor.datatype}"
            )
        if decl.dims is not None and tuple(value.shape) != decl.dims:
            raise ModelLoadError(
                f"{where}: '{key}.dims' is {list(decl.dims)} but "
                f"'{key}.input_data_file' holds shape {list(value.shape)}"
            )
        dims = tuple(value.shape)
    else:
        assert decl.dims is not None  # the parser requires dims without a file
        dims = decl.dims
        value = None
    if not _fits(dims, declared):
        raise ModelLoadError(
            f"{where}: '{key}.dims' {list(dims)} do not fit input '{tensor.name}' "
            f"{list(declared)} (-1: any size)"
        )
    if value is not None:
        return value
    if decl.data == "zero_data":
        return warm_up_inputs(Signature((TensorSpec(tensor.name, tensor.datatype, dims),), ()))[
            tensor.name
        ]
    return _random(dims, tensor, np.random.default_rng(0))


def _warmup_table(spec: ModelSpec, warmup: WarmupSpec, signature: Signature) -> Sample:
    """A ``[[warmup]]`` table as a sample for ``signature``.

    Raises:
        ModelLoadError: the table does not fit the model (naming the key).
    """
    where = spec.path / MODEL_TOML
    batched = signature.max_batch_size > 0
    if not batched and warmup.batch_size != 1:
        raise ModelLoadError(
            f"{where}: '{warmup.where}.batch_size' is {warmup.batch_size} but the model does not "
            "batch (max_batch_size 0): dims are the whole shape and batch_size must be 1"
        )
    if batched and warmup.batch_size > signature.max_batch_size:
        raise ModelLoadError(
            f"{where}: '{warmup.where}.batch_size' {warmup.batch_size} is above max_batch_size "
            f"{signature.max_batch_size}"
        )
    by_name = {t.name: t for t in signature.inputs}
    given = {i.name: i for i in warmup.inputs}
    for name in given:
        if name not in by_name:
            raise ModelLoadError(
                f"{where}: '{warmup.where}.inputs.{name}': the model has no input {name!r} "
                f"(it has: {', '.join(by_name)})"
            )
    for name in by_name:
        if name not in given:
            raise ModelLoadError(f"{where}: '{warmup.where}.inputs' lacks the input {name!r}")
    inputs: dict[str, Array] = {}
    for name, tensor in by_name.items():
        declared = tensor.shape[1:] if batched else tensor.shape
        key = f"{warmup.where}.inputs.{name}"
        value = _warmup_input(spec, key, given[name], tensor, declared)
        if batched:
            value = np.ascontiguousarray(np.broadcast_to(value, (warmup.batch_size, *value.shape)))
        inputs[name] = value
    return Sample(inputs, f"[[warmup]] {warmup.name!r}")


def _warmup_npz(path: Path, signature: Signature) -> Sample:
    """A warmup/ .npz file (one array per input, named as the input) as a sample.

    Raises:
        ModelLoadError: unreadable, pickled, or not the model's inputs.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz of one array per input")
        with loaded as npz:
            inputs = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelLoadError(f"{path}: not a readable .npz without pickles: {e}") from e
    names = [t.name for t in signature.inputs]
    extra = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if extra or missing:
        raise ModelLoadError(
            f"{path}: holds {sorted(inputs)}, the model's inputs are {names}"
            + (f" (missing {missing})" if missing else "")
        )
    for t in signature.inputs:
        if inputs[t.name].dtype.kind == "S" and t.datatype is DataType.BYTES:
            inputs[t.name] = inputs[t.name].astype(object)
    return Sample(inputs, f"{WARMUP_DIR}/{path.name}")


def warmup_samples(spec: ModelSpec, signature: Signature) -> list[tuple[Sample, int]]:
    """The operator's warm-up samples, each with how many times it runs: every .npz of the
    model's warmup/ folder (sorted, once each), then model.toml's ``[[warmup]]`` tables.
    Each is checked against ``signature`` as a request would be.

    Raises:
        ModelLoadError: a sample is unreadable or does not fit the model (named).
    """
    samples: list[tuple[Sample, int]] = []
    folder = spec.path / WARMUP_DIR
    try:
        files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    except OSError as e:
        raise ModelLoadError(f"{folder}: cannot read the folder: {e.strerror or e}") from e
    samples += [(_warmup_npz(f, signature), 1) for f in files]
    samples += [(_warmup_table(spec, w, signature), w.count) for w in spec.warmup]
    for sample, _ in samples:
        try:
            validate_request(InferRequest(spec.name, dict(sample.inputs)), signature)
        except EdgedError as e:
            raise ModelLoadError(f"model '{spec.name}': warm-up {sample.source}: {e}") from e
    return samples


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
    """Median timed run of the reference sample per kind (``auto`` placement and recovery
    trials)."""
    warm_outputs: Mapping[str, Array] = field(default_factory=dict)
    """What the chosen executor answered to ``reference``: what a recovered executor's
    answers are compared with before the model moves back to it."""
    reference: Sample | None = None
    """The first warm-up sample that ran; None when none did (the synthetic input was
    refused and the operator gave none): the first request that succeeds becomes it."""
    warmup_error: str = ""
    """Why the synthetic warm-up failed (the load went on without it)."""


@dataclass
class _Loaded:
    kind: str
    instances: list[LoadedModel]
    signature: Signature
    warm_outputs: dict[str, Array]
    timings_s: list[float]
    runs: list[tuple[Sample, int]] = field(default_factory=list)
    """The warm-up every copy gets: the reference given, then the operator's samples."""
    reference: Sample | None = None
    synthetic_error: str = ""

    def close(self) -> None:
        for instance in self.instances:
            instance.close()


def _warm(kind: str, instance: LoadedModel, sample: Sample) -> dict[str, Array]:
    try:
        return instance.infer(dict(sample.inputs))
    except EdgedError as e:
        raise ModelLoadError(f"{kind}: warm-up {sample.source} failed: {e}") from e


def _warm_up(loaded: _Loaded) -> None:
    """Run ``loaded.runs`` on every copy (each must succeed); without any, try the synthetic
    input and keep why it failed instead of failing."""
    if loaded.runs:
        for instance in loaded.instances:
            for sample, times in loaded.runs:
                for _ in range(times):
                    outputs = _warm(loaded.kind, instance, sample)
                    if loaded.reference is None:
                        loaded.reference, loaded.warm_outputs = sample, outputs
        return
    synthetic = Sample(warm_up_inputs(loaded.signature), "synthetic zeros")
    try:
        for i, instance in enumerate(loaded.instances):
            outputs = instance.infer(dict(synthetic.inputs))
            if i == 0:
                loaded.warm_outputs = outputs
    except EdgedError as e:
        loaded.synthetic_error = str(e)
        loaded.warm_outputs = {}
        return
    loaded.reference = synthetic
    loaded.runs = [(synthetic, 1)]


def _load_on(
    kind: str,
    spec: ModelSpec,
    artifact: ModelArtifact,
    options: ExecutorOptions,
    count: int,
    default_max_batch_size: int,
    timed_runs: int,
    max_run_s: float = 0.0,
    reference: Sample | None = None,
) -> _Loaded:
    """``count`` copies on ``kind`` (fewer if the executor holds fewer), each warmed up,
    then ``timed_runs`` timed runs of the reference sample on the first, each within
    ``max_run_s`` (0: no limit). Closes what it loaded if anything fails.

    Warm-up: ``reference`` (a sample the version already ran) and the operator's samples
    (warmup/ and [[warmup]]) must all succeed. Without any, the synthetic input is tried;
    if the model refuses it, the copies load anyway (``synthetic_error`` says why) and the
    first request that succeeds becomes the reference.

    Raises:
        EdgedError: the executor refused the model, failed on a warm-up sample, or a timed
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
        loaded.runs = warmup_samples(spec, loaded.signature)
        if reference is not None:
            loaded.runs.insert(0, (reference, 1))
        _warm_up(loaded)
        for _ in range(timed_runs if loaded.reference is not None else 0):
            assert loaded.reference is not None
            started = time.perf_counter()
            loaded.instances[0].infer(dict(loaded.reference.inputs))
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
    added: list[LoadedModel] = []
    try:
        while len(loaded.instances) + len(added) < want:
            added.append(executor.load(artifact, options))
            for sample, times in loaded.runs:
                for _ in range(times):
                    _warm(loaded.kind, added[-1], sample)
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

    def refuse(self, kind: str, error: EdgedError | str) -> None:
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
    """The first of ``kinds`` that loads ``count`` warmed copies. One that loads but fails
    the synthetic warm-up is kept only if no later kind runs it (then the model refuses
    the input, not the executor); else it is refused with that error."""
    provisional: _Loaded | None = None
    for kind in kinds:
        try:
            loaded = load(kind, count)
        except EdgedError as e:
            attempts.refuse(kind, e)
            continue
        if loaded.synthetic_error and provisional is None:
            provisional = loaded
            continue
        if loaded.synthetic_error:
            loaded.close()
            continue
        if provisional is not None:
            provisional.close()
            attempts.refuse(
                provisional.kind,
                f"{provisional.kind}: failed the warm-up that {kind} ran: "
                f"{provisional.synthetic_error}",
            )
        if loaded.timings_s:
            attempts.timings_s[kind] = median(loaded.timings_s)
        return loaded
    return provisional


def _place_auto(
    kinds: Sequence[str],
    load: Callable[[str, int], _Loaded],
    grow: Callable[[_Loaded], None],
    attempts: _Attempts,
) -> tuple[_Loaded | None, tuple[str, ...]]:
    """One timed copy on every one of ``kinds``; the fastest (median) that can grow to the
    full instance count wins, the others are closed. Returns it and the kinds ranked.
    Kinds that failed a synthetic warm-up others ran are refused; when every kind failed it
    (nothing timed), the preference order stands."""
    timed: dict[str, _Loaded] = {}
    for kind in kinds:
        try:
            timed[kind] = load(kind, 1)
        except EdgedError as e:
            attempts.refuse(kind, e)
    if any(not t.synthetic_error for t in timed.values()):
        for kind in [k for k, t in timed.items() if t.synthetic_error]:
            attempts.refuse(
                kind,
                f"{kind}: failed the synthetic warm-up others ran: {timed[kind].synthetic_error}",
            )
            timed.pop(kind).close()
    attempts.timings_s.update({k: median(v.timings_s) for k, v in timed.items() if v.timings_s})
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
    reference: Sample | None = None,
) -> ModelVersion:
    """Load ``version`` of ``spec`` on one of ``candidates`` (default: its preference list),
    one copy per instance, and warm every copy up. Blocking: call from a worker thread.

    ``placement`` (default: model.toml's): "first" takes the first candidate that loads and
    warms up; "auto" loads one copy on every candidate, times ``AUTO_TIMED_RUNS`` warm-up
    runs on each, keeps the fastest (median), and closes the others. ``trial_runs`` times
    that many more runs on the chosen copy; with ``max_run_s``, a run slower than that
    refuses the executor (a recovery trial: a device that still hangs must not get the model
    back). ``inference_timeout_s`` bounds each batch once serving. ``reference`` (a
    sample the version already ran: failover, recovery) runs first on every copy, is timed,
    and must succeed; see ``_load_on`` for the warm-up.

    Instances: model.toml's ``instances``, else ``instances_default``, else
    ``default_instances(cores)``; each copy gets cores / instances runtime threads, so that
    together they do not oversubscribe the cores.

    Raises:
        ModelLoadError: no candidate could load it, or the warm-up failed.
    """
    artifact = ModelArtifact(spec.path / str(version) / spec.artifact_name, spec.format)
    cores = cores or available_cores()
    count = spec.instances or instances_default or default_instances(cores)
    options = ExecutorOptions(
        intra_op_threads=threads_default or max(1, cores // count), remote=spec.remote
    )
    # (an executor with max_instances loads fewer copies; the threads stay as sized)
    kinds = tuple(dict.fromkeys(spec.executor_preference if candidates is None else candidates))
    attempts = _Attempts(spec, version)
    auto = (placement or spec.placement) == "auto" and len(kinds) > 1

    def load(kind: str, copies: int) -> _Loaded:
        runs = AUTO_TIMED_RUNS if auto else trial_runs
        return _load_on(
            kind,
            spec,
            artifact,
            options,
            copies,
            default_max_batch_size,
            runs,
            max_run_s,
            reference,
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
                "; ".join(
                    v if v.startswith(f"{k}: ") else f"{k}: {v}"
                    for k, v in attempts.refused.items()
                )
                or "no candidate executor"
            )
        )
    try:
        batching, queueing = policies(spec, chosen.signature)
    except ModelLoadError:
        chosen.close()
        raise
    if chosen.synthetic_error:
        log.warning(
            "warm_up_skipped",
            model=spec.name,
            version=version,
            executor=chosen.kind,
            error=chosen.synthetic_error,
            detail="the model refused the synthetic warm-up input; it serves anyway, and the "
            "first request that succeeds becomes its reference sample (give warm-up data in "
            f"{WARMUP_DIR}/ or [[warmup]] to warm it up)",
        )
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
            reference=chosen.reference,
            warmup_error=chosen.synthetic_error,
        ),
        stats=stats,
        inference_timeout_s=inference_timeout_s,
    )
