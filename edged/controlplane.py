"""The control plane: the one object the frontends' management routes talk to, beside the data
plane (``edged.serving.dataplane``) for inference.

Over-the-air updates (start, status, rollback, history: ``edged.ota``) and on-device learning
(add samples, start a fine-tune, jobs and sample counts: ``edged.learn``), answered in
``edged.core.control`` values, so a frontend imports ``edged.core``, the data plane and this,
and nothing of OTA or learning. Either side may be off (None): its calls then raise
``UnavailableError`` saying which config key turns it on.
"""

from __future__ import annotations

from collections.abc import Mapping

from edged.core.control import (
    FineTuneJob,
    JobDetail,
    JobList,
    SamplesAdded,
    UpdateInfo,
    UpdateStarted,
    UpdateStatus,
    UpdateStep,
)
from edged.core.errors import UnavailableError
from edged.core.types import Array
from edged.learn.jobs import LearnManager
from edged.learn.store import JobRecord
from edged.ota.state import Transition
from edged.ota.types import ModelStatus
from edged.ota.updater import UpdateManager

__all__ = ["LEARNING_OFF", "OTA_OFF", "ControlPlane"]

#: what the learning calls answer when learn.enabled is off
LEARNING_OFF = "on-device learning is off: set learn.enabled (docs/learning.md)"
#: what the update calls answer when OTA is off
OTA_OFF = "over-the-air updates are off: set ota.repository_url (docs/ota.md)"

#: ListUpdates' default number of updates
HISTORY_LIMIT = 100


def update_status(status: ModelStatus, transitions: list[Transition] | None = None) -> UpdateStatus:
    """An OTA status (with the states its update passed) as the frontends see it."""
    record = status.record
    update = (
        None
        if record is None
        else UpdateInfo(
            id=record.id,
            kind=record.kind.value,
            from_version=record.from_version,
            to_version=record.to_version,
            requested=record.requested,
            error=record.error,
            started_at=record.started_at,
            updated_at=record.updated_at,
            finished_at=record.finished_at,
        )
    )
    return UpdateStatus(
        model=status.model,
        state=status.state.value,
        committed=status.committed,
        update=update,
        steps=tuple(UpdateStep(t.state.value, t.at, t.reason) for t in transitions or ()),
    )


def fine_tune_job(job: JobRecord, progress: float | None = None) -> FineTuneJob:
    """A stored job as the frontends see it, with its live ``progress`` when it runs."""
    return FineTuneJob(
        id=job.id,
        model=job.model,
        strategy=job.strategy,
        trigger=job.trigger,
        state=job.state.value,
        progress=job.progress if progress is None else progress,
        parent_version=job.parent_version,
        new_version=job.new_version,
        verdict=job.verdict,
        error=job.error,
        update_id=job.update_id,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        metrics=dict(job.metrics),
    )


class ControlPlane:
    """Updates and learning as the frontends see them, over one UpdateManager (None: OTA is
    off) and one LearnManager (None: learning is off)."""

    def __init__(
        self, updates: UpdateManager | None = None, learn: LearnManager | None = None
    ) -> None:
        self._updates = updates
        self._learn = learn

    def _ota(self) -> UpdateManager:
        if self._updates is None:
            raise UnavailableError(OTA_OFF)
        return self._updates

    def _learning(self) -> LearnManager:
        if self._learn is None:
            raise UnavailableError(LEARNING_OFF)
        return self._learn

    def require_learning(self) -> None:
        """For a frontend, before it decodes samples' tensors.

        Raises:
            UnavailableError: learning is off.
        """
        self._learning()

    # -- over-the-air updates ----------------------------------------------------------------

    async def start_update(
        self, model: str, version: str = "latest", *, wait: bool = False
    ) -> UpdateStarted:
        """Update ``model`` to ``version`` (a number or "latest"; "" is "latest").

        Raises:
            UnavailableError: OTA is off; as ``UpdateManager.start_update``.
            ModelNotFoundError, InvalidInputError, AlreadyExistsError: as
                ``UpdateManager.start_update``.
        """
        result = await self._ota().start_update(model, version or "latest", wait=wait)
        return UpdateStarted(update_status(result.status), result.started, result.reason)

    async def update_status(self, model: str = "") -> list[UpdateStatus]:
        """Every model's OTA status (``model``: just that one).

        Raises:
            UnavailableError: OTA is off.
            ModelNotFoundError: as ``UpdateManager.status``.
        """
        return [update_status(s) for s in await self._ota().status(model)]

    async def rollback(self, model: str, version: str = "", *, wait: bool = False) -> UpdateStatus:
        """Go back to an earlier version (``version`` "": the one below the committed one).

        Raises:
            UnavailableError: OTA is off.
            ModelNotFoundError, InvalidInputError, AlreadyExistsError: as
                ``UpdateManager.rollback``.
        """
        return update_status(await self._ota().rollback(model, version, wait=wait))

    async def update_history(self, model: str = "", limit: int = 0) -> list[UpdateStatus]:
        """Past updates newest first (at most ``limit``, 0: ``HISTORY_LIMIT``), each with
        the states it passed.

        Raises:
            UnavailableError: OTA is off.
        """
        history = await self._ota().history(model, limit or HISTORY_LIMIT)
        return [update_status(status, steps) for status, steps in history]

    # -- on-device learning ------------------------------------------------------------------

    async def add_samples(
        self, model: str, inputs: Mapping[str, Array], labels: Array
    ) -> SamplesAdded:
        """Check, featurise and store labelled samples.

        Raises:
            UnavailableError: learning is off; as ``LearnManager.add_samples``.
            ModelNotFoundError, ModelNotReadyError, InvalidInputError, OverloadedError,
            ModelLoadError, ExecutorError: as ``LearnManager.add_samples``.
        """
        accepted, counts, job = await self._learning().add_samples(model, inputs, labels)
        triggered = None if job is None else fine_tune_job(job)
        return SamplesAdded(accepted, counts, triggered)

    async def start_fine_tune(
        self, model: str, strategy: str = "", *, wait: bool = False
    ) -> FineTuneJob:
        """Fine-tune ``model`` on its pending samples (``strategy`` "": the model's).

        Raises:
            UnavailableError: learning is off; as ``LearnManager.start_job``.
            ModelNotFoundError, ModelNotReadyError, InvalidInputError, AlreadyExistsError,
            UnsupportedError: as ``LearnManager.start_job``.
        """
        learn = self._learning()
        job = await learn.start_job(model, strategy, wait=wait)
        return fine_tune_job(job, learn.progress(job))

    async def job(self, job_id: int) -> JobDetail:
        """One job with its model's sample counts.

        Raises:
            UnavailableError: learning is off.
            ModelNotFoundError: no such job.
        """
        learn = self._learning()
        job = await learn.job(job_id)
        counts = await learn.counts(job.model)
        return JobDetail(fine_tune_job(job, learn.progress(job)), counts)

    async def jobs(self, model: str = "", limit: int = 0) -> JobList:
        """Jobs newest first (at most ``limit``, 0: ``learn.history_limit``), with the sample
        counts of every trainable model (``model``: of that one).

        Raises:
            UnavailableError: learning is off.
            ModelNotFoundError: ``model`` is not in the repository.
        """
        learn = self._learning()
        jobs = await learn.jobs(model, limit)
        counts = await learn.all_counts(model)
        return JobList(
            tuple(fine_tune_job(j, learn.progress(j)) for j in jobs),
            tuple(counts),
        )
