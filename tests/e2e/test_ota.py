"""Over-the-air updates end to end: a real TUF repository served on 127.0.0.1, real daemon
processes, a client sending requests over gRPC all the while.

(a) digits 1 -> 2 ("latest") under load: zero failed requests, 2 serves once COMMITTED;
(b) a bundle whose self-test fails: FAILED with the reason, 1 still serves, zero failures;
(c) a version too slow for ota.max_p99_ms in its health window: ROLLED_BACK, 1 serves again;
    one that fails requests past ota.max_error_rate: ROLLED_BACK within a second;
(d) a tampered target: FAILED, the TUF error class named in GetUpdateStatus;
(e) kill -9 in every state, restart: the committed version serves (the new one only if it had
    been committed) and the update is finished or undone.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from edged.core.types import InferRequest
from edged.fleet import build
from edged.frontends.kserve_codec import request_to_proto
from edged.ota import bundle
from edged.serving.versions import read_active
from tests import modelgen
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess
from tests.digits_variants import (
    DIGITS_V1,
    MODEL_TOML,
    SAMPLE,
    poisoned,
    poisoned_digits_model,
    run_onnx,
    write_digits_bundle,
)
from tests.tuf_fixtures import ServedFleetRepo


def slow_digits_model(delay_ms: float) -> bytes:
    """digits' signature (input FP32 [N, 64] -> probabilities [N, 10], label INT64 [N]), but
    every run first burns roughly ``delay_ms`` of CPU (tests/modelgen.py's slow_model loop):
    it passes a self-test and serves correctly shaped answers, just too slowly."""
    iterations = max(1, round(delay_ms / 1000 / modelgen.calibrate_slow_iteration_seconds()))
    size = 64
    weight = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32) / 8
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "weight"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["x_in"], ["x_out"]),
        ],
        "burn",
        [
            vi("iteration", TensorProto.INT64, []),
            vi("cond_in", TensorProto.BOOL, []),
            vi("state_in", TensorProto.FLOAT, [size, size]),
            vi("x_in", TensorProto.FLOAT, None),
        ],
        [
            vi("cond_out", TensorProto.BOOL, []),
            vi("state_out", TensorProto.FLOAT, [size, size]),
            vi("x_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Loop", ["trips", "", "weight", "input"], ["state", "carried"], body=body
            ),
            helper.make_node("Slice", ["carried", "zero", "ten", "one"], ["probabilities"]),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "slow_digits",
        [vi("input", TensorProto.FLOAT, ["batch", 64])],
        [
            vi("probabilities", TensorProto.FLOAT, ["batch", 10]),
            vi("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([10], np.int64), "ten"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


# -- the fleet side (edged.fleet.build, tests/tuf_fixtures.py) --------------------------


class OtaRepo:
    """A TUF repository served on 127.0.0.1 that digits bundles are published to."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._repo = ServedFleetRepo(folder / "repo")
        self.url: str = self._repo.url
        self.root_path: Path = self._repo.root_path

    def publish_digits(
        self,
        version: int,
        onnx_bytes: bytes = DIGITS_V1,
        *,
        selftest_input: np.ndarray | None = None,
        expected: dict[str, np.ndarray] | None = None,
    ) -> str:
        """Build and publish digits ``version``; the self-test expects what the model itself
        computes unless ``expected`` says otherwise. Returns the target path."""
        path = write_digits_bundle(
            self.folder / "bundles" / f"digits-{version}.tar.gz",
            version,
            onnx_bytes,
            selftest_input=selftest_input,
            expected=expected,
        )
        return self._repo.publish(path).target

    def tamper(self, target: str) -> None:
        """Flip a byte of a published target on the server (same length)."""
        self._repo.tamper(target)

    def close(self) -> None:
        self._repo.close()


@pytest.fixture
def ota_repo(tmp_path: Path) -> Iterator[OtaRepo]:
    repo = OtaRepo(tmp_path / "fleet")
    yield repo
    repo.close()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(
        EXAMPLE_MODELS / "digits", repo / "digits", ignore=shutil.ignore_patterns("*.npy")
    )
    return repo


# -- daemon and clients --------------------------------------------------------------------


def serve(models: Path, ota: OtaRepo, state: Path, **keys: object) -> DaemonProcess:
    env = {
        "EDGED_OTA_REPOSITORY_URL": ota.url,
        "EDGED_OTA_ROOT": str(ota.root_path),
        "EDGED_OTA_STATE_DIR": str(state),
        "EDGED_OTA_HEALTH_WINDOW_S": "1.0",
        "EDGED_OTA_HEALTH_MIN_REQUESTS": "5",
        "EDGED_OTA_MIN_FREE_BYTES": str(1024 * 1024),
        "EDGED_MODELS_INSTANCES": "1",
        **{f"EDGED_OTA_{k.upper()}": str(v) for k, v in keys.items()},
    }
    daemon = DaemonProcess(["--models", str(models), "--grpc-address", "127.0.0.1:0"], env=env)
    daemon.wait_live()
    daemon.wait_for("server_ready", timeout=60)
    return daemon


@dataclass
class Result:
    started: float
    seconds: float
    version: str  # "" when it failed
    error: str = ""


class Load:
    """Client threads sending digits requests back to back over gRPC until stopped."""

    def __init__(
        self, address: str, inputs: Callable[[int], np.ndarray] = lambda i: SAMPLE[:1]
    ) -> None:
        self.address = address
        self.inputs = inputs
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(2)]

    def _run(self, k: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            i = k
            while not self._stop.is_set():
                message = request_to_proto(InferRequest("digits", {"input": self.inputs(i)}))
                started = time.monotonic()
                try:
                    reply = stub.ModelInfer(message, timeout=10)
                    result = Result(started, time.monotonic() - started, reply.model_version)
                except grpc.RpcError as e:
                    result = Result(started, time.monotonic() - started, "", e.code().name)
                self.results.append(result)
                i += 2

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        time.sleep(0.3)  # steady state before anything happens
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.error]


def management(address: str) -> mpb_grpc.ManagementStub:
    return mpb_grpc.ManagementStub(grpc.insecure_channel(address))  # type: ignore[no-untyped-call]


def served_version(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ModelInfer(
            request_to_proto(InferRequest("digits", {"input": SAMPLE[:1]})), timeout=10
        )
        return str(reply.model_version)


def state_name(value: int) -> str:
    return mpb.UpdateState.Name(value).removeprefix("UPDATE_STATE_")


def status(address: str) -> mpb.UpdateStatus:
    reply = management(address).GetUpdateStatus(
        mpb.GetUpdateStatusRequest(model="digits"), timeout=10
    )
    (one,) = reply.models
    return one


# -- (a) -----------------------------------------------------------------------------------


def test_update_under_load_loses_no_request(
    tmp_path: Path, models: Path, ota_repo: OtaRepo
) -> None:
    ota_repo.publish_digits(2)
    daemon = serve(models, ota_repo, tmp_path / "state")
    try:
        with Load(daemon.address) as load:
            reply = management(daemon.address).StartUpdate(
                mpb.StartUpdateRequest(model="digits", version="latest", wait=True), timeout=60
            )
            committed_at = time.monotonic()
        assert reply.started
        assert state_name(reply.status.state) == "COMMITTED", reply.status.last_error
        assert (reply.status.from_version, reply.status.to_version) == ("1", "2")
        assert reply.status.committed_version == "2"
        assert reply.status.requested == "latest"
        assert load.failures() == []
        versions = [r.version for r in load.results]
        assert versions[0] == "1"
        assert {r.version for r in load.results if r.started > committed_at} == {"2"}
        assert served_version(daemon.address) == "2"
        assert read_active(models / "digits") == [2]

        history = management(daemon.address).ListUpdates(mpb.ListUpdatesRequest(), timeout=10)
        (update,) = history.updates
        assert [state_name(t.state) for t in update.transitions] == [
            "DOWNLOADING",
            "VERIFIED",
            "STAGED",
            "WARMING",
            "ACTIVE_TRIAL",
            "COMMITTED",
        ]
        again = management(daemon.address).StartUpdate(
            mpb.StartUpdateRequest(model="digits", version="latest"), timeout=30
        )
        assert not again.started
        assert "committed" in again.reason
        with pytest.raises(grpc.RpcError) as info:
            management(daemon.address).StartUpdate(
                mpb.StartUpdateRequest(model="digits", version="1"), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'edged_ota_state{model="digits",state="COMMITTED"} 1.0' in metrics
        assert 'edged_ota_committed_version{model="digits"} 2.0' in metrics
        assert 'edged_ota_transitions_total{model="digits",state="ACTIVE_TRIAL"} 1.0' in metrics
        switched = daemon.wait_for("ota_switched")
        assert switched["swap_seconds"] >= 0
        logged = [e["state"] for e in daemon.events if e.get("event") == "ota_state"]
        assert logged[-1] == "COMMITTED"
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- (b) -----------------------------------------------------------------------------------


def test_failed_self_test_keeps_the_old_version(
    tmp_path: Path, models: Path, ota_repo: OtaRepo
) -> None:
    wrong = {k: v + 1 for k, v in run_onnx(DIGITS_V1, SAMPLE).items()}
    ota_repo.publish_digits(2, expected=wrong)
    daemon = serve(models, ota_repo, tmp_path / "state")
    try:
        with Load(daemon.address) as load:
            reply = management(daemon.address).StartUpdate(
                mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=60
            )
        assert state_name(reply.status.state) == "FAILED"
        assert "self-test failed" in reply.status.last_error
        assert reply.status.committed_version == "1"
        assert load.failures() == []
        assert {r.version for r in load.results} == {"1"}
        assert served_version(daemon.address) == "1"
        assert read_active(models / "digits") == [1]
        assert not (models / "digits" / "2").exists()  # the refused version was removed
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- (c) -----------------------------------------------------------------------------------


def test_health_window_rolls_back_a_slow_version(
    tmp_path: Path, models: Path, ota_repo: OtaRepo
) -> None:
    ota_repo.publish_digits(2, slow_digits_model(150))
    daemon = serve(models, ota_repo, tmp_path / "state", health_window_s=10, max_p99_ms=50)
    try:
        with Load(daemon.address) as load:
            started = time.monotonic()
            reply = management(daemon.address).StartUpdate(
                mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=60
            )
            rolled_back_at = time.monotonic()
        assert state_name(reply.status.state) == "ROLLED_BACK", reply.status.last_error
        assert "health window: p99 latency" in reply.status.last_error
        assert "above 50 ms" in reply.status.last_error
        assert reply.status.committed_version == "1"
        assert rolled_back_at - started < 8  # judged early, not at the end of the 10 s window
        assert load.failures() == []  # slow, not failing: every request was answered
        slow = [r for r in load.results if r.version == "2"]
        assert slow, "version 2 served during its window"
        assert {r.version for r in load.results if r.started > rolled_back_at} == {"1"}
        assert served_version(daemon.address) == "1"
        assert not (models / "digits" / "2").exists()
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- (d) -----------------------------------------------------------------------------------


def test_tampered_target_is_refused(tmp_path: Path, models: Path, ota_repo: OtaRepo) -> None:
    ota_repo.tamper(ota_repo.publish_digits(2))
    daemon = serve(models, ota_repo, tmp_path / "state")
    try:
        management(daemon.address).StartUpdate(
            mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=60
        )
        now = status(daemon.address)
        assert state_name(now.state) == "FAILED"
        assert now.last_error.startswith("LengthOrHashMismatchError: "), now.last_error
        assert now.committed_version == "1"
        assert served_version(daemon.address) == "1"
        assert not (models / "digits" / "2").exists()
        assert not list((tmp_path / "state" / "tuf" / "targets").iterdir())
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- (e) -----------------------------------------------------------------------------------

#: state the daemon is killed in -> (state after the restart, version served then)
KILLED_IN = {
    "DOWNLOADING": ("FAILED", "1"),
    "VERIFIED": ("FAILED", "1"),
    "STAGED": ("FAILED", "1"),
    "WARMING": ("FAILED", "1"),
    "ACTIVE_TRIAL": ("ROLLED_BACK", "1"),
    "ROLLING_BACK": ("ROLLED_BACK", "1"),
    "COMMITTED": ("COMMITTED", "2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", list(KILLED_IN))
def test_kill_9_in_every_state(
    tmp_path: Path, models: Path, ota_repo: OtaRepo, killed_in: str
) -> None:
    ota_repo.publish_digits(2)
    state = tmp_path / "state"
    pause = {} if killed_in == "COMMITTED" else {"pause_after_state": killed_in, "pause_s": 60}
    window = {"health_window_s": 60} if killed_in == "ROLLING_BACK" else {}
    daemon = serve(models, ota_repo, state, **pause, **window)
    try:
        stub = management(daemon.address)
        stub.StartUpdate(
            mpb.StartUpdateRequest(model="digits", version="2", wait=killed_in == "COMMITTED"),
            timeout=60,
        )
        if killed_in == "ROLLING_BACK":
            daemon.wait_for("ota_state", timeout=30, state="ACTIVE_TRIAL")
            stub.Rollback(mpb.RollbackRequest(model="digits"), timeout=30)
        if killed_in != "COMMITTED":
            daemon.wait_for("ota_paused", timeout=30, state=killed_in)
    finally:
        daemon.stop(signal.SIGKILL)
    assert daemon.proc.returncode == -signal.SIGKILL

    expected_state, expected_version = KILLED_IN[killed_in]
    again = serve(models, ota_repo, state)
    try:
        now = status(again.address)
        assert state_name(now.state) == expected_state, now.last_error
        assert served_version(again.address) == expected_version
        assert now.committed_version == expected_version
        assert read_active(models / "digits") in (None, [int(expected_version)])
        assert not (models / "digits" / ".ota-staging").exists()
        if expected_version == "1":
            assert not (models / "digits" / "2").exists()
            if killed_in != "ROLLING_BACK":
                assert now.last_error == f"interrupted in {killed_in} by a daemon restart"
            recovered = again.wait_for("ota_recovery")
            assert recovered["state"] == killed_in
            # the undone update can run again
            reply = (
                management(again.address).StartUpdate(
                    mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=60
                )
                if killed_in == "STAGED"
                else None
            )
            if reply is not None:
                assert state_name(reply.status.state) == "COMMITTED", reply.status.last_error
    finally:
        assert again.stop() == 0, again.stderr


def test_health_window_rolls_back_a_failing_version(
    tmp_path: Path, models: Path, ota_repo: OtaRepo
) -> None:
    ota_repo.publish_digits(2, poisoned_digits_model())
    daemon = serve(models, ota_repo, tmp_path / "state", health_window_s=10, max_error_rate=0.2)
    try:
        with Load(daemon.address, poisoned) as load:
            started = time.monotonic()
            reply = management(daemon.address).StartUpdate(
                mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=60
            )
            rolled_back_at = time.monotonic()
        assert state_name(reply.status.state) == "ROLLED_BACK", reply.status.last_error
        assert "health window: error rate" in reply.status.last_error
        assert rolled_back_at - started < 8
        failed = load.failures()
        assert failed, "version 2 failed requests during its window"
        assert all(r.started < rolled_back_at for r in failed)
        assert {r.version for r in load.results if r.started > rolled_back_at} == {"1"}
        assert served_version(daemon.address) == "1"
        assert not (models / "digits" / "2").exists()
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- a failure in any stage ends the update (issue #11) --------------------------------------


def _with_member(good: Path, out: Path, name: str) -> Path:
    """``good``'s members plus one more called ``name`` (a rule the archive check refuses)."""
    import io
    import tarfile

    with tarfile.open(good, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        extra = tarfile.TarInfo(name)
        extra.size = 2
        dst.addfile(extra, io.BytesIO(b"x\n"))
    return out


def test_bundle_breaking_an_archive_rule_fails_and_frees_the_model(
    tmp_path: Path, models: Path, ota_repo: OtaRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signed bundle with a member ``../../x`` (published by a fleet tool that did not check
    it: the device must not trust that it did) ends FAILED, not stuck in VERIFIED, and the
    next update of the model runs."""
    good = build.write_bundle(
        tmp_path / "good-2.tar.gz",
        name="digits",
        version=2,
        fmt="onnx",
        artifacts={"model.onnx": DIGITS_V1},
        model_toml=MODEL_TOML,
        inputs={"input": SAMPLE},
        outputs=run_onnx(DIGITS_V1, SAMPLE),
    )
    evil = _with_member(good, tmp_path / "digits-2.tar.gz", "../../x")
    info = bundle.inspect_bundle(good)
    with monkeypatch.context() as patch:
        patch.setattr(bundle, "inspect_bundle", lambda _path, *a, **k: info)
        ota_repo._repo.publish(evil)
    daemon = serve(models, ota_repo, tmp_path / "state")
    try:
        reply = management(daemon.address).StartUpdate(
            mpb.StartUpdateRequest(model="digits", version="2", wait=True), timeout=60
        )
        assert state_name(reply.status.state) == "FAILED", reply.status.last_error
        assert "../../x" in reply.status.last_error
        assert reply.status.committed_version == "1"
        assert served_version(daemon.address) == "1"
        assert not (models / "digits" / "2").exists()
        assert not (tmp_path / "x").exists()
        # the model is free: the next update runs to the end
        ota_repo.publish_digits(3)
        reply = management(daemon.address).StartUpdate(
            mpb.StartUpdateRequest(model="digits", version="latest", wait=True), timeout=60
        )
        assert reply.started
        assert state_name(reply.status.state) == "COMMITTED", reply.status.last_error
        assert served_version(daemon.address) == "3"
    finally:
        assert daemon.stop() == 0, daemon.stderr
