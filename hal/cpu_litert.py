"""cpu-litert: LiteRT (TensorFlow Lite) on the CPU, with the XNNPACK delegate.

The runtime is ``ai_edge_litert`` (``pip install ai-edge-litert``, a dependency of edged); the older
``tflite_runtime`` wheel is used when it is what is installed and can work. Everything that
touches the runtime is imported when a model loads, so edged starts without it.

One interpreter per LoadedModel; ``infer`` is called by one thread at a time (the daemon's
instance thread), and a lock makes ``close`` wait for a running inference.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edged.core.errors import ExecutorError, InvalidInputError, ModelLoadError
from edged.core.types import Array, DataType, Signature, TensorSpec
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.tflite_format import EDGETPU_CUSTOM_OP, NotTfliteError, custom_ops, is_edgetpu_model

AI_EDGE_LITERT = "ai-edge-litert"
TFLITE_RUNTIME = "tflite-runtime"
_MODULES = {
    AI_EDGE_LITERT: "ai_edge_litert.interpreter",
    TFLITE_RUNTIME: "tflite_runtime.interpreter",
}
INSTALL_HINT = "pip install ai-edge-litert"


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _minor(version: str) -> tuple[int, int]:
    parts = [*version.split("."), "0"]
    return _major(parts[0]), int(parts[1]) if parts[1].isdigit() else 0


def choose_runtime(installed: Mapping[str, str], numpy_version: str) -> tuple[str | None, str]:
    """Which LiteRT package to use, given the installed distributions and their versions.

    Returns ``(package, "")``, or ``(None, reason)`` when none can work. Pure: no imports.
    tflite-runtime stopped at 2.14, built against NumPy 1.x, and fails to import under
    NumPy 2 ("module compiled using NumPy 1.x cannot be run in NumPy 2").
    """
    if AI_EDGE_LITERT in installed:
        return AI_EDGE_LITERT, ""
    tflite_version = installed.get(TFLITE_RUNTIME)
    if tflite_version is None:
        return None, f"no LiteRT runtime: {AI_EDGE_LITERT} is not installed ({INSTALL_HINT})"
    if _minor(tflite_version) < (2, 15) and _major(numpy_version) >= 2:
        return None, (
            f"{TFLITE_RUNTIME} {tflite_version} was built for NumPy 1.x and breaks under "
            f"NumPy {numpy_version}; install {AI_EDGE_LITERT} instead ({INSTALL_HINT})"
        )
    return TFLITE_RUNTIME, ""


def installed_runtimes() -> dict[str, str]:
    """The LiteRT distributions installed, with their versions."""
    found = {}
    for name in (AI_EDGE_LITERT, TFLITE_RUNTIME):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class LiteRtRuntime:
    """The LiteRT Python API in use: ``Interpreter`` and ``load_delegate``."""

    package: str
    version: str
    interpreter: Any
    """The Interpreter class."""
    load_delegate: Callable[..., Any]
    builtin_resolver: Any
    """OpResolverType.BUILTIN: the built-in kernels *with* the default XNNPACK delegate (never
    BUILTIN_WITHOUT_DEFAULT_DELEGATES)."""


_runtime_lock = threading.Lock()
_runtime: LiteRtRuntime | None = None


def load_runtime() -> LiteRtRuntime:
    """Import the LiteRT runtime (once).

    Raises:
        ModelLoadError: no usable runtime is installed; the message names what to install.
    """
    global _runtime  # noqa: PLW0603 - one import per process, like the module system's own cache
    with _runtime_lock:
        if _runtime is not None:
            return _runtime
        installed = installed_runtimes()
        package, reason = choose_runtime(installed, np.__version__)
        if package is None:
            raise ModelLoadError(reason)
        try:
            module = importlib.import_module(_MODULES[package])
        except Exception as e:
            raise ModelLoadError(
                f"{package} {installed[package]} is installed but does not import: {e}"
            ) from e
        _runtime = LiteRtRuntime(
            package=package,
            version=installed[package],
            interpreter=module.Interpreter,
            load_delegate=module.load_delegate,
            builtin_resolver=module.OpResolverType.BUILTIN,
        )
        return _runtime


def _tensor_spec(detail: Mapping[str, Any], where: str) -> TensorSpec:
    name = str(detail["name"])
    try:
        datatype = DataType.from_numpy(detail["dtype"])
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"{where} '{name}' has type {detail['dtype']}, which KServe cannot carry"
        ) from None
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name, datatype, tuple(int(d) if d >= 0 else -1 for d in dims))


def _quantization(detail: Mapping[str, Any]) -> tuple[float, int] | None:
    """Per-tensor (scale, zero point), or None for a float tensor."""
    params = detail.get("quantization_parameters") or {}
    scales = params.get("scales")
    zero_points = params.get("zero_points")
    if scales is not None and zero_points is not None and len(scales) == 1 and scales[0]:
        return float(scales[0]), int(zero_points[0])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if scale:
        return float(scale), int(zero_point)
    return None


class LiteRtModel(LoadedModel):
    """One LiteRT interpreter (and the delegates it uses, kept alive as long as it is).

    ``quantization`` maps each quantised input and output to its (scale, zero point):
    ``real = scale * (q - zero_point)``. ``delegated_nodes`` counts the graph's delegate
    kernels (XNNPACK on the CPU, the Edge TPU's custom op on a TPU).
    """

    quantization: dict[str, tuple[float, int]]
    delegated_nodes: int

    def __init__(self, interpreter: Any, kind: str, delegates: Sequence[Any] = ()) -> None:
        self._interpreter = interpreter
        self._delegates = list(delegates)
        interpreter.allocate_tensors()  # also applies the default (XNNPACK) delegate
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        super().__init__(
            Signature(
                inputs=tuple(_tensor_spec(d, "input") for d in inputs),
                outputs=tuple(_tensor_spec(d, "output") for d in outputs),
            ),
            kind,
        )
        self._inputs = [(str(d["name"]), int(d["index"]), np.dtype(d["dtype"])) for d in inputs]
        self._outputs = [(str(d["name"]), int(d["index"])) for d in outputs]
        self._allocated: tuple[tuple[int, ...], ...] | None = tuple(
            tuple(int(x) for x in d["shape"]) for d in inputs
        )
        self.quantization = {
            str(d["name"]): q for d in (*inputs, *outputs) if (q := _quantization(d)) is not None
        }
        ops = getattr(interpreter, "_get_ops_details", None)
        self.delegated_nodes = (
            sum(1 for op in ops() if op.get("op_name") == "DELEGATE") if callable(ops) else 0
        )
        self._run_lock = threading.Lock()

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        with self._run_lock:
            interpreter = self._interpreter
            if interpreter is None:  # closed while this call waited for the lock
                raise ExecutorError(f"{self.kind}: model is closed")
            values = []
            for name, _, dtype in self._inputs:
                value = inputs[name]
                if value.dtype != dtype:
                    raise InvalidInputError(
                        f"tensor '{name}': {value.dtype} given, the model takes {dtype}"
                    )
                values.append(np.ascontiguousarray(value))
            shapes = tuple(tuple(v.shape) for v in values)
            if shapes != self._allocated:
                self._resize(interpreter, shapes)
            for (_, index, _), value in zip(self._inputs, values, strict=True):
                interpreter.set_tensor(index, value)
            interpreter.invoke()
            # get_tensor returns a copy, so the next invoke cannot change an answer.
            return {name: interpreter.get_tensor(index) for name, index in self._outputs}

    def _resize(self, interpreter: Any, shapes: tuple[tuple[int, ...], ...]) -> None:
        """Resize the inputs whose shape changed (the batch axis, usually) and re-plan memory;
        only axes the model declares dynamic (-1 in shape_signature) may change."""
        previous = self._allocated
        self._allocated = None  # until allocate_tensors succeeds
        for i, ((name, index, _), shape) in enumerate(zip(self._inputs, shapes, strict=True)):
            if previous is not None and previous[i] == shape:
                continue
            try:
                interpreter.resize_tensor_input(index, list(shape), strict=True)
            except (ValueError, RuntimeError) as e:
                declared = self.signature.inputs[i].shape
                raise InvalidInputError(
                    f"tensor '{name}': shape {list(shape)} does not fit the model's "
                    f"{list(declared)}: {e}"
                ) from e
        interpreter.allocate_tensors()
        self._allocated = shapes

    def _close(self) -> None:
        with self._run_lock:
            # The interpreter goes before the delegates it uses.
            self._interpreter = None
            self._delegates.clear()


def refuse_edgetpu(artifact: ModelArtifact, kind: str) -> None:
    """Refuse a model compiled for the Edge TPU, whose custom op the CPU cannot run.

    Raises:
        ModelLoadError: the model contains ``edgetpu-custom-op``, or is not a TFLite file.
    """
    try:
        compiled = is_edgetpu_model(artifact.path)
    except NotTfliteError as e:
        raise ModelLoadError(f"{kind}: {artifact.path} is not a TFLite model: {e}") from e
    if compiled:
        raise ModelLoadError(
            f"{kind}: {artifact.path} was compiled for the Edge TPU (it contains the "
            f"'{EDGETPU_CUSTOM_OP}' operator), which the CPU cannot run: serve it with "
            f'format = "edgetpu-tflite" on an Edge TPU, or serve the .tflite it was compiled from'
        )


class LiteRtCpuExecutor(Executor):
    """LiteRT's CPU kernels with XNNPACK; ``intra_op_threads`` becomes ``num_threads``."""

    kind: ClassVar[str] = "cpu-litert"
    formats: ClassVar[frozenset[str]] = frozenset({"tflite"})

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        refuse_edgetpu(artifact, self.kind)
        runtime = load_runtime()
        try:
            interpreter = runtime.interpreter(
                model_path=str(artifact.path),
                num_threads=max(1, options.intra_op_threads),
                experimental_op_resolver_type=runtime.builtin_resolver,
            )
            return LiteRtModel(interpreter, self.kind)
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(
                f"{self.kind}: cannot load {artifact.path}: {e}{_custom_ops_note(artifact, e)}"
            ) from e


def _custom_ops_note(artifact: ModelArtifact, error: BaseException) -> str:
    """When LiteRT refused an unresolved custom op: every custom op the model declares."""
    if "custom op" not in str(error):
        return ""
    try:
        declared = custom_ops(artifact.path)
    except (OSError, NotTfliteError):
        return ""
    return (
        f" (the model declares custom ops {', '.join(declared)}; this LiteRT runtime has no "
        "kernel for at least one of them: serve the model where its custom ops are built in)"
        if declared
        else ""
    )
