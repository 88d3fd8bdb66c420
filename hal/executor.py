"""The HAL contract: an Executor loads an artifact into a LoadedModel that runs inference.

The public methods enforce the contract and wrap failures in edged's own errors; subclasses
implement only the underscored hooks (``_load``, ``_infer``, ``_close``).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edged.core.errors import ExecutorError, InvalidInputError, ModelLoadError
from edged.core.types import Array, Signature
from hal.remote_target import RemoteTarget
from hal.report import DeviceReport


@dataclass(frozen=True)
class ModelArtifact:
    """A model file (or bundle folder) on disk and its format."""

    path: Path
    format: str
    """"onnx", "tflite", "edgetpu-tflite" or "pynq-bundle"."""


@dataclass(frozen=True)
class ExecutorOptions:
    """How to run a model; every field has a bounded default."""

    intra_op_threads: int = 1
    """Threads one inference may use inside the runtime; the daemon sizes this so that
    instances x threads does not oversubscribe the cores."""

    inter_op_threads: int = 1
    """Threads that run independent graph nodes in parallel; 1 on a small gateway."""

    device: str = ""
    """Which device of the executor's kind to use; "" takes the first one. Edge TPU: "usb",
    "usb:0", "pci:0" (libedgetpu's ``device`` option); CUDA: the ordinal, "0" or "cuda:1"."""

    delegate_library: str = ""
    """Shared library of an external LiteRT delegate for executors that load one; "" takes
    the executor's default (the Edge TPU's ``libedgetpu.so.1``)."""

    remote: RemoteTarget | None = None
    """model.toml's ``[remote]`` table: where the ``remote`` executor sends the model (other
    executors ignore it); None when the model has none."""


class LoadedModel(abc.ABC):
    """A model ready to run on one executor.

    ``signature`` is what the artifact itself declares (``max_batch_size`` 0: batching is the
    serving layer's decision). ``infer`` is called by one thread at a time per instance; the
    daemon owns the threads.
    """

    signature: Signature
    kind: str

    def __init__(self, signature: Signature, kind: str) -> None:
        self.signature = signature
        self.kind = kind
        self._closed = False
        self._lock = threading.Lock()

    def infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run the model on ``inputs`` (every declared input, already validated).

        Raises:
            InvalidInputError: an input is missing (a caller bug: frontends validate first).
            ExecutorError: the runtime failed; the cause is chained.
        """
        if self._closed:
            raise ExecutorError(f"{self.kind}: model is closed")
        missing = [t.name for t in self.signature.inputs if t.name not in inputs]
        if missing:
            raise InvalidInputError(f"missing input tensor(s): {', '.join(missing)}")
        try:
            return self._infer(inputs)
        except (InvalidInputError, ExecutorError):
            raise
        except Exception as e:
            raise ExecutorError(f"{self.kind}: inference failed: {e}") from e

    def close(self) -> None:
        """Release the runtime's resources; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    @abc.abstractmethod
    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]: ...

    def _close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release runtime resources."""


class Executor(abc.ABC):
    """A kind of device runtime. ``load`` checks the format and wraps every failure.

    A vendor adds a kind by registering its subclass under the ``edged.executors``
    entry-point group, and says whether its device is present by overriding :meth:`probe`.
    """

    kind: ClassVar[str]
    formats: ClassVar[frozenset[str]]
    max_instances: ClassVar[int | None] = None
    """Copies of one model the device can hold at once (None: no limit); the daemon loads
    no more than this whatever model.toml asks."""

    @classmethod
    def probe(cls) -> DeviceReport:
        """Whether this kind's device and runtime are present here, what it runs, and why not.

        ``hal.probe()`` calls this, on a thread with a deadline, for executor kinds it has
        no built-in check for (those registered by other packages); placement only tries
        kinds reported present and able to run the model's format. It must not raise or
        load models; a check that may hang is cut off by the probe's deadline. The default
        reports the kind present with ``formats``: an executor without a check is tried,
        and its ``load`` refuses what it cannot run.
        """
        return DeviceReport(
            kind=cls.kind,
            present=True,
            details={"probe": "none declared (assumed present)"},
            formats=tuple(sorted(cls.formats)),
        )

    def load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        """Load ``artifact`` ready to infer.

        Raises:
            ModelLoadError: wrong format, unreadable file, or the runtime refused the model.
        """
        if artifact.format not in self.formats:
            raise ModelLoadError(
                f"{self.kind} cannot run format '{artifact.format}' "
                f"(it runs: {', '.join(sorted(self.formats))})"
            )
        if not artifact.path.exists():
            raise ModelLoadError(f"{self.kind}: artifact {artifact.path} does not exist")
        try:
            return self._load(artifact, options)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{self.kind}: cannot load {artifact.path}: {e}") from e

    @abc.abstractmethod
    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel: ...
