"""The .tflite example models served by a real daemon (cpu-litert executor) to the stock
tritonclient, compared with in-process LiteRT on the same files and with the ONNX digits model.

The daemon here is this module's own, on a repository holding only digits (ONNX) and the two
LiteRT models, so its readiness depends on nothing else.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from ai_edge_litert.interpreter import Interpreter
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess
from tests.tflitegen import with_custom_op

MODELS = ("digits", "digits_tflite", "digits_int8")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("litert") / "models"
    for name in MODELS:
        shutil.copytree(EXAMPLE_MODELS / name, root / name, ignore=shutil.ignore_patterns("*.npy"))
    return root


@pytest.fixture(scope="module")
def address(repo: Path, onnx_executor: str) -> Iterator[str]:
    proc = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
    try:
        address = proc.wait_live()
        ready = proc.wait_for("server_ready", timeout=60)
        assert ready["models"] == len(MODELS)
        loaded = {
            e["model"]: e["executor"] for e in proc.events if e["event"] == "model_version_loaded"
        }
        assert loaded == {
            "digits": onnx_executor,
            "digits_tflite": "cpu-litert",
            "digits_int8": "cpu-litert",
        }
        yield address
    finally:
        code = proc.stop()
        assert code == 0, proc.stderr


@pytest.fixture
def client(address: str) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(address) as c:
        yield c


def litert_reference(repo: Path, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """What in-process LiteRT answers for the same file and batch."""
    interpreter = Interpreter(model_path=str(repo / model / "1" / "model.tflite"))
    (detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def infer(
    client: grpcclient.InferenceServerClient, model: str, x: np.ndarray
) -> dict[str, np.ndarray]:
    tensor = grpcclient.InferInput("input", list(x.shape), np_to_triton_dtype(x.dtype))
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    return {name: result.as_numpy(name) for name in ("probabilities", "label")}


def pixels(start: int, n: int) -> np.ndarray:
    return load_digits().data[start : start + n].astype(np.float32)


def to_int8(x: np.ndarray) -> np.ndarray:
    """Pixels as digits_int8 takes them (scale 0.125, zero point -128)."""
    return np.clip(np.round(x / 0.125) - 128, -128, 127).astype(np.int8)


def test_metadata_and_config_of_the_tflite_models(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("digits_tflite", as_json=True)
    assert meta["platform"] == "tflite"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]},
        {"name": "label", "datatype": "INT64", "shape": ["-1"]},
    ]
    meta8 = client.get_model_metadata("digits_int8", as_json=True)
    assert meta8["inputs"][0]["datatype"] == "INT8"
    assert meta8["outputs"][0]["datatype"] == "INT8"
    config = client.get_model_config("digits_int8", as_json=True)["config"]
    assert config["backend"] == "tflite"
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_INT8", "dims": ["64"]}]


@pytest.mark.parametrize("n", [1, 5, 32])
def test_float_model_matches_in_process_litert(
    client: grpcclient.InferenceServerClient, repo: Path, n: int
) -> None:
    x = pixels(100, n)
    got = infer(client, "digits_tflite", x)
    want = litert_reference(repo, "digits_tflite", x)
    assert got["probabilities"].dtype == np.float32
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["label"], want["label"])


@pytest.mark.parametrize("n", [1, 7, 32])
def test_int8_model_matches_in_process_litert_exactly(
    client: grpcclient.InferenceServerClient, repo: Path, n: int
) -> None:
    x = to_int8(pixels(300, n))
    got = infer(client, "digits_int8", x)
    want = litert_reference(repo, "digits_int8", x)
    assert got["probabilities"].dtype == np.int8
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_tflite_models_agree_with_the_onnx_model(client: grpcclient.InferenceServerClient) -> None:
    data = load_digits()
    x = data.data[-128:].astype(np.float32)
    labels = {m: [] for m in MODELS}
    for start in range(0, len(x), 32):
        batch = x[start : start + 32]
        labels["digits"].append(infer(client, "digits", batch)["label"])
        labels["digits_tflite"].append(infer(client, "digits_tflite", batch)["label"])
        labels["digits_int8"].append(infer(client, "digits_int8", to_int8(batch))["label"])
    onnx, tflite, int8 = (np.concatenate(labels[m]) for m in MODELS)
    np.testing.assert_array_equal(tflite, onnx)
    assert np.mean(int8 == onnx) >= 0.97
    assert np.mean(int8 == data.target[-128:]) >= 0.95


def test_a_wrong_datatype_is_refused_before_the_executor(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client, "digits_int8", pixels(0, 1))  # FP32 sent to an INT8 input
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INT8" in err.value.message()


def test_an_edgetpu_model_without_an_edge_tpu_fails_to_load_with_the_reason(
    client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    model = repo / "digits_edgetpu"
    with_custom_op(
        EXAMPLE_MODELS / "digits_tflite" / "1" / "model.tflite",
        model / "1" / "model_edgetpu.tflite",
    )
    (model / "model.toml").write_text('format = "edgetpu-tflite"\n')
    try:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("digits_edgetpu")
        message = err.value.message()
        assert "edgetpu" in message
        assert "libedgetpu.so.1" in message  # no Edge TPU runtime on this host
        assert client.is_model_ready("digits_tflite")  # the rest keeps serving
    finally:
        client.unload_model("digits_edgetpu")
        shutil.rmtree(model)
