"""The .debs built once per test session: packaging/build-deb.sh for a Debian release and an
architecture, shared by tests/e2e/test_deb.py and tests/e2e/test_deb_chroot.py."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests import shared_cache

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
#: the Debian release tag build-deb.sh puts in the version, and the release's CPython
SUITES = {"bookworm": ("deb12", "3.11"), "trixie": ("deb13", "3.13")}

BINFMT = Path("/proc/sys/fs/binfmt_misc")
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
QEMU = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}

_built: dict[tuple[str, str], tuple[Path, Path]] = {}


#: what a package is built from: a change to any of these files means a new build
BUILD_INPUTS = ("pyproject.toml", "README.md", "docs/operations.md", "edged", "hal", "models",
                "packaging")  # fmt: skip
#: built packages kept between sessions, by the digest of their inputs (EDGED_TEST_CACHE)
DEB_CACHE = Path(os.environ.get("EDGED_TEST_CACHE", "/var/cache/edged-test")) / "debs"


def inputs_digest(suite: str, arch: str) -> str:
    """sha256 over every build input's path and contents (no __pycache__), the target and the
    host's dpkg/debhelper versions: the same digest builds the same packages."""
    digest = hashlib.sha256(f"{suite} {arch}\n".encode())
    tools = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "dpkg-dev", "debhelper"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    digest.update(tools.encode())
    for top in BUILD_INPUTS:
        path = REPO / top
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                digest.update(str(file.relative_to(REPO)).encode() + b"\0")
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def build(suite: str, arch: str) -> tuple[Path, Path]:
    """(edged, edged-learn) .deb for ``suite`` and ``arch``: packaging/build-deb.sh's, or the
    ones it built from the same inputs in an earlier session (EDGED_TEST_REBUILD_DEBS=1 builds
    anew). Built once per session at most. The cache is shared with concurrent sessions
    (tests/shared_cache.py): one builds while the others wait, none sees a half-written
    package, and packages a running session uses are not removed under it."""
    if (suite, arch) in _built:
        return _built[(suite, arch)]
    tag = SUITES[suite][0]
    names = [f"{n}_{VERSION}-1~{tag}_{arch}.deb" for n in ("edged", "edged-learn")]

    def build_into(staging: Path) -> None:
        result = subprocess.run(
            [str(REPO / "packaging" / "build-deb.sh"), "--arch", arch, "--suite", suite,
             "--out", str(staging)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": sys.executable},
            check=False,
            timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                "packaging/build-deb.sh failed (the wheels come from the package index: is it "
                f"reachable?)\n{result.stderr[-4000:]}"
            )
        assert result.stdout.split() == [str(staging / name) for name in names]

    started = time.monotonic()
    out, built = shared_cache.entry(
        DEB_CACHE, f"{suite}-{arch}", inputs_digest(suite, arch), build_into,
        complete=lambda folder: all((folder / name).is_file() for name in names),
        rebuild=bool(os.environ.get("EDGED_TEST_REBUILD_DEBS")),
    )  # fmt: skip
    base, learn = (out / name for name in names)
    if built:
        sizes = ", ".join(f"{d.name} {d.stat().st_size / 2**20:.1f} MiB" for d in (base, learn))
        print(f"built {sizes} in {time.monotonic() - started:.0f} s")
    else:
        print(f"{base.name}, {learn.name}: built earlier from the same inputs ({out})")
    _built[(suite, arch)] = (base, learn)
    return _built[(suite, arch)]


class Served:
    """An `edged serve` started from a package (its argv given whole), with its JSON log
    lines in a queue and its stderr kept."""

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
        raise AssertionError(
            f"no {event} (exit {self.proc.poll()}): {''.join(self.stderr)[-3000:]}"
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def healthcheck_command() -> list[str]:
    """Dockerfile.arm64's HEALTHCHECK command (exec form)."""
    dockerfile = (REPO / "Dockerfile.arm64").read_text().replace("\\\n", " ")
    (line,) = (ln for ln in dockerfile.splitlines() if ln.startswith("HEALTHCHECK"))
    command: list[str] = json.loads(line.partition("CMD ")[2])
    return command


def emulation(arch: str) -> None:
    """Make binaries of ``arch`` run here (binfmt_misc and qemu-user), or skip saying why not:
    only where binfmt_misc is not mounted and cannot be."""
    if arch == HOST_ARCH:
        return
    if not (BINFMT / "status").exists():
        mount = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mount.returncode != 0:
            pytest.skip(
                f"{arch} needs emulation, and binfmt_misc is not mounted at {BINFMT} and cannot "
                f"be (mount -t binfmt_misc: {mount.stderr.strip() or mount.returncode})"
            )
    entry = BINFMT / QEMU[arch]
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", QEMU[arch]], capture_output=True, check=False)
    assert entry.exists(), (
        f"binfmt_misc has no {QEMU[arch]} entry: apt-get install qemu-user-static binfmt-support "
        "(make test-tools does)"
    )
    assert "enabled" in entry.read_text(), entry.read_text()
