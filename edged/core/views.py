"""What the data plane (``edged.serving.dataplane``) answers frontends with: plain values in
edged's own vocabulary (strings, ints, ``edged.core.types``), never serving or hal objects, so
that a frontend is a codec plus routes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edged.core.types import Signature

#: a circuit breaker's states, as metrics label them (hal's BreakerState values; a unit test
#: keeps the two in step)
BREAKER_STATES = ("closed", "open", "half_open")


class VersionState(enum.StrEnum):
    """A model version's state, as RepositoryIndex reports it."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index."""

    name: str
    version: str
    state: VersionState
    reason: str = ""


@dataclass(frozen=True)
class ServerMetadata:
    """Who answers: name, version and the protocol extensions this frontend implements."""

    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output as a client sends it (the batch axis as -1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A served model version's metadata."""

    name: str
    versions: tuple[str, ...]
    platform: str
    executor: str
    max_batch_size: int
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class PipelineStepView:
    """One step of a pipeline, as Triton's ensemble_scheduling shows it."""

    name: str
    model: str
    version: int
    """-1: the highest version served, at each request."""
    input_map: tuple[tuple[str, str], ...]
    """(model input, pipeline tensor) pairs."""
    output_map: tuple[tuple[str, str], ...]
    """(model output, pipeline tensor) pairs."""


@dataclass(frozen=True)
class ModelConfiguration:
    """What a served model version runs with, in Triton's terms (ModelConfig)."""

    name: str
    signature: Signature
    platform: str
    backend: str
    executor: str
    instances: int
    versions: tuple[int, ...]
    model_toml: str
    #: the batcher gathers requests (max_batch_size > 0); the fields below apply only then
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority: int = 0
    max_queue_size: int = 0
    default_timeout_us: int = 0
    #: a pipeline's steps (platform "ensemble"); () for a model
    steps: tuple[PipelineStepView, ...] = ()


@dataclass(frozen=True)
class ServedVersion:
    """A version served now, as the metrics endpoint shows it."""

    name: str
    version: int
    executor: str
    instances: int
    max_batch_size: int
    queue_depth: int
    in_flight: int


@dataclass(frozen=True)
class BreakerView:
    """One executor's circuit breaker of one served version (``state``: a BREAKER_STATES
    value)."""

    model: str
    version: int
    executor: str
    state: str


@dataclass(frozen=True)
class PlacementCounters:
    """Failover counts: (model, version, from, to) moves away and back, and executor failures
    by (model, version, executor)."""

    failovers: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    recoveries: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    executor_failures: dict[tuple[str, str, str], int] = field(default_factory=dict)
    replans: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(model, version, from cut, to cut) -> switches of a split model's cut."""


@dataclass(frozen=True)
class LinkView:
    """The link to one remote server, as the ``remote`` executor measured it."""

    address: str
    rtt_s: float | None
    """Estimated round trip (None: not measured yet)."""
    bandwidth_bps: float | None
    """Estimated bandwidth, bits per second (None: not measured yet)."""
    calls: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    """Time the calls took, summed."""


@dataclass(frozen=True)
class CutView:
    """The cut a re-planned split model version serves (``<local>``: all local)."""

    model: str
    version: int
    cut: str
