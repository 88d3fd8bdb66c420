"""grpc.health.v1 (overall and per model) and server reflection, with the standard clients."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def channel(address: str):
    with grpc.insecure_channel(address) as ch:
        yield ch


def test_health_overall_and_per_model(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == SERVING
    for model in ("digits", "multi_io", "simple_static"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=model), timeout=5)
        assert reply.status == SERVING, model
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _reflect(channel, request: reflection_pb2.ServerReflectionRequest):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))


def test_reflection_lists_and_describes_services(channel) -> None:
    reply = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    reply = _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService"
        ),
    )
    assert reply.file_descriptor_response.file_descriptor_proto
    reply = _reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelConfig"),
    )
    assert reply.file_descriptor_response.file_descriptor_proto
