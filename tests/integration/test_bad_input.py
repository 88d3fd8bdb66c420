"""Every kind of bad request gets a clear status and message naming what was wrong, never
reaches the executor, and leaves the daemon serving."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

FP32_64 = np.zeros((1, 64), dtype=np.float32)


def digits_request(**changes) -> pb.ModelInferRequest:
    """A valid digits request, then ``changes`` applied."""
    request = pb.ModelInferRequest(model_name="digits", id="bad")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(FP32_64.tobytes())
    for key, value in changes.items():
        value(request) if callable(value) else setattr(request, key, value)
    return request


def _set_input(**fields):
    def change(request: pb.ModelInferRequest) -> None:
        tensor = request.inputs[0]
        for k, v in fields.items():
            if k == "shape":
                del tensor.shape[:]
                tensor.shape.extend(v)
            else:
                setattr(tensor, k, v)

    return change


def _set_raw(data: bytes):
    def change(request: pb.ModelInferRequest) -> None:
        request.raw_input_contents[0] = data

    return change


def _add_typed(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.extend([0.0] * 64)


def _add_input(name: str):
    def change(request: pb.ModelInferRequest) -> None:
        request.inputs.add(name=name, datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(FP32_64.tobytes())

    return change


def _drop_input(request: pb.ModelInferRequest) -> None:
    del request.inputs[:]
    del request.raw_input_contents[:]


def _request_output(name: str):
    def change(request: pb.ModelInferRequest) -> None:
        request.outputs.add(name=name)

    return change


def _multi_io_text(raw_text: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="multi_io")
    tensors = {
        "x": ("FP32", np.zeros((1, 4), np.float32).tobytes()),
        "offset": ("FP16", np.zeros((1, 4), np.float16).tobytes()),
        "mask": ("BOOL", np.zeros((1, 4), np.bool_).tobytes()),
        "ids": ("INT64", np.zeros((1, 3), np.int64).tobytes()),
        "raw": ("UINT8", np.zeros((1, 2), np.uint8).tobytes()),
        "text": ("BYTES", raw_text),
    }
    shapes = {
        "x": [1, 4],
        "offset": [1, 4],
        "mask": [1, 4],
        "ids": [1, 3],
        "raw": [1, 2],
        "text": [1, 1],
    }
    for name, (datatype, data) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=shapes[name])
        request.raw_input_contents.append(data)
    return request


CASES = [
    # (id, request, status, words the message must contain)
    (
        "wrong-dtype",
        digits_request(_=_set_input(datatype="FP64"), __=_set_raw(np.zeros((1, 64)).tobytes())),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "FP64", "FP32"],
    ),
    (
        "wrong-rank",
        digits_request(_=_set_input(shape=[64])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "shape"],
    ),
    (
        "wrong-shape",
        digits_request(_=_set_input(shape=[2, 32])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "shape", "[2, 32]"],
    ),
    (
        "raw-length",
        digits_request(_=_set_raw(b"\x00" * 255)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "255 bytes", "256"],
    ),
    (
        "raw-and-typed",
        digits_request(_=_add_typed),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "both"],
    ),
    ("unknown-model", digits_request(model_name="nope"), grpc.StatusCode.NOT_FOUND, ["nope"]),
    (
        "unknown-version",
        digits_request(model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        ["digits", "9"],
    ),
    (
        "bad-version",
        digits_request(model_version="latest"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["latest"],
    ),
    (
        "unknown-input",
        digits_request(_=_add_input("extra")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["extra"],
    ),
    (
        "duplicate-input",
        digits_request(_=_add_input("input")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "more than once"],
    ),
    (
        "missing-input",
        digits_request(_=_drop_input),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["missing", "input"],
    ),
    (
        "unknown-output",
        digits_request(_=_request_output("logits")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["logits"],
    ),
    (
        "batch-too-big",
        digits_request(
            _=_set_input(shape=[33, 64]), __=_set_raw(np.zeros((33, 64), np.float32).tobytes())
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "batch size 33", "32"],
    ),
    (
        "unknown-datatype",
        digits_request(_=_set_input(datatype="FP8")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "FP8"],
    ),
    (
        "negative-dim",
        digits_request(_=_set_input(shape=[-1, 64])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "negative"],
    ),
    (
        "bytes-prefix-cut",
        _multi_io_text(b"\x05\x00"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["text", "prefix"],
    ),
    (
        "bytes-prefix-overrun",
        _multi_io_text(struct.pack("<I", 100) + b"abc"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["text", "100 bytes"],
    ),
    (
        "bytes-not-utf8",
        _multi_io_text(struct.pack("<I", 2) + b"\xff\xfe"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["text", "UTF-8"],
    ),
    (
        "shared-memory-and-raw",
        digits_request(
            _=lambda r: (
                r.inputs[0]
                .parameters["shared_memory_region"]
                .CopyFrom(pb.InferParameter(string_param="r0"))
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["raw_input_contents", "shared memory"],  # both raw bytes and a region
    ),
    (
        "shared-memory-unregistered",
        digits_request(
            _=lambda r: (
                r.inputs[0]
                .parameters["shared_memory_region"]
                .CopyFrom(pb.InferParameter(string_param="r0")),
                r.inputs[0]
                .parameters["shared_memory_byte_size"]
                .CopyFrom(pb.InferParameter(int64_param=256)),
                r.ClearField("raw_input_contents"),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "'r0'", "not registered"],
    ),
]


# issue #11: malformed shapes and over-long names are INVALID_ARGUMENT (never INTERNAL, never
# RESOURCE_EXHAUSTED from an error that echoes kilobytes of client text)
CASES += [
    (
        "huge-dim-beside-zero",
        digits_request(_=_set_input(shape=[0, 2**63 - 1]), __=_set_raw(b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "too large"],
    ),
    (
        "65-dims",
        digits_request(_=_set_input(shape=[1] * 65)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "65 dimensions", "64"],
    ),
    (
        "10kb-datatype",
        digits_request(_=_set_input(datatype="X" * 10_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input", "datatype", "10000 chars"],
    ),
    (
        "100kb-model-name",
        digits_request(model_name="m" * 100_000),
        grpc.StatusCode.NOT_FOUND,
        ["100000 chars"],
    ),
    (
        "100kb-tensor-name",
        digits_request(_=_set_input(name="t" * 100_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["100000 chars"],
    ),
    (
        "nul-in-names",
        digits_request(_=_set_input(name="in\0put")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["in\\x00put"],
    ),
]


@pytest.fixture
def stub(address: str):
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def executions(stub, model: str) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return sum(s.execution_count for s in stats.model_stats)


@pytest.mark.parametrize(
    ("request_", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_is_refused_clearly(stub, request_, code, words) -> None:
    before = {m: executions(stub, m) for m in ("digits", "multi_io")}
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, timeout=10)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), (word, err.value.details())
    # never reached an executor ...
    assert {m: executions(stub, m) for m in before} == before
    # ... and the daemon goes on serving
    good = stub.ModelInfer(digits_request(), timeout=10)
    assert good.outputs[1].name == "label"


def test_message_over_size_limit(stub) -> None:
    # the shared daemon runs with EDGED_SERVER_MAX_REQUEST_BYTES = 4 MiB
    big = np.zeros((32, 64 * 1024), dtype=np.float32)  # 8 MiB
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=list(big.shape))
    request.raw_input_contents.append(big.tobytes())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    assert stub.ModelInfer(digits_request(), timeout=10).model_name == "digits"


def test_typed_contents_are_accepted(stub) -> None:
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend([0.0] * 64)
    typed = stub.ModelInfer(request, timeout=10)
    raw = stub.ModelInfer(digits_request(), timeout=10)
    assert typed.raw_output_contents == raw.raw_output_contents


def test_stream_survives_bad_requests(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [
            digits_request(id="a"),
            digits_request(model_name="nope", id="b"),
            digits_request(_=_set_raw(b"x"), id="c"),
            digits_request(id="d"),
        ]
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=10))
    by_id = {r.infer_response.id: r for r in replies}
    assert set(by_id) == {"a", "b", "c", "d"}
    assert by_id["a"].error_message == ""
    assert by_id["d"].error_message == ""
    assert "nope" in by_id["b"].error_message
    assert "input" in by_id["c"].error_message


def test_tritonclient_raises_with_message(address: str) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        tensor = grpcclient.InferInput("input", [1, 63], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
        with pytest.raises(grpcclient.InferenceServerException) as err:
            client.infer("digits", [tensor])
        assert "input" in err.value.message()
        assert client.is_server_ready()


def test_too_many_inputs_are_refused_before_decoding(stub) -> None:
    """200,000 tiny inputs: RESOURCE_EXHAUSTED naming the limit (limits.max_inputs, 256 by
    default), answered without decoding them; the daemon goes on serving."""
    request = pb.ModelInferRequest(model_name="digits")
    for i in range(200_000):  # names only: the shared daemon takes at most 4 MiB
        request.inputs.add(name=str(i))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "200000 input tensors" in err.value.details()
    assert "limits.max_inputs" in err.value.details()
    assert stub.ModelInfer(digits_request(), timeout=10).model_name == "digits"


def test_too_many_parameters_are_refused(stub) -> None:
    request = digits_request()
    for i in range(65):
        request.parameters[f"p{i}"].int64_param = i
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_parameters" in err.value.details()


LOAD_NAMES = [
    # (id, name, status)
    ("a-file", "digits/model.toml", grpc.StatusCode.INVALID_ARGUMENT),
    ("a-file-at-the-top", "README.md", grpc.StatusCode.NOT_FOUND),
    ("nul-byte", "dig\0its", grpc.StatusCode.INVALID_ARGUMENT),
    ("300-chars", "m" * 300, grpc.StatusCode.INVALID_ARGUMENT),
    ("dot-dot", "..", grpc.StatusCode.INVALID_ARGUMENT),
    ("no-such-folder", "nope", grpc.StatusCode.NOT_FOUND),
]


@pytest.mark.parametrize(
    ("name", "code"), [c[1:] for c in LOAD_NAMES], ids=[c[0] for c in LOAD_NAMES]
)
def test_load_of_a_name_that_is_not_a_model_folder(
    stub, address: str, served_repo, name: str, code
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    (served_repo / "README.md").write_text("not a model\n")
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
    assert err.value.code() == code, err.value.details()
    assert len(err.value.details()) < 1024
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
