"""edged optimize into the pipeline, end to end: optimise the example digits model (INT8
static, real onnxruntime.quantization), bundle the accepted variant with ``edged-fleet
bundle``, publish it to a real TUF repository served on 127.0.0.1, roll it out to a real
daemon process with StartUpdate, and serve it over gRPC with the stock Triton client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from sklearn.datasets import load_digits

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged.serving.versions import read_active
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess
from tests.tuf_fixtures import ServedFleetRepo

pytestmark = pytest.mark.slow

METHOD = "int8-static-minmax"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, check=False
    )


def _device_env(fleet: ServedFleetRepo, tmp_path: Path) -> dict[str, str]:
    """A device daemon that takes its updates from ``fleet`` with a short health window."""
    return {
        "EDGED_OTA_REPOSITORY_URL": fleet.url,
        "EDGED_OTA_ROOT": str(fleet.root_path),
        "EDGED_OTA_STATE_DIR": str(tmp_path / "state"),
        "EDGED_OTA_HEALTH_WINDOW_S": "0.5",
        "EDGED_OTA_HEALTH_MIN_REQUESTS": "0",
        "EDGED_OTA_MIN_FREE_BYTES": str(1024 * 1024),
        "EDGED_MODELS_INSTANCES": "1",
    }


def test_an_optimised_model_is_bundled_rolled_out_over_tuf_and_served(tmp_path: Path) -> None:
    data = load_digits()
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.savez(
        calibration / "digits.npz",
        input=data.data[:800].astype(np.float32),
        labels=data.target[:800].astype(np.int64),
    )
    out = tmp_path / "optimized"
    run = _cli(
        "-m", "edged.cli", "optimize", str(EXAMPLE_MODELS / "digits"),
        "--calibration", str(calibration), "--out", str(out), "--methods", METHOD,
        "--max-accuracy-drop", "1.0", "--runs", "3", "--no-plot", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    original, variant = (json.loads(line) for line in run.stdout.splitlines())
    assert variant["accepted"], variant["reason"]
    assert variant["size_bytes"] < original["size_bytes"]
    model_dir = out / METHOD / "digits"
    assert variant["path"] == str(model_dir / "1" / "model.onnx")

    bundle = tmp_path / "digits-2.tar.gz"
    run = _cli(
        "-m", "edged.fleet", "bundle", str(model_dir), "--version", "2",
        "--source", str(model_dir / "1"), "--out", str(bundle),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        lineage_member = next(n for n in names if n.endswith("optimize.json"))
        lineage = json.loads(tar.extractfile(lineage_member).read())  # type: ignore[union-attr]
    assert lineage["method"] == METHOD  # the rollout carries its evidence
    assert lineage["parent"]["name"] == "digits"

    models = tmp_path / "models"
    shutil.copytree(EXAMPLE_MODELS / "digits", models / "digits")
    with ServedFleetRepo(tmp_path / "fleet") as fleet:
        fleet.publish(bundle)
        env = _device_env(fleet, tmp_path)
        daemon = DaemonProcess(["--models", str(models), "--grpc-address", "127.0.0.1:0"], env=env)
        try:
            daemon.wait_live()
            daemon.wait_for("server_ready", timeout=60)
            import grpc

            with grpc.insecure_channel(daemon.address) as channel:
                stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
                reply = stub.StartUpdate(
                    mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=120
                )
            assert reply.started, reply.reason
            state = mpb.UpdateState.Name(reply.status.state)
            assert state == "UPDATE_STATE_COMMITTED", reply.status.last_error
            assert read_active(models / "digits") == [2]

            x = data.data[1500:1532].astype(np.float32)
            client = triton.InferenceServerClient(daemon.address)
            try:
                tensor = triton.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer("digits", [tensor])
            finally:
                client.close()
            assert result.get_response().model_version == "2"
            served = result.as_numpy("probabilities")
            session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
            (expected,) = session.run(["probabilities"], {"input": x})
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
            labels = result.as_numpy("label")
            assert np.mean(labels == data.target[1500:1532]) > 0.9
        finally:
            assert daemon.stop() == 0, daemon.stderr


def _perturbed(bundle: Path, version: int, out: Path, work: Path) -> Path:
    """``bundle`` with its variant's weights shuffled after it was optimised, re-bundled as
    ``version`` the way a careless pipeline would: the self-test's expected outputs are
    recomputed from the broken model (so that check passes), the optimize evidence and its
    held-out check set are carried over unchanged."""
    import onnx
    from onnx import numpy_helper

    from edged.fleet.build import build_bundle
    from edged.ota import archive
    from edged.ota.bundle import read_manifest

    (work / "unpacked").mkdir()
    root = archive.extract(bundle, work / "unpacked")
    manifest = read_manifest(root)
    assert manifest.optimize is not None
    model_dir = work / manifest.name
    source = model_dir / "source"
    source.mkdir(parents=True)
    shutil.copyfile(root / "model.toml", model_dir / "model.toml")
    for name in manifest.artifacts:
        shutil.copyfile(root / name, source / name)
    model = onnx.load(str(source / "model.onnx"))
    rng = np.random.default_rng(7)
    shuffled = 0
    for i, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.size >= 64:
            broken = rng.permutation(values.reshape(-1)).reshape(values.shape)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(broken, tensor.name))
            shuffled += 1
    assert shuffled
    onnx.save(model, str(source / "model.onnx"))
    check = (root / manifest.optimize.file).read_bytes()
    return build_bundle(model_dir, version, out, source=source, optimize=(manifest.optimize, check))


def test_bundle_optimize_rolls_out_with_its_evidence_and_the_device_refuses_a_drifted_variant(
    tmp_path: Path,
) -> None:
    data = load_digits()
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.savez(
        calibration / "digits.npz",
        input=data.data[:600].astype(np.float32),
        labels=data.target[:600].astype(np.int64),
    )
    good = tmp_path / "digits-3.tar.gz"
    run = _cli(
        "-m", "edged.fleet", "bundle", str(EXAMPLE_MODELS / "digits"), "--version", "3",
        "--out", str(good), "--optimize", f"{METHOD},prune-magnitude",
        "--calibration", str(calibration), "--max-accuracy-drop", "1.0", "--sparsity", "0.95",
        "--pick", "best-quality", "--runs", "3", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    made = json.loads(run.stdout)
    evidence = made["optimize"]
    assert evidence["method"] == METHOD  # the pruned variant was over budget
    assert {v["method"]: v["accepted"] for v in evidence["variants"]} == {
        "original": True,
        METHOD: True,
        "prune-magnitude": False,
    }
    assert evidence["evidence"]["parent"] == "digits"
    assert evidence["evidence"]["agreement"] >= 0.99
    # the report travels in the bundle; inspect reads it back
    run = _cli("-m", "edged.fleet", "inspect", str(good), "--json")
    assert run.returncode == 0, run.stderr
    inspected = json.loads(run.stdout)["optimize"]
    assert inspected["evidence"] == evidence["evidence"]
    assert inspected["lineage"]["parent"]["sha256"] == evidence["evidence"]["parent_sha256"]
    assert len(inspected["lineage"]["variants"]) == 3

    broken = _perturbed(good, 2, tmp_path / "digits-2.tar.gz", tmp_path)

    models = tmp_path / "models"
    shutil.copytree(EXAMPLE_MODELS / "digits", models / "digits")
    x = data.data[1500:1532].astype(np.float32)
    with ServedFleetRepo(tmp_path / "fleet") as fleet:
        fleet.publish(broken)
        fleet.publish(good)
        env = _device_env(fleet, tmp_path)
        daemon = DaemonProcess(["--models", str(models), "--grpc-address", "127.0.0.1:0"], env=env)
        try:
            daemon.wait_live()
            daemon.wait_for("server_ready", timeout=60)
            import grpc

            client = triton.InferenceServerClient(daemon.address)

            def infer() -> tuple[str, np.ndarray]:
                tensor = triton.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer("digits", [tensor])
                return result.get_response().model_version, result.as_numpy("probabilities")

            before_version, before = infer()
            with grpc.insecure_channel(daemon.address) as channel:
                stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
                reply = stub.StartUpdate(
                    mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=120
                )
                assert reply.started, reply.reason
                assert mpb.UpdateState.Name(reply.status.state) == "UPDATE_STATE_FAILED"
                reason = reply.status.last_error
                assert "optimize check" in reason, reason
                assert "agreement" in reason
                assert "ota.optimize_agreement_slack" in reason
                failed = daemon.wait_for("ota_optimize_check_failed", model="digits")
                assert failed["method"] == METHOD
                # the version it served never stopped, and still answers the same
                still_version, still = infer()
                assert still_version == before_version == "1"
                np.testing.assert_array_equal(still, before)
                assert not (models / "digits" / "2").exists()

                reply = stub.StartUpdate(
                    mpb.StartUpdateRequest(model="digits", version="3", wait=True), timeout=120
                )
                assert reply.started, reply.reason
                state = mpb.UpdateState.Name(reply.status.state)
                assert state == "UPDATE_STATE_COMMITTED", reply.status.last_error
            passed = daemon.wait_for("ota_optimize_check", model="digits")
            assert passed["agreement"] >= evidence["evidence"]["agreement"] - 0.01
            version, served = infer()
            assert version == "3"
            client.close()
            assert read_active(models / "digits") == [3]
            session = ort.InferenceSession(str(models / "digits" / "3" / "model.onnx"))
            (expected,) = session.run(["probabilities"], {"input": x})
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
            # the evidence is installed beside the model it describes
            lineage = json.loads((models / "digits" / "3" / "optimize.json").read_text())
            assert lineage["method"] == METHOD
            assert lineage["pick"] == "best-quality"
            assert lineage["check"]["agreement"] == evidence["evidence"]["agreement"]
        finally:
            assert daemon.stop() == 0, daemon.stderr
