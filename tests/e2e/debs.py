"""The .debs built once per test session: packaging/build-deb.sh for a Debian release and an
architecture, shared by tests/e2e/test_deb.py and tests/e2e/test_deb_chroot.py."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
#: the Debian release tag build-deb.sh puts in the version, and the release's CPython
SUITES = {"bookworm": ("deb12", "3.11"), "trixie": ("deb13", "3.13")}

_built: dict[tuple[str, str], tuple[Path, Path]] = {}


def build(suite: str, arch: str) -> tuple[Path, Path]:
    """(edged, edged-learn) .deb for ``suite`` and ``arch``, built on first use."""
    if (suite, arch) not in _built:
        out = Path(tempfile.mkdtemp(prefix=f"edged-deb-{suite}-{arch}-"))
        started = time.monotonic()
        result = subprocess.run(
            [str(REPO / "packaging" / "build-deb.sh"), "--arch", arch, "--suite", suite,
             "--out", str(out)],
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
        tag = SUITES[suite][0]
        base, learn = (
            out / f"{name}_{VERSION}-1~{tag}_{arch}.deb" for name in ("edged", "edged-learn")
        )
        assert result.stdout.split() == [str(base), str(learn)], result.stdout
        sizes = ", ".join(f"{d.name} {d.stat().st_size / 2**20:.1f} MiB" for d in (base, learn))
        print(f"built {sizes} in {time.monotonic() - started:.0f} s")
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
