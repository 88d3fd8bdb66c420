"""Start a real `edged serve` process on loopback and follow its JSON log lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MODELS = REPO_ROOT / "models"


# Tests keep OTA and learning state in temporary folders: allow them as state roots.
TEST_STATE_ROOTS = tempfile.gettempdir()
_PRIORITY = re.compile(r"^<([0-7])>")


def _test_env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EDGED_") and k not in ("JOURNAL_STREAM", "STATE_DIRECTORY")
    }
    full_env["EDGED_ZMQ_ADDRESSES"] = "tcp://127.0.0.1:0"  # never the fixed default ports
    full_env["EDGED_METRICS_ADDRESS"] = "127.0.0.1:0"
    full_env["EDGED_SERVER_HTTP_ADDRESS"] = "127.0.0.1:0"
    full_env["EDGED_OTA_STATE_ROOTS"] = TEST_STATE_ROOTS
    full_env.update(env or {})
    return full_env


class DaemonProcess:
    """A running `edged serve`; ``events`` collects its parsed log lines.

    With ``journal``, its stdout is a pipe that ``JOURNAL_STREAM`` names (device:inode), as
    systemd does for a service whose output goes to journald; each event then records the
    ``<N>`` priority prefix its line started with as ``_priority``."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, *, journal: bool = False
    ) -> None:
        full_env = _test_env(env)
        stdout: int | None = subprocess.PIPE
        read_end = None
        if journal:
            read_fd, write_fd = os.pipe()
            st = os.fstat(write_fd)
            full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            stdout, read_end = write_fd, os.fdopen(read_fd, "r")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edged.cli", "serve", *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
            cwd=REPO_ROOT,
        )
        if read_end is not None:
            os.close(stdout)  # type: ignore[arg-type]
        self._stdout = read_end if read_end is not None else self.proc.stdout
        self.events: list[dict[str, Any]] = []
        self.other_lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # stderr is drained all the time: a pipe nobody reads fills up (64 KiB) and blocks
        # whichever daemon thread writes to it next
        self._stderr_lines: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        self.address = ""
        self.zmq_endpoints: list[str] = []
        self.metrics_address = ""

    def _read(self) -> None:
        assert self._stdout is not None
        for line in self._stdout:
            with self._cond:
                try:
                    priority = _PRIORITY.match(line)
                    event = json.loads(line[priority.end() :] if priority else line)
                    event["_t"] = time.monotonic() - self.started
                    if priority:
                        event["_priority"] = int(priority.group(1))
                    self.events.append(event)
                except json.JSONDecodeError:
                    self.other_lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_lines.append(line)

    @property
    def stderr(self) -> str:
        """What the daemon wrote to stderr so far."""
        return "".join(self._stderr_lines)

    def wait_for(self, event: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """The first log event named ``event`` (with ``fields``); fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                        return e
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"edged exited ({self.proc.returncode}) before '{event}': "
                        f"{self.stderr}"
                        f" {self.events[-5:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no '{event}' within {timeout}s; events: {self.events[-5:]}"
                    )
                self._cond.wait(min(left, 0.1))

    def wait_live(self, timeout: float = 30.0) -> str:
        """Wait for the gRPC port and return HOST:PORT."""
        event = self.wait_for("server_live", timeout)
        self.address = event["grpc_address"]
        self.zmq_endpoints = event.get("zmq_endpoints", [])
        self.metrics_address = event.get("metrics_address", "")
        self.http_address = event.get("http_address", "")
        return self.address

    def in_flight(self, model: str) -> float:
        """The daemon's own count of ``model``'s requests queued or running
        (edged_inflight_requests on its metrics port)."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "edged_inflight_requests" and sample.labels.get("model") == model:
                    return float(sample.value)
        return 0.0

    def wait_in_flight(self, model: str, at_least: int, timeout: float = 60.0) -> None:
        """Wait until the daemon has at least ``at_least`` of ``model``'s requests queued or
        running: sent is not arrived, on a busy machine."""
        deadline = time.monotonic() + timeout
        while (count := self.in_flight(model)) < at_least:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model}: {count} requests in flight, not {at_least}")
            time.sleep(0.005)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon and wait for it to exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(5)
        self._stderr_reader.join(5)
        return code


def copy_example_models(target: Path) -> Path:
    """A writable copy of the example repository in models/."""
    shutil.copytree(
        EXAMPLE_MODELS, target, ignore=shutil.ignore_patterns("*.py", "README.md", "__pycache__")
    )
    return target


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run the edged CLI to completion."""
    full_env = _test_env(env)
    return subprocess.run(
        [sys.executable, "-m", "edged.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO_ROOT,
        check=False,
    )
