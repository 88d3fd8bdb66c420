"""What ``hal.probe()`` says about one executor kind on this host: a value type of its own, so
that the executor contract (``hal.executor``), placement and the probes all use it without
importing one another (hal/probe.py imports the executors' modules to run their checks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edged.core.types import DataType


@dataclass(frozen=True)
class DeviceReport:
    """One executor kind on this host."""

    kind: str
    present: bool
    details: dict[str, str] = field(default_factory=dict)
    """What was found: device name, memory, compute capability, USB or PCIe path, FPGA part,
    runtime versions."""
    reason: str = ""
    """Why the kind is absent ("" when present): every check that failed, in order."""
    formats: tuple[str, ...] = ()
    """Artifact formats the kind runs."""
    dtypes: tuple[DataType, ...] = ()
    """Tensor datatypes the kind takes."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        data = asdict(self)
        data["dtypes"] = [str(d) for d in self.dtypes]
        data["formats"] = list(self.formats)
        return data
