"""edgetpu: a Coral Edge TPU (USB or PCIe) through libedgetpu, LiteRT's external delegate.

A model for the Edge TPU is a .tflite file the Edge TPU compiler has rewritten: the part it
compiled is one custom operator, ``edgetpu-custom-op``, which only libedgetpu's delegate can
run. This executor takes format ``edgetpu-tflite`` (``model_edgetpu.tflite``), checks the
operator is there before loading, loads the delegate the way pycoral's ``make_interpreter``
does (``load_delegate("libedgetpu.so.1", {"device": "usb:0"})``), and hands it to the LiteRT
interpreter through ``experimental_delegates``. The delegate library is
``ExecutorOptions.delegate_library``, else the ``EDGETPU_LIBRARY`` environment variable, else
``libedgetpu.so.1``. (Not an ``EDGED_`` variable: those are reserved for config keys, and an
unknown one stops the daemon.)
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import ClassVar

from edged.core.errors import ModelLoadError
from hal.cpu_litert import LiteRtModel, load_runtime
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.probe import EDGETPU_LIBRARY, EDGETPU_USB_IDS, EdgeTpu, list_edge_tpus
from hal.tflite_format import EDGETPU_CUSTOM_OP, NotTfliteError, is_edgetpu_model

__all__ = [
    "EDGETPU_LIBRARY",
    "LIBRARY_ENV",
    "EdgeTpu",
    "EdgeTpuExecutor",
    "delegate_library",
    "is_edgetpu_model",
    "list_edge_tpus",
]

LIBRARY_ENV = "EDGETPU_LIBRARY"
_DELEGATE_SYMBOLS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")


def delegate_library(options: ExecutorOptions, env: Mapping[str, str] | None = None) -> str:
    """The Edge TPU delegate library to load: the option, the environment, or the default."""
    env = os.environ if env is None else env
    return options.delegate_library or env.get(LIBRARY_ENV, "") or EDGETPU_LIBRARY


def _devices_seen() -> str:
    devices = list_edge_tpus()
    if devices:
        return ", ".join(f"{d.name} ({d.path})" for d in devices)
    ids = " or ".join(f"{v}:{p}" for v, p in EDGETPU_USB_IDS)
    return f"none (no /dev/apex_* and no USB device {ids})"


def _check_delegate_library(library: str) -> None:
    """Open ``library`` and check it exports the external delegate ABI, before LiteRT's
    ``load_delegate`` does (whose Delegate object, when its constructor fails that early,
    raises again from ``__del__``).

    Raises:
        ModelLoadError: the library does not load, or is not an external delegate.
    """
    try:
        handle = ctypes.CDLL(library)
    except OSError as e:
        raise ModelLoadError(
            f"edgetpu: cannot load the Edge TPU runtime {library}: {e} (install "
            f"libedgetpu1-std from Coral's package repository)"
        ) from e
    missing = [s for s in _DELEGATE_SYMBOLS if not hasattr(handle, s)]
    if missing:
        raise ModelLoadError(
            f"edgetpu: {library} is not a LiteRT external delegate (it lacks {', '.join(missing)})"
        )


class EdgeTpuExecutor(Executor):
    """LiteRT with libedgetpu's delegate; ``ExecutorOptions.device`` picks the TPU."""

    kind: ClassVar[str] = "edgetpu"
    formats: ClassVar[frozenset[str]] = frozenset({"edgetpu-tflite"})

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        try:
            compiled = is_edgetpu_model(artifact.path)
        except NotTfliteError as e:
            raise ModelLoadError(f"edgetpu: {artifact.path} is not a TFLite model: {e}") from e
        if not compiled:
            raise ModelLoadError(
                f"edgetpu: {artifact.path} has no '{EDGETPU_CUSTOM_OP}' operator, so nothing in "
                f"it would run on the Edge TPU: compile it with edgetpu_compiler, or serve it "
                f'with format = "tflite" on the CPU'
            )
        runtime = load_runtime()
        library = delegate_library(options)
        delegate_options = {"device": options.device} if options.device else {}
        which = f"Edge TPU '{options.device}'" if options.device else "an Edge TPU"
        _check_delegate_library(library)
        try:
            delegate = runtime.load_delegate(library, delegate_options)
        except ValueError as e:
            detail = " ".join(str(e).split())
            raise ModelLoadError(
                f"edgetpu: {library} could not open {which}: {detail}; "
                f"Edge TPUs seen: {_devices_seen()}"
            ) from e
        try:
            interpreter = runtime.interpreter(
                model_path=str(artifact.path),
                experimental_delegates=[delegate],
                num_threads=max(1, options.intra_op_threads),
                experimental_op_resolver_type=runtime.builtin_resolver,
            )
            return LiteRtModel(interpreter, self.kind, delegates=[delegate])
        except (ValueError, RuntimeError) as e:
            detail = " ".join(str(e).split())
            hint = (
                f" ({library} took no '{EDGETPU_CUSTOM_OP}' node: is it a libedgetpu that "
                f"matches the model's compiler version?)"
                if "unresolved custom op" in detail
                else ""
            )
            raise ModelLoadError(
                f"edgetpu: {artifact.path} does not run with {library}: {detail}{hint}"
            ) from e
