"""A loaded model version: its instances, the threads that run them, its statistics."""

from __future__ import annotations

import asyncio
import os
import time

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
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = version
        self.signature = signature
        self.kind = instances[0].kind
        self.instances = len(instances)
        self.batching = batching
        self.queueing = queueing
        self.stats = ModelStats()
        self.in_flight = 0
        self._instances = instances
        self.scheduler = Scheduler(
            f"{spec.name}/{version}", instances, batching, queueing, self.stats.record_execution
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
        """Stop the scheduler (failing anything still queued), then close every instance."""
        await self.scheduler.stop()
        for instance in self._instances:
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


def load_model_version(
    spec: ModelSpec,
    version: int,
    default_max_batch_size: int,
    instances_default: int = 0,
    cores: int | None = None,
    threads_default: int = 0,
) -> ModelVersion:
    """Load ``version`` of ``spec`` on the first executor in its preference list that takes
    it, one copy per instance, and warm every copy up. Blocking: call from a worker thread.

    Instances: model.toml's ``instances``, else ``instances_default``, else
    ``default_instances(cores)``; each copy gets cores / instances runtime threads, so that
    together they do not oversubscribe the cores.

    Raises:
        ModelLoadError: no executor could load it, or the warm-up failed.
    """
    artifact = ModelArtifact(spec.path / str(version) / spec.artifact_name, spec.format)
    cores = cores or available_cores()
    count = spec.instances or instances_default or default_instances(cores)
    options = ExecutorOptions(intra_op_threads=threads_default or max(1, cores // count))
    # (an executor with max_instances loads fewer copies; the threads stay as sized)
    errors: list[str] = []
    for kind in spec.executor_preference:
        instances: list[LoadedModel] = []
        try:
            executor = get_executor(kind)
            for _ in range(min(count, executor.max_instances or count)):
                instances.append(executor.load(artifact, options))
            signature = resolve_signature(instances[0].signature, spec, default_max_batch_size)
            batching, queueing = policies(spec, signature)
            warm = warm_up_inputs(signature)
            for instance in instances:
                instance.infer(warm)
        except EdgedError as e:
            for instance in instances:
                instance.close()
            errors.append(f"{kind}: {e}")
            log.warning(
                "executor_refused", model=spec.name, version=version, executor=kind, error=str(e)
            )
            continue
        log.info(
            "model_version_loaded",
            model=spec.name,
            version=version,
            executor=kind,
            instances=len(instances),
            threads_per_instance=options.intra_op_threads,
            max_batch_size=signature.max_batch_size,
            dynamic_batching=batching.max_batch_size > 0,
        )
        return ModelVersion(spec, version, signature, instances, batching, queueing)
    raise ModelLoadError(
        f"model '{spec.name}' version {version}: no executor could load it: " + "; ".join(errors)
    )
