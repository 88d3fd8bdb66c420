"""edged.v1.Management over gRPC: over-the-air updates and on-device learning
(protos/edged/v1/management.proto).

A thin servicer over the control plane (``edged.controlplane``): protobuf in -> the
ControlPlane -> ``edged.core.control`` values -> protobuf out; domain errors become status
codes in ``edged.frontends.grpc.handle_errors``. AddSamples' inputs are decoded by the
inference codec's ``inputs_from_proto`` (no inference message is built), so they are checked
exactly as an inference request's are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np

from edged._proto.edged.v1 import management_pb2 as pb
from edged._proto.edged.v1 import management_pb2_grpc as pb_grpc
from edged.controlplane import ControlPlane
from edged.core.control import FineTuneJob, MetricValue, SampleCounts, UpdateStatus
from edged.core.errors import InvalidInputError
from edged.core.limits import RequestLimits
from edged.frontends.grpc import handle_errors
from edged.frontends.grpc_server import Services
from edged.frontends.kserve_codec import (
    check_input_limits,
    inputs_decode_inline,
    inputs_from_proto,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Management"].full_name


def _version(v: int | None) -> str:
    return "" if v is None else str(v)


def _state(name: str) -> pb.UpdateState.ValueType:
    return pb.UpdateState.Value(f"UPDATE_STATE_{name}")


def status_to_proto(status: UpdateStatus) -> pb.UpdateStatus:
    """One model's (or one past update's) status as the wire message."""
    message = pb.UpdateStatus(
        model=status.model,
        committed_version=_version(status.committed),
        state=_state(status.state),
    )
    update = status.update
    if update is not None:
        message.update_id = update.id
        message.kind = update.kind
        message.from_version = _version(update.from_version)
        message.to_version = _version(update.to_version)
        message.requested = update.requested
        message.last_error = update.error
        message.started.FromNanoseconds(int(update.started_at * 1e9))
        message.updated.FromNanoseconds(int(update.updated_at * 1e9))
        if update.finished_at is not None:
            message.finished.FromNanoseconds(int(update.finished_at * 1e9))
    for step in status.steps:
        added = message.transitions.add(state=_state(step.state), reason=step.reason)
        added.time.FromNanoseconds(int(step.at * 1e9))
    return message


def counts_to_proto(counts: SampleCounts) -> pb.SampleCounts:
    return pb.SampleCounts(
        model=counts.model,
        pending=counts.pending,
        stored=counts.stored,
        stored_bytes=counts.stored_bytes,
    )


def _accuracy(value: MetricValue) -> float:
    return float("nan") if value is None else float(value)


def _count(value: MetricValue) -> int:
    return 0 if value is None else int(value)


def job_to_proto(job: FineTuneJob) -> pb.Job:
    """One fine-tune job as the wire message."""
    m = job.metrics
    message = pb.Job(
        id=job.id,
        model=job.model,
        strategy=job.strategy,
        state=pb.JobState.Value(f"JOB_STATE_{job.state}"),
        progress=job.progress,
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
                old_holdout=_count(m.get("old_holdout")),
                new_holdout=_count(m.get("new_holdout")),
                trained_samples=_count(m.get("trained_samples")),
                train_seconds=float(m.get("train_seconds") or 0.0),
                worker_max_rss_bytes=_count(m.get("worker_max_rss_bytes")),
                state_bytes=_count(m.get("state_bytes")),
            )
        )
    message.created.FromNanoseconds(int(job.created_at * 1e9))
    message.updated.FromNanoseconds(int(job.updated_at * 1e9))
    if job.finished_at is not None:
        message.finished.FromNanoseconds(int(job.finished_at * 1e9))
    return message


def service(
    control: ControlPlane,
    limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
) -> tuple[str, Callable[[Services], None]]:
    """The Management service for ``build_server(services=...)``."""

    def add_to_server(server: Services) -> None:
        pb_grpc.add_ManagementServicer_to_server(  # type: ignore[no-untyped-call]
            ManagementServicer(control, limits), server
        )

    return SERVICE_NAME, add_to_server


class ManagementServicer(pb_grpc.ManagementServicer):
    """edged.v1.Management over one ControlPlane."""

    def __init__(
        self,
        control: ControlPlane,
        limits: RequestLimits = RequestLimits(),  # noqa: B008 - frozen
    ) -> None:
        self._control = control
        self._limits = limits

    @handle_errors
    async def StartUpdate(
        self, request: pb.StartUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartUpdateResponse:
        result = await self._control.start_update(request.model, request.version, wait=request.wait)
        return pb.StartUpdateResponse(
            status=status_to_proto(result.status), started=result.started, reason=result.reason
        )

    @handle_errors
    async def GetUpdateStatus(
        self, request: pb.GetUpdateStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUpdateStatusResponse:
        statuses = await self._control.update_status(request.model)
        return pb.GetUpdateStatusResponse(models=[status_to_proto(s) for s in statuses])

    @handle_errors
    async def Rollback(
        self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackResponse:
        status = await self._control.rollback(request.model, request.version, wait=request.wait)
        return pb.RollbackResponse(status=status_to_proto(status))

    @handle_errors
    async def ListUpdates(
        self, request: pb.ListUpdatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListUpdatesResponse:
        history = await self._control.update_history(request.model, request.limit)
        return pb.ListUpdatesResponse(updates=[status_to_proto(status) for status in history])

    # -- on-device learning ----------------------------------------------------------------

    @handle_errors
    async def AddSamples(
        self, request: pb.AddSamplesRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddSamplesResponse:
        self._control.require_learning()
        check_input_limits(request.inputs, self._limits)
        if not request.model:
            raise InvalidInputError("model_name is empty")
        if inputs_decode_inline(request.inputs):
            inputs = inputs_from_proto(request.inputs, request.raw_input_contents)
        else:
            inputs = await asyncio.to_thread(
                inputs_from_proto, request.inputs, request.raw_input_contents
            )
        added = await self._control.add_samples(
            request.model, inputs, np.array(request.labels, dtype=np.int64)
        )
        response = pb.AddSamplesResponse(
            accepted=added.accepted, counts=counts_to_proto(added.counts)
        )
        if added.triggered is not None:
            response.triggered.CopyFrom(job_to_proto(added.triggered))
        return response

    @handle_errors
    async def StartFineTune(
        self, request: pb.StartFineTuneRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartFineTuneResponse:
        job = await self._control.start_fine_tune(
            request.model, request.strategy, wait=request.wait
        )
        return pb.StartFineTuneResponse(job=job_to_proto(job))

    @handle_errors
    async def GetJob(
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJobResponse:
        detail = await self._control.job(request.job_id)
        return pb.GetJobResponse(
            job=job_to_proto(detail.job), counts=counts_to_proto(detail.counts)
        )

    @handle_errors
    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        listed = await self._control.jobs(request.model, request.limit)
        return pb.ListJobsResponse(
            jobs=[job_to_proto(j) for j in listed.jobs],
            counts=[counts_to_proto(c) for c in listed.counts],
        )
