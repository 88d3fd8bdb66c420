"""What an operator reads: journald priorities on every line, native libraries' stderr as
events, warnings for a failed load or an empty repository, the probe's reason once, where
state goes (and the state roots), and a busy port named without gRPC core's raw line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edged.logs import PRIORITIES
from tests.daemon_process import REPO_ROOT, DaemonProcess, run_cli

pytestmark = pytest.mark.slow

ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def serve(repo: Path, env: dict[str, str] | None = None, **kwargs: bool) -> DaemonProcess:
    return DaemonProcess(
        ["--models", str(repo), "--grpc-address", "127.0.0.1:0"], env=env, **kwargs
    )


def copy_model(repo: Path, name: str, as_name: str | None = None, toml: str = "") -> None:
    target = repo / (as_name or name)
    shutil.copytree(REPO_ROOT / "models" / name, target, ignore=shutil.ignore_patterns("*.py"))
    text = (target / "model.toml").read_text().replace(f'name = "{name}"', "")
    (target / "model.toml").write_text(f'name = "{as_name or name}"\n{toml}{text}')


@pytest.fixture
def mixed_repo(tmp_path: Path) -> Path:
    """digits, a LiteRT model (whose runtime prints to stderr), two models that prefer an
    executor that cannot run ONNX, and one whose file is not a model."""
    repo = tmp_path / "models"
    copy_model(repo, "digits")
    copy_model(repo, "digits_tflite")
    for name in ("prefers_tpu_a", "prefers_tpu_b"):
        copy_model(repo, "digits", name, 'executors = ["edgetpu", "cpu-onnx"]\n')
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "broken" / "model.toml").write_text('name = "broken"\nformat = "onnx"\n')
    return repo


def test_journal_gets_each_events_priority(mixed_repo: Path) -> None:
    daemon = serve(mixed_repo, journal=True)
    try:
        daemon.wait_live()
        done = daemon.wait_for("server_not_ready", timeout=60)
        native = daemon.wait_for("native_stderr", source="litert")
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert not daemon.other_lines  # every line: <N> then one JSON object
    for event in daemon.events:
        assert event["_priority"] == PRIORITIES[event["level"]], event
    failed = [e for e in daemon.events if e["event"] == "model_load_failed"]
    assert [e["model"] for e in failed] == ["broken"]
    assert failed[0]["_priority"] == 3  # journalctl -p err shows it
    assert done["level"] == "warning"
    assert done["failed"] == ["broken"]
    # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." is an event now
    assert native["level"] == "info"
    assert "XNNPACK" in native["message"]
    assert "TensorFlow Lite" not in daemon.stderr
    # the same reason for the same executor: once at info, not once per model
    skipped = [
        e for e in daemon.events if e["event"] == "executor_skipped" and e["executor"] == "edgetpu"
    ]
    assert len(skipped) == 1, skipped
    assert skipped[0]["model"] in ("prefers_tpu_a", "prefers_tpu_b")
    assert "not this model's format 'onnx'" in skipped[0]["reason"]


def test_empty_repository_warns_and_plain_lines_without_journal(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    daemon = serve(tmp_path / "models")
    try:
        daemon.wait_live()
        empty = daemon.wait_for("repository_empty")
        ready = daemon.wait_for("server_ready")
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert empty["level"] == "warning"
    assert empty["repository"] == str(tmp_path / "models")
    assert ready["level"] == "warning"
    assert ready["models"] == 0
    assert not daemon.other_lines
    assert not any("_priority" in e for e in daemon.events)  # no prefix outside the journal


@pytest.mark.parametrize("capture", [True, False])
def test_port_in_use_names_the_reason(capture: bool) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        result = run_cli(
            "serve",
            "--models",
            "models",
            "--grpc-address",
            address,
            env={"EDGED_LOG_CAPTURE_NATIVE_STDERR": str(capture).lower()},
        )
    assert result.returncode == 2
    assert f"cannot bind {address}: address already in use" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    native = [e for e in events if e["event"] == "native_stderr"]
    if capture:  # gRPC core's own line arrives as an event, not raw before edged's message
        assert result.stderr.splitlines() == [
            f"edged: config key 'server.grpc_address': cannot bind {address}: address "
            "already in use (another process listens there)"
        ]
        assert native
        assert native[0]["source"] == "grpc"
        assert native[0]["level"] == "error"
        assert "Address already in use" in native[0]["message"]
    else:  # the knob works: the raw line is back
        assert ABSL_LINE.search(result.stderr)
        assert not native


def _learning(state: Path, **extra: str) -> dict[str, str]:
    return {"EDGED_LEARN_ENABLED": "true", "EDGED_OTA_STATE_DIR": str(state), **extra}


def test_state_directory_is_announced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "models").mkdir()
    daemon = serve(tmp_path / "models", _learning(state))
    try:
        daemon.wait_live()
        event = daemon.wait_for("state_directory")
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert event["path"] == str(state.resolve())
    assert event["created"] is True
    assert event["used_by"] == ["ota", "learn"]
    assert event["level"] == "warning"  # created outside a systemd StateDirectory
    assert (state / "learn.sqlite3").exists()


def test_state_directory_outside_the_roots_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run_cli(
        "serve",
        "--models",
        "models",
        "--grpc-address",
        "127.0.0.1:0",
        env=_learning(state, EDGED_OTA_STATE_ROOTS="/var/lib/edged"),
    )
    assert result.returncode == 2
    assert "config key 'ota.state_dir'" in result.stderr
    assert "outside the allowed state roots (/var/lib/edged)" in result.stderr
    assert "ota.state_roots" in result.stderr
    assert not state.exists()  # refused before anything was created


def test_systemd_state_directory_is_a_root(tmp_path: Path) -> None:
    service = tmp_path / "var-lib-edged"  # what StateDirectory=edged names
    service.mkdir()
    (tmp_path / "models").mkdir()
    daemon = serve(
        tmp_path / "models",
        _learning(
            service / "state", EDGED_OTA_STATE_ROOTS="/var/lib/edged", STATE_DIRECTORY=str(service)
        ),
    )
    try:
        daemon.wait_live()
        event = daemon.wait_for("state_directory")
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert event["path"] == str((service / "state").resolve())
    assert event["level"] == "info"  # the folder systemd made for the service


JOURNAL_SOCKET = Path("/run/systemd/journal/stdout")


def _journald_listens() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(JOURNAL_SOCKET))
        except OSError:
            return False
    return True


@pytest.mark.skipif(
    not (_journald_listens() and shutil.which("systemd-cat") and shutil.which("journalctl")),
    reason="needs a running systemd-journald (/run/systemd/journal/stdout), systemd-cat and "
    "journalctl",
)
def test_journalctl_filters_a_failed_load_by_priority(mixed_repo: Path) -> None:
    """The real journald: systemd-cat connects edged's stdout to the journal's stream socket
    with level prefixes on (as a unit's StandardOutput=journal does); JOURNAL_STREAM names the
    socket as systemd would. `journalctl -p err` then shows model_load_failed and no info."""
    tag = f"edged-test-{uuid.uuid4().hex[:12]}"
    script = (
        'export JOURNAL_STREAM="$(stat -L -c %d:%i /proc/$$/fd/1)"; '
        f'exec "{sys.executable}" -m edged.cli serve --models "{mixed_repo}" '
        "--grpc-address 127.0.0.1:0"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env.update(EDGED_ZMQ_ADDRESSES="tcp://127.0.0.1:0", EDGED_METRICS_ADDRESS="127.0.0.1:0")
    proc = subprocess.Popen(
        ["systemd-cat", "-t", tag, "--level-prefix=true", "sh", "-c", script],
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _journal(tag, "info", "server_not_ready"):
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    errors = _journal(tag, "err")
    assert [e["event"] for e in errors] == ["model_load_failed"]
    assert errors[0]["model"] == "broken"
    warnings = {e["event"] for e in _journal(tag, "warning")}
    assert {"model_load_failed", "server_not_ready"} <= warnings
    assert "server_live" not in warnings


def _journal(tag: str, priority: str, event: str = "") -> list[dict[str, object]]:
    out = subprocess.run(
        ["journalctl", "-t", tag, "-p", priority, "-o", "cat", "--no-pager"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [e for e in events if not event or e["event"] == event]
