"""edged.v1.Management over gRPC: over-the-air updates and on-device learning
(protos/edged/v1/management.proto).

A thin servicer: protobuf in -> the UpdateManager or LearnManager -> protobuf out; domain
errors become status codes in ``edged.frontends.grpc.handle_errors``. AddSamples' inputs are
decoded by the inference codec's ``inputs_from_proto`` (no inference message is built), so
they are checked exactly as an inference request's are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np

from edged._proto.edged.v1 import management_pb2 as pb
from edged._proto.edged.v1 import management_pb2_grpc as pb_grpc
from edged.core.errors import InvalidInputError, UnavailableError
from edged.core.limits import RequestLimits
from edged.frontends.grpc import handle_errors
from edged.frontends.kserve_codec import (
    check_input_limits,
    inputs_decode_inline,
    inputs_from_proto,
)
from edged.learn.jobs import LEARNING_OFF, LearnManager
from edged.learn.store import Counts, JobRecord
from edged.ota.state import Transition, UpdateRecord
from edged.ota.types import ModelStatus
from edged.ota.updater import UpdateManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Management"].full_name


def _version(v: int | None) -> str:
    return "" if v is None else str(v)


def _state(name: str) -> pb.UpdateState.ValueType:
    return pb.UpdateState.Value(f"UPDATE_STATE_{name}")


def status_to_proto(
    status: ModelStatus, transitions: list[Transition] | None = None
) -> pb.UpdateStatus:
    """One model's (or one past update's) status as the wire message."""
    message = pb.UpdateStatus(
        model=status.model,
        committed_version=_version(status.committed),
        state=_state(status.state),
    )
    record: UpdateRecord | None = status.record
    if record is not None:
        message.update_id = record.id
        message.kind = record.kind.value
        message.from_version = _version(record.from_version)
        message.to_version = _version(record.to_version)
        message.requested = record.requested
        message.last_error = record.error
        message.started.FromNanoseconds(int(record.started_at * 1e9))
        message.updated.FromNanoseconds(int(record.updated_at * 1e9))
        if record.finished_at is not None:
            message.finished.FromNanoseconds(int(record.finished_at * 1e9))
    for t in transitions or []:
        step = message.transitions.add(state=_state(t.state), reason=t.reason)
        step.time.FromNanoseconds(int(t.at * 1e9))
    return message


def counts_to_proto(counts: Counts) -> pb.SampleCounts:
    return pb.SampleCounts(
        model=counts.model,
        pending=counts.pending,
        stored=counts.stored,
        stored_bytes=counts.stored_bytes,
    )


def _accuracy(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def job_to_proto(job: JobRecord, progress: float | None = None) -> pb.Job:
    """One fine-tune job as the wire message."""
    m = job.metrics
    message = pb.Job(
        id=job.id,
        model=job.model,
        strategy=job.strategy,
        state=pb.JobState.Value(f"JOB_STATE_{job.state}"),
        progress=job.progress if progress is None else progress,
        trigger=job.trigger,
        parent_version=_version(job.parent_version),
        new_version=_version(job.new_version),
        verdict=job.verdict,
        error=job.error,
        update_id=job.update_id,
    )
    if m:
        message.metrics.CopyFrom(
            pb.JobMetrics(
                old_accuracy_before=_accuracy(m.get("old_accuracy_before")),
                old_accuracy_after=_accuracy(m.get("old_accuracy_after")),
                new_accuracy_before=_accuracy(m.get("new_accuracy_before")),
                new_accuracy_after=_accuracy(m.get("new_accuracy_after")),
                old_holdout=int(m.get("old_holdout", 0)),
                new_holdout=int(m.get("new_holdout", 0)),
                trained_samples=int(m.get("trained_samples", 0)),
                train_seconds=float(m.get("train_seconds", 0.0)),
                worker_max_rss_bytes=int(m.get("worker_max_rss_bytes", 0)),
                state_bytes=int(m.get("state_bytes", 0)),
            )
        )
    message.created.FromNanoseconds(int(job.created_at * 1e9))
    message.updated.FromNanoseconds(int(job.updated_at * 1e9))
    if job.finished_at is not None:
        message.finished.FromNanoseconds(int(job.finished_at * 1e9))
    return message


def service(
    updates: UpdateManager | None,
    learn: LearnManager | None = None,
    limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
) -> tuple[str, Callable[[grpc.aio.Server], None]]:
    """The Management service for ``build_server(services=...)``."""

    def add_to_server(server: grpc.aio.Server) -> None:
        pb_grpc.add_ManagementServicer_to_server(  # type: ignore[no-untyped-call]
            ManagementServicer(updates, learn, limits), server
        )

    return SERVICE_NAME, add_to_server


class ManagementServicer(pb_grpc.ManagementServicer):
    """edged.v1.Management over one UpdateManager (None: OTA is off) and one LearnManager
    (None: learning is off)."""

    def __init__(
        self,
        updates: UpdateManager | None,
        learn: LearnManager | None = None,
        limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
    ) -> None:
        self._updates = updates
        self._learn = learn
        self._limits = limits

    def _learning(self) -> LearnManager:
        if self._learn is None:
            raise UnavailableError(LEARNING_OFF)
        return self._learn

    def _manager(self) -> UpdateManager:
        if self._updates is None:
            raise UnavailableError(
                "over-the-air updates are off: set ota.repository_url (docs/ota.md)"
            )
        return self._updates

    @handle_errors
    async def StartUpdate(
        self, request: pb.StartUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartUpdateResponse:
        result = await self._manager().start_update(
            request.model, request.version or "latest", wait=request.wait
        )
        return pb.StartUpdateResponse(
            status=status_to_proto(result.status), started=result.started, reason=result.reason
        )

    @handle_errors
    async def GetUpdateStatus(
        self, request: pb.GetUpdateStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUpdateStatusResponse:
        statuses = await self._manager().status(request.model)
        return pb.GetUpdateStatusResponse(models=[status_to_proto(s) for s in statuses])

    @handle_errors
    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackResponse:
        status = await self._manager().rollback(request.model, request.version, wait=request.wait)
        return pb.RollbackResponse(status=status_to_proto(status))

    @handle_errors
    async def ListUpdates(
        self, request: pb.ListUpdatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUpdatesResponse:
        history = await self._manager().history(request.model, request.limit or 100)
        return pb.ListUpdatesResponse(
            updates=[status_to_proto(status, steps) for status, steps in history]
        )

    # -- on-device learning ----------------------------------------------------------------

    @handle_errors
    async def AddSamples(
        self, request: pb.AddSamplesRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddSamplesResponse:
        learn = self._learning()
        check_input_limits(request.inputs, self._limits)
        if not request.model:
            raise InvalidInputError("model_name is empty")
        if inputs_decode_inline(request.inputs):
            inputs = inputs_from_proto(request.inputs, request.raw_input_contents)
        else:
            inputs = await asyncio.to_thread(
                inputs_from_proto, request.inputs, request.raw_input_contents
            )
        accepted, counts, job = await learn.add_samples(
            request.model, inputs, np.array(request.labels, dtype=np.int64)
        )
        response = pb.AddSamplesResponse(accepted=accepted, counts=counts_to_proto(counts))
        if job is not None:
            response.triggered.CopyFrom(job_to_proto(job))
        return response

    @handle_errors
    async def StartFineTune(
        self, request: pb.StartFineTuneRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartFineTuneResponse:
        learn = self._learning()
        job = await learn.start_job(request.model, request.strategy, wait=request.wait)
        return pb.StartFineTuneResponse(job=job_to_proto(job, learn.progress(job)))

    @handle_errors
    async def GetJob(
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJobResponse:
        learn = self._learning()
        job = await learn.job(request.job_id)
        counts = await learn.counts(job.model)
        return pb.GetJobResponse(
            job=job_to_proto(job, learn.progress(job)), counts=counts_to_proto(counts)
        )

    @handle_errors
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        learn = self._learning()
        jobs = await learn.jobs(request.model, request.limit)
        counts = await learn.all_counts(request.model)
        return pb.ListJobsResponse(
            jobs=[job_to_proto(j, learn.progress(j)) for j in jobs],
            counts=[counts_to_proto(c) for c in counts],
        )
