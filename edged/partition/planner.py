"""Pick where to cut a model (Neurosurgeon, Kang et al., ASPLOS 2017): the cut whose
estimated end-to-end latency is least, "all local" and "all remote" included.

Pure: no I/O, no clock. The estimate of a split at a cut is

    head here + round trip + (bytes sent + bytes answered) / bandwidth + tail on the server

all local is the whole model here, and all remote is the inputs cut (no head). The costs come
from :mod:`edged.partition.profile` (measured on each side) and the link from measurements
(or the operator's figures).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edged.core.errors import ConfigError

#: the cut that sends nothing: the whole model runs here
ALL_LOCAL = "<local>"


@dataclass(frozen=True)
class CutCost:
    """What one cut costs, measured."""

    cut: str
    """The tensor sent (``graph.INPUTS_CUT``: all remote; :data:`ALL_LOCAL`: nothing sent)."""
    head_s: float
    """Latency of the head on the device (the whole model for ALL_LOCAL; 0 for all remote)."""
    tail_s: float
    """Latency of the tail on the server (0 for ALL_LOCAL)."""
    sent_bytes: int
    """Bytes of the tensor(s) sent to the server (0 for ALL_LOCAL)."""
    answer_bytes: int = 0
    """Bytes of the outputs the server answers (0 for ALL_LOCAL)."""


@dataclass(frozen=True)
class Link:
    """The network between device and server."""

    rtt_s: float
    """Round-trip time of a call that carries (almost) nothing, seconds."""
    bandwidth_bps: float
    """Throughput of the link, bits per second."""

    def __post_init__(self) -> None:
        if not (self.rtt_s >= 0 and math.isfinite(self.rtt_s)):
            raise ConfigError(f"link round-trip time {self.rtt_s!r} must be a number >= 0")
        if not self.bandwidth_bps > 0:
            raise ConfigError(f"link bandwidth {self.bandwidth_bps!r} must be > 0")

    def transfer_s(self, n_bytes: int) -> float:
        """Time to move ``n_bytes`` one way at the link's bandwidth."""
        return n_bytes * 8 / self.bandwidth_bps


@dataclass(frozen=True)
class Estimate:
    """One row of the plan: a cut and its estimated end-to-end latency, by part."""

    cut: str
    head_s: float
    transfer_s: float
    """Round trip plus both transfers (0 for ALL_LOCAL)."""
    tail_s: float
    sent_bytes: int

    @property
    def total_s(self) -> float:
        return self.head_s + self.transfer_s + self.tail_s


@dataclass(frozen=True)
class Plan:
    """Every cut's estimate, in the table's order, and the one chosen."""

    estimates: tuple[Estimate, ...]
    choice: Estimate


def estimate(cost: CutCost, link: Link) -> Estimate:
    """The end-to-end latency of ``cost``'s cut over ``link``."""
    if cost.cut == ALL_LOCAL:
        return Estimate(cost.cut, cost.head_s, 0.0, 0.0, 0)
    transfer = link.rtt_s + link.transfer_s(cost.sent_bytes + cost.answer_bytes)
    return Estimate(cost.cut, cost.head_s, transfer, cost.tail_s, cost.sent_bytes)


def plan(costs: Sequence[CutCost], link: Link) -> Plan:
    """The cut of least estimated latency among ``costs``. Ties go to the cut that needs the
    link least: all local, else the one sending fewer bytes, else the later (more local) one.

    Raises:
        ConfigError: ``costs`` is empty, names a cut twice, or holds a negative cost.
    """
    if not costs:
        raise ConfigError("no cut to choose from")
    seen: set[str] = set()
    for cost in costs:
        if cost.cut in seen:
            raise ConfigError(f"cut '{cost.cut}' is listed twice")
        seen.add(cost.cut)
        if min(cost.head_s, cost.tail_s, cost.sent_bytes, cost.answer_bytes) < 0:
            raise ConfigError(f"cut '{cost.cut}' has a negative cost")
    estimates = tuple(estimate(c, link) for c in costs)
    order = {e.cut: i for i, e in enumerate(estimates)}
    choice = min(
        estimates,
        key=lambda e: (e.total_s, e.cut != ALL_LOCAL, e.sent_bytes, -order[e.cut]),
    )
    return Plan(estimates, choice)
