"""Daemon processes: start-up order, graceful shutdown, configuration errors, runtime
load/unload, and the `edged infer` command."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import modelgen
from tests.conftest import write_model
from tests.daemon_process import DaemonProcess, copy_example_models, run_cli


def serve(repo: Path, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
    return DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0", *args], env=env)


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits plus a model whose every run (warm-up included) takes about a second."""
    repo = copy_example_models(tmp_path_factory.mktemp("slow") / "models")
    write_model(repo, "slow", lambda d: modelgen.slow_model(d, 1000))
    return repo


def test_live_before_slow_model_is_ready(slow_repo: Path) -> None:
    daemon = serve(slow_repo)
    try:
        address = daemon.wait_live()
        with grpcclient.InferenceServerClient(address) as client:
            assert client.is_server_live()
            assert not client.is_model_ready("slow")  # still warming up
            assert not client.is_server_ready()
            daemon.wait_for("server_ready", timeout=60)
            assert client.is_model_ready("slow")
            assert client.is_server_ready()
        loaded = daemon.wait_for("model_version_loaded", model="slow")
        live = daemon.wait_for("server_live")
        assert live["_t"] < loaded["_t"]
    finally:
        assert daemon.stop() == 0


def test_sigterm_lets_in_flight_requests_finish(slow_repo: Path) -> None:
    daemon = serve(slow_repo)
    results: list[object] = []
    try:
        address = daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)

        def call(i: int) -> None:
            with grpcclient.InferenceServerClient(address) as client:
                x = np.full((1, 4), i, dtype=np.float32)
                tensor = grpcclient.InferInput("x", [1, 4], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    results.append(client.infer("slow", [tensor]).as_numpy("y"))
                except Exception as e:
                    results.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all three are in flight: one running, two waiting for the instance
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for("shutdown_started", timeout=10)
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with (
            grpcclient.InferenceServerClient(address) as late,
            pytest.raises(grpcclient.InferenceServerException),
        ):
            late.infer("digits", [tensor], client_timeout=5)
        for t in threads:
            t.join(30)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr
    assert len(results) == 3
    assert all(isinstance(r, np.ndarray) for r in results), results
    assert sorted(float(r[0, 0]) for r in results) == [0.0, 1.0, 2.0]
    events = [e["event"] for e in daemon.events]
    assert events.index("shutdown_started") < events.index("shutdown_complete")
    assert "model_version_unloaded" in events


def test_sigint_exits_zero(tmp_path: Path) -> None:
    daemon = serve(copy_example_models(tmp_path / "models"))
    daemon.wait_live()
    daemon.wait_for("server_ready")
    assert daemon.stop(signal.SIGINT) == 0
    assert daemon.events[-1]["event"] == "shutdown_complete"


def test_log_lines_are_json_events_with_context(tmp_path: Path) -> None:
    daemon = serve(copy_example_models(tmp_path / "models"), env={"EDGED_LOG_LEVEL": "debug"})
    try:
        address = daemon.wait_live()
        daemon.wait_for("server_ready")
        with grpcclient.InferenceServerClient(address) as client:
            tensor = grpcclient.InferInput("input", [1, 63], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 63), np.float32))
            with pytest.raises(grpcclient.InferenceServerException):
                client.infer("digits", [tensor], request_id="r-77")
        refused = daemon.wait_for("infer_refused", timeout=10)
    finally:
        daemon.stop()
    assert daemon.other_lines == []
    assert refused["model"] == "digits"
    assert refused["request_id"] == "r-77"
    assert refused["status"] == "INVALID_ARGUMENT"
    assert all({"event", "level", "timestamp"} <= set(e) for e in daemon.events)


CONFIG_ERRORS = [
    ("unknown-key", '[server]\ngrpc_adress = "127.0.0.1:0"\n', {}, "server.grpc_adress"),
    ("unknown-section", "[sever]\n", {}, "sever"),
    ("bad-type", '[server]\nmax_request_bytes = "big"\n', {}, "server.max_request_bytes"),
    ("bad-env", "", {"EDGED_SERVER_SHUTDOWN_GRACE_S": "soon"}, "server.shutdown_grace_s"),
    ("unknown-env", "", {"EDGED_SERVER_PORT": "1"}, "EDGED_SERVER_PORT"),
    ("bad-level", '[log]\nlevel = "loud"\n', {}, "log.level"),
    ("not-toml", "[server\n", {}, "not valid TOML"),
]


@pytest.mark.parametrize(
    ("toml", "env", "named"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_bad_config_stops_the_start_naming_the_key(tmp_path: Path, toml: str, env, named) -> None:
    config = tmp_path / "edged.toml"
    config.write_text(toml)
    result = run_cli("serve", "--config", str(config), "--models", "models", env=env)
    assert result.returncode == 2
    assert named in result.stderr


def test_missing_repository_stops_the_start(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "--models", str(tmp_path / "nowhere"), "--grpc-address", "127.0.0.1:0"
    )
    assert result.returncode == 2
    assert "models.repository" in result.stderr


def test_runtime_load_and_unload(tmp_path: Path) -> None:
    repo = copy_example_models(tmp_path / "models")
    daemon = serve(repo)
    try:
        address = daemon.wait_live()
        daemon.wait_for("server_ready")
        with grpcclient.InferenceServerClient(address) as client:
            # a model dropped into the repository is loaded on request
            write_model(repo, "late", modelgen.dynamic_axes_model)
            assert not client.is_model_ready("late")
            client.load_model("late")
            assert client.is_model_ready("late")
            # a broken model fails to load with the reason, and the server stays up
            (repo / "broken" / "1").mkdir(parents=True)
            (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
            (repo / "broken" / "model.toml").write_text('format = "onnx"\n')
            with pytest.raises(grpcclient.InferenceServerException) as err:
                client.load_model("broken")
            assert "broken" in err.value.message()
            index = {
                m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]
            }
            assert index["broken"]["state"] == "UNAVAILABLE"
            assert index["broken"]["reason"]
            assert not client.is_server_ready()  # strict readiness: a wanted model failed
            client.unload_model("broken")
            assert client.is_server_ready()
            # unloading drains and stops serving
            client.unload_model("digits")
            assert not client.is_model_ready("digits")
            tensor = grpcclient.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
            with pytest.raises(grpcclient.InferenceServerException) as err:
                client.infer("digits", [tensor])
            assert err.value.status() == "StatusCode.UNAVAILABLE"
            client.load_model("digits")
            assert client.is_model_ready("digits")
            with pytest.raises(grpcclient.InferenceServerException) as err:
                client.load_model("no_such_model")
            assert err.value.status() == "StatusCode.NOT_FOUND"
    finally:
        assert daemon.stop() == 0


def test_grpc_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    first = serve(copy_example_models(tmp_path / "a"))
    try:
        address = first.wait_live()
        result = run_cli("serve", "--models", "models", "--grpc-address", address)
        assert result.returncode == 2
        assert "server.grpc_address" in result.stderr
    finally:
        first.stop()


def test_cli_infer(address: str, tmp_path: Path) -> None:
    result = run_cli(
        "infer",
        "digits",
        "--address",
        address,
        "--input",
        "input=models/digits/sample.npy",
        "--save",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["model_name"] == "digits"
    assert reply["outputs"]["label"]["data"] == [0, 1]
    saved = np.load(tmp_path / "out" / "probabilities.npy")
    assert saved.shape == (2, 10)


def test_cli_infer_reports_server_errors(address: str, tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((1, 3), np.float32))
    result = run_cli(
        "infer", "digits", "--address", address, "--input", f"input={tmp_path / 'bad.npy'}"
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "input" in result.stderr


def test_health_follows_model_state(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    daemon = serve(copy_example_models(tmp_path / "models"))
    try:
        address = daemon.wait_live()
        daemon.wait_for("server_ready")
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = lambda s: health.Check(health_pb2.HealthCheckRequest(service=s)).status  # noqa: E731
            assert check("digits") == health_pb2.HealthCheckResponse.SERVING
            grpcclient.InferenceServerClient(address).unload_model("digits")
            time.sleep(0.2)
            assert check("digits") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        daemon.stop()
