"""edged.v1.Management over gRPC: over-the-air updates (protos/edged/v1/management.proto).

A thin servicer: protobuf in -> the UpdateManager -> protobuf out; domain errors become status
codes in ``edged.frontends.grpc.handle_errors``.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from edged._proto.edged.v1 import management_pb2 as pb
from edged._proto.edged.v1 import management_pb2_grpc as pb_grpc
from edged.core.errors import UnavailableError
from edged.frontends.grpc import handle_errors
from edged.ota.state import Transition, UpdateRecord
from edged.ota.updater import ModelStatus, UpdateManager

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


def service(updates: UpdateManager | None) -> tuple[str, Callable[[grpc.aio.Server], None]]:
    """The Management service for ``build_server(services=...)``."""

    def add_to_server(server: grpc.aio.Server) -> None:
        pb_grpc.add_ManagementServicer_to_server(  # type: ignore[no-untyped-call]
            ManagementServicer(updates), server
        )

    return SERVICE_NAME, add_to_server


class ManagementServicer(pb_grpc.ManagementServicer):
    """edged.v1.Management over one UpdateManager (None: OTA is off)."""

    def __init__(self, updates: UpdateManager | None) -> None:
        self._updates = updates

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
