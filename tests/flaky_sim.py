"""A simulated flaky accelerator: an executor kind ``flaky-sim`` at the hardware boundary.

It is what a vendor ships: a module with an ``Executor`` subclass, registered under the
``edged.executors`` entry-point group by its own distribution (``flaky_sim-0.0.dist-info``).
:func:`install` writes both into a folder; put that folder on a daemon's PYTHONPATH and the
daemon finds ``flaky-sim`` like any installed executor, without edged knowing about it.

The "device" runs ONNX models through the real cpu-onnx code path (hal.cpu_onnx), but
misbehaves on command, through environment variables (not ``EDGED_``: those are config keys):

- ``FLAKY_SIM_FAULT_FILE``: while this file exists, every inference fails. Its content picks
  how: ``raise`` (or empty) raises a device error; ``hang`` sleeps ``FLAKY_SIM_HANG_S``
  seconds (default 2) before answering, past any sensible inference timeout; ``corrupt``
  answers, but every float output is off by 1 (a device that computes wrong). Change it
  with :func:`set_fault` (atomic): written in place, an inference that reads it between the
  truncation and the write sees it empty and raises, whatever mode was being written.
- ``FLAKY_SIM_DELAY_S``: every inference takes this much longer (a slow device).
- ``FLAKY_SIM_ABSENT``: the probe reports the device absent, with this text as the reason.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from edged.core.types import Array
from edged.storage import write_atomic
from hal.cpu_onnx import OnnxCpuExecutor
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.report import DeviceReport

KIND = "flaky-sim"


def set_fault(path: Path, how: str) -> None:
    """Make the control file at ``path`` say ``how`` ("raise", "hang", "corrupt"), atomically
    (a rename over it): a device reading it meanwhile sees the old mode or the new one, never
    an empty file (``raise``). CI once saw a request fail with the device error while a test
    wrote "hang" in place under load."""
    write_atomic(path, lambda f: f.write(how.encode()))


class SimulatedDeviceError(RuntimeError):
    """What the simulated device raises while faulted."""


def _fault() -> str | None:
    """The fault mode while the control file exists ("raise" or "hang"), else None."""
    path = os.environ.get("FLAKY_SIM_FAULT_FILE", "")
    if not path:
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return text or "raise"


class FlakySimModel(LoadedModel):
    """A cpu-onnx session behind a device that can fail or hang."""

    def __init__(self, inner: LoadedModel) -> None:
        super().__init__(inner.signature, KIND)
        self._inner = inner

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        delay = float(os.environ.get("FLAKY_SIM_DELAY_S", "0") or 0)
        if delay:
            time.sleep(delay)
        fault = _fault()
        if fault == "hang":
            time.sleep(float(os.environ.get("FLAKY_SIM_HANG_S", "2") or 2))
        elif fault == "corrupt":
            outputs = self._inner.infer(inputs)
            return {k: v + 1 if v.dtype.kind == "f" else v for k, v in outputs.items()}
        elif fault is not None:
            raise SimulatedDeviceError("simulated device fault (flaky-sim)")
        return self._inner.infer(inputs)

    def _close(self) -> None:
        self._inner.close()


class FlakySimExecutor(Executor):
    """The simulated accelerator's executor."""

    kind: ClassVar[str] = KIND
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})

    @classmethod
    def probe(cls) -> DeviceReport:
        absent = os.environ.get("FLAKY_SIM_ABSENT", "")
        return DeviceReport(
            kind=KIND,
            present=not absent,
            details={} if absent else {"device": "simulated flaky accelerator"},
            reason=absent,
            formats=("onnx",),
        )

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        return FlakySimModel(OnnxCpuExecutor().load(artifact, options))


def install(target: Path) -> Path:
    """Write this module as ``flaky_sim.py`` and its distribution's metadata (registering
    ``flaky-sim`` in ``edged.executors``) into ``target``; returns ``target`` for PYTHONPATH."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, target / "flaky_sim.py")
    dist = target / "flaky_sim-0.0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky-sim\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[edged.executors]\nflaky-sim = flaky_sim:FlakySimExecutor\n"
    )
    return target
