"""Placement and failover with real daemon processes and a simulated flaky accelerator.

``flaky-sim`` (tests/flaky_sim.py) is installed the way a vendor would ship an executor: its
own distribution in a folder on the daemon's PYTHONPATH, registering an ``edged.executors``
entry point, with a ``probe()``. It runs ONNX through cpu-onnx and fails or hangs while a
control file exists. A client thread keeps requests going while the device fails and
recovers, and every request is accounted for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from edged.client import ZmqClient
from tests import flaky_sim
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess, run_cli

SAMPLE = np.load(EXAMPLE_MODELS / "digits" / "sample.npy").astype(np.float32)  # (2, 64)


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flaky_sim.install(tmp_path_factory.mktemp("vendor") / "site")


def digits_model(repo: Path, name: str, toml: str, instances: int = 1) -> None:
    (repo / name / "1").mkdir(parents=True)
    shutil.copyfile(
        EXAMPLE_MODELS / "digits" / "1" / "model.onnx", repo / name / "1" / "model.onnx"
    )
    (repo / name / "model.toml").write_text(
        f'name = "{name}"\nformat = "onnx"\nmax_batch_size = 8\ninstances = {instances}\n{toml}'
    )


def serve(repo: Path, sim_path: Path, env: dict[str, str]) -> DaemonProcess:
    daemon = DaemonProcess(
        ["--models", str(repo), "--grpc-address", "127.0.0.1:0"],
        env={
            "PYTHONPATH": os.pathsep.join([str(sim_path), os.environ.get("PYTHONPATH", "")]),
            **env,
        },
    )
    daemon.wait_live()
    daemon.wait_for("server_ready", timeout=30)
    return daemon


def executor_of(daemon: DaemonProcess, model: str) -> str:
    """Where ``model`` runs, as ModelConfig and ZeroMQ model_metadata say (they must agree)."""
    with grpcclient.InferenceServerClient(daemon.address) as client:
        config = client.get_model_config(model, as_json=True)["config"]
    with ZmqClient(daemon.zmq_endpoints[0]) as zmq_client:
        metadata = zmq_client.model_metadata(model)
    executor = config["parameters"]["executor"]["string_value"]
    assert metadata["executor"] == executor
    kind = "KIND_CPU" if executor.startswith("cpu-") else "KIND_MODEL"
    assert config["instance_group"][0]["kind"] == kind
    return executor


def scrape(daemon: DaemonProcess) -> list:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def logged_at(event: dict[str, Any]) -> float:
    """When the daemon logged ``event`` (its own timestamp, seconds): a gap between two events
    taken here is the daemon's, not when this busy process got round to reading the lines."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


#: a breaker that opened: "half_open" once retry_after_s has passed, until a probe decides
OUT_OF_ROTATION = ("open", "half_open")


def breaker(samples: list, model: str, executor: str) -> str:
    """The state edged_executor_breaker_state says the breaker is in."""
    (state,) = [
        s.labels["state"]
        for s in samples
        if s.name == "edged_executor_breaker_state"
        and s.value == 1
        and s.labels["model"] == model
        and s.labels["executor"] == executor
    ]
    return state


@dataclass
class Outcome:
    sent: float
    ok: bool
    status: str = ""
    message: str = ""


@dataclass
class Load:
    """One client sending digits requests back to back, checking every answer."""

    address: str
    model: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    wrong_answers: int = 0

    def run(self) -> None:
        expected = None
        with grpcclient.InferenceServerClient(self.address) as client:
            tensor = grpcclient.InferInput("input", [2, 64], "FP32")
            tensor.set_data_from_numpy(SAMPLE)
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    labels = client.infer(self.model, [tensor]).as_numpy("label")
                except grpcclient.InferenceServerException as e:
                    self.outcomes.append(Outcome(sent, False, str(e.status()), e.message()))
                    continue
                if expected is None:
                    expected = labels
                self.wrong_answers += int(not np.array_equal(labels, expected))
                self.outcomes.append(Outcome(sent, True))

    def successes_after(self, t: float) -> int:
        return sum(1 for o in self.outcomes if o.ok and o.sent > t)

    def wait_successes(self, count: int, after: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.successes_after(after) < count:
            assert time.monotonic() < deadline, (
                f"fewer than {count} successes: {self.outcomes[-3:]}"
            )
            time.sleep(0.01)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


@contextlib.contextmanager
def running(load: Load) -> Iterator[Load]:
    """``load`` on its own thread until the block ends (before the daemon stops)."""
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        thread.join(10)


def test_a_failing_executor_fails_over_and_comes_back(tmp_path: Path, sim_path: Path) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "flaky", 'executors = ["flaky-sim", "cpu-onnx"]\n')
    fault = tmp_path / "fault"
    daemon = serve(
        repo,
        sim_path,
        {
            "FLAKY_SIM_FAULT_FILE": str(fault),
            "EDGED_EXECUTORS_FAILURE_THRESHOLD": "3",
            "EDGED_EXECUTORS_RETRY_AFTER_S": "1.0",
        },
    )
    load = Load(daemon.address, "flaky")
    try:
        assert executor_of(daemon, "flaky") == "flaky-sim"
        with running(load):
            load.wait_successes(20, after=0)
            faulted = time.monotonic()
            flaky_sim.set_fault(fault, "raise")
            failover = daemon.wait_for("executor_failover", timeout=10)
            load.wait_successes(20, after=time.monotonic())
            assert executor_of(daemon, "flaky") == "cpu-onnx"  # the client changed nothing
            samples = scrape(daemon)
            assert (
                metric(
                    samples,
                    "edged_executor_failovers_total",
                    model="flaky",
                    **{"from": "flaky-sim", "to": "cpu-onnx"},
                )
                == 1
            )
            assert metric(samples, "edged_model_info", model="flaky", executor="cpu-onnx") == 1
            assert breaker(samples, "flaky", "flaky-sim") in OUT_OF_ROTATION

            # still faulty when the breaker turns half-open: the trial fails, and the model
            # stays on cpu-onnx without a single failed request
            retry = daemon.wait_for("executor_retry_failed", timeout=10)
            assert retry["executor"] == "flaky-sim"
            assert "simulated device fault" in retry["error"]
            fault.unlink()
            recovered = daemon.wait_for("executor_recovered", timeout=10)
            load.wait_successes(20, after=time.monotonic())
            assert executor_of(daemon, "flaky") == "flaky-sim"
        samples = scrape(daemon)
    finally:
        assert daemon.stop() == 0, daemon.stderr

    opened = [e for e in daemon.events if e["event"] == "executor_circuit_open"]
    assert len(opened) == 1
    assert (failover["from"], failover["to"]) == ("flaky-sim", "cpu-onnx")
    assert (recovered["from"], recovered["to"]) == ("cpu-onnx", "flaky-sim")
    assert logged_at(recovered) - logged_at(retry) >= 0.9  # retry_after_s after the failed trial
    # exactly the requests that hit the failing device failed, all of them while it did
    assert len(load.failures) == 3, load.failures
    assert all(o.status == "StatusCode.INTERNAL" for o in load.failures), load.failures
    assert all("simulated device fault" in o.message for o in load.failures)
    # ... in a row, from the request in flight when the fault began
    first = load.outcomes.index(load.failures[0])
    assert load.outcomes[first : first + 3] == load.failures
    assert load.outcomes[first + 1].sent >= faulted
    assert load.wrong_answers == 0
    assert len(load.outcomes) >= 60
    assert (
        metric(
            samples,
            "edged_executor_recoveries_total",
            model="flaky",
            **{"from": "cpu-onnx", "to": "flaky-sim"},
        )
        == 1
    )
    assert (
        metric(samples, "edged_executor_failures_total", model="flaky", executor="flaky-sim") == 3
    )
    assert breaker(samples, "flaky", "flaky-sim") == "closed"
    # statistics survived both moves: every answer is counted once
    successes = sum(1 for o in load.outcomes if o.ok)
    assert metric(samples, "edged_request_success_total", model="flaky") <= successes
    assert metric(samples, "edged_request_success_total", model="flaky") >= successes - 1


def test_under_concurrent_load_only_requests_on_the_failing_device_fail(
    tmp_path: Path, sim_path: Path
) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "busy", 'executors = ["flaky-sim", "cpu-onnx"]\n', instances=2)
    fault = tmp_path / "fault"
    threshold = 3
    daemon = serve(
        repo,
        sim_path,
        {"FLAKY_SIM_FAULT_FILE": str(fault), "EDGED_EXECUTORS_FAILURE_THRESHOLD": str(threshold)},
    )
    loads = [Load(daemon.address, "busy") for _ in range(4)]
    try:
        with contextlib.ExitStack() as stack:
            for load in loads:
                stack.enter_context(running(load))
            for load in loads:
                load.wait_successes(10, after=0)
            flaky_sim.set_fault(fault, "raise")
            daemon.wait_for("executor_failover", timeout=10)
            switched = time.monotonic()
            for load in loads:
                load.wait_successes(10, after=switched)
        samples = scrape(daemon)
    finally:
        assert daemon.stop() == 0, daemon.stderr
    failures = [o for load in loads for o in load.failures]
    # every failed request ran on the failing device: none was lost to the move itself
    assert failures
    assert all("simulated device fault" in o.message for o in failures), failures
    assert all(o.sent < switched for o in failures)
    # batches that failed: the threshold, plus at most one already running on the other
    # instance (a success of a batch that was running there when the device failed, answered
    # after the first failure, does not reset the breaker's count); each holds at most one
    # request per client
    batches = metric(samples, "edged_executor_failures_total", model="busy")
    assert threshold <= batches <= threshold + 1
    assert len(failures) <= batches * len(loads)
    assert sum(load.wrong_answers for load in loads) == 0


def test_a_hanging_executor_times_out_and_fails_over(tmp_path: Path, sim_path: Path) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "hangs", 'executors = ["flaky-sim", "cpu-onnx"]\n')
    fault = tmp_path / "fault"
    daemon = serve(
        repo,
        sim_path,
        {
            "FLAKY_SIM_FAULT_FILE": str(fault),
            "FLAKY_SIM_HANG_S": "1.0",
            "EDGED_EXECUTORS_INFERENCE_TIMEOUT_S": "0.2",
            "EDGED_EXECUTORS_FAILURE_THRESHOLD": "2",
            "EDGED_EXECUTORS_RETRY_AFTER_S": "30",
        },
    )
    load = Load(daemon.address, "hangs")
    try:
        with running(load):
            load.wait_successes(10, after=0)
            flaky_sim.set_fault(fault, "hang")
            daemon.wait_for("executor_failover", timeout=10)
            load.wait_successes(20, after=time.monotonic())
            assert executor_of(daemon, "hangs") == "cpu-onnx"
            daemon.wait_for("inference_returned_after_timeout", timeout=5)
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert len(load.failures) == 2, load.failures
    assert all(o.status == "StatusCode.DEADLINE_EXCEEDED" for o in load.failures), load.failures
    assert all("did not finish within 0.2s" in o.message for o in load.failures), load.failures
    timeouts = [e for e in daemon.events if e["event"] == "inference_timeout"]
    assert len(timeouts) == 2
    # the one instance was stuck in the first hang: the second request waited for its thread
    # to come back (1 s) instead of being run on an instance still busy
    assert logged_at(timeouts[1]) - logged_at(timeouts[0]) >= 0.8
    assert load.wrong_answers == 0


def test_a_hanging_device_does_not_get_the_model_back(tmp_path: Path, sim_path: Path) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "slowpoke", 'executors = ["flaky-sim", "cpu-onnx"]\n')
    fault = tmp_path / "fault"
    daemon = serve(
        repo,
        sim_path,
        {
            "FLAKY_SIM_FAULT_FILE": str(fault),
            "FLAKY_SIM_HANG_S": "0.5",
            "EDGED_EXECUTORS_INFERENCE_TIMEOUT_S": "0.2",
            "EDGED_EXECUTORS_FAILURE_THRESHOLD": "1",
            "EDGED_EXECUTORS_RETRY_AFTER_S": "0.5",
        },
    )
    load = Load(daemon.address, "slowpoke")
    try:
        with running(load):
            load.wait_successes(5, after=0)
            flaky_sim.set_fault(fault, "hang")
            daemon.wait_for("executor_failover", timeout=10)
            # half-open: the trial answers, but slower than the inference timeout: refused
            retry = daemon.wait_for("executor_retry_failed", timeout=10)
            assert "more than executors.inference_timeout_s" in retry["error"]
            assert executor_of(daemon, "slowpoke") == "cpu-onnx"
            fault.unlink()
            daemon.wait_for("executor_recovered", timeout=10)
            assert executor_of(daemon, "slowpoke") == "flaky-sim"
            load.wait_successes(5, after=time.monotonic())
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert len(load.failures) == 1, load.failures


def test_a_model_with_no_other_executor_stays_with_its_breaker_open(
    tmp_path: Path, sim_path: Path
) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "lonely", 'executors = ["flaky-sim"]\n')
    fault = tmp_path / "fault"
    daemon = serve(
        repo,
        sim_path,
        {
            "FLAKY_SIM_FAULT_FILE": str(fault),
            "EDGED_EXECUTORS_FAILURE_THRESHOLD": "2",
            "EDGED_EXECUTORS_RETRY_AFTER_S": "0.5",
        },
    )
    tensor = grpcclient.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(SAMPLE)
    try:
        with grpcclient.InferenceServerClient(daemon.address) as client:
            flaky_sim.set_fault(fault, "raise")
            for _ in range(4):
                with pytest.raises(grpcclient.InferenceServerException, match="simulated"):
                    client.infer("lonely", [tensor])
            failed = daemon.wait_for("executor_failover_failed", timeout=5)
            assert executor_of(daemon, "lonely") == "flaky-sim"
            assert breaker(scrape(daemon), "lonely", "flaky-sim") in OUT_OF_ROTATION
            fault.unlink()
            time.sleep(0.6)  # past retry_after_s: the next request is the half-open probe
            client.infer("lonely", [tensor])
            closed = daemon.wait_for("executor_circuit_closed", timeout=5)
            assert breaker(scrape(daemon), "lonely", "flaky-sim") == "closed"
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert failed["executor"] == "flaky-sim"
    assert failed["detail"] == "no other candidate executor"
    assert failed["candidates"] == ["flaky-sim"]
    assert closed["executor"] == "flaky-sim"
    assert not [e for e in daemon.events if e["event"] == "executor_failover"]


def test_auto_placement_keeps_the_faster_executor(tmp_path: Path, sim_path: Path) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "raced", 'executors = ["flaky-sim", "cpu-onnx"]\nplacement = "auto"\n')
    daemon = serve(repo, sim_path, {"FLAKY_SIM_DELAY_S": "0.02"})
    try:
        decided = daemon.wait_for("placement_decided", model="raced")
        assert executor_of(daemon, "raced") == "cpu-onnx"
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert decided["executor"] == "cpu-onnx"
    timings = decided["timings_ms"]
    assert timings["flaky-sim"] >= 20 > timings["cpu-onnx"]
    loaded = [e for e in daemon.events if e["event"] == "model_version_loaded"]
    assert [e["executor"] for e in loaded] == ["cpu-onnx"]


def test_an_absent_executor_is_skipped_with_the_probe_reason(
    tmp_path: Path, sim_path: Path
) -> None:
    repo = tmp_path / "models"
    digits_model(repo, "unplugged", 'executors = ["flaky-sim", "cpu-onnx"]\n')
    daemon = serve(repo, sim_path, {"FLAKY_SIM_ABSENT": "simulated: unplugged"})
    try:
        skipped = daemon.wait_for("executor_skipped", model="unplugged", executor="flaky-sim")
        assert executor_of(daemon, "unplugged") == "cpu-onnx"
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert skipped["reason"] == "simulated: unplugged"
    probed = daemon.wait_for("devices_probed")
    assert probed["absent"]["flaky-sim"] == "simulated: unplugged"
    assert not [e for e in daemon.events if e["event"] == "executor_refused"]


def test_edged_devices_lists_a_vendor_executor(sim_path: Path) -> None:
    env = {"PYTHONPATH": str(sim_path)}
    table = run_cli("devices", env=env)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1] for line in table.stdout.splitlines()[1:]}
    assert rows["flaky-sim"] == "yes"
    assert rows["cpu-onnx"] == "yes"
    absent = run_cli("devices", "--json", env={**env, "FLAKY_SIM_ABSENT": "simulated: unplugged"})
    assert absent.returncode == 0, absent.stderr
    reports = {r["kind"]: r for r in json.loads(absent.stdout)}
    assert reports["flaky-sim"]["present"] is False
    assert reports["flaky-sim"]["reason"] == "simulated: unplugged"
    assert reports["flaky-sim"]["formats"] == ["onnx"]
    assert list(reports)[:5] == ["cpu-onnx", "cpu-litert", "cuda", "edgetpu", "pynq"]
