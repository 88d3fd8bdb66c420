"""Hardware abstraction layer: executors that run models, and how edged finds them.

An executor kind ("cpu-onnx", ...) is registered under the ``edged.executors`` entry-point
group, so a vendor package can add one without touching edged. ``probe()`` says which kinds
this host can run; ``place()`` (hal.placement) picks a model's candidates from that.
"""

from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.placement import Plan, place
from hal.probe import probe
from hal.registry import available_kinds, get_executor
from hal.report import DeviceReport

__all__ = [
    "DeviceReport",
    "Executor",
    "ExecutorOptions",
    "LoadedModel",
    "ModelArtifact",
    "Plan",
    "available_kinds",
    "get_executor",
    "place",
    "probe",
]
