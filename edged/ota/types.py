"""The values OTA hands to its callers (the management service, the learning jobs): an
update's status as seen from outside, what StartUpdate did, and the self-test a new version must
pass. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

from edged.core.types import Array
from edged.ota.bundle import OptimizeEvidence
from edged.ota.state import State, UpdateRecord


@dataclass(frozen=True)
class ModelStatus:
    """One model's OTA status: its latest update (None: never had one) and committed
    version."""

    model: str
    state: State
    committed: int | None
    record: UpdateRecord | None = None


@dataclass(frozen=True)
class StartResult:
    """What StartUpdate did."""

    status: ModelStatus
    started: bool
    reason: str = ""


@dataclass(frozen=True)
class SelfTest:
    """What a new version must answer before it takes traffic (a bundle's selftest.npz, or
    a fine-tune's check of its composed graph)."""

    inputs: dict[str, Array]
    expected: dict[str, Array]
    rtol: float
    atol: float
    optimize: OptimizeCheck | None = None
    """A bundle of an ``edged optimize`` variant: its held-out check, run after the
    self-test."""


@dataclass(frozen=True)
class OptimizeCheck:
    """An optimised variant's check set (optimize.npz) and the evidence it must reproduce
    (bundle.toml ``[optimize]``): ``inputs`` held out from calibration, ``parent`` the parent
    model's outputs to them."""

    inputs: dict[str, Array]
    parent: dict[str, Array]
    evidence: OptimizeEvidence
