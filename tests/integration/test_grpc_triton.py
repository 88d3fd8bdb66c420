"""The stock tritonclient.grpc against a real daemon: every RPC, every datatype, outputs
compared with in-process ONNX Runtime on the same inputs."""

from __future__ import annotations

import queue
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests import modelgen


def reference(
    repo: Path, model: str, inputs: dict[str, np.ndarray], version: int = 1
) -> dict[str, np.ndarray]:
    """What in-process ONNX Runtime answers for the same model file and inputs."""
    session = ort.InferenceSession(
        str(repo / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {}
    for name, value in inputs.items():
        decoded = np.vectorize(lambda b: b.decode(), otypes=[object])
        feed[name] = decoded(value) if value.dtype == object else value
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(names, feed), strict=True))
    for name, value in out.items():
        if value.dtype == object:
            out[name] = np.vectorize(lambda s: s.encode(), otypes=[object])(value)
    return out


def make_inputs(inputs: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    result = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        result.append(tensor)
    return result


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def client(address: str):
    with grpcclient.InferenceServerClient(address) as c:
        yield c


def digits_inputs(n: int = 4) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    return {"input": load_digits().data[:n].astype(np.float32)}


def multi_io_inputs(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    text = np.array([[f"héllo {i}".encode()] for i in range(n)], dtype=object)
    return {
        "x": rng.standard_normal((n, 4)).astype(np.float32),
        "offset": rng.standard_normal((n, 4)).astype(np.float16),
        "mask": rng.random((n, 4)) > 0.5,
        "ids": rng.integers(-100, 100, (n, 3)).astype(np.int64),
        "raw": rng.integers(0, 255, (n, 2)).astype(np.uint8),
        "text": text,
    }


# -- server and model health / metadata -----------------------------------------------------


def test_server_live_ready_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edged"
    assert "model_repository" in meta["extensions"]


@pytest.mark.parametrize(
    "model",
    [
        "digits",
        "multi_io",
        "simple_static",
        "dynamic",
        "scalar",
        "slashes",
        "batch_axis1",
        "all_dtypes",
    ],
)
def test_model_ready(client, model: str) -> None:
    assert client.is_model_ready(model)


def test_model_not_ready_for_unknown(client) -> None:
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("digits", "7")


def test_model_metadata_digits(client) -> None:
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert meta["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": ["-1"]}


def test_model_config_digits(client, onnx_executor: str) -> None:
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert config["output"][0] == {
        "name": "probabilities",
        "data_type": "TYPE_FP32",
        "dims": ["10"],
    }
    # only the batch axis: Triton's way, dims [1] reshaped to []
    assert config["output"][1]["dims"] == ["1"]
    assert config["output"][1]["reshape"] == {}
    # where it runs: the executor placement chose
    kind = "KIND_GPU" if onnx_executor == "cuda" else "KIND_CPU"
    assert config["instance_group"][0]["kind"] == kind
    assert config["parameters"]["executor"] == {"string_value": onnx_executor}


def test_model_config_non_batching_reports_full_dims(client) -> None:
    config = client.get_model_config("simple_static", as_json=True)["config"]
    assert config.get("max_batch_size", 0) == 0
    assert config["input"][0]["dims"] == ["2", "3"]
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    meta = client.get_model_metadata("batch_axis1", as_json=True)
    assert meta["inputs"][0]["shape"] == ["3", "-1"]
    config = client.get_model_config("all_dtypes", as_json=True)["config"]
    by_name = {i["name"]: i["data_type"] for i in config["input"]}
    assert by_name["in_bytes"] == "TYPE_STRING"
    assert by_name["in_fp16"] == "TYPE_FP16"


# -- inference ------------------------------------------------------------------------------


def test_infer_digits_matches_onnxruntime(client, served_repo: Path) -> None:
    inputs = digits_inputs(5)
    result = client.infer("digits", make_inputs(inputs), request_id="req-42")
    want = reference(served_repo, "digits", inputs)
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), want["probabilities"], rtol=1e-6, atol=1e-7
    )
    assert_same(result.as_numpy("label"), want["label"])
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == "digits"
    assert response.model_version == "1"


def test_infer_requested_outputs_subset(client) -> None:
    result = client.infer(
        "digits", make_inputs(digits_inputs(2)), outputs=[grpcclient.InferRequestedOutput("label")]
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"]
    assert result.as_numpy("probabilities") is None


def test_infer_multi_io_every_output(client, served_repo: Path) -> None:
    inputs = multi_io_inputs(3)
    result = client.infer("multi_io", make_inputs(inputs))
    want = reference(served_repo, "multi_io", inputs)
    assert {o.name for o in result.get_response().outputs} == set(want)
    for name, value in want.items():
        assert_same(result.as_numpy(name), value)


@pytest.mark.parametrize("case", modelgen.ALL_DTYPES, ids=lambda c: c.kserve)
def test_every_datatype_round_trips_raw(client, case: modelgen.DtypeCase) -> None:
    rng = np.random.default_rng(3)
    if case.kserve == "BYTES":
        value = np.array([[b"", b"abc"], ["ü".encode(), b"\x00zero"]], dtype=object)
    elif case.kserve == "BOOL":
        value = np.array([[True, False], [False, True]])
    elif case.numpy_dtype.kind == "f":
        value = rng.standard_normal((2, 2)).astype(case.numpy_dtype)
    else:
        info = np.iinfo(case.numpy_dtype)
        value = np.array([[info.min, info.max], [0, 1]], dtype=case.numpy_dtype)
    # all_dtypes takes every input at once; the others carry zeros of their own type
    inputs = {}
    for other in modelgen.ALL_DTYPES:
        if other is case:
            inputs[f"in_{other.suffix}"] = value
        elif other.kserve == "BYTES":
            inputs[f"in_{other.suffix}"] = np.array([[b"x", b"y"]] * 2, dtype=object)
        else:
            inputs[f"in_{other.suffix}"] = np.zeros((2, 2), dtype=other.numpy_dtype)
    result = client.infer(
        "all_dtypes",
        make_inputs(inputs),
        outputs=[grpcclient.InferRequestedOutput(f"out_{case.suffix}")],
    )
    out = result.get_response().outputs[0]
    assert out.datatype == case.kserve
    assert_same(result.as_numpy(f"out_{case.suffix}"), value)


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        ("dynamic", {"x": np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)}),
        ("dynamic", {"x": np.ones((1, 1, 4), dtype=np.float32)}),
        (
            "scalar",
            {
                "scale": np.array(2.5, dtype=np.float32),
                "x": np.arange(6, dtype=np.float32).reshape(2, 3),
            },
        ),
        ("slashes", {"input/0": np.arange(10, dtype=np.float32).reshape(2, 5)}),
        ("batch_axis1", {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}),
    ],
    ids=["dynamic-2x5", "dynamic-1x1", "scalar", "slashes", "batch-axis-1"],
)
def test_signature_edge_cases(client, served_repo: Path, model: str, inputs) -> None:
    result = client.infer(model, make_inputs(inputs))
    want = reference(served_repo, model, inputs)
    for name, value in want.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-6)


def test_version_policy_serves_latest_only(client, served_repo: Path) -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.ones((2, 3), dtype=np.int32)
    inputs = {"INPUT0": a, "INPUT1": b}
    result = client.infer("simple_static", make_inputs(inputs))
    assert result.get_response().model_version == "2"
    assert_same(
        result.as_numpy("OUTPUT1"),
        reference(served_repo, "simple_static", inputs, version=2)["OUTPUT1"],
    )
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple_static", make_inputs(inputs), model_version="1")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert client.get_model_metadata("simple_static", as_json=True)["versions"] == ["2"]


def test_async_client(address: str, served_repo: Path) -> None:
    import asyncio

    async def main() -> None:
        async with aioclient.InferenceServerClient(address) as c:
            assert await c.is_server_live()
            inputs = digits_inputs(3)
            results = await asyncio.gather(
                *(c.infer("digits", make_inputs(inputs), request_id=str(i)) for i in range(8))
            )
            want = reference(served_repo, "digits", inputs)
            for i, r in enumerate(results):
                assert r.get_response().id == str(i)
                assert_same(r.as_numpy("label"), want["label"])

    asyncio.run(main())


def test_streaming_with_in_stream_errors(client, served_repo: Path) -> None:
    responses: queue.Queue = queue.Queue()

    def callback(result, error) -> None:
        responses.put((result, error))

    client.start_stream(callback=partial(callback))
    try:
        inputs = digits_inputs(2)
        bad = {"input": np.zeros((2, 63), dtype=np.float32)}
        for i, payload in enumerate([inputs, bad, inputs, inputs]):
            client.async_stream_infer("digits", make_inputs(payload), request_id=f"s{i}")
        got = [responses.get(timeout=10) for _ in range(4)]
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    results = [r for r, e in got if e is None]
    assert len(errors) == 1
    assert "input" in errors[0].message()
    assert "shape" in errors[0].message()
    assert sorted(r.get_response().id for r in results) == ["s0", "s2", "s3"]
    want = reference(served_repo, "digits", inputs)
    for r in results:
        assert_same(r.as_numpy("label"), want["label"])


# -- repository and statistics -------------------------------------------------------------


def test_repository_index(client) -> None:
    index = {
        (m["name"], m.get("version", "")): m
        for m in client.get_model_repository_index(as_json=True)["models"]
    }
    assert index[("digits", "1")]["state"] == "READY"
    assert index[("simple_static", "2")]["state"] == "READY"
    assert ("simple_static", "1") not in index


def test_statistics_count_success_and_failure(client) -> None:
    before = client.get_inference_statistics("multi_io", as_json=True)["model_stats"][0]
    client.infer("multi_io", make_inputs(multi_io_inputs(2)))
    bad = multi_io_inputs(2)
    bad["x"] = bad["x"][:, :3]
    with pytest.raises(InferenceServerException):
        client.infer("multi_io", make_inputs(bad))
    after = client.get_inference_statistics("multi_io", as_json=True)["model_stats"][0]

    def count(stats, key):
        return int(stats.get("inference_stats", {}).get(key, {}).get("count", 0))

    assert count(after, "success") == count(before, "success") + 1
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    assert int(after["inference_stats"]["queue"]["count"]) >= 1
    # a request refused by validation is counted as a failure but never reaches the model
    assert count(after, "fail") == count(before, "fail") + 1
    sizes = {int(b["batch_size"]) for b in after["batch_stats"]}
    assert 2 in sizes
