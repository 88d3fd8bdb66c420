"""Dockerfile.arm64 built with a daemonless builder and its image run under emulation.

buildah (Debian's package) builds the Dockerfile as written, with `--isolation chroot` (no
daemon, no runc) and `--platform linux/arm64`: its RUN step (apt-get install of the arm64 .deb)
runs under qemu-user through binfmt_misc. Docker Hub is not reachable from here, so the base,
BASE=debian:bookworm-slim by default, is replaced by a local image made FROM scratch of the
debootstrapped Debian 12 arm64 root filesystem the chroot tests cache
(tests/e2e/debian_rootfs.sh); `apt-get update` inside the build reaches Debian's mirror. Then
the image's root filesystem (buildah mount) runs its ENTRYPOINT as its USER with its ENV, under
qemu, serving the example models, and the HEALTHCHECK command stored in the image passes; the
host asks it with tritonclient. Needs root and buildah (make test-tools installs it); skipped,
with the reason, only where binfmt_misc cannot be mounted (or without root)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.e2e.debs import REPO, Served, build, emulation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

CACHE = Path(os.environ.get("EDGED_TEST_CACHE", "/var/cache/edged-test"))
BASE = "localhost/edged-test-base:bookworm-arm64"
#: this session's image: a fixed tag would be re-tagged, or removed, by a concurrent session
IMAGE = f"localhost/edged-test:arm64-{uuid.uuid4().hex[:12]}"


def _buildah(*args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"buildah {args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout.strip()


def _base_image() -> None:
    """The debootstrapped Debian 12 arm64 root filesystem as an image, FROM scratch (made by
    one session at a time: a concurrent one waits, then finds it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".base-image.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _make_base_image()


def _make_base_image() -> None:
    if subprocess.run(["buildah", "inspect", "--type", "image", BASE],
                      capture_output=True, check=False).returncode == 0:  # fmt: skip
        return
    tarball = subprocess.run(
        [str(REPO / "tests/e2e/debian_rootfs.sh"), "bookworm", "arm64", str(CACHE)],
        capture_output=True, text=True, timeout=3000, check=True,
    ).stdout.strip()  # fmt: skip
    container = _buildah("from", "--arch", "arm64", "scratch")
    try:
        _buildah("add", container, tarball, "/")
        _buildah("config", "--arch", "arm64", "--os", "linux", container)
        _buildah("commit", "--quiet", container, BASE)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def image(tmp_path: Path) -> Iterator[dict[str, object]]:
    if os.geteuid() != 0:
        pytest.skip("buildah --isolation chroot and chroot need root")
    assert shutil.which("buildah"), "buildah is missing: make test-tools installs it"
    emulation("arm64")
    _base_image()
    context = tmp_path / "context"
    (context / "dist").mkdir(parents=True)
    for deb in build("bookworm", "arm64"):
        shutil.copy(deb, context / "dist" / deb.name)
    shutil.copy(REPO / "Dockerfile.arm64", context / "Dockerfile.arm64")
    shutil.copy(REPO / ".dockerignore", context / ".dockerignore")
    _buildah(
        "bud", "--isolation", "chroot", "--format", "docker", "--platform", "linux/arm64",
        "--pull=false", "--build-arg", f"BASE={BASE}", "--layers=false",
        "-f", str(context / "Dockerfile.arm64"), "-t", IMAGE, str(context),
        timeout=2400,
    )  # fmt: skip
    config = json.loads(_buildah("inspect", "--type", "image", IMAGE))
    try:
        yield config
    finally:
        subprocess.run(["buildah", "rmi", "-f", IMAGE], capture_output=True, check=False)


def test_dockerfile_builds_and_its_image_passes_its_healthcheck(
    image: dict[str, object], tmp_path: Path
) -> None:
    docker = image["Docker"]
    assert isinstance(docker, dict)
    config = docker["config"]
    assert docker["architecture"] == "arm64"
    assert config["User"] == "edged"
    assert config["Entrypoint"] == [
        "/opt/edged/venv/bin/edged", "serve", "--config", "/etc/edged/edged.toml"
    ]  # fmt: skip
    test = config["Healthcheck"]["Test"]
    assert test[0] == "CMD"

    container = _buildah("from", "--pull=false", IMAGE)
    root = Path(_buildah("mount", container))
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    daemon = None
    try:
        # an operator's volume: the example models in /var/lib/edged/models
        shutil.copytree(root / "usr/share/edged/models", root / "var/lib/edged/models",
                        dirs_exist_ok=True)  # fmt: skip
        subprocess.run(["chroot", str(root), "chown", "-R", "edged:edged", "/var/lib/edged"],
                       check=True)  # fmt: skip
        env = dict(item.split("=", 1) for item in config["Env"])
        # the image's ports are fixed (8001, 8002, 5555); this shared host gets free ones
        grpc_port = _free_port()
        env.update(
            EDGED_SERVER_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}",
            EDGED_METRICS_ADDRESS="127.0.0.1:0",
            EDGED_SERVER_HTTP_ADDRESS="127.0.0.1:0",
            EDGED_ZMQ_ADDRESSES="ipc:///run/edged/edged.sock,tcp://127.0.0.1:0",
        )
        daemon = Served(
            ["chroot", f"--userspec={config['User']}:{config['User']}", str(root),
             *config["Entrypoint"]],
            env,
        )  # fmt: skip
        daemon.wait_for("server_live", timeout=300)
        ready = daemon.wait_for("server_ready", timeout=600)
        assert ready["failed"] == []
        health = subprocess.run(
            ["chroot", f"--userspec={config['User']}:{config['User']}", str(root), *test[1:]],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert health.returncode == 0, health.stderr
        sample = np.load(REPO / "models/digits/sample.npy")
        with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton.InferInput("input", list(sample.shape), "FP32")
            tensor.set_data_from_numpy(sample)
            label = client.infer("digits", [tensor]).as_numpy("label")
        assert label is not None
        assert label.tolist() == [0, 1]
        assert daemon.stop() == 0, "".join(daemon.stderr)[-3000:]
    finally:
        if daemon is not None:
            daemon.kill()
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
        subprocess.run(["buildah", "umount", container], capture_output=True, check=False)
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
