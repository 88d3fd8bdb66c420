"""What the control plane (``edged.controlplane``) answers frontends with: over-the-air
updates and on-device learning as plain values (strings, ints, floats), never OTA or learning
objects, so that a frontend's management routes are a codec like its inference routes.

States are the names the management API carries: an update's ``state`` is one of OTA's
states (``IDLE``, ``DOWNLOADING``, ... ``COMMITTED``, ``ROLLED_BACK``, ``FAILED``), a job's
one of ``RUNNING``, ``PUBLISHING``, ``PROMOTED``, ``REJECTED``, ``FAILED``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: one of a fine-tune's metrics (an accuracy, a count, seconds, bytes; None: not measured)
MetricValue = float | int | None


@dataclass(frozen=True)
class UpdateStep:
    """A state one update passed, when (Unix seconds) and why."""

    state: str
    at: float
    reason: str = ""


@dataclass(frozen=True)
class UpdateInfo:
    """One update (or rollback, or fine-tune publication) as recorded; times in Unix
    seconds."""

    id: int
    kind: str
    """"update", "rollback" or "fine-tune"."""
    from_version: int | None
    to_version: int | None
    requested: str
    error: str
    started_at: float
    updated_at: float
    finished_at: float | None = None


@dataclass(frozen=True)
class UpdateStatus:
    """One model's OTA status (or one past update's): the update's state, the committed
    version (None: none yet), the update itself (None: never had one) and, in the history,
    the states it passed."""

    model: str
    state: str
    committed: int | None
    update: UpdateInfo | None = None
    steps: tuple[UpdateStep, ...] = ()


@dataclass(frozen=True)
class UpdateStarted:
    """What StartUpdate did: whether an update started, and why not."""

    status: UpdateStatus
    started: bool
    reason: str = ""


@dataclass(frozen=True)
class SampleCounts:
    """One model's sample store: samples waiting for a fine-tune, samples kept, their bytes."""

    model: str
    pending: int = 0
    stored: int = 0
    stored_bytes: int = 0


@dataclass(frozen=True)
class FineTuneJob:
    """One fine-tune job; ``progress`` 0..1 (live while it runs), times in Unix seconds,
    ``metrics`` the gate's figures by name (``edged.learn.task.JobMetrics``'s fields)."""

    id: int
    model: str
    strategy: str
    trigger: str
    state: str
    progress: float
    parent_version: int | None
    new_version: int | None
    verdict: str
    error: str
    update_id: int
    created_at: float
    updated_at: float
    finished_at: float | None = None
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplesAdded:
    """What AddSamples did: samples accepted, the store after, the job it started (if any)."""

    accepted: int
    counts: SampleCounts
    triggered: FineTuneJob | None = None


@dataclass(frozen=True)
class JobDetail:
    """One job with its model's sample store (GetJob)."""

    job: FineTuneJob
    counts: SampleCounts


@dataclass(frozen=True)
class JobList:
    """Jobs, newest first, with the sample store of every trainable model (or the one asked
    for) (ListJobs)."""

    jobs: tuple[FineTuneJob, ...]
    counts: tuple[SampleCounts, ...]
