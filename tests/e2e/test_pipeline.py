"""Pipelines (issue #16 item 1) served by a real daemon on loopback, driven by
tritonclient.grpc and edged.client.ZmqClient, on real ONNX Runtime models: PP-OCR's text
detector and direction classifier (tests/corpus.py, rapidocr-onnxruntime's wheel) with the
ONNX helper models of models/build_pipeline.py between them, and the digits example.

Concurrency and merging are observed in the step models' statistics (a batch that holds a
pipeline's two steps, or a step and a direct request), never by timing: the model they run
on waits up to 5 s for a second request (preferred batch size 2), so requests that arrive
one after the other run as two batches.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from edged.client import ZmqClient, ZmqClientError
from models import build_pipeline
from tests import corpus, modelgen
from tests.conftest import write_model
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DET = corpus.CORPUS[2]
CLS = corpus.CORPUS[3]
assert (DET.name, CLS.name) == ("ocr_det", "ocr_cls")

#: digits, but a lone request waits up to 5 s for a second one (two run as one batch)
PAIRED = """max_batch_size = 8
dynamic_batching = { max_queue_delay_us = 5000000, preferred_batch_sizes = [2] }
"""

PIPELINES = {
    # two independent steps on the same model: concurrent steps merge into one batch
    "pair": """max_batch_size = 4
[[inputs]]
name = "a"
datatype = "FP32"
dims = [64]
[[inputs]]
name = "b"
datatype = "FP32"
dims = [64]
[[outputs]]
name = "label_a"
[[outputs]]
name = "label_b"
[[pipeline.step]]
name = "left"
model = "paired"
input_map = { input = "a" }
output_map = { label = "label_a" }
[[pipeline.step]]
name = "right"
model = "paired"
input_map = { input = "b" }
output_map = { label = "label_b" }
""",
    # one step: its request merges with a direct request to the same model
    "via": """max_batch_size = 4
[[inputs]]
name = "x"
datatype = "FP32"
dims = [64]
[[outputs]]
name = "probs"
[[pipeline.step]]
model = "paired"
input_map = { input = "x" }
output_map = { probabilities = "probs" }
""",
    # y = 9x through two steps on "dynamic" (y = 3x)
    "triple": """max_batch_size = 4
[[inputs]]
name = "x"
datatype = "FP32"
dims = [-1, 4]
[[outputs]]
name = "out"
[[pipeline.step]]
name = "first"
model = "dynamic"
input_map = { x = "x" }
output_map = { y = "once" }
[[pipeline.step]]
name = "second"
model = "dynamic"
input_map = { x = "once" }
output_map = { y = "out" }
""",
}

#: pipelines that must fail to load: (model.toml body, what the error names)
BROKEN = {
    "bad_model": (
        """[[inputs]]
name = "x"
datatype = "FP32"
dims = [1, 64]
[[outputs]]
name = "y"
[[pipeline.step]]
name = "classify"
model = "no_such_model"
input_map = { input = "x" }
output_map = { label = "y" }
""",
        ["step 'classify'", "model 'no_such_model'"],
    ),
    "bad_tensor": (
        """[[inputs]]
name = "x"
datatype = "FP32"
dims = [1, 64]
[[outputs]]
name = "y"
[[pipeline.step]]
name = "classify"
model = "digits"
input_map = { input = "pixels" }
output_map = { label = "y" }
""",
        ["step 'classify'", "tensor 'pixels'"],
    ),
    "bad_output": (
        """[[inputs]]
name = "x"
datatype = "FP32"
dims = [1, 64]
[[outputs]]
name = "y"
[[pipeline.step]]
name = "classify"
model = "digits"
input_map = { input = "x" }
output_map = { logits = "y" }
""",
        ["step 'classify'", "no output 'logits'"],
    ),
    "bad_dtype": (
        """[[inputs]]
name = "x"
datatype = "INT64"
dims = [1, 64]
[[outputs]]
name = "y"
[[pipeline.step]]
name = "classify"
model = "digits"
input_map = { input = "x" }
output_map = { label = "y" }
""",
        ["step 'classify'", "input 'input' is FP32 but tensor 'x' is INT64"],
    ),
    "bad_shape": (
        """[[inputs]]
name = "x"
datatype = "FP32"
dims = [1, 32]
[[outputs]]
name = "y"
[[pipeline.step]]
name = "classify"
model = "digits"
input_map = { input = "x" }
output_map = { label = "y" }
""",
        ["step 'classify'", "tensor 'x' has [1, 32]"],
    ),
    "cycle": (
        """max_batch_size = 4
[[inputs]]
name = "x"
datatype = "FP32"
dims = [-1, 4]
[[outputs]]
name = "t1"
[[pipeline.step]]
name = "a"
model = "dynamic"
input_map = { x = "t2" }
output_map = { y = "t1" }
[[pipeline.step]]
name = "b"
model = "dynamic"
input_map = { x = "t1" }
output_map = { y = "t2" }
""",
        ["step 'a'", "a cycle", "tensor 't2'"],
    ),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipelines") / "models"
    build_pipeline.write_repository(root, corpus.fetch(DET), corpus.fetch(CLS))
    shutil.copytree(EXAMPLE_MODELS / "digits", root / "digits")
    shutil.copytree(EXAMPLE_MODELS / "digits" / "1", root / "paired" / "1")
    (root / "paired" / "model.toml").write_text(PAIRED)
    write_model(root, "dynamic", modelgen.dynamic_axes_model, "max_batch_size = 4\n")
    for name, body in PIPELINES.items():
        (root / name).mkdir()
        (root / name / "model.toml").write_text(body)
    for name, (body, _) in BROKEN.items():
        (root / name).mkdir()
        (root / name / "model.toml").write_text(body)
    return root


@pytest.fixture(scope="module")
def daemon(repo: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(
        ["--models", str(repo), "--grpc-address", "127.0.0.1:0"],
        # the operator's own sizing (one copy per model) so batches are what is counted
        env={"EDGED_MODELS_INSTANCES": "1"},
    )
    try:
        proc.wait_live()
        # the broken pipelines fail to load: with strict readiness the server is not ready
        event = proc.wait_for("server_not_ready", timeout=120)
        assert sorted(event["failed"]) == sorted(BROKEN)
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(daemon.address) as c:
        yield c


def text_image(text: str, *, flip: bool = False, size: tuple[int, int] = (96, 320)) -> np.ndarray:
    """Black text on white, RGB uint8 [1, H, W, 3] (upside down with ``flip``)."""
    height, width = size
    canvas = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(canvas).text((20, 30), text, fill="black", font_size=32)
    if flip:
        canvas = canvas.rotate(180)
    return np.asarray(canvas, dtype=np.uint8)[None]


def by_hand(repo: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    """The four steps run one after the other with in-process ONNX Runtime."""

    def run(model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = corpus.onnx_session(repo / model / "1" / "model.onnx", "cpu-onnx")
        return list(session.run(None, feeds))

    det_input, cls_image = run("ocr_pre", {"image": image})
    (text_map,) = run("ocr_det", {"x": det_input})
    (crop,) = run("ocr_crop", {"image": cls_image, "prob": text_map})
    (direction,) = run("ocr_cls", {"x": crop})
    return {"direction": direction, "text_map": text_map}


def grpc_infer(
    client: grpcclient.InferenceServerClient, model: str, inputs: dict[str, np.ndarray]
) -> grpcclient.InferResult:
    tensors = []
    for name, value in inputs.items():
        datatype = {np.uint8: "UINT8", np.float32: "FP32"}[value.dtype.type]
        t = grpcclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    return client.infer(model, tensors)


def stats(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of ``model``."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def digits(i: int) -> np.ndarray:
    return load_digits().data[i : i + 1].astype(np.float32)


def test_ocr_pipeline_equals_the_steps_by_hand(
    daemon: DaemonProcess, client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    images = [text_image("edge gateway"), text_image("edge gateway", flip=True)]
    with ZmqClient(daemon.zmq_endpoints[0]) as zmq_client:
        for image in images:
            want = by_hand(repo, image)
            result = grpc_infer(client, "ocr", {"image": image})
            over_zmq = zmq_client.infer("ocr", {"image": image})
            for name, value in want.items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(over_zmq[name], value, rtol=1e-5, atol=1e-5)
    # the text was found (a box smaller than the image) and the crop it fed the classifier
    # tells upright from upside-down text
    top, left, bottom, right = build_pipeline.crop_box(by_hand(repo, images[0])["text_map"])
    assert (bottom - top, right - left) < (96, 320)
    upright, flipped = (by_hand(repo, i)["direction"][0] for i in images)
    assert upright.argmax() != flipped.argmax()
    # every step ran on its own model (its own statistics)
    for model in ("ocr_pre", "ocr_det", "ocr_crop", "ocr_cls"):
        assert stats(client, model)[0] >= 4


def test_metadata_and_config_describe_the_pipeline(
    daemon: DaemonProcess, client: grpcclient.InferenceServerClient
) -> None:
    meta = client.get_model_metadata("ocr", as_json=True)
    assert meta["platform"] == "ensemble"
    assert [i["name"] for i in meta["inputs"]] == ["image"]
    assert meta["inputs"][0]["datatype"] == "UINT8"
    assert [o["name"] for o in meta["outputs"]] == ["direction", "text_map"]
    config = client.get_model_config("ocr", as_json=True)["config"]
    assert config["platform"] == "ensemble"
    assert "instance_group" not in config
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["ocr_pre", "ocr_det", "ocr_crop", "ocr_cls"]
    assert steps[1]["input_map"] == {"x": "det_input"}
    assert steps[1]["output_map"] == {"sigmoid_0.tmp_0": "text_map"}
    assert "[[pipeline.step]]" in config["parameters"]["model_toml"]["string_value"]
    with ZmqClient(daemon.zmq_endpoints[0]) as zmq_client:
        assert zmq_client.model_metadata("ocr")["platform"] == "ensemble"
        assert zmq_client.is_model_ready("ocr")
    # Prometheus lists it as a served model running on "pipeline"
    info = 'edged_model_info{executor="pipeline",instances="0",max_batch_size="0",model="ocr"'
    assert info in _metrics(daemon)


def test_independent_steps_run_concurrently(client: grpcclient.InferenceServerClient) -> None:
    before = stats(client, "paired")
    result = grpc_infer(client, "pair", {"a": digits(0), "b": digits(1)})
    assert result.as_numpy("label_a").tolist() == [0]
    assert result.as_numpy("label_b").tolist() == [1]
    inferences, executions = stats(client, "paired")
    # both steps were queued together: one batch of two (one after the other: two batches)
    assert (inferences - before[0], executions - before[1]) == (2, 1)


def test_a_step_merges_with_direct_requests(
    daemon: DaemonProcess, client: grpcclient.InferenceServerClient
) -> None:
    before = stats(client, "paired")
    direct: dict[str, np.ndarray] = {}

    def send_direct() -> None:
        with ZmqClient(daemon.zmq_endpoints[0]) as c:
            direct.update(c.infer("paired", {"input": digits(2)}))

    thread = threading.Thread(target=send_direct)
    thread.start()
    result = grpc_infer(client, "via", {"x": digits(3)})
    thread.join(30)
    assert direct["label"].tolist() == [2]
    assert result.as_numpy("probs").argmax() == 3
    inferences, executions = stats(client, "paired")
    assert (inferences - before[0], executions - before[1]) == (2, 1)


def test_a_failing_step_is_named(
    daemon: DaemonProcess, client: grpcclient.InferenceServerClient
) -> None:
    # 100 x 100 is not a multiple of 32: the detector fails inside ONNX Runtime
    bad = np.full((1, 100, 100, 3), 255, np.uint8)
    with pytest.raises(InferenceServerException) as failed:
        grpc_infer(client, "ocr", {"image": bad})
    assert "pipeline 'ocr' step 'detect' (model 'ocr_det')" in str(failed.value)
    with ZmqClient(daemon.zmq_endpoints[0]) as zmq_client, pytest.raises(ZmqClientError) as z:
        zmq_client.infer("ocr", {"image": bad})
    assert "step 'detect'" in str(z.value)
    # a request that does not fit the pipeline is refused before any step runs
    with pytest.raises(InferenceServerException, match="input tensor 'image'"):
        grpc_infer(client, "ocr", {"image": bad[..., :2]})
    # the daemon goes on serving the pipeline
    assert grpc_infer(client, "ocr", {"image": text_image("ok")}).as_numpy("direction").shape


def test_mapping_errors_fail_the_load_naming_step_and_tensor(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    for name, (_, named) in BROKEN.items():
        entry = index[name]
        assert entry["state"] == "UNAVAILABLE", entry
        for words in named:
            assert words in entry["reason"], (name, entry["reason"])
        assert not client.is_model_ready(name)
    for name in ("ocr", "pair", "via", "triple", "digits"):
        assert client.is_model_ready(name), name


def test_cancelling_a_request_cancels_its_pending_step(
    daemon: DaemonProcess, client: grpcclient.InferenceServerClient
) -> None:
    before = stats(client, "paired")
    answers: list[object] = []
    call = client.async_infer("via", _inputs("x", digits(4)), lambda r, e: answers.append(e))
    # the step waits in paired's queue (for company) until the client goes away
    _wait_queued(client, daemon, "paired")
    call.cancel()
    event = daemon.wait_for("pipeline_cancelled", model="via")
    assert event["cancelled_steps"] == ["paired"]
    # two direct requests now run as one batch: the cancelled step is not among them
    results: list[dict[str, np.ndarray]] = []

    def send(i: int) -> None:
        with ZmqClient(daemon.zmq_endpoints[0]) as c:
            results.append(c.infer("paired", {"input": digits(i)}))

    threads = [threading.Thread(target=send, args=(i,)) for i in (5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(int(r["label"][0]) for r in results) == [5, 6]
    inferences, executions = stats(client, "paired")
    assert (inferences - before[0], executions - before[1]) == (2, 1)


def _inputs(name: str, value: np.ndarray) -> list[grpcclient.InferInput]:
    t = grpcclient.InferInput(name, list(value.shape), "FP32")
    t.set_data_from_numpy(value)
    return [t]


def _metrics(daemon: DaemonProcess) -> str:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics") as reply:
        return str(reply.read().decode())


def _wait_queued(
    client: grpcclient.InferenceServerClient, daemon: DaemonProcess, model: str
) -> None:
    """Until the daemon's own queue-depth gauge shows a request waiting on ``model``."""
    deadline = time.monotonic() + 30
    line = f'edged_queue_depth{{model="{model}",version="1"}} 1.0'
    while time.monotonic() < deadline:
        if line in _metrics(daemon):
            return
        time.sleep(0.02)
    raise AssertionError(f"no request queued on {model}")


def test_a_step_model_unloaded_makes_the_pipeline_unavailable(
    client: grpcclient.InferenceServerClient,
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    result = grpc_infer(client, "triple", {"x": x})
    np.testing.assert_allclose(result.as_numpy("out"), 9 * x)
    client.unload_model("dynamic")
    try:
        assert not client.is_model_ready("triple")
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["triple"]["state"] == "UNAVAILABLE"
        assert "step 'first'" in index["triple"]["reason"]
        with pytest.raises(InferenceServerException) as failed:
            grpc_infer(client, "triple", {"x": x})
        assert "step 'first'" in str(failed.value)
        assert "UNAVAILABLE" in str(failed.value.status())
    finally:
        client.load_model("dynamic")
    assert client.is_model_ready("triple")
    np.testing.assert_allclose(grpc_infer(client, "triple", {"x": x}).as_numpy("out"), 9 * x)


def _scale_model(directory: Path, factor: float, width: int = 4) -> None:
    """Like modelgen's dynamic_axes_model (``y = 3x``) with another factor or width."""
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])],
        initializer=[numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    directory.mkdir(parents=True)
    save(model, str(directory / "model.onnx"))


def test_a_swapped_step_model_is_used_at_once_unless_its_tensors_changed(
    client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    x = np.ones((1, 1, 4), np.float32)
    np.testing.assert_allclose(grpc_infer(client, "triple", {"x": x}).as_numpy("out"), 9 * x)
    _scale_model(repo / "dynamic" / "2", 2.0)  # same tensors, y = 2x
    try:
        client.load_model("dynamic")  # the highest version serves: 2
        out = grpc_infer(client, "triple", {"x": x}).as_numpy("out")
        np.testing.assert_allclose(out, 4 * x)  # both steps ran version 2
        _scale_model(repo / "dynamic" / "3", 2.0, width=5)  # other tensors
        client.load_model("dynamic")
        assert not client.is_model_ready("triple")
        with pytest.raises(InferenceServerException, match="other tensors than when the pipe"):
            grpc_infer(client, "triple", {"x": x})
    finally:
        shutil.rmtree(repo / "dynamic" / "3", ignore_errors=True)
        shutil.rmtree(repo / "dynamic" / "2", ignore_errors=True)
        client.load_model("dynamic")
    assert client.is_model_ready("triple")
    np.testing.assert_allclose(grpc_infer(client, "triple", {"x": x}).as_numpy("out"), 9 * x)
