"""The Makefile's install stamps: `make serve` installs the runtime only, `make test` the
dev and test extras; each stamp is honoured and a changed pyproject.toml reinstalls.

Runs `make -n` (print the commands, run nothing) against a throwaway venv path."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(target: str, venv: Path) -> str:
    result = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def _pip_installs(commands: str) -> list[str]:
    return [
        line
        for line in commands.splitlines()
        if "pip install" in line and "--upgrade pip" not in line
    ]


def _stamps(commands: str) -> list[str]:
    """The stamp files a dry run would touch."""
    touched = [line.split("touch ", 1)[1] for line in commands.splitlines() if "touch " in line]
    return [name for line in touched for name in line.split()]


def test_serve_installs_only_the_runtime(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    installs = _pip_installs(_dry_run("serve", venv))
    assert installs == [f"{venv}/bin/python -m pip install -q -e ."]


def test_test_installs_dev_and_test_extras_and_both_stamps(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    commands = _dry_run("test", venv)
    installs = _pip_installs(commands)
    assert any("-e '.[dev,pynq]'" in line for line in installs), installs
    assert any("--no-deps pynq==" in line for line in installs), installs
    touched = _stamps(commands)
    assert any("/.installed-" in t for t in touched), touched
    assert any("/.runtime-" in t for t in touched), touched  # the dev stack includes the runtime


def test_each_stamp_satisfies_only_its_own_targets(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    runtime, dev = (
        next(t for t in _stamps(_dry_run("test", venv)) if f"/.{kind}-" in t)
        for kind in ("runtime", "installed")
    )
    venv.mkdir()
    Path(runtime).touch()
    assert _pip_installs(_dry_run("serve", venv)) == []  # runtime installed: nothing to do
    assert _pip_installs(_dry_run("lint", venv))  # but the dev tools are not
    Path(dev).touch()
    assert _pip_installs(_dry_run("lint", venv)) == []
    # a stamp of another pyproject.toml (an older checksum) does not count
    Path(runtime).rename(venv / ".runtime-1")
    Path(dev).rename(venv / ".installed-1")
    assert _pip_installs(_dry_run("serve", venv))
    assert _pip_installs(_dry_run("lint", venv))
