"""The audio model of issue #10 (silero-vad's silero_vad.onnx, tests/corpus.py), which
refuses the synthetic warm-up, served by real daemons: its first request that succeeds
becomes the reference sample, and what warm-up answers were used for works from it.

(a) OTA: a bundle without test vectors is self-tested with the reference sample: a version
    answering non-finite numbers is refused (FAILED, the old one serves), the real one is
    committed;
(b) failover and recovery (flaky-sim, tests/flaky_sim.py, a simulated accelerator): the
    version moves to cpu-onnx running the reference; a recovered device that computes wrong
    is refused by comparing its answer to the reference with the serving copy's; once right
    again, the model moves back;
(c) ``placement = "auto"``: nothing could be timed at load; the version is placed again,
    timed on the reference sample, and moves to the faster executor;
(d) a synthetic warm-up that hangs still fails the load (models.load_timeout_s).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged.fleet import build
from edged.ota import bundle
from tests import corpus, flaky_sim
from tests.daemon_process import DaemonProcess
from tests.tuf_fixtures import ServedFleetRepo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

VAD = corpus.CORPUS[0]
SR = np.array(16000, dtype=np.int64)


def chunk(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input": (rng.standard_normal((1, 576)) * 0.1).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": SR,
    }


def infer(address: str, inputs: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    tensors = []
    for name, value in inputs.items():
        datatype = "INT64" if value.dtype == np.int64 else "FP32"
        t = grpcclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        tensors.append(t)
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer("vad", tensors)
    version = result.get_response(as_json=True)["model_version"]
    return version, {n: result.as_numpy(n) for n in ("output", "stateN")}


def in_process(inputs: dict[str, np.ndarray], executor: str) -> dict[str, np.ndarray]:
    session = corpus.onnx_session(corpus.fetch(VAD), executor)
    output, state = session.run(None, inputs)
    return {"output": output, "stateN": state}


def assert_answer(
    got: dict[str, np.ndarray], inputs: dict[str, np.ndarray], executor: str = "cpu-onnx"
) -> None:
    """As in-process ONNX Runtime answers on ``executor``'s providers (flaky-sim runs
    cpu-onnx's code)."""
    want = in_process(inputs, "cuda" if executor == "cuda" else "cpu-onnx")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], **corpus.tolerance(executor))


def executor_of(address: str) -> str:
    with grpcclient.InferenceServerClient(address) as client:
        config = client.get_model_config("vad", as_json=True)["config"]
    return str(config["parameters"]["executor"]["string_value"])


@pytest.fixture
def models(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    corpus.place(repo, VAD)
    return repo


# -- (a) OTA --------------------------------------------------------------------------------


def infinite_vad(folder: Path) -> Path:
    """silero-vad's signature, answering inf: runs, but no version to serve."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["input", "axes"], ["total"], keepdims=1),
            helper.make_node("Div", ["total", "zero"], ["output"]),
            helper.make_node("Identity", ["state"], ["stateN"]),
        ],
        "infinite_vad",
        [
            vi("input", TensorProto.FLOAT, ["batch", "samples"]),
            vi("state", TensorProto.FLOAT, [2, "batch", 128]),
            vi("sr", TensorProto.INT64, []),
        ],
        [
            vi("output", TensorProto.FLOAT, ["batch", 1]),
            vi("stateN", TensorProto.FLOAT, [2, "batch", 128]),
        ],
        initializer=[
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    return folder


def update(address: str, version: int) -> mpb.UpdateStatus:
    with grpc.insecure_channel(address) as channel:
        stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.StartUpdate(
            mpb.StartUpdateRequest(model="vad", version=str(version), wait=True), timeout=120
        )
    return reply.status


@pytest.fixture
def fleet(tmp_path: Path, models: Path) -> Iterator[ServedFleetRepo]:
    repo = ServedFleetRepo(tmp_path / "fleet")
    out = tmp_path / "bundles"
    # the real model again as version 2, and one answering inf as version 3; neither can
    # carry test vectors the fleet computes (the default inputs are too short for its STFT)
    with pytest.raises(bundle.BundleError, match="--no-selftest"):
        build.build_bundle(models / "vad", 2, out / "vad-2.tar.gz", source=models / "vad" / "1")
    for version, source in [
        (2, models / "vad" / "1"),
        (3, infinite_vad(tmp_path / "infinite")),
    ]:
        path = build.build_bundle(
            models / "vad", version, out / f"vad-{version}.tar.gz", source=source, selftest=False
        )
        repo.publish(path)
    yield repo
    repo.close()


def test_ota_self_test_runs_the_first_request(
    tmp_path: Path, models: Path, fleet: ServedFleetRepo
) -> None:
    daemon = DaemonProcess(
        ["--models", str(models), "--grpc-address", "127.0.0.1:0"],
        env={
            "EDGED_OTA_REPOSITORY_URL": fleet.url,
            "EDGED_OTA_ROOT": str(fleet.root_path),
            "EDGED_OTA_STATE_DIR": str(tmp_path / "state"),
            "EDGED_OTA_HEALTH_WINDOW_S": "0.5",
            "EDGED_OTA_MIN_FREE_BYTES": str(1024 * 1024),
        },
    )
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        daemon.wait_for("warm_up_skipped", model="vad")
        where = executor_of(daemon.address)  # cpu-onnx, or cuda on a GPU host
        first = chunk(1)
        version, answer = infer(daemon.address, first)
        assert version == "1"
        assert_answer(answer, first, where)
        daemon.wait_for("reference_sample_taken", model="vad", version=1)

        refused = update(daemon.address, 3)
        assert mpb.UpdateState.Name(refused.state) == "UPDATE_STATE_FAILED"
        assert "self-test failed" in refused.last_error
        assert "'output' has 1 of 1 values that are not finite" in refused.last_error
        assert infer(daemon.address, chunk(2))[0] == "1"

        committed = update(daemon.address, 2)
        assert mpb.UpdateState.Name(committed.state) == "UPDATE_STATE_COMMITTED"
        used = [e for e in daemon.events if e["event"] == "ota_selftest_reference"]
        assert [e["sample"] for e in used] == ["request (no id)", "request (no id)"]
        later = chunk(3)
        version, answer = infer(daemon.address, later)
        assert version == "2"
        assert_answer(answer, later, where)
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- (b) failover and recovery ----------------------------------------------------------------


def test_failover_and_recovery_compare_with_the_first_request(tmp_path: Path, models: Path) -> None:
    sim_path = flaky_sim.install(tmp_path / "site")
    (models / "vad" / "model.toml").write_text(
        'executors = ["flaky-sim", "cpu-onnx"]\ninstances = 1\n'
    )
    fault = tmp_path / "fault"
    daemon = DaemonProcess(
        ["--models", str(models), "--grpc-address", "127.0.0.1:0"],
        env={
            "PYTHONPATH": os.pathsep.join([str(sim_path), os.environ.get("PYTHONPATH", "")]),
            "FLAKY_SIM_FAULT_FILE": str(fault),
            "EDGED_EXECUTORS_FAILURE_THRESHOLD": "1",
            "EDGED_EXECUTORS_RETRY_AFTER_S": "0.5",
        },
    )
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        # the synthetic input fails on both executors: the model refuses it, not the device
        loaded = daemon.wait_for("model_version_loaded", model="vad")
        assert loaded["executor"] == "flaky-sim"
        first = chunk(1)
        _, answer = infer(daemon.address, first)
        assert_answer(answer, first)
        daemon.wait_for("reference_sample_taken", model="vad", executor="flaky-sim")

        flaky_sim.set_fault(fault, "raise")
        with pytest.raises(grpcclient.InferenceServerException):
            infer(daemon.address, chunk(2))
        moved = daemon.wait_for("executor_failover", model="vad", timeout=30)
        assert (moved["from"], moved["to"]) == ("flaky-sim", "cpu-onnx")
        flaky_sim.set_fault(fault, "corrupt")  # answers again, but wrongly: recovery must see it
        refused = daemon.wait_for("executor_retry_failed", model="vad", timeout=30)
        assert "differs from the serving executor's answer" in refused["error"]
        probe = chunk(4)
        assert_answer(infer(daemon.address, probe)[1], probe)  # still on cpu-onnx: right
        fault.unlink()
        back = daemon.wait_for("executor_recovered", model="vad", timeout=30)
        assert (back["from"], back["to"]) == ("cpu-onnx", "flaky-sim")
        last = chunk(5)
        assert_answer(infer(daemon.address, last)[1], last)
    finally:
        assert daemon.stop() == 0, daemon.stderr
    shutil.rmtree(sim_path, ignore_errors=True)


# -- (c) placement = "auto" -------------------------------------------------------------------


def test_auto_placement_times_the_first_request(tmp_path: Path, models: Path) -> None:
    """Nothing could be timed at load (the model refuses the synthetic input on both
    executors); the first request is the reference, the version is placed again timed on
    it, and moves to the faster executor (flaky-sim is made 50 ms slower per run)."""
    sim_path = flaky_sim.install(tmp_path / "site")
    (models / "vad" / "model.toml").write_text(
        'executors = ["flaky-sim", "cpu-onnx"]\nplacement = "auto"\ninstances = 1\n'
    )
    daemon = DaemonProcess(
        ["--models", str(models), "--grpc-address", "127.0.0.1:0"],
        env={
            "PYTHONPATH": os.pathsep.join([str(sim_path), os.environ.get("PYTHONPATH", "")]),
            "FLAKY_SIM_DELAY_S": "0.05",
        },
    )
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        decided = daemon.wait_for("placement_decided", model="vad")
        assert (decided["executor"], decided["timings_ms"]) == ("flaky-sim", {})
        first = chunk(1)
        assert_answer(infer(daemon.address, first)[1], first)
        replanned = daemon.wait_for("placement_replanned", model="vad", timeout=30)
        assert (replanned["from"], replanned["to"]) == ("flaky-sim", "cpu-onnx")
        assert set(replanned["timings_ms"]) == {"flaky-sim", "cpu-onnx"}
        with grpcclient.InferenceServerClient(daemon.address) as client:
            config = client.get_model_config("vad", as_json=True)["config"]
        assert config["parameters"]["executor"]["string_value"] == "cpu-onnx"
        later = chunk(2)
        assert_answer(infer(daemon.address, later)[1], later)
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- (d) a warm-up that hangs ------------------------------------------------------------------


def test_a_hanging_warm_up_still_fails_the_load(tmp_path: Path, models: Path) -> None:
    """The synthetic warm-up may fail without refusing the model, but not hang: the load's
    time limit (models.load_timeout_s) fails it, and the other models serve."""
    sim_path = flaky_sim.install(tmp_path / "site")
    (models / "vad" / "model.toml").write_text('executors = ["flaky-sim"]\ninstances = 1\n')
    corpus.place(models, corpus.CORPUS[3])  # ocr_cls, on cpu-onnx
    fault = tmp_path / "fault"
    flaky_sim.set_fault(fault, "hang")
    daemon = DaemonProcess(
        ["--models", str(models), "--grpc-address", "127.0.0.1:0"],
        env={
            "PYTHONPATH": os.pathsep.join([str(sim_path), os.environ.get("PYTHONPATH", "")]),
            "FLAKY_SIM_FAULT_FILE": str(fault),
            "FLAKY_SIM_HANG_S": "3",
            "EDGED_MODELS_LOAD_TIMEOUT_S": "1",
            "EDGED_MODELS_STRICT_READINESS": "false",
        },
    )
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        failed = daemon.wait_for("model_load_failed", model="vad")
        assert "took more than 1.0s to load" in failed["error"]
        with grpcclient.InferenceServerClient(daemon.address) as client:
            assert client.is_model_ready("ocr_cls")
            assert not client.is_model_ready("vad")
            index = client.get_model_repository_index(as_json=True)["models"]
            (vad,) = [m for m in index if m["name"] == "vad"]
            assert vad["state"] == "UNAVAILABLE"
            assert "took more than" in vad["reason"]
    finally:
        assert daemon.stop() == 0, daemon.stderr
