"""pynq: a FINN-style dataflow accelerator in a PYNQ overlay, fed through AXI DMA engines.

The driver pattern is FINN's (``finn/qnn-data/templates/driver/driver_base.py``): download the
overlay, allocate one packed uint8 buffer per input and output sized for the bundle's batch,
then per request fold and pack the inputs into their buffers, arm every output DMA (S2MM),
start every input DMA (MM2S), wait, and unpack and unfold the outputs. The bundle format and
the fold/pack arithmetic live in :mod:`hal.pynq_bundle`.

The FPGA is one per board and pynq keeps one loaded overlay per device: loading a second
bundle (or a second instance of this one) replaces the first, whose model then refuses to run
instead of driving DMAs that no longer exist. Serve a pynq model with ``instances = 1``.

pynq's ``_SDMAChannel.wait()`` spins forever on an accelerator that never finishes, so this
executor polls the channel's status with a deadline and calls ``wait()`` only once the channel
is idle. A timeout resets the DMA engines (so none writes into freed memory later) and leaves
the model faulted: it answers ExecutorError until it is reloaded, which re-downloads the
bitstream and so resets the programmable logic.

pynq is imported when a bundle is loaded, not when this module is: without it the executor
refuses to load, with the reason (see docs/adr/0002-pynq-alongside-numpy2.md).
"""

from __future__ import annotations

import importlib
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, NoReturn

import numpy as np

from edged.core.errors import ExecutorError, InvalidInputError, ModelLoadError
from edged.core.types import Array
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.pynq_bundle import (
    MANIFEST_NAME,
    Manifest,
    StreamTensor,
    check_range,
    fold,
    pack,
    read_manifest,
    unfold,
    unpack,
)

AXI_DMA_VLNV_PREFIX = "xilinx.com:ip:axi_dma:"
#: metadata files pynq looks for beside a bitstream of the same stem
METADATA_SUFFIXES = (".hwh", ".xclbin")
#: AXI DMA register offsets (PG021): MM2S and S2MM control registers, and their reset bit
_MM2S_DMACR = 0x00
_S2MM_DMACR = 0x30
_DMACR_RESET = 0x4
_DMASR = 0x04
_DMASR_IDLE = 0x2
_DMASR_ERROR_NAMES = {0x10: "an internal error", 0x20: "a slave error", 0x40: "a decode error"}
_DMASR_ERRORS = sum(_DMASR_ERROR_NAMES)
_RESET_WAIT_S = 0.1
#: polls that spin (sleep(0)) before the wait backs off to short sleeps
_SPIN_POLLS = 200
_POLL_SLEEP_S = 0.0002

#: one overlay download at a time in this process: pynq's device state is global
_DOWNLOAD_LOCK = threading.Lock()


def import_pynq() -> ModuleType:
    """The pynq package, imported on first use.

    Raises:
        ModelLoadError: pynq (or a module it needs) cannot be imported; the message says
            which and how to install it.
    """
    try:
        with warnings.catch_warnings():
            # pynqutils imports pkg_resources, which warns that it is deprecated.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            module = importlib.import_module("pynq")
            importlib.import_module("pynq.lib.dma")
            buffer_module = importlib.import_module("pynq.buffer")
    except ImportError as e:
        raise ModelLoadError(
            f"pynq: the pynq package cannot be imported ({e}); on a PYNQ board image it is "
            f"preinstalled, elsewhere install edged[pynq] and then "
            f"'pip install --no-deps pynq==4.0.0 pynqutils==0.1.3' "
            f"(docs/adr/0002-pynq-alongside-numpy2.md)"
        ) from e
    _numpy2_buffer_compat(buffer_module.PynqBuffer)
    return module


def _numpy2_buffer_compat(buffer_class: type) -> None:
    """Let pynq's ``PynqBuffer`` keep its ``device`` attribute under numpy 2.

    ``PynqBuffer.__new__`` sets ``self.device`` (the pynq Device the buffer lives on); numpy 2
    gave ``ndarray`` a read-only ``device`` property (the array API's, always "cpu"), so the
    assignment fails and ``pynq.allocate`` cannot make a buffer. A plain class attribute on
    the subclass shadows that property, so ``device`` is an ordinary instance attribute again,
    as pynq (written for numpy 1) expects. Nothing changes under numpy 1, or once pynq fixes
    it (the class then defines ``device`` itself).
    """
    if "device" not in buffer_class.__dict__ and isinstance(
        getattr(np.ndarray, "device", None), type(np.ndarray.shape)
    ):
        buffer_class.device = None  # type: ignore[attr-defined]


def bundle_dir(artifact_path: Path) -> Path:
    """The bundle folder: the artifact path itself, or the folder of its ``manifest.json``."""
    if artifact_path.is_dir():
        return artifact_path
    if artifact_path.name == MANIFEST_NAME:
        return artifact_path.parent
    raise ModelLoadError(
        f"pynq: {artifact_path} is neither a bundle folder nor its {MANIFEST_NAME}"
    )


def bitstream_files(folder: Path, manifest: Manifest) -> Path:
    """The bitstream path, after checking it and its metadata file exist.

    Raises:
        ModelLoadError: the bitstream, or every metadata file beside it, is missing.
    """
    bitfile = folder / manifest.bitstream
    if not bitfile.is_file():
        raise ModelLoadError(f"pynq: bundle {folder} lacks its bitstream '{manifest.bitstream}'")
    if bitfile.suffix != ".xclbin" and not any(
        bitfile.with_suffix(s).is_file() for s in METADATA_SUFFIXES
    ):
        names = " or ".join(bitfile.with_suffix(s).name for s in METADATA_SUFFIXES)
        raise ModelLoadError(f"pynq: bundle {folder} lacks {names} beside '{manifest.bitstream}'")
    return bitfile


@dataclass
class _Stream:
    """One tensor's DMA channel and its device buffer."""

    tensor: StreamTensor
    dma: Any
    channel: Any
    buffer: Any


class PynqModel(LoadedModel):
    """One downloaded overlay with its DMA buffers; one request at a time."""

    def __init__(
        self,
        manifest: Manifest,
        overlay: Any,
        inputs: list[_Stream],
        outputs: list[_Stream],
    ) -> None:
        super().__init__(manifest.signature(), PynqExecutor.kind)
        self.manifest = manifest
        self._overlay: Any = overlay
        self._inputs = inputs
        self._outputs = outputs
        self._run_lock = threading.Lock()
        self._fault: str | None = None

    @property
    def fault(self) -> str | None:
        """Why the model refuses to run (a DMA hung or failed), or None."""
        return self._fault

    def _batch_size(self, inputs: Mapping[str, Array]) -> int:
        sizes: set[int] = set()
        for s in self._inputs:
            t = s.tensor
            x = np.asarray(inputs[t.name])
            if x.ndim != len(t.shape) or tuple(x.shape[1:]) != t.sample_shape:
                raise InvalidInputError(
                    f"tensor '{t.name}': shape {list(x.shape)} is not [N, "
                    f"{', '.join(map(str, t.sample_shape))}]"
                )
            sizes.add(int(x.shape[0]))
        if len(sizes) != 1:
            raise InvalidInputError(f"inputs disagree on the batch size: {sorted(sizes)}")
        n = sizes.pop()
        if not 1 <= n <= self.manifest.batch:
            raise InvalidInputError(
                f"batch of {n} is outside 1..{self.manifest.batch}, what the bundle's buffers hold"
            )
        return n

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        with self._run_lock:
            if self._overlay is None:
                raise ExecutorError("pynq: model is closed")
            if self._fault is not None:
                raise ExecutorError(f"pynq: {self._fault}; reload the model")
            if not self._overlay.is_loaded():
                raise ExecutorError(
                    "pynq: another bitstream was downloaded to the FPGA after this model's; "
                    "reload the model (a pynq model must run with one instance)"
                )
            n = self._batch_size(inputs)
            for s in self._inputs:
                t = s.tensor
                x = np.asarray(inputs[t.name])
                check_range(t.name, x, t.bits, t.signed)
                packed = pack(fold(x, t.folded_shape), t.bits, t.signed, t.packed_shape[-1])
                np.copyto(s.buffer[:n], packed)
                s.buffer.flush()
            self._run(n)
            outputs: dict[str, Array] = {}
            for s in self._outputs:
                t = s.tensor
                s.buffer.invalidate()
                folded = unpack(
                    np.array(s.buffer[:n], dtype=np.uint8),
                    t.bits,
                    t.signed,
                    t.folded_shape[-1],
                    t.datatype.numpy_dtype,
                )
                outputs[t.name] = unfold(folded, t.shape)
            return outputs

    def _run(self, n: int) -> None:
        """Arm the outputs, start the inputs, wait for all with one deadline."""
        try:
            for s in self._outputs + self._inputs:
                s.channel.transfer(s.buffer, 0, n * s.tensor.packed_bytes)
        except RuntimeError as e:  # pynq refuses a channel that is not started or not idle
            self._fail(f"cannot start DMA '{s.tensor.dma}' for tensor '{s.tensor.name}': {e}", e)
        deadline = time.monotonic() + self.manifest.timeout_s
        for s, direction in [(s, "MM2S") for s in self._inputs] + [
            (s, "S2MM") for s in self._outputs
        ]:
            self._wait(s, direction, deadline)
        for s in self._outputs:
            expected = n * s.tensor.packed_bytes
            if int(s.channel.transferred) != expected:
                raise ExecutorError(
                    f"pynq: DMA '{s.tensor.dma}' received {s.channel.transferred} bytes of "
                    f"output '{s.tensor.name}', expected {expected}"
                )

    def _wait(self, s: _Stream, direction: str, deadline: float) -> None:
        """Poll the channel's status register until idle, an error, or the deadline."""
        what = f"DMA '{s.tensor.dma}' ({direction}, tensor '{s.tensor.name}')"
        status_offset = (_MM2S_DMACR if direction == "MM2S" else _S2MM_DMACR) + _DMASR
        polls = 0
        while True:
            status = int(s.dma.mmio.read(status_offset))
            if status & _DMASR_ERRORS:
                errors = ", ".join(n for bit, n in _DMASR_ERROR_NAMES.items() if status & bit)
                self._fail(f"{what} stopped with {errors} (DMASR {status:#x})")
            if status & _DMASR_IDLE:
                break
            if time.monotonic() > deadline:
                self._fail(f"{what} did not finish within {self.manifest.timeout_s:g} s")
            polls += 1
            time.sleep(0 if polls < _SPIN_POLLS else _POLL_SLEEP_S)
        try:
            s.channel.wait()  # returns at once on an idle channel: invalidates, counts bytes
        except RuntimeError as e:
            self._fail(f"{what} failed: {e}", e)

    def _fail(self, fault: str, cause: BaseException | None = None) -> NoReturn:
        """Fault the model: reset its DMAs (so none writes into freed memory later) and raise."""
        self._fault = fault
        self._reset_dmas()
        raise ExecutorError(
            f"pynq: {fault}; the DMA engines were reset and the model must be reloaded"
        ) from cause

    def _reset_dmas(self) -> None:
        """Soft-reset every DMA this model drives, so none touches its buffers again."""
        seen: set[int] = set()
        for s in self._inputs + self._outputs:
            if id(s.dma) in seen:
                continue
            seen.add(id(s.dma))
            offset = _MM2S_DMACR if s.dma.sendchannel is not None else _S2MM_DMACR
            try:
                s.dma.mmio.write(offset, _DMACR_RESET)
                deadline = time.monotonic() + _RESET_WAIT_S
                while s.dma.mmio.read(offset) & _DMACR_RESET and time.monotonic() < deadline:
                    time.sleep(_POLL_SLEEP_S)
            except Exception:  # noqa: S110 - best effort on a device that is failing
                pass

    def _close(self) -> None:
        with self._run_lock:
            if self._overlay is None:
                return
            if self._fault is not None:
                self._reset_dmas()
            for s in self._inputs + self._outputs:
                s.buffer.freebuffer()
                s.buffer = None
            self._inputs.clear()
            self._outputs.clear()
            overlay, self._overlay = self._overlay, None
            overlay.free()


class PynqExecutor(Executor):
    """PYNQ overlays driven through AXI DMA, FINN's driver pattern."""

    kind: ClassVar[str] = "pynq"
    formats: ClassVar[frozenset[str]] = frozenset({"pynq-bundle"})
    max_instances: ClassVar[int | None] = 1  # one overlay on the fabric at a time

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        folder = bundle_dir(artifact.path)
        manifest = read_manifest(folder)
        bitfile = bitstream_files(folder, manifest)
        pynq = import_pynq()
        with _DOWNLOAD_LOCK:
            try:
                overlay = pynq.Overlay(str(bitfile), download=True)
            except Exception as e:
                raise ModelLoadError(f"pynq: cannot download overlay {bitfile}: {e}") from e
            inputs: list[_Stream] = []
            outputs: list[_Stream] = []
            try:
                if manifest.clock_mhz is not None:
                    pynq.ps.Clocks.set_pl_clk(0, clk_mhz=manifest.clock_mhz)
                for t in manifest.inputs:
                    inputs.append(self._stream(pynq, overlay, manifest, t, "sendchannel"))
                for t in manifest.outputs:
                    outputs.append(self._stream(pynq, overlay, manifest, t, "recvchannel"))
            except BaseException:
                for s in inputs + outputs:
                    s.buffer.freebuffer()
                overlay.free()
                raise
        return PynqModel(manifest, overlay, inputs, outputs)

    @staticmethod
    def _stream(
        pynq: ModuleType, overlay: Any, manifest: Manifest, t: StreamTensor, channel_name: str
    ) -> _Stream:
        role = "input" if channel_name == "sendchannel" else "output"
        ip = overlay.ip_dict.get(t.dma)
        if ip is None:
            dmas = sorted(
                k
                for k, v in overlay.ip_dict.items()
                if str(v.get("type", "")).startswith(AXI_DMA_VLNV_PREFIX)
            )
            raise ModelLoadError(
                f"pynq: the overlay has no DMA '{t.dma}' (named by {role} '{t.name}'); "
                f"its DMAs: {', '.join(dmas) or 'none'}"
            )
        if not str(ip.get("type", "")).startswith(AXI_DMA_VLNV_PREFIX):
            raise ModelLoadError(
                f"pynq: IP '{t.dma}' (named by {role} '{t.name}') is a {ip.get('type')}, "
                f"not an AXI DMA"
            )
        driver: Any = overlay
        for part in t.dma.split("/"):
            driver = getattr(driver, part)
        channel = getattr(driver, channel_name, None)
        if channel is None:
            which = "MM2S (memory to stream)" if role == "input" else "S2MM (stream to memory)"
            raise ModelLoadError(
                f"pynq: DMA '{t.dma}' has no {which} channel for {role} '{t.name}'"
            )
        nbytes = manifest.batch * t.packed_bytes
        if nbytes > int(driver.buffer_max_size):
            raise ModelLoadError(
                f"pynq: a batch of {manifest.batch} of {role} '{t.name}' is {nbytes} bytes, more "
                f"than DMA '{t.dma}' moves in one transfer ({driver.buffer_max_size})"
            )
        buffer = pynq.allocate(
            shape=(manifest.batch, *t.packed_shape[1:]), dtype=np.uint8, target=overlay.device
        )
        return _Stream(t, driver, channel, buffer)
