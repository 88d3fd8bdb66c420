"""The .deb installed with dpkg into real Debian root filesystems and serving from there:
Debian 12 (bookworm) on arm64 under qemu-user emulation, Debian 12 and Debian 13 (trixie) on
amd64. For each: packaging/build-deb.sh builds edged and edged-learn for the release and the
architecture (tests/e2e/debs.py keeps them in /var/cache/edged-test/debs by the digest of their
inputs: an unchanged tree is not rebuilt); tests/e2e/debian_rootfs.sh gives a minimal root
filesystem (debootstrap, cached under /var/cache/edged-test: the first run builds it, minutes,
and under emulation many);
`dpkg -i` installs both packages in a chroot, where systemd does not run, and must leave
edged.service enabled; then the packaged `edged serve` (the packaged /etc/edged/edged.toml, as
the user edged, ports moved by EDGED_* variables) serves the example models, and the host asks
it with tritonclient and ZmqClient: the answers must equal those of this checkout's daemon on
amd64. Dockerfile.arm64's HEALTHCHECK command passes inside the chroot; SIGTERM exits 0;
`dpkg --purge` removes everything.

Needs root (chroot, mount). The arm64 case needs binfmt_misc: it is mounted here when it is
not (`make test-tools` installs qemu-user-static and binfmt-support), and the case is skipped,
with the reason, only where it cannot be. The installed size and idle RSS go to stdout and to
/var/cache/edged-test/measurements.jsonl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton

from edged.client import ZmqClient
from tests.daemon_process import DaemonProcess, copy_example_models
from tests.e2e.debs import (
    HOST_ARCH,
    REPO,
    SUITES,
    VERSION,
    Served,
    build,
    emulation,
    healthcheck_command,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

CACHE = Path(os.environ.get("EDGED_TEST_CACHE", "/var/cache/edged-test"))
#: the models both daemons are asked, and their input (the digits sample, [2, 64] FP32)
MODELS = ("digits", "digits_tflite")
SAMPLE = np.load(REPO / "models" / "digits" / "sample.npy")
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}


def _run(argv: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert result.returncode == 0, f"{argv}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def _in_root(root: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _run(["chroot", str(root), *argv], timeout=timeout, env=CHROOT_ENV)


@pytest.fixture
def rootfs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the cached root filesystem of ``request.param`` = (suite, arch), with
    /proc mounted."""
    suite, arch = request.param
    if os.geteuid() != 0:
        pytest.skip("installing into a chroot needs root (chroot, mount)")
    for tool in ("debootstrap", "dpkg-buildpackage", "chroot"):
        assert shutil.which(tool), f"{tool} is missing: make test-tools installs it"
    emulation(arch)
    started = time.monotonic()
    tarball = _run(
        [str(REPO / "tests" / "e2e" / "debian_rootfs.sh"), suite, arch, str(CACHE)], timeout=3000
    ).stdout.strip()
    root = tmp_path / "root"
    root.mkdir()
    _run(["tar", "--numeric-owner", "-xf", tarball, "-C", str(root)])
    print(f"rootfs {suite}/{arch} ready in {time.monotonic() - started:.0f} s")
    _run(["mount", "-t", "proc", "proc", str(root / "proc")])
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)


def _ask(address: str, model: str) -> dict[str, np.ndarray]:
    with triton.InferenceServerClient(address) as client:
        tensor = triton.InferInput("input", list(SAMPLE.shape), "FP32")
        tensor.set_data_from_numpy(SAMPLE)
        reply = client.infer(model, [tensor])
        return {name: reply.as_numpy(name) for name in ("probabilities", "label")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    """This checkout's daemon (amd64, the repository's venv) on the example models."""
    repo = copy_example_models(tmp_path_factory.mktemp("reference") / "models")
    daemon = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
    try:
        address = daemon.wait_live(60)
        daemon.wait_for("server_ready", 120)
        return {model: _ask(address, model) for model in MODELS}
    finally:
        daemon.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _record(measurement: dict[str, Any]) -> None:
    print(json.dumps(measurement))
    with (CACHE / "measurements.jsonl").open("a") as out:
        out.write(json.dumps(measurement) + "\n")


@pytest.mark.parametrize(
    "rootfs",
    [("bookworm", "arm64"), ("bookworm", "amd64"), ("trixie", "amd64")],
    indirect=True,
    ids=["debian12-arm64-qemu", "debian12-amd64", "debian13-amd64"],
)
def test_deb_installs_and_serves_in_a_chroot(
    rootfs: Path, request: pytest.FixtureRequest, reference: dict[str, dict[str, np.ndarray]]
) -> None:
    suite, arch = request.node.callspec.params["rootfs"]
    tag, python = SUITES[suite]
    root = rootfs
    started = time.monotonic()
    base, learn = build(suite, arch)

    # dpkg -i, as an image build in a chroot does: no systemd running
    for deb in (base, learn):
        shutil.copy(deb, root / "tmp" / deb.name)
    installing = time.monotonic()
    _in_root(root, "dpkg", "-i", f"/tmp/{base.name}", f"/tmp/{learn.name}", timeout=1800)
    install_s = time.monotonic() - installing
    status = _in_root(root, "dpkg-query", "-W", "-f", "${Status} ${Version}\n", "edged")
    assert status.stdout.split() == ["install", "ok", "installed", f"{VERSION}-1~{tag}"]
    wants = root / "etc/systemd/system/multi-user.target.wants/edged.service"
    assert wants.is_symlink(), "dpkg -i in a chroot left edged.service disabled"
    assert os.readlink(wants) in {"/lib/systemd/system/edged.service",
                                  "/usr/lib/systemd/system/edged.service"}  # fmt: skip
    assert (root / "lib/systemd/system/edged.service").read_text() == (
        REPO / "packaging/systemd/edged.service"
    ).read_text()
    # the venv runs this release's python, and edged-learn's onnx imports in it
    venv_python = _in_root(root, "/opt/edged/venv/bin/python", "-c",
                           "import sys, onnx; print('%d.%d' % sys.version_info[:2])")  # fmt: skip
    assert venv_python.stdout.strip() == python
    installed_kib = int(_run(["du", "-sk", str(root / "opt/edged/venv")]).stdout.split()[0])
    learn_kib = int(_run(["du", "-sk", *map(str, (root / "opt/edged/venv/lib").glob(
        "python3.*/site-packages/onnx"))]).stdout.split()[0])  # fmt: skip

    # the operator's first steps: models into the repository, then the service's command
    _in_root(root, "cp", "-r", "/usr/share/edged/models/.", "/var/lib/edged/models/")
    _in_root(root, "chown", "-R", "edged:edged", "/var/lib/edged/models")
    _in_root(root, "install", "-d", "-o", "edged", "-g", "edged", "-m", "0750", "/run/edged")
    env = {
        **CHROOT_ENV,
        "HOME": "/var/lib/edged",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # as the unit sets
        "EDGED_SERVER_GRPC_ADDRESS": "127.0.0.1:0",
        "EDGED_METRICS_ADDRESS": "127.0.0.1:0",
        "EDGED_SERVER_HTTP_ADDRESS": "127.0.0.1:0",
        "EDGED_ZMQ_ADDRESSES": "ipc:///run/edged/edged.sock,tcp://127.0.0.1:0",
    }
    daemon = Served(
        ["chroot", "--userspec=edged:edged", str(root),
         "/opt/edged/venv/bin/edged", "serve", "--config", "/etc/edged/edged.toml"],
        env,
    )  # fmt: skip
    try:
        serving = time.monotonic()
        live = daemon.wait_for("server_live", timeout=300)
        ready = daemon.wait_for("server_ready", timeout=600)
        ready_s = time.monotonic() - serving
        assert ready["failed"] == []
        time.sleep(2)  # idle: loaded, no request yet
        rss_kib = _rss_kib(daemon.proc.pid)
        address = live["grpc_address"]
        assert (root / "run/edged/edged.sock").exists()

        for model in MODELS:  # tritonclient, from the host
            answer = _ask(address, model)
            np.testing.assert_array_equal(answer["label"], reference[model]["label"])
            np.testing.assert_allclose(
                answer["probabilities"], reference[model]["probabilities"], rtol=1e-4, atol=1e-6
            )
        (tcp,) = (e for e in live["zmq_endpoints"] if e.startswith("tcp://"))
        with ZmqClient(tcp) as client:  # the ZeroMQ fast path, from the host
            outputs = client.infer("digits", {"input": SAMPLE})
        np.testing.assert_array_equal(outputs["label"], reference["digits"]["label"])
        np.testing.assert_allclose(
            outputs["probabilities"], reference["digits"]["probabilities"], rtol=1e-4, atol=1e-6
        )
        health = subprocess.run(
            ["chroot", "--userspec=edged:edged", str(root), *healthcheck_command()],
            env={**env, "EDGED_SERVER_GRPC_ADDRESS": address},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert health.returncode == 0, health.stderr
        assert daemon.stop() == 0, "".join(daemon.stderr)[-3000:]
    finally:
        daemon.kill()

    # purge: the maintainer scripts undo everything (the unit's link, the venv, the state)
    _in_root(root, "dpkg", "--purge", "edged-learn", "edged", timeout=600)
    assert not wants.is_symlink()
    assert not (root / "opt/edged").exists()
    assert not (root / "var/lib/edged").exists()
    _record({
        "suite": suite, "arch": arch, "emulated": arch != HOST_ARCH,
        "deb_mib": round(base.stat().st_size / 2**20, 1),
        "learn_deb_mib": round(learn.stat().st_size / 2**20, 1),
        "venv_installed_mib": round(installed_kib / 1024, 1),
        "of_which_edged_learn_mib": round(learn_kib / 1024, 1),
        "idle_rss_mib": round(rss_kib / 1024, 1),
        "dpkg_install_s": round(install_s), "ready_s": round(ready_s),
        "test_s": round(time.monotonic() - started),
    })  # fmt: skip
