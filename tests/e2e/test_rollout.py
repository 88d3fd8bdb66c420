"""``edged-fleet rollout`` end to end: three real daemon processes on 127.0.0.1, two TUF
repositories served on loopback, and the command run as a process (``python -m
edged.fleet``), talking real gRPC to each daemon's management API.

Two daemons ("good-1", "good-2") follow a repository where digits 2 is a sound bundle; the
third ("broken") follows one where digits 2 is a bundle whose self-test expects outputs the
model does not give, so that device's update FAILS (and it keeps serving 1) while the same
rollout succeeds on the others.

(a) the broken device is the canary, --max-failures 0: the rollout halts after the canary
    (exit 1); the other two are never asked (their update status stays IDLE, they serve 1);
(b) the canary passes, the broken device in wave 2 crosses --max-failures 0: halted, exit 1,
    the device after it never asked; then --max-failures 1 with --version latest completes,
    exit 0, a device already on 2 counted as a success;
(c) an unreachable device (nothing listening) is a failure, not a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from edged.core.types import InferRequest
from edged.frontends.kserve_codec import request_to_proto
from edged.serving.versions import read_active
from tests.daemon_process import EXAMPLE_MODELS, REPO_ROOT, DaemonProcess
from tests.tuf_fixtures import DIGITS, DIGITS_SAMPLE, ServedFleetRepo, build_digits_bundle

SAMPLE = np.load(DIGITS_SAMPLE)


def wrong_expectations() -> dict[str, np.ndarray]:
    """What digits 1 answers on the self-test sample, each value off by one."""
    session = ort.InferenceSession(
        str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {"input": SAMPLE})
    return {name: value + 1 for name, value in zip(names, outputs, strict=True)}


# -- the fleet: two repositories, three daemons ----------------------------------------------


@dataclass
class Fleet:
    daemons: dict[str, DaemonProcess]
    models: dict[str, Path]

    def address(self, name: str) -> str:
        return self.daemons[name].address

    def devices(self, *names: str) -> str:
        return ",".join(self.address(n) for n in names)

    def name_of(self, address: str) -> str:
        return next(n for n, d in self.daemons.items() if d.address == address)


def start_daemon(models: Path, repo: ServedFleetRepo, state: Path) -> DaemonProcess:
    env = {
        "EDGED_OTA_REPOSITORY_URL": repo.url,
        "EDGED_OTA_ROOT": str(repo.root_path),
        "EDGED_OTA_STATE_DIR": str(state),
        "EDGED_OTA_HEALTH_WINDOW_S": "0.5",
        "EDGED_OTA_MIN_FREE_BYTES": str(1024 * 1024),
        "EDGED_MODELS_INSTANCES": "1",
    }
    return DaemonProcess(["--models", str(models), "--grpc-address", "127.0.0.1:0"], env=env)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    good = ServedFleetRepo(tmp_path / "good-repo")
    broken = ServedFleetRepo(tmp_path / "broken-repo")
    daemons: dict[str, DaemonProcess] = {}
    try:
        good.publish(build_digits_bundle(tmp_path / "good-bundles", 2))
        broken.publish(
            build_digits_bundle(tmp_path / "broken-bundles", 2, expected=wrong_expectations())
        )
        models = {}
        for name, repo in (("good-1", good), ("good-2", good), ("broken", broken)):
            models[name] = tmp_path / name / "models"
            shutil.copytree(
                EXAMPLE_MODELS / "digits",
                models[name] / "digits",
                ignore=shutil.ignore_patterns("*.npy"),
            )
            daemons[name] = start_daemon(models[name], repo, tmp_path / name / "state")
        for daemon in daemons.values():  # started together, waited for in turn
            daemon.wait_live()
            daemon.wait_for("server_ready", timeout=60)
        yield Fleet(daemons, models)
    finally:
        codes = {name: d.stop() for name, d in daemons.items()}
        good.close()
        broken.close()
    assert all(code == 0 for code in codes.values()), {n: d.stderr for n, d in daemons.items()}


def rollout(*args: str) -> subprocess.CompletedProcess[str]:
    """``edged-fleet rollout ARGS`` as a process, polling fast."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    return subprocess.run(
        [sys.executable, "-m", "edged.fleet", "rollout", "--poll-interval", "0.1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def by_name(fleet: Fleet, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {fleet.name_of(d["device"]): d for d in report["devices"]}


def update_status(address: str) -> mpb.UpdateStatus:
    with grpc.insecure_channel(address) as channel:
        stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.GetUpdateStatus(mpb.GetUpdateStatusRequest(model="digits"), timeout=10)
    (one,) = reply.models
    return one


def state_name(status: mpb.UpdateStatus) -> str:
    return mpb.UpdateState.Name(status.state).removeprefix("UPDATE_STATE_")


def served_version(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ModelInfer(
            request_to_proto(InferRequest("digits", {"input": SAMPLE[:1]})), timeout=10
        )
    return str(reply.model_version)


def assert_never_asked(fleet: Fleet, name: str) -> None:
    status = update_status(fleet.address(name))
    assert (state_name(status), status.update_id) == ("IDLE", 0)
    assert status.committed_version == "1"
    assert served_version(fleet.address(name)) == "1"
    assert not [e for e in fleet.daemons[name].events if e.get("event") == "ota_state"]


def assert_still_on_1(fleet: Fleet, name: str) -> None:
    status = update_status(fleet.address(name))
    assert state_name(status) == "FAILED"
    assert "self-test failed" in status.last_error
    assert status.committed_version == "1"
    assert served_version(fleet.address(name)) == "1"
    assert read_active(fleet.models[name] / "digits") == [1]


# -- (a) ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_broken_canary_halts_the_rollout(fleet: Fleet) -> None:
    done = rollout(
        "--devices", fleet.devices("broken", "good-1", "good-2"),
        "--model", "digits", "--version", "2", "--max-failures", "0",
        "--health-timeout", "60", "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = report_of(done)
    assert (report["verdict"], report["waves"], report["exit_code"]) == ("halted", 1, 1)
    assert (report["succeeded"], report["failed"], report["skipped"]) == (0, 1, 2)
    assert report["summary"].startswith("rollout halted after the canary wave of 3")
    devices = by_name(fleet, report)
    assert list(devices) == ["broken", "good-1", "good-2"]  # the order given
    canary = devices["broken"]
    assert (canary["state"], canary["wave"]) == ("FAILED", 1)
    assert (canary["from_version"], canary["to_version"]) == ("1", "2")
    assert "self-test failed" in canary["last_error"]
    for name in ("good-1", "good-2"):
        assert devices[name] == {
            "device": fleet.address(name),
            "wave": None,
            "state": "SKIPPED",
            "from_version": "",
            "to_version": "",
            "last_error": "",
            "note": "",
        }
        assert_never_asked(fleet, name)
    assert_still_on_1(fleet, "broken")
    assert "wave 1 of 3 (canary)" in done.stderr
    assert "wave 2" not in done.stderr


# -- (b) ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_rollout_stops_at_the_failure_threshold(fleet: Fleet) -> None:
    # the canary passes; the broken device in wave 2 is one failure more than allowed
    done = rollout(
        "--devices", fleet.devices("good-1", "broken", "good-2"),
        "--model", "digits", "--version", "2", "--canary", "1", "--max-failures", "0",
        "--health-timeout", "60", "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = report_of(done)
    assert (report["verdict"], report["waves"]) == ("halted", 2)
    assert (report["succeeded"], report["failed"], report["skipped"]) == (1, 1, 1)
    devices = by_name(fleet, report)
    assert [(d["state"], d["wave"]) for d in devices.values()] == [
        ("COMMITTED", 1),
        ("FAILED", 2),
        ("SKIPPED", None),
    ]
    assert (devices["good-1"]["from_version"], devices["good-1"]["to_version"]) == ("1", "2")
    assert "self-test failed" in devices["broken"]["last_error"]
    assert served_version(fleet.address("good-1")) == "2"
    assert state_name(update_status(fleet.address("good-1"))) == "COMMITTED"
    assert_still_on_1(fleet, "broken")
    assert_never_asked(fleet, "good-2")

    # one failure allowed: the same broken device no longer stops the rest; "latest" is
    # resolved by each device, and good-1, on 2 already, counts as a success
    done = rollout(
        "--devices", fleet.devices("good-2", "broken", "good-1"),
        "--model", "digits", "--version", "latest", "--max-failures", "1",
        "--health-timeout", "60",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    header, *rows, verdict = done.stdout.splitlines()
    assert header.split() == ["device", "wave", "state", "version", "last_error"]
    assert [row.split()[:4] for row in rows[:1]] == [
        [fleet.address("good-2"), "1", "COMMITTED", "1"],  # "1 -> 2" splits in three
    ]
    assert rows[0].split()[3:6] == ["1", "->", "2"]
    assert rows[1].split()[:6] == [fleet.address("broken"), "2", "FAILED", "1", "->", "2"]
    assert "self-test failed" in rows[1]
    assert rows[2].split()[:4] == [fleet.address("good-1"), "3", "ALREADY_AT_VERSION", "2"]
    assert "committed" in rows[2]
    assert verdict == "rollout completed: 2 of 3 devices succeeded, 1 failed (at most 1 allowed)"
    # each device's update states are reported as they change, not only when its wave ends
    good_2 = [
        line.split()[-1]
        for line in done.stderr.splitlines()
        if line.startswith(f"edged-fleet:   {fleet.address('good-2')}: update ")
    ]
    assert good_2[-1] == "COMMITTED"
    assert len(good_2) > 1  # at least the first state seen and the last
    assert served_version(fleet.address("good-2")) == "2"
    assert update_status(fleet.address("good-2")).requested == "latest"
    assert served_version(fleet.address("good-1")) == "2"
    assert_still_on_1(fleet, "broken")


# -- (c) ---------------------------------------------------------------------------------------


def test_an_unreachable_device_is_a_failure() -> None:
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        done = rollout(
            "--devices", address, "--model", "digits", "--version", "2",
            "--health-timeout", "20", "--json",
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = report_of(done)
    assert report["verdict"] == "failed"
    (device,) = report["devices"]
    assert device["state"] == "ERROR"
    assert device["last_error"].startswith("StartUpdate: UNAVAILABLE: ")
