"""The stock tritonclient.http against a real daemon: what test_grpc_triton.py proves over
gRPC, over KServe v2 HTTP/REST — health, metadata, configuration, inference with JSON and
binary tensors for every datatype, errors, repository load/unload and statistics."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests import modelgen
from tests.daemon_process import DaemonProcess, copy_example_models
from tests.integration.test_grpc_triton import (
    assert_same,
    digits_inputs,
    multi_io_inputs,
    reference,
)


def make_inputs(inputs: dict[str, np.ndarray], binary: bool = True) -> list[httpclient.InferInput]:
    result = []
    for name, value in inputs.items():
        tensor = httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value, binary_data=binary)
        result.append(tensor)
    return result


@pytest.fixture
def http_address(daemon: DaemonProcess) -> str:
    return daemon.http_address


class Client(httpclient.InferenceServerClient):
    """tritonclient.http's client, closed explicitly by each test. Its ``__del__`` closes it
    again, from whichever thread the cyclic garbage collector happens to run in, and gevent
    refuses to join its pool from a foreign thread (InvalidThreadUseError, an unraisable
    exception that fails a later, unrelated test): closing once is enough."""

    def __del__(self) -> None:
        pass


@pytest.fixture
def client(http_address: str):
    c = Client(http_address)
    yield c
    c.close()


def _raw(address: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{address}{path}",
        data=body,
        headers=headers or {},
        method="POST" if body else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- health and metadata ---------------------------------------------------------------------


def test_server_live_ready_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edged"
    assert "model_repository" in meta["extensions"]
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("model", ["digits", "multi_io", "simple_static", "all_dtypes"])
def test_model_ready(client, model: str) -> None:
    assert client.is_model_ready(model)


def test_model_not_ready_for_unknown(client) -> None:
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("digits", "7")


def test_model_metadata_digits(client) -> None:
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert client.get_model_metadata("digits", "1") == meta


def test_model_config_digits(client, onnx_executor: str) -> None:
    config = client.get_model_config("digits")
    assert config["name"] == "digits"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert config["parameters"]["executor"] == {"string_value": onnx_executor}
    assert "model_toml" in config["parameters"]


# -- inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_digits_matches_onnxruntime(client, served_repo: Path, binary: bool) -> None:
    inputs = digits_inputs(5)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")
    ]
    result = client.infer("digits", make_inputs(inputs, binary), outputs=outputs, request_id="r-7")
    want = reference(served_repo, "digits", inputs)
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), want["probabilities"], rtol=1e-6, atol=1e-7
    )
    assert_same(result.as_numpy("label"), want["label"])
    response = result.get_response()
    assert response["id"] == "r-7"
    assert response["model_name"] == "digits"
    assert response["model_version"] == "1"
    assert ("parameters" in response["outputs"][0]) is binary


def test_infer_without_outputs_answers_every_output_binary(client, served_repo: Path) -> None:
    inputs = multi_io_inputs(3)
    result = client.infer("multi_io", make_inputs(inputs))
    want = reference(served_repo, "multi_io", inputs)
    assert {o["name"] for o in result.get_response()["outputs"]} == set(want)
    for name, value in want.items():
        assert_same(result.as_numpy(name), value)


def test_infer_requested_outputs_subset(client) -> None:
    result = client.infer(
        "digits",
        make_inputs(digits_inputs(2)),
        outputs=[httpclient.InferRequestedOutput("label")],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.as_numpy("probabilities") is None


def _dtype_value(case: modelgen.DtypeCase) -> np.ndarray:
    rng = np.random.default_rng(3)
    if case.kserve == "BYTES":
        return np.array([[b"", b"abc"], ["ü".encode(), b"\x00zero"]], dtype=object)
    if case.kserve == "BOOL":
        return np.array([[True, False], [False, True]])
    if case.numpy_dtype.kind == "f":
        return rng.standard_normal((2, 2)).astype(case.numpy_dtype)
    info = np.iinfo(case.numpy_dtype)
    return np.array([[info.min, info.max], [0, 1]], dtype=case.numpy_dtype)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("case", modelgen.ALL_DTYPES, ids=lambda c: c.kserve)
def test_every_datatype_round_trips(client, case: modelgen.DtypeCase, binary: bool) -> None:
    value = _dtype_value(case)
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
        make_inputs(inputs, binary),
        outputs=[httpclient.InferRequestedOutput(f"out_{case.suffix}", binary_data=binary)],
    )
    out = result.get_response()["outputs"][0]
    assert out["datatype"] == case.kserve
    got = result.as_numpy(f"out_{case.suffix}")
    if case.kserve == "BYTES" and not binary:  # JSON carries BYTES as strings
        got = np.vectorize(lambda s: s.encode(), otypes=[object])(got)
    assert_same(got, value)


def test_version_policy_and_not_found(client) -> None:
    inputs = {
        "INPUT0": np.arange(6, dtype=np.int32).reshape(2, 3),
        "INPUT1": np.ones((2, 3), dtype=np.int32),
    }
    assert client.infer("simple_static", make_inputs(inputs)).get_response()["model_version"] == "2"
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple_static", make_inputs(inputs), model_version="1")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        client.infer("no_such_model", make_inputs(inputs))
    assert err.value.status() == "404"
    assert "no_such_model" in err.value.message()


# -- errors ----------------------------------------------------------------------------------


def test_bad_shape_names_the_tensor_and_daemon_keeps_serving(client) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("digits", make_inputs({"input": np.zeros((2, 63), dtype=np.float32)}))
    assert err.value.status() == "400"
    assert "input" in err.value.message()
    assert client.is_server_ready()


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b'{"inputs": 3}', {}, 400, "'inputs'"),
        (
            b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],'
            b'"parameters":{"binary_data_size":256}}]}',
            {},
            400,
            "binary_data_size",
        ),
        (b'{"inputs":[]}', {"Inference-Header-Content-Length": "99999"}, 400, "Header"),
        (
            b'{"inputs":[{"name":"input","datatype":"FP99","shape":[1,64],"data":[0]}]}',
            {},
            400,
            "FP99",
        ),
        (
            b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":[1,2]}]}',
            {},
            400,
            "input",
        ),
    ],
    ids=["json", "inputs-type", "binary-short", "header-length", "datatype", "count"],
)
def test_malformed_requests_are_refused_with_the_field(
    http_address: str, body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    got, payload = _raw(http_address, "/v2/models/digits/infer", body, headers)
    assert got == status
    assert needle in json.loads(payload)["error"]


def test_body_over_the_limit_is_refused(http_address: str) -> None:
    body = b" " * (4 * 1024 * 1024 + 1)  # the session daemon's server.max_request_bytes + 1
    got, payload = _raw(http_address, "/v2/models/digits/infer", body)
    assert got == 429
    assert "max_request_bytes" in json.loads(payload)["error"]


def test_too_many_inputs_is_refused_before_decoding(http_address: str) -> None:
    inputs = [{"name": f"i{i}", "datatype": "FP32", "shape": [1], "data": [0]} for i in range(300)]
    got, payload = _raw(
        http_address, "/v2/models/digits/infer", json.dumps({"inputs": inputs}).encode()
    )
    assert got == 429
    assert "max_inputs" in json.loads(payload)["error"]


def test_unknown_route_and_wrong_method(http_address: str) -> None:
    assert _raw(http_address, "/v3/nothing")[0] == 404
    assert _raw(http_address, "/v2/models/digits/infer")[0] == 405  # GET


def test_curl_example_from_the_readme(http_address: str) -> None:
    """The README's curl example, verbatim but for the port."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("curl") and "/infer" in x)
    command = line.replace("localhost:8000", http_address)
    done = subprocess.run(
        ["sh", "-c", command], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["model_name"] == "simple_static"
    assert {o["name"] for o in answer["outputs"]} == {"OUTPUT0", "OUTPUT1"}


# -- repository and statistics ---------------------------------------------------------------


def test_repository_index(client) -> None:
    index = {(m["name"], m.get("version", "")): m for m in client.get_model_repository_index()}
    assert index[("digits", "1")]["state"] == "READY"
    assert index[("simple_static", "2")]["state"] == "READY"
    assert ("simple_static", "1") not in index


def test_statistics_count_success_and_failure(client) -> None:
    before = client.get_inference_statistics("multi_io")["model_stats"][0]
    client.infer("multi_io", make_inputs(multi_io_inputs(2)))
    bad = multi_io_inputs(2)
    bad["x"] = bad["x"][:, :3]
    with pytest.raises(InferenceServerException):
        client.infer("multi_io", make_inputs(bad))
    after = client.get_inference_statistics("multi_io")["model_stats"][0]
    stats, was = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] == was["success"]["count"] + 1
    assert stats["fail"]["count"] == was["fail"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2
    assert stats["compute_infer"]["ns"] > 0
    assert 2 in {b["batch_size"] for b in after["batch_stats"]}
    every = client.get_inference_statistics()["model_stats"]
    assert {"digits", "multi_io"} <= {s["name"] for s in every}


@pytest.fixture(scope="module")
def own_daemon(tmp_path_factory: pytest.TempPathFactory):
    """A daemon of its own: loading and unloading must not disturb the shared one."""
    repo = copy_example_models(tmp_path_factory.mktemp("http_repo") / "models")
    proc = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
    try:
        proc.wait_live()
        proc.wait_for("server_ready", timeout=60)
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr


def test_repository_unload_and_load(own_daemon: DaemonProcess) -> None:
    c = Client(own_daemon.http_address)
    try:
        assert c.is_model_ready("digits")
        c.unload_model("digits")
        assert not c.is_model_ready("digits")
        c.load_model("digits")
        assert c.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("no_such_model")
        assert err.value.status() == "404"
        with pytest.raises(InferenceServerException) as err:
            c.load_model("../etc")
        assert err.value.status() in ("400", "404")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("digits", config='{"max_batch_size": 4}')
        assert err.value.status() == "501"
        assert c.is_model_ready("digits")
    finally:
        c.close()
