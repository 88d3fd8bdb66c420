"""Native test doubles built from C: simulated hardware libraries (an Edge TPU delegate, an
NVIDIA driver), compiled once per test session by ``build_shared``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCES = Path(__file__).resolve().parent


def build_shared(source: str, out_dir: Path) -> Path:
    """Compile ``tests/native/<source>`` into ``out_dir``/lib<stem>.so; skips without a C
    compiler (the message says which)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc/gcc) to build the simulated native library")
    out = out_dir / f"lib{Path(source).stem}.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out),
         str(SOURCES / source)],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    return out
