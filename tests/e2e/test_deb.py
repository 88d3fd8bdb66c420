"""The .deb, built for real with debhelper: packaging/build-deb.sh makes
edged_<version>-1~deb12_amd64.deb and edged-learn_..., whose control fields, maintainer scripts and
files are checked, and lintian must report no error; then the package's files, unpacked, run on
this (Debian 12) host: the venv's `edged serve` runs the packaged /etc/edged/edged.toml (paths and
ports moved by EDGED_* variables) until SIGTERM, also under the kernel's W^X rule that the unit's
MemoryDenyWriteExecute= imposes. (dpkg -i into Debian 12 and 13 root filesystems, arm64 under
emulation included: tests/e2e/test_deb_chroot.py.)

The wheels come from the package index (pip's cache makes a rebuild quick); where it cannot be
reached the build fails and so does this test, saying so."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.debs import REPO, VERSION, Served, build, healthcheck_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
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
def debs() -> tuple[Path, Path]:
    return build("bookworm", "amd64")


@pytest.fixture(scope="module")
def deb(debs: tuple[Path, Path]) -> Path:
    return debs[0]


def dpkg_deb(*args: str) -> str:
    result = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True)
    return result.stdout


def _fields(deb: Path) -> dict[str, str]:
    return dict(
        line.split(": ", 1)
        for line in dpkg_deb("--field", str(deb)).splitlines()
        if ": " in line and not line.startswith(" ")
    )


def test_control_fields(debs: tuple[Path, Path]) -> None:
    base, learn = _fields(debs[0]), _fields(debs[1])
    assert base["Package"] == "edged"
    assert base["Version"] == f"{VERSION}-1~deb12"
    assert base["Architecture"] == "amd64"
    depends = [d.strip() for d in base["Depends"].split(",")]
    # the venv's extension modules are CPython 3.11's: Debian 12's python3.11
    assert "python3.11" in depends
    assert "python3 (>= 3.11~)" in depends
    assert "adduser" in depends
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends), depends
    assert "python3-venv" not in depends  # nothing is built at install time
    assert base["Suggests"] == "edged-learn"
    assert int(base["Installed-Size"]) > 10_000  # KiB: the venv is in it
    assert learn["Package"] == "edged-learn"
    assert f"edged (= {VERSION}-1~deb12)" in learn["Depends"]


def test_maintainer_scripts_come_from_debhelper(deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "--control", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/edged/edged.toml"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK), script
        subprocess.run(["sh", "-n", str(control / script)], check=True)  # parses
    postinst = (control / "postinst").read_text()
    assert "adduser --system" in postinst
    # dh_installsystemd: enabled on install whether or not systemd runs (a chroot image
    # build), started only where it runs
    assert "deb-systemd-helper enable 'edged.service'" in postinst
    assert "deb-systemd-invoke $_dh_action 'edged.service'" in postinst
    assert "systemctl enable" not in postinst
    assert "compileall" in postinst
    assert "deb-systemd-invoke stop 'edged.service'" in (control / "prerm").read_text()
    assert "deb-systemd-helper purge 'edged.service'" in (control / "postrm").read_text()


def test_lintian_reports_no_error(debs: tuple[Path, Path]) -> None:
    if shutil.which("lintian") is None:
        pytest.fail("lintian is missing: make test-tools installs it")
    result = subprocess.run(
        ["lintian", "--fail-on", "error", *map(str, debs)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    # 0 errors; warnings are printed (none with lintian 2.116, Debian 12's), not fatal: a newer
    # lintian may add tags this package cannot know of yet
    assert not [ln for ln in result.stdout.splitlines() if ln.startswith("E:")]


def _paths(deb: Path) -> set[str]:
    listing = dpkg_deb("--contents", str(deb))
    assert {line.split()[1] for line in listing.splitlines()} == {"root/root"}
    return {line.split()[5].removeprefix(".") for line in listing.splitlines()}


def test_contents(debs: tuple[Path, Path]) -> None:
    paths, learn = _paths(debs[0]), _paths(debs[1])
    site = "/opt/edged/venv/lib/python3.11/site-packages"
    for path in (
        "/etc/edged/edged.toml",
        "/lib/systemd/system/edged.service",
        "/usr/share/doc/edged/copyright",
        "/usr/share/doc/edged/changelog.Debian.gz",
        "/usr/share/edged/models/digits/model.toml",
        "/opt/edged/venv/pyvenv.cfg",
        "/opt/edged/venv/bin/edged",
        "/opt/edged/venv/bin/edged-fleet",
        f"{site}/edged/cli.py",
        f"{site}/onnxruntime/__init__.py",
        f"{site}/ai_edge_litert/interpreter.py",
    ):
        assert path in paths, path
    # the examples are for reference: nothing is installed into the model repository
    assert not any(p.startswith("/var/lib/edged") for p in paths)
    assert not any(p.endswith(".pyc") for p in paths | learn)  # postinst compiles them
    names = {_name(p.rsplit("/", 2)[1]) for p in paths if p.endswith(".dist-info/METADATA")}
    runtime = {_requirement_name(r) for r in PYPROJECT["dependencies"]}
    assert runtime <= names, f"missing: {runtime - names}"
    assert not names & NOT_RUNTIME, f"test/dev packages in the venv: {names & NOT_RUNTIME}"
    assert "onnx" not in names
    assert "pip" not in names
    # onnx is edged-learn's, and only onnx
    learn_names = {_name(p.rsplit("/", 2)[1]) for p in learn if p.endswith(".dist-info/METADATA")}
    assert learn_names == {"onnx"}
    # the prune list took effect (packaging/venv-prune.txt)
    assert not any("/onnxruntime/capi/libonnxruntime.so" in p for p in paths)
    assert not any("/numpy/_core/tests/" in p for p in paths)


@pytest.fixture(scope="module")
def installed(debs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both packages unpacked into a root (dpkg-deb -x; no maintainer scripts). Returns root.
    The venv's python is a link to /usr/bin/python3.11, which a Debian 12 host has."""
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("the Debian 12 package's venv runs /usr/bin/python3.11, missing here")
    root = tmp_path_factory.mktemp("root")
    for deb in debs:
        subprocess.run(["dpkg-deb", "--extract", str(deb), str(root)], check=True)
    return root


def _edged(installed: Path) -> list[str]:
    """The packaged bin/edged, run with the unpacked venv's python (its #! line names
    /opt/edged/venv/bin/python, which is not this root)."""
    venv = installed / "opt/edged/venv"
    return [str(venv / "bin/python"), str(venv / "bin/edged")]


def test_installed_venv_has_only_runtime_packages(installed: Path) -> None:
    venv = installed / "opt/edged/venv"
    result = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import importlib.metadata as m, json, sys; "
         "print(json.dumps([sys.prefix, [d.metadata['Name'] for d in m.distributions()]]))"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    prefix, distributions = json.loads(result.stdout)
    assert prefix == str(venv)  # the venv, not the system's python
    names = {_requirement_name(n) for n in distributions}
    assert "edged" in names
    assert "onnx" in names
    assert not names & NOT_RUNTIME, names
    version = subprocess.run(
        [*_edged(installed), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"edged {VERSION}"


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
            *_edged(installed),
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
            *_edged(installed),
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
    command = healthcheck_command()
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
