"""The .deb, built for real: packaging/build-deb.sh makes edged_<version>_amd64.deb, whose
control fields and files are checked; then the package's own install step
(/usr/lib/edged/install-venv.sh, what postinst runs) builds a venv from the bundled wheels with
no index, and that venv's `edged serve` runs the packaged /etc/edged/edged.toml (paths and ports
moved by EDGED_* variables) until SIGTERM, also under the kernel's W^X rule that the unit's
MemoryDenyWriteExecute= imposes.

The wheels come from the package index (pip's cache makes a rebuild quick); where it cannot be
reached the build fails and so does this test, saying so."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
# Test and development distributions that must never reach a gateway.
NOT_RUNTIME = {
    "pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "tritonclient", "scikit-learn",
    "grpcio-tools", "mypy", "mypy-protobuf", "ruff", "nvidia-cuda-runtime-cu12", "pynq",
    "pynqutils", "pynqmetadata", "onnxruntime-gpu", "pycuda", "setuptools",
}  # fmt: skip
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
MDWE_LAUNCHER = f"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0):
    sys.exit(f"prctl(PR_SET_MDWE) failed: errno {{ctypes.get_errno()}}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _name(wheel: str) -> str:
    """The normalised distribution name of a wheel file."""
    return re.sub(r"[-_.]+", "-", wheel.split("-", maxsplit=1)[0]).lower()


def _requirement_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!\[;~]", requirement)[0]).lower()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    env = {**os.environ, "PYTHON": sys.executable}
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "packaging" / "build-deb.sh"), "--arch", "amd64", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=540,
    )
    if result.returncode != 0:
        pytest.fail(
            "packaging/build-deb.sh failed (the runtime wheels come from the package index: "
            f"is it reachable?)\n{result.stderr[-4000:]}"
        )
    path = out / f"edged_{VERSION}_amd64.deb"
    assert result.stdout.strip() == str(path)
    print(f"built {path.name}: {path.stat().st_size / 2**20:.1f} MiB in "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    return path


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True).stdout


def test_control_fields(deb: Path) -> None:
    fields = dict(
        line.split(": ", 1)
        for line in dpkg_deb("--field", str(deb)).splitlines()
        if ": " in line and not line.startswith(" ")
    )
    assert fields["Package"] == "edged"
    assert fields["Version"] == VERSION
    assert fields["Architecture"] == "amd64"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3 (>= 3.11)" in depends
    assert "python3 (<< 3.12)" in depends  # the wheelhouse is CPython 3.11 only
    assert "python3-venv" in depends
    assert "adduser" in depends
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends), depends
    assert int(fields["Installed-Size"]) > 10_000  # KiB: the wheelhouse is in it


def test_control_area(deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "--control", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/edged/edged.toml"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK), script
        subprocess.run(["sh", "-n", str(control / script)], check=True)  # parses
    postinst = (control / "postinst").read_text()
    assert "adduser --system" in postinst
    assert "/usr/lib/edged/install-venv.sh" in postinst
    assert "systemctl enable edged.service" in postinst
    assert "systemctl stop edged.service" in (control / "prerm").read_text()


def test_contents(deb: Path) -> None:
    listing = dpkg_deb("--contents", str(deb))
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    owners = {line.split()[1] for line in listing.splitlines()}
    assert owners == {"root/root"}
    for path in (
        "/etc/edged/edged.toml",
        "/lib/systemd/system/edged.service",
        "/usr/lib/edged/install-venv.sh",
        "/usr/share/doc/edged/copyright",
        "/usr/share/edged/models/digits/model.toml",
    ):
        assert path in paths, path
    assert (REPO / "packaging" / "systemd" / "edged.service").exists()
    # the examples are for reference: nothing is installed into the model repository
    assert not any(p.startswith("/var/lib/edged") for p in paths)
    assert not any(p.startswith("/opt/edged/venv") for p in paths)  # postinst builds it

    wheels = sorted(
        p.rsplit("/", 1)[1] for p in paths if p.startswith("/opt/edged/wheels/") and p[-1] != "/"
    )
    assert all(w.endswith(".whl") for w in wheels), wheels
    names = {_name(w) for w in wheels}
    assert f"edged-{VERSION}-py3-none-any.whl" in wheels
    runtime = {_requirement_name(r) for r in PYPROJECT["dependencies"]}
    assert runtime <= names, f"missing wheels: {runtime - names}"
    assert not names & NOT_RUNTIME, f"test/dev packages in the wheelhouse: {names & NOT_RUNTIME}"
    for wheel in wheels:  # CPython 3.11 on x86_64 (or pure Python)
        _, _, tags = wheel.removesuffix(".whl").partition("-")
        python_tag, abi, platform = tags.split("-")[-3:]
        assert platform == "any" or re.fullmatch(r"(manylinux\w*_x86_64\.?)+", platform), wheel
        assert python_tag in {"py3", "py2.py3", "cp311"} or abi == "abi3", wheel


def _python_for_venv() -> str:
    """Debian's python3 when it is 3.11 with venv (as on a bookworm gateway), else ours."""
    debian = Path("/usr/bin/python3")
    if debian.exists():
        probe = subprocess.run(
            [str(debian), "-c", "import sys, ensurepip, venv; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 11)":
            return str(debian)
    return sys.executable


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package unpacked into a root, and the venv its install step builds. Returns root."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(root)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_INDEX_URL"] = "http://127.0.0.1:9/unreachable"  # --no-index must not need one
    result = subprocess.run(
        [
            str(root / "usr/lib/edged/install-venv.sh"),
            "--wheels",
            str(root / "opt/edged/wheels"),
            "--venv",
            str(root / "opt/edged/venv"),
            "--python",
            _python_for_venv(),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edged {VERSION}"
    return root


def test_installed_venv_has_only_runtime_packages(installed: Path) -> None:
    venv = installed / "opt/edged/venv"
    result = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {_requirement_name(p["name"]) for p in json.loads(result.stdout)}
    assert "edged" in names
    assert not names & NOT_RUNTIME - {"setuptools"}, names  # an old ensurepip may add setuptools
    version = subprocess.run(
        [str(venv / "bin/edged"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"edged {VERSION}"


class Served:
    """The packaged `edged serve` with its log lines in a queue."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.stderr.append(line)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.get("event") == event:
                return line
        pytest.fail(f"no {event} (exit {self.proc.poll()}): {''.join(self.stderr)[-3000:]}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def serve(installed: Path, tmp_path: Path) -> Iterator[Any]:
    """Start the packaged venv's `edged serve` on the packaged config, the example models
    from /usr/share/edged/models copied to a temporary repository, every port 0."""
    repo = tmp_path / "models"
    shutil.copytree(installed / "usr/share/edged/models", repo)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGED_", "PIP_"))}
    env.update(
        EDGED_MODELS_REPOSITORY=str(repo),
        EDGED_OTA_STATE_DIR=str(tmp_path / "state"),
        EDGED_SERVER_GRPC_ADDRESS="127.0.0.1:0",
        EDGED_METRICS_ADDRESS="127.0.0.1:0",
        EDGED_ZMQ_ADDRESSES=f"ipc://{run}/edged.sock,tcp://127.0.0.1:0",
    )
    started: list[Served] = []

    def start(prefix: list[str] | None = None) -> Served:
        argv = [
            str(installed / "opt/edged/venv/bin/edged"),
            "serve",
            "--config",
            str(installed / "etc/edged/edged.toml"),
        ]
        served = Served([*(prefix or []), *argv], env)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def _infer(installed: Path, address: str, model: str) -> dict[str, Any]:
    sample = REPO / "models" / "digits" / "sample.npy"
    result = subprocess.run(
        [
            str(installed / "opt/edged/venv/bin/edged"),
            "infer",
            model,
            "--address",
            address,
            "--input",
            f"input={sample}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def _healthcheck(installed: Path, address: str) -> int:
    """Dockerfile.arm64's HEALTHCHECK command, run with the packaged venv's python."""
    dockerfile = (REPO / "Dockerfile.arm64").read_text().replace("\\\n", " ")
    (line,) = (ln for ln in dockerfile.splitlines() if ln.startswith("HEALTHCHECK"))
    command = json.loads(line.partition("CMD ")[2])
    command[0] = str(installed / "opt/edged/venv/bin/python")
    env = {**os.environ, "EDGED_SERVER_GRPC_ADDRESS": address}
    return subprocess.run(command, env=env, capture_output=True, check=False).returncode


def test_packaged_daemon_serves_and_drains(installed: Path, serve: Any, tmp_path: Path) -> None:
    daemon = serve()
    live = daemon.wait_for("server_live")
    address = live["grpc_address"]
    socket = tmp_path / "run" / "edged.sock"
    assert f"ipc://{socket}" in live["zmq_endpoints"]
    assert socket.stat().st_mode & 0o777 == 0o660
    ready = daemon.wait_for("server_ready")
    assert ready["failed"] == []
    reply = _infer(installed, address, "digits")
    assert reply["outputs"]["label"]["data"] == [0, 1]
    assert _healthcheck(installed, address) == 0
    assert daemon.stop() == 0, "".join(daemon.stderr)
    assert not socket.exists()


def test_packaged_daemon_runs_under_write_xor_execute(installed: Path, serve: Any) -> None:
    """The unit sets MemoryDenyWriteExecute=yes. The kernel's PR_SET_MDWE (Linux 6.3+) refuses
    the same mappings (writable and executable, or made executable later), is inherited
    across exec, and needs no systemd: ONNX Runtime, LiteRT (XNNPACK) and NumPy serve under it."""
    probe = subprocess.run(
        [sys.executable, "-c", MDWE_LAUNCHER, sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux 6.3+): {probe.stderr.strip()}")
    daemon = serve([sys.executable, "-c", MDWE_LAUNCHER])
    address = daemon.wait_for("server_live")["grpc_address"]
    ready = daemon.wait_for("server_ready")
    assert ready["failed"] == []
    for model in ("digits", "digits_tflite"):  # cpu-onnx, cpu-litert
        reply = _infer(installed, address, model)
        assert reply["outputs"]["label"]["data"] == [0, 1], model
    assert daemon.stop() == 0, "".join(daemon.stderr)
