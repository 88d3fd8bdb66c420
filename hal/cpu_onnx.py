"""cpu-onnx: ONNX Runtime on the CPU, set up for a small gateway."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from edged.core.errors import InvalidInputError, ModelLoadError
from edged.core.types import Array, DataType, Signature, TensorSpec
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact

_DATATYPE_BY_ORT_TYPE: dict[str, DataType] = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
    "tensor(string)": DataType.BYTES,
}


def _spec(arg: Any, where: str) -> TensorSpec:
    datatype = _DATATYPE_BY_ORT_TYPE.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"{where} '{arg.name}' has type {arg.type}, which KServe cannot carry")
    # ONNX Runtime reports a symbolic or unknown axis as a str or None: both are dynamic.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def signature_of(session: ort.InferenceSession) -> Signature:
    """The signature an ONNX Runtime session declares (``max_batch_size`` 0)."""
    return Signature(
        inputs=tuple(_spec(a, "input") for a in session.get_inputs()),
        outputs=tuple(_spec(a, "output") for a in session.get_outputs()),
    )


def session_options(options: ExecutorOptions) -> ort.SessionOptions:
    """Session options for a gateway: bounded threads, no spinning when idle, full graph
    optimisation, quiet logs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, options.intra_op_threads)
    so.inter_op_num_threads = max(1, options.inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # FATAL only: a failing run raises, and edged logs it as a structured event; ORT's own
    # ERROR line per failed run would be a second, unstructured copy on stderr
    so.log_severity_level = 4
    return so


class OnnxCpuModel(LoadedModel):
    """One ONNX Runtime session."""

    def __init__(self, session: ort.InferenceSession) -> None:
        super().__init__(signature_of(session), OnnxCpuExecutor.kind)
        self._session = session
        self._string_inputs = {
            t.name for t in self.signature.inputs if t.datatype is DataType.BYTES
        }
        self._output_names = [t.name for t in self.signature.outputs]

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        feed: dict[str, Array] = {}
        for spec in self.signature.inputs:
            value = inputs[spec.name]
            if spec.name in self._string_inputs:
                value = _to_str_array(spec.name, value)
            feed[spec.name] = value
        results = self._session.run(self._output_names, feed)
        outputs: dict[str, Array] = {}
        for name, value in zip(self._output_names, results, strict=True):
            array = np.asarray(value)
            if array.dtype.kind in "OU":
                array = _to_bytes_array(array)
            outputs[name] = array
        return outputs

    def _close(self) -> None:
        del self._session


def _to_str_array(name: str, value: Array) -> Array:
    """ONNX Runtime takes string tensors as str; BYTES elements arrive as bytes."""
    out = np.empty(value.shape, dtype=object)
    flat_in = value.reshape(-1)
    flat_out = out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, bytes | bytearray):
            try:
                flat_out[i] = bytes(item).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInputError(
                    f"tensor '{name}': element {i} is not UTF-8, which this ONNX string input needs"
                ) from e
        else:
            flat_out[i] = str(item)
    return out


def _to_bytes_array(value: Array) -> Array:
    out = np.empty(value.shape, dtype=object)
    out.reshape(-1)[:] = [
        v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value.reshape(-1)
    ]
    return out


class OnnxCpuExecutor(Executor):
    """ONNX Runtime's CPU execution provider."""

    kind: ClassVar[str] = "cpu-onnx"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        session = ort.InferenceSession(
            str(artifact.path),
            sess_options=session_options(options),
            providers=["CPUExecutionProvider"],
        )
        return OnnxCpuModel(session)
