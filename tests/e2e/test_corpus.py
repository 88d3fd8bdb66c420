"""Real third-party models (tests/corpus.py) dropped into a repository with no model.toml
anywhere: one daemon serves them all, and every answer over gRPC (stock tritonclient) is
what in-process ONNX Runtime / LiteRT answer on the same seeded inputs.

Then, on the same daemon: folders that cannot be served (an artifact edged does not know,
two that conflict, a LiteRT model needing custom ops the runtime lacks) are refused by
RepositoryModelLoad with the reason and listed UNAVAILABLE by RepositoryIndex, while the
others keep serving.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from ai_edge_litert.interpreter import Interpreter
from tritonclient.utils import np_to_triton_dtype

from tests import corpus
from tests.daemon_process import DaemonProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

Inputs = dict[str, np.ndarray]


def _requests() -> dict[str, list[tuple[Inputs, tuple[str, ...]]]]:
    """Per model: (inputs, outputs the client asks for; () = all), seeded."""
    rng = np.random.default_rng(20261204)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def image(*shape: int) -> np.ndarray:
        return rng.random(shape, dtype=np.float32)

    sr = np.array(16000, dtype=np.int64)  # an int64 scalar: shape []
    return {
        "vad": [
            (
                {"input": f32(1, 576) * 0.1, "state": np.zeros((2, 1, 128), np.float32), "sr": sr},
                ("output",),
            ),
            ({"input": f32(2, 576) * 0.1, "state": f32(2, 2, 128) * 0.1, "sr": sr}, ()),
        ],
        "vad_seq": [
            (
                {
                    "input": f32(4, 576) * 0.1,
                    "h": np.zeros((1, 1, 128), np.float32),
                    "c": np.zeros((1, 1, 128), np.float32),
                },
                (),
            )
        ],
        "ocr_det": [({"x": image(1, 3, 64, 96)}, ()), ({"x": image(1, 3, 96, 160)}, ())],
        "ocr_cls": [({"x": image(2, 3, 48, 192)}, ())],
        "palm": [({"input_1": image(1, 192, 192, 3)}, ())],
        "face_landmark": [({"input_1": image(1, 192, 192, 3)}, ("conv2d_21",))],
        "hand_landmark": [({"input_1": image(1, 224, 224, 3)}, ())],
        "selfie": [({"input_1": image(1, 256, 256, 3)}, ())],
        # stateful (resource variables): one request, after the one synthetic warm-up run
        "wakeword": [
            (
                {
                    "serving_default_input_audio:0": rng.integers(
                        -128, 128, (1, 3, 40), dtype=np.int64
                    ).astype(np.int8)
                },
                (),
            )
        ],
    }


REQUESTS = _requests()


def in_process(
    path: Path, history: list[Inputs], executor: str = "cpu-onnx"
) -> list[dict[str, np.ndarray]]:
    """What the runtime answers in-process, default options, to each of ``history`` (ONNX:
    on the providers of ``executor``, where the daemon placed the model)."""
    answers = []
    if path.suffix == ".onnx":
        session = corpus.onnx_session(path, executor)
        names = [o.name for o in session.get_outputs()]
        for inputs in history:
            answers.append(dict(zip(names, session.run(names, inputs), strict=True)))
        return answers
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    by_name = {d["name"]: d for d in interpreter.get_input_details()}
    for inputs in history:
        for name, value in inputs.items():
            detail = by_name[name]
            if list(detail["shape"]) != list(value.shape):
                interpreter.resize_tensor_input(detail["index"], list(value.shape))
                interpreter.allocate_tensors()
            interpreter.set_tensor(detail["index"], value)
        interpreter.invoke()
        outputs = interpreter.get_output_details()
        answers.append({d["name"]: interpreter.get_tensor(d["index"]) for d in outputs})
    return answers


def infer(
    client: grpcclient.InferenceServerClient, model: str, inputs: Inputs, wanted: tuple[str, ...]
) -> dict[str, np.ndarray]:
    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    outputs = [grpcclient.InferRequestedOutput(n) for n in wanted] or None
    result = client.infer(model, tensors, outputs=outputs)
    response = result.get_response(as_json=True)
    return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}


def executor_of(client: grpcclient.InferenceServerClient, model: str) -> str:
    """Where the daemon placed ``model`` (ModelConfig's ``executor`` parameter)."""
    config = client.get_model_config(model, as_json=True)["config"]
    return str(config["parameters"]["executor"]["string_value"])


def assert_same(
    model: str, got: Mapping[str, np.ndarray], want: Mapping[str, Any], executor: str
) -> float:
    """Equal names, dtypes and shapes; integers equal; floats to float32 rounding (the
    daemon's sessions use their own thread counts; bit-identical on the development machine).
    Returns the largest float difference."""
    worst = 0.0
    for name, value in got.items():
        expected = np.asarray(want[name])
        assert value.dtype == expected.dtype, (model, name)
        assert value.shape == expected.shape, (model, name)
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(value, expected, err_msg=model, **corpus.tolerance(executor))
            worst = max(worst, float(np.max(np.abs(value - expected), initial=0.0)))
        else:
            np.testing.assert_array_equal(value, expected, err_msg=f"{model}/{name}")
    return worst


@pytest.fixture(scope="session")
def corpus_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("corpus") / "models"
    repo.mkdir()
    for model in corpus.CORPUS:
        corpus.place(repo, model)
    return repo


@pytest.fixture(scope="session")
def corpus_daemon(corpus_repo: Path) -> Iterator[DaemonProcess]:
    """One daemon for the whole corpus."""
    proc = DaemonProcess(["--models", str(corpus_repo), "--grpc-address", "127.0.0.1:0"])
    try:
        proc.wait_live()
        proc.wait_for("server_ready", timeout=180)
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.stderr


@pytest.fixture
def client(corpus_daemon: DaemonProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(corpus_daemon.address) as c:
        yield c


def test_no_model_toml_anywhere(corpus_repo: Path) -> None:
    assert not list(corpus_repo.rglob("model.toml"))
    assert sorted(p.name for p in corpus_repo.iterdir()) == sorted(m.name for m in corpus.CORPUS)


def test_every_model_is_ready(
    client: grpcclient.InferenceServerClient, corpus_daemon: DaemonProcess
) -> None:
    assert client.is_server_ready()
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    for model in corpus.CORPUS:
        assert client.is_model_ready(model.name), model.name
        assert index[model.name]["state"] == "READY", index[model.name]
    # the audio model refused the synthetic input: said once, as a warning naming the error
    skipped = [e for e in corpus_daemon.events if e["event"] == "warm_up_skipped"]
    assert "vad" in {e["model"] for e in skipped}
    vad = next(e for e in skipped if e["model"] == "vad")
    assert vad["level"] == "warning"
    assert vad["error"]


@pytest.mark.parametrize("model", corpus.CORPUS, ids=lambda m: m.name)
def test_answers_as_in_process(
    client: grpcclient.InferenceServerClient, model: corpus.CorpusModel
) -> None:
    requests = REQUESTS[model.name]
    history = [inputs for inputs, _ in requests]
    if model.name == "wakeword":  # its state saw the synthetic warm-up (zeros) first
        history = [{k: np.zeros_like(v) for k, v in history[0].items()}, *history]
    executor = executor_of(client, model.name)
    expected = in_process(corpus.fetch(model), history, executor)[-len(requests) :]
    for (inputs, wanted), want in zip(requests, expected, strict=True):
        got = infer(client, model.name, inputs, wanted)
        assert sorted(got) == sorted(wanted or want), model.name
        assert_same(model.name, got, want, executor)


def test_vad_state_round_trip(client: grpcclient.InferenceServerClient) -> None:
    """The recurrent state comes back and goes in again, as a streaming client does."""
    path = corpus.fetch(corpus.CORPUS[0])
    rng = np.random.default_rng(7)
    sr = np.array(16000, dtype=np.int64)
    state = np.zeros((2, 1, 128), np.float32)
    chunks = [rng.standard_normal((1, 576)).astype(np.float32) * 0.1 for _ in range(3)]
    executor = executor_of(client, "vad")
    session = corpus.onnx_session(path, executor)
    tol = corpus.tolerance(executor)
    want_state = state
    for chunk in chunks:
        got = infer(client, "vad", {"input": chunk, "state": state, "sr": sr}, ())
        want, want_state = session.run(None, {"input": chunk, "state": want_state, "sr": sr})
        np.testing.assert_allclose(got["output"], want, **tol)
        state = got["stateN"]
    np.testing.assert_allclose(state, want_state, **tol)


def test_model_config_is_the_completed_configuration(
    client: grpcclient.InferenceServerClient,
) -> None:
    config = client.get_model_config("vad", as_json=True)["config"]
    assert config["platform"] == "onnxruntime_onnx"
    assert config.get("max_batch_size", 0) == 0  # the state is not batch-major
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["sr"]["data_type"] == "TYPE_INT64"
    assert inputs["state"]["dims"] == ["2", "-1", "128"]
    text = config["parameters"]["model_toml"]["string_value"]
    assert 'format = "onnx"' in text
    assert "max_batch_size = 0" in text
    assert 'name = "state"' in text
    cls = client.get_model_config("ocr_cls", as_json=True)["config"]
    assert int(cls["max_batch_size"]) > 0
    wake = client.get_model_config("wakeword", as_json=True)["config"]
    assert wake["backend"] == "tflite"
    assert 'format = "tflite"' in wake["parameters"]["model_toml"]["string_value"]


def test_unservable_folders_are_refused_with_the_reason(
    client: grpcclient.InferenceServerClient, corpus_repo: Path
) -> None:
    """Runs last on the shared daemon: it leaves the server ready as it found it."""
    corpus.place(corpus_repo, corpus.CUSTOM_OP)
    (corpus_repo / "torch" / "1").mkdir(parents=True)
    (corpus_repo / "torch" / "1" / "model.pt").write_bytes(b"\x80\x02")
    (corpus_repo / "both" / "1").mkdir(parents=True)
    shutil.copyfile(corpus.fetch(corpus.CORPUS[3]), corpus_repo / "both" / "1" / "model.onnx")
    shutil.copyfile(corpus.fetch(corpus.CORPUS[5]), corpus_repo / "both" / "1" / "model.tflite")
    reasons = {
        "face_attention": "unresolved custom op: Landmarks2TransformMatrix",
        "torch": "model.pt, which is no artifact edged serves",
        "both": "artifacts of 2 formats (model.onnx, model.tflite)",
    }
    try:
        for name, reason in reasons.items():
            with pytest.raises(grpcclient.InferenceServerException) as err:
                client.load_model(name)
            assert reason in err.value.message(), err.value.message()
            if name == "face_attention":  # and every custom op the model declares
                assert "declares custom ops Landmarks2TransformMatrix, " in err.value.message()
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        for name, reason in reasons.items():
            assert index[name]["state"] == "UNAVAILABLE"
            assert reason in index[name]["reason"], index[name]
        for model in corpus.CORPUS:  # the others keep serving
            assert client.is_model_ready(model.name)
        inputs, wanted = REQUESTS["ocr_cls"][0]
        assert infer(client, "ocr_cls", inputs, wanted)
    finally:
        for name in reasons:
            client.unload_model(name)
            shutil.rmtree(corpus_repo / name)
    assert client.is_server_ready()
