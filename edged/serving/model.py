"""A loaded model version: its instances, the threads that run them, its statistics."""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog

from edged.core.errors import EdgedError, ModelLoadError
from edged.core.types import Array, DataType, InferRequest, InferResponse, Signature
from edged.serving.repository import ModelSpec, resolve_signature
from edged.serving.stats import ModelStats
from edged.serving.validate import validate_request
from hal import ExecutorOptions, LoadedModel, ModelArtifact, get_executor

log = structlog.get_logger("edged.serving")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class _Timings:
    input_ns: int
    infer_ns: int
    output_ns: int


class ModelVersion:
    """One version of one model, ready to serve: ``instances`` copies of the loaded model,
    each run by its own worker thread, so the event loop never runs inference."""

    def __init__(
        self, spec: ModelSpec, version: int, signature: Signature, instances: list[LoadedModel]
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = version
        self.signature = signature
        self.kind = instances[0].kind
        self.stats = ModelStats()
        self.in_flight = 0
        self._instances = instances
        self._pool = ThreadPoolExecutor(
            max_workers=len(instances), thread_name_prefix=f"edged-{spec.name}-{version}"
        )
        self._free: asyncio.Queue[LoadedModel] = asyncio.Queue()
        for instance in instances:
            self._free.put_nowait(instance)
        self._idle = asyncio.Event()
        self._idle.set()

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate ``request``, run it on a free instance, and answer.

        Raises:
            InvalidInputError: the request does not fit the signature.
            ExecutorError: the executor failed.
        """
        start = time.monotonic_ns()
        self.in_flight += 1
        self._idle.clear()
        try:
            batch_size = validate_request(request, self.signature)
            instance = await self._free.get()
            dequeued = time.monotonic_ns()
            try:
                loop = asyncio.get_running_loop()
                ctx = contextvars.copy_context()
                outputs, timings = await loop.run_in_executor(
                    self._pool, ctx.run, self._run, instance, request
                )
            finally:
                self._free.put_nowait(instance)
            self.stats.record_success(
                batch_size,
                time.monotonic_ns() - start,
                dequeued - start,
                timings.input_ns,
                timings.infer_ns,
                timings.output_ns,
            )
        except EdgedError:
            self.stats.record_failure(time.monotonic_ns() - start)
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        return InferResponse(self.name, str(self.version), outputs, request.id)

    def _run(
        self, instance: LoadedModel, request: InferRequest
    ) -> tuple[dict[str, Array], _Timings]:
        t0 = time.monotonic_ns()
        inputs = request.inputs
        t1 = time.monotonic_ns()
        results = instance.infer(inputs)
        t2 = time.monotonic_ns()
        wanted = request.requested_outputs or tuple(t.name for t in self.signature.outputs)
        outputs = {name: results[name] for name in wanted}
        t3 = time.monotonic_ns()
        return outputs, _Timings(t1 - t0, t2 - t1, t3 - t2)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is running here; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Close every instance and stop the worker threads (blocks until they finish)."""
        self._pool.shutdown(wait=True)
        for instance in self._instances:
            instance.close()


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


def load_model_version(
    spec: ModelSpec, version: int, default_max_batch_size: int, cores: int | None = None
) -> ModelVersion:
    """Load ``version`` of ``spec`` on the first executor in its preference list that takes
    it, one copy per instance, and warm every copy up. Blocking: call from a worker thread.

    Raises:
        ModelLoadError: no executor could load it, or the warm-up failed.
    """
    artifact = ModelArtifact(spec.path / str(version) / spec.artifact_name, spec.format)
    cores = cores or available_cores()
    options = ExecutorOptions(intra_op_threads=max(1, cores // spec.instances))
    errors: list[str] = []
    for kind in spec.executor_preference:
        instances: list[LoadedModel] = []
        try:
            executor = get_executor(kind)
            for _ in range(spec.instances):
                instances.append(executor.load(artifact, options))
            signature = resolve_signature(instances[0].signature, spec, default_max_batch_size)
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
            max_batch_size=signature.max_batch_size,
        )
        return ModelVersion(spec, version, signature, instances)
    raise ModelLoadError(
        f"model '{spec.name}' version {version}: no executor could load it: " + "; ".join(errors)
    )
