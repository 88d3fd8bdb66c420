"""The generated stubs are current, and edged's protos are Triton's on the wire.

(a) edged/_proto/ matches what tools/gen_protos.py produces from protos/.
(b) Every message, enum and RPC of tritonclient's service_pb2/model_config_pb2
    exists in ours with identical field names, numbers, types and cardinality.
(c) Messages serialized by one side parse on the other with equal values, and
    the stock tritonclient can call a server built on our generated servicer.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import descriptor, descriptor_pool, unknown_fields
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_svc

from edged._proto import POOL
from edged._proto.inference import grpc_service_pb2 as ours_svc
from edged._proto.inference import grpc_service_pb2_grpc as ours_svc_grpc
from edged._proto.inference import model_config_pb2 as ours_mc

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "inference.GRPCInferenceService"


# --------------------------------------------------------------------------- (a)


def test_generated_stubs_are_current() -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed; cannot regenerate stubs to compare")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, (
        "edged/_proto/ is stale; run `python tools/gen_protos.py` and commit the result\n"
        + result.stdout
        + result.stderr
    )


# --------------------------------------------------------------------------- (b)


def _walk_messages(containers: Any) -> Iterator[descriptor.Descriptor]:
    for message in containers:
        yield message
        yield from _walk_messages(message.nested_types)


def _triton_messages() -> list[descriptor.Descriptor]:
    found: list[descriptor.Descriptor] = []
    for module in (triton_svc, triton_mc):
        found.extend(_walk_messages(module.DESCRIPTOR.message_types_by_name.values()))
    return found


def _triton_enums() -> list[descriptor.EnumDescriptor]:
    enums: list[descriptor.EnumDescriptor] = []
    for module in (triton_svc, triton_mc):
        enums.extend(module.DESCRIPTOR.enum_types_by_name.values())
    for message in _triton_messages():
        enums.extend(message.enum_types)
    return enums


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == descriptor.FieldDescriptor.LABEL_REPEATED)  # protobuf < 6


def _field_signature(field: descriptor.FieldDescriptor) -> dict[str, Any]:
    return {
        "number": field.number,
        "type": field.type,
        "repeated": _is_repeated(field),
        "packed": field.is_packed,
        "presence": field.has_presence,
        "message_type": field.message_type.full_name if field.message_type else None,
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }


TRITON_MESSAGES = {m.full_name: m for m in _triton_messages()}
TRITON_ENUMS = {e.full_name: e for e in _triton_enums()}
TRITON_METHODS = {
    m.name: m for m in triton_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
}


def test_reference_is_what_we_expect() -> None:
    # Guards the comparison itself against an empty or unexpected reference.
    assert len(TRITON_METHODS) == 20
    assert {"inference.ModelConfig", "inference.ModelInferRequest", "inference.MemoryUsage"} <= set(
        TRITON_MESSAGES
    )
    assert "inference.DataType" in TRITON_ENUMS


@pytest.mark.parametrize("full_name", sorted(TRITON_MESSAGES))
def test_message_matches_triton(full_name: str) -> None:
    theirs = TRITON_MESSAGES[full_name]
    ours = POOL.FindMessageTypeByName(full_name)
    assert {f.name: _field_signature(f) for f in ours.fields} == {
        f.name: _field_signature(f) for f in theirs.fields
    }
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry
    assert [o.name for o in ours.oneofs] == [o.name for o in theirs.oneofs]


@pytest.mark.parametrize("full_name", sorted(TRITON_ENUMS))
def test_enum_matches_triton(full_name: str) -> None:
    theirs = TRITON_ENUMS[full_name]
    ours = POOL.FindEnumTypeByName(full_name)
    assert [(v.name, v.number) for v in ours.values] == [(v.name, v.number) for v in theirs.values]


@pytest.mark.parametrize("method", sorted(TRITON_METHODS))
def test_rpc_matches_triton(method: str) -> None:
    theirs = TRITON_METHODS[method]
    ours = POOL.FindServiceByName(SERVICE).methods_by_name[method]
    assert ours.full_name == theirs.full_name  # the gRPC path is /<service>/<method>
    assert ours.input_type.full_name == theirs.input_type.full_name
    assert ours.output_type.full_name == theirs.output_type.full_name
    assert ours.client_streaming == theirs.client_streaming
    assert ours.server_streaming == theirs.server_streaming


def test_service_has_no_extra_rpcs() -> None:
    assert {m.name for m in POOL.FindServiceByName(SERVICE).methods} == set(TRITON_METHODS)


def test_stubs_live_in_edged_pool_beside_tritonclient() -> None:
    # Both are imported in this process; ours must not collide with Triton's
    # registrations in the default pool.
    assert ours_svc.DESCRIPTOR.name == "inference/grpc_service.proto"
    assert POOL.FindFileByName("inference/model_config.proto") is ours_mc.DESCRIPTOR
    default = descriptor_pool.Default()
    assert default.FindMessageTypeByName("inference.ModelInferRequest") is (
        triton_svc.ModelInferRequest.DESCRIPTOR
    )
    with pytest.raises(KeyError):
        default.FindFileByName("inference/grpc_service.proto")


# --------------------------------------------------------------------------- (c)


def _tree(message: Message) -> dict[str, Any]:
    """Field values of a message as plain Python data (class independent)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                out[field.name] = {k: _tree(v) for k, v in value.items()}
            else:
                out[field.name] = dict(value)
        elif field.message_type is not None:
            out[field.name] = [_tree(v) for v in value] if _is_repeated(field) else _tree(value)
        elif _is_repeated(field):
            out[field.name] = list(value)
        else:
            out[field.name] = value
        if field.containing_oneof is not None:
            out[f"<oneof {field.containing_oneof.name}>"] = field.name
    return out


def _fill_infer_request(pb: Any) -> Message:
    """A ModelInferRequest touching every field and parameter kind, via module `pb`."""
    request = pb.ModelInferRequest(model_name="resnet", model_version="3", id="req-17")
    request.parameters["sequence_id"].uint64_param = 2**63 + 5
    request.parameters["priority"].int64_param = -2
    request.parameters["binary_data_output"].bool_param = True
    request.parameters["note"].string_param = "héllo"
    request.parameters["scale"].double_param = 0.125

    typed = request.inputs.add(name="typed", datatype="FP32", shape=[2, 3])
    typed.parameters["shared_memory_region"].string_param = "region0"
    contents = typed.contents
    contents.bool_contents.extend([True, False])
    contents.int_contents.extend([-(2**31), 7])
    contents.int64_contents.extend([-(2**63), 2**62])
    contents.uint_contents.extend([0, 2**32 - 1])
    contents.uint64_contents.extend([2**64 - 1])
    contents.fp32_contents.extend([1.5, -0.25, 3.0, 0.0, 1e-3, 2.0])
    contents.fp64_contents.extend([1e300, -2.5])
    contents.bytes_contents.extend([b"\x00\xff", b""])
    request.inputs.add(name="raw", datatype="BYTES", shape=[1])

    output = request.outputs.add(name="probs")
    output.parameters["classification"].int64_param = 5
    request.outputs.add(name="logits")

    request.raw_input_contents.extend([b"", b"\x03\x00\x00\x00abc"])
    return request


def _fill_model_config(pb: Any) -> Message:
    config = pb.ModelConfig(name="seq", platform="onnxruntime_onnx", max_batch_size=8)
    config.version_policy.specific.versions.extend([1, 3])
    config.input.add(name="x", data_type=pb.TYPE_FP16, dims=[-1, 4], optional=True)
    config.output.add(name="y", data_type=pb.TYPE_BF16, dims=[4], label_filename="l.txt")
    config.sequence_batching.oldest.max_candidate_sequences = 4
    control = config.sequence_batching.control_input.add(name="START").control.add()
    control.kind = pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID
    control.data_type = pb.TYPE_UINT64
    state = config.sequence_batching.state.add(input_name="in", output_name="out")
    state.initial_state.add(name="zeros", zero_data=True, dims=[2])
    group = config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=2)
    group.rate_limiter.resources.add(name="R", count=1, **{"global": True})
    config.parameters["threads"].string_value = "4"
    config.metric_tags["site"] = "edge-7"
    config.model_warmup.add(name="w", batch_size=1).inputs["x"].random_data = True
    config.optimization.cuda.graph_spec.add(batch_size=1).input["x"].dim.extend([1, 4])
    config.response_cache.enable = True
    return config


def _fill_stream_response(pb: Any) -> Message:
    response = pb.ModelStreamInferResponse(error_message="")
    infer = response.infer_response
    infer.model_name = "m"
    infer.id = "9"
    infer.parameters["triton_final_response"].bool_param = True
    tensor = infer.outputs.add(name="y", datatype="INT64", shape=[1])
    tensor.contents.int64_contents.append(42)
    infer.raw_output_contents.append(b"\x01" * 8)
    return response


def _fill_statistics(pb: Any) -> Message:
    response = pb.ModelStatisticsResponse()
    stats = response.model_stats.add(name="m", version="1", inference_count=10)
    stats.inference_stats.cache_miss.count = 3
    stats.batch_stats.add(batch_size=4).compute_infer.ns = 123
    stats.memory_usage.add(type="CPU", id=0, byte_size=2**40)
    return response


BUILDERS = {
    "ModelInferRequest": _fill_infer_request,
    "ModelConfig": _fill_model_config,
    "ModelStreamInferResponse": _fill_stream_response,
    "ModelStatisticsResponse": _fill_statistics,
}
MODULES = {  # name -> (tritonclient module, our module)
    "ModelInferRequest": (triton_svc, ours_svc),
    "ModelConfig": (triton_mc, ours_mc),
    "ModelStreamInferResponse": (triton_svc, ours_svc),
    "ModelStatisticsResponse": (triton_svc, ours_svc),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("direction", ["triton->edged", "edged->triton"])
def test_round_trip(name: str, direction: str) -> None:
    triton_module, our_module = MODULES[name]
    source_module, target_module = (
        (triton_module, our_module) if direction == "triton->edged" else (our_module, triton_module)
    )
    sent = BUILDERS[name](source_module)
    received = getattr(target_module, name).FromString(sent.SerializeToString())

    assert type(received).DESCRIPTOR.file.pool is not type(sent).DESCRIPTOR.file.pool
    assert _tree(received) == _tree(sent)
    assert received.SerializeToString(deterministic=True) == sent.SerializeToString(
        deterministic=True
    )


def test_round_trip_spot_values() -> None:
    wire = _fill_infer_request(triton_svc).SerializeToString()
    ours = ours_svc.ModelInferRequest.FromString(wire)
    assert ours.parameters["sequence_id"].WhichOneof("parameter_choice") == "uint64_param"
    assert ours.parameters["sequence_id"].uint64_param == 2**63 + 5
    assert ours.parameters["scale"].double_param == 0.125
    assert list(ours.inputs[0].shape) == [2, 3]
    assert list(ours.inputs[0].contents.uint64_contents) == [2**64 - 1]
    assert list(ours.raw_input_contents) == [b"", b"\x03\x00\x00\x00abc"]
    assert len(unknown_fields.UnknownFieldSet(ours)) == 0


# ------------------------------------------------- tritonclient against our servicer


class _EchoServicer(ours_svc_grpc.GRPCInferenceServiceServicer):
    """Answers health checks and echoes inputs back as outputs."""

    def ServerLive(self, request: Any, context: Any) -> Any:
        return ours_svc.ServerLiveResponse(live=True)

    def _echo(self, request: Any) -> Any:
        response = ours_svc.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    def ModelInfer(self, request: Any, context: Any) -> Any:
        return self._echo(request)

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        for request in request_iterator:
            yield ours_svc.ModelStreamInferResponse(infer_response=self._echo(request))


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ours_svc_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_tritonclient_calls_our_servicer(echo_server: str) -> None:
    np = pytest.importorskip("numpy")
    client = triton_grpc.InferenceServerClient(echo_server)
    try:
        assert client.is_server_live()

        data = np.arange(6, dtype=np.float32).reshape(2, 3)
        tensor = triton_grpc.InferInput("x", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer("echo", [tensor], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("x"), data)
        assert result.get_response().id == "r1"

        received: list[Any] = []
        client.start_stream(callback=lambda result, error: received.append((result, error)))
        client.async_stream_infer("echo", [tensor], request_id="s1")
        client.stop_stream()  # waits for the stream to drain
        assert len(received) == 1
        stream_result, error = received[0]
        assert error is None
        np.testing.assert_array_equal(stream_result.as_numpy("x"), data)
    finally:
        client.close()
