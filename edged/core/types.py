"""Domain types: datatypes, tensor specs, signatures, requests and responses.

Tensors are numpy arrays throughout. BYTES tensors are numpy object arrays whose elements are
``bytes`` (the representation tritonclient uses), never ``str``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

LEARN_STRATEGIES: tuple[str, ...] = (
    "naive",
    "ewc",
    "lwf",
    "replay",
    "streaming-lda",
    "replay+lwf",
    "replay+ewc",
)
"""The continual-learning strategies, by the names that model.toml's ``[learn] strategy``,
the management API's StartFineTune and ``edged learn start --strategy`` take; the one list
(``edged.learn.strategies`` implements each, docs/learning.md describes them)."""


class DataType(enum.StrEnum):
    """The KServe v2 tensor datatypes."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype that holds this datatype (``object`` for BYTES)."""
        return _NUMPY_BY_DATATYPE[self]

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for BYTES, whose elements vary in length."""
        return 0 if self is DataType.BYTES else self.numpy_dtype.itemsize

    @classmethod
    def from_numpy(cls, dtype: npt.DTypeLike) -> DataType:
        """The datatype of a numpy dtype; object, bytes and str arrays are BYTES.

        Raises:
            ValueError: numpy dtype has no KServe datatype (complex, datetime, ...).
        """
        dt = np.dtype(dtype)
        if dt.kind in "OSU":
            return cls.BYTES
        if dt.byteorder not in ("=", "|"):
            dt = dt.newbyteorder("=")  # a big-endian array is still that datatype
        for datatype, candidate in _NUMPY_BY_DATATYPE.items():
            if candidate == dt:
                return datatype
        raise ValueError(f"numpy dtype {dt} has no KServe datatype")


_NUMPY_BY_DATATYPE: dict[DataType, np.dtype[Any]] = {
    DataType.BOOL: np.dtype(np.bool_),
    DataType.UINT8: np.dtype(np.uint8),
    DataType.UINT16: np.dtype(np.uint16),
    DataType.UINT32: np.dtype(np.uint32),
    DataType.UINT64: np.dtype(np.uint64),
    DataType.INT8: np.dtype(np.int8),
    DataType.INT16: np.dtype(np.int16),
    DataType.INT32: np.dtype(np.int32),
    DataType.INT64: np.dtype(np.int64),
    DataType.FP16: np.dtype(np.float16),
    DataType.FP32: np.dtype(np.float32),
    DataType.FP64: np.dtype(np.float64),
    DataType.BYTES: np.dtype(object),
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model as the model itself sees it.

    ``shape`` is the full shape the executor takes, batch axis included; -1 marks a dynamic
    axis. A rank-0 (scalar) tensor has ``shape == ()``.
    """

    name: str
    datatype: DataType
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """What a model takes and returns.

    When ``max_batch_size > 0`` axis 0 of every input and output is the batch axis (dynamic,
    at most ``max_batch_size``); when it is 0 the model cannot batch and requests carry the
    model's full shapes.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0

    def input(self, name: str) -> TensorSpec | None:
        """The input called ``name``, or None."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output called ``name``, or None."""
        return next((t for t in self.outputs if t.name == name), None)

    def client_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """The shape a client sees in metadata: the batch axis reported as -1."""
        if self.max_batch_size > 0 and spec.shape:
            return (-1, *spec.shape[1:])
        return spec.shape

    def config_dims(self, spec: TensorSpec) -> tuple[int, ...]:
        """The dims Triton's ModelConfig reports: the shape without the batch axis."""
        if self.max_batch_size > 0:
            return spec.shape[1:]
        return spec.shape


@dataclass
class InferRequest:
    """One inference request after the frontend decoded it."""

    model_name: str
    inputs: dict[str, Array]
    model_version: str = ""
    id: str = ""
    requested_outputs: tuple[str, ...] = ()
    parameters: Mapping[str, object] = field(default_factory=dict)


@dataclass
class InferResponse:
    """The answer to one request; ``outputs`` keeps the order the model declares."""

    model_name: str
    model_version: str
    outputs: dict[str, Array]
    id: str = ""
