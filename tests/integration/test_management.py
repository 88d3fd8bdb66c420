"""edged.v1.Management on the shared daemon (OTA off): served, reflected, and every RPC says
that OTA is off."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edged._proto.edged.v1 import management_pb2 as pb
from edged._proto.edged.v1 import management_pb2_grpc as pb_grpc


@pytest.fixture
def stub(address: str):
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("rpc", "request_"),
    [
        ("StartUpdate", pb.StartUpdateRequest(model="digits")),
        ("GetUpdateStatus", pb.GetUpdateStatusRequest()),
        ("Rollback", pb.RollbackRequest(model="digits")),
        ("ListUpdates", pb.ListUpdatesRequest()),
    ],
)
def test_ota_off_is_unavailable(stub, rpc: str, request_) -> None:
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ota.repository_url" in info.value.details()


def test_reflection_describes_management(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(reflect.ServerReflectionInfo(iter([request]), timeout=5)))
        assert "edged.v1.Management" in {s.name for s in reply.list_services_response.service}
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="edged.v1.Management"
        )
        reply = next(iter(reflect.ServerReflectionInfo(iter([request]), timeout=5)))
        assert reply.file_descriptor_response.file_descriptor_proto
