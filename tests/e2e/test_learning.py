"""On-device learning end to end: real `edged serve` processes, the example trainable model
(models/digits_learn: a backbone and head trained on digits 0-4 only), samples over gRPC
(edged.v1.Management/AddSamples) and ZeroMQ, fine-tune jobs in their worker process,
publishing through the update path, inference with the stock tritonclient.

(a) samples added over gRPC survive kill -9 and a restart; bad samples are refused with the
    field named and store nothing;
(b) a job on new classes (5-9) is promoted: version 2 serves, is better on the new data, and
    records its lineage; the update shows as kind "fine-tune", COMMITTED;
(c) a job fed mislabelled data is rejected by the gate: version 1 stays, nothing is installed;
(d) the ZeroMQ add_samples message stores samples like AddSamples does.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged._proto.inference import grpc_service_pb2 as ipb
from edged.client import ZmqClient, ZmqClientError
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess, run_cli

pytestmark = pytest.mark.slow

MODEL = "digits_learn"
NEW = np.load(EXAMPLE_MODELS / MODEL / "test_new.npz")  # classes 5-9, raw 64-pixel inputs
OLD = np.load(EXAMPLE_MODELS / MODEL / "test_old.npz")  # classes 0-4
X2 = NEW["x"][:2]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(
        EXAMPLE_MODELS / MODEL, repo / MODEL, ignore=shutil.ignore_patterns("test_*.npz")
    )
    shutil.copytree(
        EXAMPLE_MODELS / "digits", repo / "digits", ignore=shutil.ignore_patterns("*.npy")
    )
    return repo


def serve(models: Path, state: Path, **keys: str) -> DaemonProcess:
    env = {
        "EDGED_LEARN_ENABLED": "true",
        "EDGED_OTA_STATE_DIR": str(state),
        "EDGED_OTA_HEALTH_WINDOW_S": "0.3",
        "EDGED_OTA_MIN_FREE_BYTES": str(1024 * 1024),
        "EDGED_MODELS_INSTANCES": "1",
        **keys,
    }
    daemon = DaemonProcess(["--models", str(models), "--grpc-address", "127.0.0.1:0"], env=env)
    daemon.wait_live()
    daemon.wait_for("server_ready", timeout=60)
    return daemon


@pytest.fixture
def daemon(models: Path, tmp_path: Path) -> Iterator[DaemonProcess]:
    d = serve(models, tmp_path / "state")
    yield d
    d.stop()


def management(address: str) -> tuple[grpc.Channel, mpb_grpc.ManagementStub]:
    channel = grpc.insecure_channel(address)
    return channel, mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]


def add_request(x: np.ndarray, labels: np.ndarray, model: str = MODEL) -> mpb.AddSamplesRequest:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return mpb.AddSamplesRequest(
        model=model,
        inputs=[
            ipb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[x.tobytes()],
        labels=[int(v) for v in labels],
    )


def accuracy(address: str, x: np.ndarray, y: np.ndarray, version: str = "") -> float:
    client = triton.InferenceServerClient(address)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    result = client.infer(MODEL, [inp], model_version=version)
    labels = result.as_numpy("label")
    client.close()
    return float((labels == y).mean())


# -- (a) intake and durability -------------------------------------------------------------


def test_samples_survive_kill_and_restart(models: Path, tmp_path: Path) -> None:
    daemon = serve(models, tmp_path / "state")
    channel, stub = management(daemon.address)
    try:
        first = stub.AddSamples(add_request(NEW["x"][:30], NEW["y"][:30]))
        second = stub.AddSamples(add_request(NEW["x"][30:50], NEW["y"][30:50]))
        assert first.accepted == 30
        assert second.counts.pending == 50
        assert second.counts.stored_bytes >= 50 * 4
    finally:
        channel.close()
        daemon.stop(signal.SIGKILL)
    again = serve(models, tmp_path / "state")
    channel, stub = management(again.address)
    try:
        listing = stub.ListJobs(mpb.ListJobsRequest(model=MODEL))
        assert [(c.model, c.pending, c.stored) for c in listing.counts] == [(MODEL, 50, 50)]
        text = metrics_text(again)
        assert f'edged_learn_samples{{model="{MODEL}",status="pending"}} 50.0' in text
    finally:
        channel.close()
        again.stop()


def metrics_text(daemon: DaemonProcess) -> str:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=5) as r:
        return str(r.read().decode())


@pytest.mark.parametrize(
    ("request_of", "code", "words"),
    [
        (lambda: add_request(NEW["x"][:4], NEW["y"][:3]), "INVALID_ARGUMENT", "'labels' has 3"),
        (lambda: add_request(NEW["x"][:2], [0, 10]), "INVALID_ARGUMENT", "labels[1] = 10"),
        (lambda: add_request(NEW["x"][:2], [0, -1]), "INVALID_ARGUMENT", "labels[1] = -1"),
        (
            lambda: add_request(NEW["x"][:2, :60], [0, 1]),
            "INVALID_ARGUMENT",
            "input tensor 'input': shape [2, 60]",
        ),
        (lambda: add_request(X2, [0, 1], model="digits"), "INVALID_ARGUMENT", "not trainable"),
        (lambda: add_request(X2, [0, 1], model="nope"), "NOT_FOUND", "nope"),
        (lambda: add_request(X2, [0, 1], model=""), "INVALID_ARGUMENT", "model_name is empty"),
    ],
)
def test_bad_samples_are_refused_and_store_nothing(
    daemon: DaemonProcess, request_of: object, code: str, words: str
) -> None:
    channel, stub = management(daemon.address)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.AddSamples(request_of())  # type: ignore[operator]
        assert caught.value.code().name == code
        assert words in (caught.value.details() or "")
        listing = stub.ListJobs(mpb.ListJobsRequest(model=MODEL))
        assert listing.counts[0].stored == 0
        assert stub.AddSamples(add_request(NEW["x"][:2], NEW["y"][:2])).accepted == 2
    finally:
        channel.close()


# -- (b), (c) jobs ---------------------------------------------------------------------------


def test_fine_tune_promotes_a_better_version_then_mislabelled_data_is_rejected(
    daemon: DaemonProcess, models: Path
) -> None:
    address = daemon.address
    half = len(NEW["y"]) // 2
    before_new = accuracy(address, NEW["x"][half:], NEW["y"][half:])
    before_old = accuracy(address, OLD["x"], OLD["y"])
    channel, stub = management(address)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.StartFineTune(mpb.StartFineTuneRequest(model=MODEL))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "learn.min_samples" in (caught.value.details() or "")

        stub.AddSamples(add_request(NEW["x"][:half], NEW["y"][:half]))
        started = time.monotonic()
        job = stub.StartFineTune(mpb.StartFineTuneRequest(model=MODEL, wait=True)).job
        seconds = time.monotonic() - started
        assert mpb.JobState.Name(job.state) == "JOB_STATE_PROMOTED", (job.verdict, job.error)
        assert job.new_version == "2"
        assert job.parent_version == "1"
        assert job.strategy == "replay+lwf"
        assert job.verdict.startswith("passed")
        assert job.metrics.new_accuracy_after > job.metrics.new_accuracy_before
        assert job.update_id > 0
        print(f"fine-tune job end to end: {seconds:.2f}s, metrics {job.metrics}")

        status = stub.GetUpdateStatus(mpb.GetUpdateStatusRequest(model=MODEL)).models[0]
        assert status.kind == "fine-tune"
        assert mpb.UpdateState.Name(status.state) == "UPDATE_STATE_COMMITTED"
        assert status.committed_version == "2"

        after_new = accuracy(address, NEW["x"][half:], NEW["y"][half:])
        after_old = accuracy(address, OLD["x"], OLD["y"])
        assert after_new > before_new + 0.3  # unseen samples of the new classes
        assert after_old > before_old - 0.1
        lineage = json.loads((models / MODEL / "2" / "lineage.json").read_text())
        assert lineage["parent_version"] == 1
        assert lineage["strategy"] == "replay+lwf"
        assert lineage["samples"] == half
        counts = stub.GetJob(mpb.GetJobRequest(job_id=job.id)).counts
        assert counts.pending == 0

        # (c) the same inputs, every label wrong: the gate refuses, version 2 stays
        wrong = (NEW["y"][:half] + 1) % 10
        stub.AddSamples(add_request(NEW["x"][:half], wrong))
        rejected = stub.StartFineTune(
            mpb.StartFineTuneRequest(model=MODEL, strategy="naive", wait=True)
        ).job
        assert mpb.JobState.Name(rejected.state) == "JOB_STATE_REJECTED", rejected.error
        assert rejected.verdict.startswith("rejected")
        assert rejected.new_version == ""
        assert rejected.update_id == 0
        assert sorted(p.name for p in (models / MODEL).iterdir() if p.name.isdigit()) == [
            "1",
            "2",
        ]
        assert accuracy(address, NEW["x"][half:], NEW["y"][half:]) == after_new
        jobs = stub.ListJobs(mpb.ListJobsRequest(model=MODEL)).jobs
        assert [j.id for j in jobs] == [rejected.id, job.id]
        assert stub.GetJob(mpb.GetJobRequest(job_id=rejected.id)).counts.pending == 0
    finally:
        channel.close()


# -- (d) ZeroMQ ------------------------------------------------------------------------------


def test_zmq_add_samples(daemon: DaemonProcess) -> None:
    with ZmqClient(daemon.zmq_endpoints[0]) as client:
        result = client.add_samples(MODEL, {"input": NEW["x"][:8].astype(np.float32)}, NEW["y"][:8])
        assert result["accepted"] == 8
        assert result["pending"] == 8
        assert result["triggered_job"] is None
        with pytest.raises(ZmqClientError) as caught:
            client.add_samples(MODEL, {"input": NEW["x"][:2].astype(np.float32)}, [1])
        assert caught.value.code == "INVALID_ARGUMENT"
        assert "'labels' has 1" in str(caught.value)


# -- a trigger, and a job that fails -------------------------------------------------------


def test_triggered_job_that_fails_leaves_the_model_and_samples(
    models: Path, tmp_path: Path
) -> None:
    """learn.trigger_samples starts a job by itself; its worker cannot start under a 64 MiB
    address-space limit, so the job fails: version 1 still serves, the samples still wait."""
    daemon = serve(
        models,
        tmp_path / "state",
        EDGED_LEARN_TRIGGER_SAMPLES="20",
        EDGED_LEARN_JOB_MEMORY_MB="64",
    )
    channel, stub = management(daemon.address)
    try:
        first = stub.AddSamples(add_request(NEW["x"][:10], NEW["y"][:10]))
        assert not first.HasField("triggered")
        second = stub.AddSamples(add_request(NEW["x"][10:25], NEW["y"][10:25]))
        assert second.HasField("triggered")
        assert second.triggered.trigger == "trigger"
        job_id = second.triggered.id
        deadline = time.monotonic() + 60
        while True:
            job = stub.GetJob(mpb.GetJobRequest(job_id=job_id))
            if mpb.JobState.Name(job.job.state) != "JOB_STATE_RUNNING":
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert mpb.JobState.Name(job.job.state) == "JOB_STATE_FAILED"
        assert "fine-tune worker failed" in job.job.error
        assert job.counts.pending == 25
        assert sorted(p.name for p in (models / MODEL).iterdir() if p.name.isdigit()) == ["1"]
        status = stub.GetUpdateStatus(mpb.GetUpdateStatusRequest(model=MODEL)).models[0]
        assert mpb.UpdateState.Name(status.state) == "UPDATE_STATE_IDLE"
        assert accuracy(daemon.address, OLD["x"], OLD["y"]) > 0.9
    finally:
        channel.close()
        daemon.stop()


def test_learning_off_answers_unavailable(models: Path, tmp_path: Path) -> None:
    daemon = serve(models, tmp_path / "state", EDGED_LEARN_ENABLED="false")
    channel, stub = management(daemon.address)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.AddSamples(add_request(NEW["x"][:2], NEW["y"][:2]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "learn.enabled" in (caught.value.details() or "")
        # the trainable model serves like any other
        assert accuracy(daemon.address, OLD["x"], OLD["y"]) > 0.9
    finally:
        channel.close()
        daemon.stop()


def test_kill_9_during_a_job(models: Path, tmp_path: Path) -> None:
    """kill -9 while a job trains: its worker dies with the daemon; after the restart the job
    is FAILED (interrupted), version 1 serves, and every sample still waits."""
    state = tmp_path / "state"
    daemon = serve(models, state, EDGED_LEARN_EPOCHS="1000")
    channel, stub = management(daemon.address)
    x = np.concatenate([NEW["x"]] * 10)
    y = np.concatenate([NEW["y"]] * 10)
    try:
        for i in range(0, len(y), 100):
            stub.AddSamples(add_request(x[i : i + 100], y[i : i + 100]))
        job = stub.StartFineTune(mpb.StartFineTuneRequest(model=MODEL)).job
        deadline = time.monotonic() + 30
        while stub.GetJob(mpb.GetJobRequest(job_id=job.id)).job.progress == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = _workers(state)
        assert workers, "the job's worker process is running"
    finally:
        channel.close()
        daemon.stop(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the worker outlived its daemon"
        time.sleep(0.05)
    again = serve(models, state)
    channel, stub = management(again.address)
    try:
        after = stub.GetJob(mpb.GetJobRequest(job_id=job.id))
        assert mpb.JobState.Name(after.job.state) == "JOB_STATE_FAILED"
        assert "interrupted by a restart" in after.job.error
        assert after.counts.pending == len(y)
        assert sorted(p.name for p in (models / MODEL).iterdir() if p.name.isdigit()) == ["1"]
        assert not (state / "learn" / "jobs").exists()
    finally:
        channel.close()
        again.stop()


def _workers(state: Path) -> list[int]:
    """Processes running edged.learn.worker on a job folder under ``state``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"edged.learn.worker" in argv and any(str(state).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_kill_9_while_publishing(models: Path, tmp_path: Path) -> None:
    """kill -9 while the fine-tuned version is on trial: OTA recovery rolls it back at the
    restart, and the job takes that outcome (FAILED); version 1 serves, the samples wait."""
    state = tmp_path / "state"
    daemon = serve(models, state, EDGED_OTA_HEALTH_WINDOW_S="60")
    channel, stub = management(daemon.address)
    try:
        stub.AddSamples(add_request(NEW["x"][:50], NEW["y"][:50]))
        job = stub.StartFineTune(mpb.StartFineTuneRequest(model=MODEL)).job
        daemon.wait_for("ota_state", state="ACTIVE_TRIAL", timeout=30)
        during = stub.GetJob(mpb.GetJobRequest(job_id=job.id)).job
        assert mpb.JobState.Name(during.state) == "JOB_STATE_PUBLISHING"
        assert during.new_version == "2"
        assert during.update_id > 0
    finally:
        channel.close()
        daemon.stop(signal.SIGKILL)
    again = serve(models, state)
    channel, stub = management(again.address)
    try:
        after = stub.GetJob(mpb.GetJobRequest(job_id=job.id))
        assert mpb.JobState.Name(after.job.state) == "JOB_STATE_FAILED"
        assert "publishing ended ROLLED_BACK" in after.job.error
        assert after.counts.pending == 50
        status = stub.GetUpdateStatus(mpb.GetUpdateStatusRequest(model=MODEL)).models[0]
        assert (status.kind, status.committed_version) == ("fine-tune", "1")
        assert sorted(p.name for p in (models / MODEL).iterdir() if p.name.isdigit()) == ["1"]
        assert accuracy(again.address, NEW["x"], NEW["y"]) == 0.0  # version 1 knows no 5-9
    finally:
        channel.close()
        again.stop()


def test_edged_learn_cli(daemon: DaemonProcess, tmp_path: Path) -> None:
    """`edged learn add|start|jobs` against a running daemon."""
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, NEW["x"][:50].astype(np.float32))
    np.save(y, NEW["y"][:50])
    address = ["--address", daemon.address]
    added = run_cli("learn", "add", MODEL, "--input", f"input={x}", "--labels", str(y), *address)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["accepted"] == "50"  # uint64 is a string in proto JSON
    started = run_cli("learn", "start", MODEL, "--wait", *address)
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    assert (job["state"], job["new_version"]) == ("JOB_STATE_PROMOTED", "2")
    # progress on stderr while it waits: the job's states, then the update's, in order
    progress = [line.removeprefix("edged learn start: ") for line in started.stderr.splitlines()]
    said = [line.split(" (")[0] for line in progress]
    assert said[0] == f"job {job['id']} RUNNING"
    assert said[-1] == f"job {job['id']} PROMOTED"
    update = [line for line in progress if line.startswith(f"update {job['update_id']} ")]
    states = [line.split(": ")[1].split(" ")[0] for line in update]
    assert states[-3:] == ["WARMING", "ACTIVE_TRIAL", "COMMITTED"], progress
    assert any("health window open" in line for line in update)
    listed = run_cli("learn", "jobs", *address)
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert [j["id"] for j in report["jobs"]] == [job["id"]]
    assert report["counts"][0]["model"] == MODEL
    again = run_cli("learn", "start", MODEL, *address)
    assert again.returncode == 1
    assert "INVALID_ARGUMENT" in again.stderr
    assert "learn.min_samples" in again.stderr
