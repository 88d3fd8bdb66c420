"""Pick where to cut a model (Neurosurgeon, Kang et al., ASPLOS 2017): the cut whose
estimated cost is least, "all local" and "all remote" included, and say when a measured link
has moved enough to plan again.

Pure: no I/O, no clock. Two objectives:

- ``latency`` (the default): the end-to-end latency of a split at a cut,

      head here + round trip + (bytes sent + bytes answered) / bandwidth + tail on the server

- ``device_cpu``: what the device spends (CPU time, a stand-in for its energy),

      head here + (bytes sent + bytes answered) * byte_cost_s

  where ``byte_cost_s`` is the device's CPU time per byte put on or taken off the wire
  (serialisation, the gRPC stack, the network driver); the link's speed does not enter, the
  server's time does not either. Neurosurgeon's energy objective has the same shape (compute
  energy of the head plus a per-byte transmission energy).

All local is the whole model here, and all remote is the inputs cut (no head). The costs come
from :mod:`edged.partition.profile` (measured on each side) and the link from measurements
(or the operator's figures).

On a device under a CPU limit (a CFS quota, :mod:`edged.partition.quota`) a cut's latency is
also at least what the limit lets the device's CPU per request take (the model's part, the
daemon's own work per request, the bytes): the estimate is the greater of the two, because
the device's waits for its next period overlap the transfer and the server's tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from edged.core.errors import ConfigError
from edged.partition.quota import CpuLimit

#: the cut that sends nothing: the whole model runs here
ALL_LOCAL = "<local>"
#: the cut that runs nothing here: the request's inputs are sent (graph.INPUTS_CUT)
ALL_REMOTE = "<inputs>"

#: what the planner minimises
Objective = Literal["latency", "device_cpu"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "device_cpu")
#: a round-trip change smaller than this never counts as the link moving (loopback jitter)
RTT_FLOOR_S = 0.001


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
    device_cpu_s: float | None = None
    """The device's CPU time per request at this cut: its part of the model, the daemon's
    own work per request, the bytes on the wire (None: not known; a CPU limit then bounds
    nothing)."""


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
    cost_s: float | None = None
    """What the objective minimises, when it is not the latency (device_cpu: the device's
    CPU seconds); None: the latency, ``total_s``."""
    bound_s: float = 0.0
    """The least time the device's CPU limit lets its CPU per request take (0: no limit,
    or the CPU per request is not known)."""

    @property
    def total_s(self) -> float:
        """The estimated end-to-end latency: the parts in turn, or the device's CPU limit's
        bound where that is longer."""
        return max(self.head_s + self.transfer_s + self.tail_s, self.bound_s)

    @property
    def objective_s(self) -> float:
        """What the plan minimised for this row."""
        return self.total_s if self.cost_s is None else self.cost_s


@dataclass(frozen=True)
class Plan:
    """Every cut's estimate, in the table's order, and the one chosen."""

    estimates: tuple[Estimate, ...]
    choice: Estimate
    objective: Objective = "latency"


def estimate(
    cost: CutCost,
    link: Link,
    objective: Objective = "latency",
    byte_cost_s: float = 0.0,
    cpu_limit: CpuLimit | None = None,
) -> Estimate:
    """The end-to-end latency of ``cost``'s cut over ``link``, and with ``device_cpu`` the
    device's CPU time (head plus ``byte_cost_s`` per byte sent or answered). With
    ``cpu_limit``, the latency is at least the limit's bound on the cut's device CPU."""
    bound = 0.0
    if cpu_limit is not None and cost.device_cpu_s is not None:
        bound = cpu_limit.bound_s(cost.device_cpu_s)
    if cost.cut == ALL_LOCAL:
        cpu_here = None if objective == "latency" else cost.head_s
        return Estimate(cost.cut, cost.head_s, 0.0, 0.0, 0, cpu_here, bound)
    transfer = link.rtt_s + link.transfer_s(cost.sent_bytes + cost.answer_bytes)
    cpu = None
    if objective == "device_cpu":
        cpu = cost.head_s + (cost.sent_bytes + cost.answer_bytes) * byte_cost_s
    return Estimate(cost.cut, cost.head_s, transfer, cost.tail_s, cost.sent_bytes, cpu, bound)


def plan(
    costs: Sequence[CutCost],
    link: Link,
    objective: Objective = "latency",
    byte_cost_s: float = 0.0,
    margin: float = 0.0,
    cpu_limit: CpuLimit | None = None,
) -> Plan:
    """The cut of least estimated cost among ``costs``: latency, or with ``device_cpu`` the
    device's CPU time (``byte_cost_s``: CPU seconds per byte on the wire). Ties go to the cut
    that needs the link least: all local, else the one sending fewer bytes, else the later
    (more local) one.

    ``cpu_limit``: the device's CPU limit, which bounds each cut's latency from below by
    what it lets the cut's ``device_cpu_s`` take (cuts without one are not bounded).

    ``margin`` (a fraction, 0 by default): a split (a cut with a head, sent to the server) is
    chosen only if its estimate is below the better of all local and all remote by more than
    ``margin`` of that; otherwise the better of the two is. A guard for profiles whose errors
    are of that size: a split that the estimates favour by less than their error can lose.

    Raises:
        ConfigError: ``costs`` is empty, names a cut twice, holds a negative cost, or the
            objective is unknown, its byte cost negative or the margin outside [0, 1).
    """
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"margin {margin!r} must be in [0, 1)")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not (byte_cost_s >= 0 and math.isfinite(byte_cost_s)):
        raise ConfigError(f"byte cost {byte_cost_s!r} must be a number >= 0")
    if not costs:
        raise ConfigError("no cut to choose from")
    seen: set[str] = set()
    for cost in costs:
        if cost.cut in seen:
            raise ConfigError(f"cut '{cost.cut}' is listed twice")
        seen.add(cost.cut)
        cpu = 0.0 if cost.device_cpu_s is None else cost.device_cpu_s
        if min(cost.head_s, cost.tail_s, cost.sent_bytes, cost.answer_bytes, cpu) < 0:
            raise ConfigError(f"cut '{cost.cut}' has a negative cost")
    estimates = tuple(estimate(c, link, objective, byte_cost_s, cpu_limit) for c in costs)
    order = {e.cut: i for i, e in enumerate(estimates)}

    def key(e: Estimate) -> tuple[float, bool, int, int]:
        return (e.objective_s, e.cut != ALL_LOCAL, e.sent_bytes, -order[e.cut])

    choice = min(estimates, key=key)
    whole = [e for e in estimates if e.cut in (ALL_LOCAL, ALL_REMOTE)]
    if margin and whole and choice.cut not in (ALL_LOCAL, ALL_REMOTE):
        better = min(whole, key=key)
        if choice.objective_s > (1.0 - margin) * better.objective_s:
            choice = better
    return Plan(estimates, choice, objective)


def moved(planned: Link, measured: Link, threshold: float) -> bool:
    """Whether the link has moved enough since ``planned`` to plan again: its bandwidth by
    more than ``threshold`` (a fraction) of the planned one, up or down, or its round trip by
    more than ``threshold`` of the planned one and more than :data:`RTT_FLOOR_S`."""
    ratio = measured.bandwidth_bps / planned.bandwidth_bps
    if abs(ratio - 1.0) > threshold:
        return True
    change = abs(measured.rtt_s - planned.rtt_s)
    return change > RTT_FLOOR_S and change > threshold * planned.rtt_s
