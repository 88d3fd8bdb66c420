"""cuda: ONNX Runtime on an NVIDIA GPU (TensorRT, then CUDA execution provider).

Needs onnxruntime-gpu in place of onnxruntime (``pip uninstall -y onnxruntime`` first: both
wheels install the same ``onnxruntime`` module), pycuda, and an NVIDIA driver. Without
a usable GPU the executor refuses to load with the probe's reason, so the daemon falls back to
the next executor in the model's list and never routes a request here.

Data path of one inference: the caller's (pageable) arrays are copied into page-locked host
buffers, then to device buffers with ``cuMemcpyHtoDAsync`` on this model's stream; ONNX Runtime
reads them in place through IOBinding and writes outputs to device memory it allocates; those
are copied back through page-locked buffers on the same stream. Buffers are kept and grown, so
a steady batch size allocates nothing. After the session is created, the providers it
actually uses are checked: ONNX Runtime silently falls back to the CPU when the CUDA provider
cannot start (wrong CUDA or cuDNN version), and a model placed on ``cuda`` that runs on the
CPU is a load failure, not a slow success.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from edged.core.errors import ExecutorError, ModelLoadError
from edged.core.types import Array, DataType
from hal.cpu_onnx import (
    _DATATYPE_BY_ORT_TYPE,
    _to_bytes_array,
    _to_str_array,
    session_options,
    signature_of,
)
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.probe import HostPaths, probe_cuda
from hal.report import DeviceReport

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

Provider = str | tuple[str, dict[str, Any]]


def parse_device(device: str) -> int:
    """The CUDA ordinal ``ExecutorOptions.device`` names: "" (0), "1", "cuda:1".

    Raises:
        ModelLoadError: it is not one of those forms.
    """
    text = device.strip().removeprefix("cuda").removeprefix(":")
    if text == "":
        return 0
    if text.isdigit():
        return int(text)
    raise ModelLoadError(f'cuda: device {device!r} is not a CUDA ordinal ("0", "cuda:1")')


def gpu_providers(available: Sequence[str], device_id: int) -> list[Provider]:
    """The providers to ask ONNX Runtime for, best first: TensorRT and CUDA where this
    onnxruntime build has them, then the CPU for any node neither takes."""
    providers: list[Provider] = []
    if TENSORRT in available:
        providers.append((TENSORRT, {"device_id": device_id, "trt_fp16_enable": False}))
    if CUDA in available:
        providers.append(
            (
                CUDA,
                {
                    "device_id": device_id,
                    "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": "HEURISTIC",
                },
            )
        )
    if not providers:
        raise ModelLoadError(
            f"cuda: this onnxruntime has neither {TENSORRT} nor {CUDA} (it has "
            f"{', '.join(available)}): install onnxruntime-gpu"
        )
    providers.append(CPU)
    return providers


def require_gpu_provider(session: Any, requested: Sequence[Provider]) -> str:
    """The GPU provider ``session`` really runs on.

    Raises:
        ModelLoadError: ONNX Runtime fell back to the CPU (the CUDA provider did not start).
    """
    in_use = list(session.get_providers())
    for name in in_use:
        if name in GPU_PROVIDERS:
            return str(name)
    wanted = [p if isinstance(p, str) else p[0] for p in requested]
    raise ModelLoadError(
        f"cuda: ONNX Runtime runs this model on {', '.join(in_use) or 'nothing'}, not the GPU "
        f"(asked for {', '.join(wanted)}): the CUDA provider failed to start; check that the "
        f"CUDA and cuDNN versions match this onnxruntime-gpu"
    )


_NUMPY_BY_ORT_TYPE = {k: v.numpy_dtype for k, v in _DATATYPE_BY_ORT_TYPE.items()}


class _PinnedPool:
    """Page-locked host buffers and device buffers per tensor, grown on demand."""

    def __init__(self, cuda: Any) -> None:
        self._cuda = cuda
        self._host: dict[str, Any] = {}
        self._device: dict[str, Any] = {}
        self._device_size: dict[str, int] = {}

    def host(self, key: str, nbytes: int) -> Any:
        buf = self._host.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._cuda.pagelocked_empty(max(nbytes, 256), np.uint8)
            self._host[key] = buf
        return buf[:nbytes]

    def device(self, key: str, nbytes: int) -> Any:
        if self._device_size.get(key, -1) < nbytes:
            old = self._device.pop(key, None)
            if old is not None:
                old.free()
            self._device[key] = self._cuda.mem_alloc(max(nbytes, 256))
            self._device_size[key] = max(nbytes, 256)
        return self._device[key]

    def free(self) -> None:
        for allocation in self._device.values():
            allocation.free()
        self._device.clear()
        self._host.clear()


class CudaModel(LoadedModel):
    """One ONNX Runtime session on one GPU, with its stream and buffers."""

    def __init__(
        self,
        session: Any,
        cuda: Any,
        context: Any,
        device_id: int,
        provider: str,
        memory: tuple[int, int],
    ) -> None:
        super().__init__(signature_of(session), CudaExecutor.kind)
        self.provider = provider
        """The GPU provider in use (TensorRT or CUDA)."""
        self.memory = memory
        """(free, total) bytes of device memory after the session was created."""
        self._session = session
        self._cuda = cuda
        self._context = context
        self._device_id = device_id
        context.push()
        try:
            self._stream = cuda.Stream()
        finally:
            cuda.Context.pop()
        self._buffers = _PinnedPool(cuda)
        self._run_lock = threading.Lock()

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        with self._run_lock:
            self._context.push()
            try:
                return self._run(inputs)
            finally:
                self._cuda.Context.pop()

    def _run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        cuda, stream, pool = self._cuda, self._stream, self._buffers
        binding = self._session.io_binding()
        for spec in self.signature.inputs:
            value = inputs[spec.name]
            if spec.datatype is DataType.BYTES:  # strings never leave the host
                binding.bind_cpu_input(spec.name, _to_str_array(spec.name, value))
                continue
            array = np.ascontiguousarray(value)
            staged = pool.host("in:" + spec.name, array.nbytes)
            np.copyto(staged.view(array.dtype).reshape(array.shape), array)
            device = pool.device("in:" + spec.name, array.nbytes)
            if array.nbytes:
                cuda.memcpy_htod_async(device, staged, stream)
            binding.bind_input(
                spec.name, "cuda", self._device_id, array.dtype, list(array.shape), int(device)
            )
        stream.synchronize()  # inputs are on the device before ONNX Runtime's stream reads them
        for spec in self.signature.outputs:
            if spec.datatype is DataType.BYTES:
                binding.bind_output(spec.name)
            else:
                binding.bind_output(spec.name, "cuda", self._device_id)
        self._session.run_with_iobinding(binding)  # returns once the GPU work is done
        staged_outputs: list[tuple[str, Any, tuple[int, ...], np.dtype[Any]]] = []
        results: dict[str, Array] = {}
        for spec, value in zip(self.signature.outputs, binding.get_outputs(), strict=True):
            if spec.datatype is DataType.BYTES:
                results[spec.name] = _to_bytes_array(np.asarray(value.numpy()))
                continue
            dtype = _NUMPY_BY_ORT_TYPE.get(value.data_type())
            if dtype is None:
                raise ExecutorError(f"cuda: output '{spec.name}' has type {value.data_type()}")
            shape = tuple(int(d) for d in value.shape())
            nbytes = math.prod(shape) * dtype.itemsize
            staged = pool.host("out:" + spec.name, nbytes)
            if nbytes:
                cuda.memcpy_dtoh_async(staged, int(value.data_ptr()), stream)
            staged_outputs.append((spec.name, staged, shape, dtype))
        stream.synchronize()
        for name, staged, shape, dtype in staged_outputs:
            # Copy out of the reused page-locked buffer.
            results[name] = np.array(staged.view(dtype).reshape(shape))
        return {spec.name: results[spec.name] for spec in self.signature.outputs}

    def _close(self) -> None:
        with self._run_lock:
            self._context.push()
            try:
                del self._session
                self._buffers.free()
            finally:
                self._cuda.Context.pop()
                self._context.detach()


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelLoadError(f"cuda: {module} does not import: {e}") from e


class CudaExecutor(Executor):
    """ONNX Runtime with TensorRT/CUDA on the GPU ``ExecutorOptions.device`` names."""

    kind: ClassVar[str] = "cuda"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def __init__(self, prober: Callable[[], DeviceReport] | None = None) -> None:
        self._prober = prober or (lambda: probe_cuda(HostPaths()))

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        report = self._prober()
        if not report.present:
            raise ModelLoadError(f"cuda: no usable GPU: {report.reason}")
        device_id = parse_device(options.device)
        cuda = _import("pycuda.driver")
        cuda.init()
        if device_id >= cuda.Device.count():
            raise ModelLoadError(
                f"cuda: device {device_id} does not exist ({cuda.Device.count()} present)"
            )
        context = cuda.Device(device_id).retain_primary_context()
        context.push()
        try:
            requested = gpu_providers(ort.get_available_providers(), device_id)
            session = ort.InferenceSession(
                str(artifact.path), sess_options=session_options(options), providers=requested
            )
            provider = require_gpu_provider(session, requested)
            free, total = cuda.mem_get_info()
        except BaseException:
            cuda.Context.pop()
            context.detach()
            raise
        cuda.Context.pop()
        return CudaModel(session, cuda, context, device_id, provider, (int(free), int(total)))
