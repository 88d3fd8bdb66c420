"""Triton's own load generator, perf_analyzer (shipped in the tritonclient wheel), drives
edged: it reads ModelMetadata, ModelConfig and ModelStatistics and sends ModelInfer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _perf_analyzer() -> tuple[Path, dict[str, str]]:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        pytest.skip("perf_analyzer is not in the venv (install edged[test])")
    import nvidia.cuda_runtime  # the wheel nvidia-cuda-runtime-cu12, for libcudart.so.12

    libdir = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    env = dict(os.environ, LD_LIBRARY_PATH=f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    missing = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, env=env, check=False
    ).stdout
    if "not found" in missing and shutil.which("apt-get"):
        lines = [line.strip() for line in missing.splitlines() if "not found" in line]
        pytest.skip(
            f"perf_analyzer libraries missing ({'; '.join(lines)}); `make test` installs libb64-0d"
        )
    return binary, env


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits", "multi_io"])
def test_perf_analyzer_drives_edged(address: str, model: str) -> None:
    binary, env = _perf_analyzer()
    shape_args = ["--shape", "text:1", "--string-length", "8"] if model == "multi_io" else []
    result = subprocess.run(
        [
            str(binary),
            "-m",
            model,
            "-u",
            address,
            "-i",
            "grpc",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "500",
            "--max-trials",
            "3",
            "--stability-percentage",
            "999",
            "-b",
            "2",
            *shape_args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Throughput:" in output
    # server-side figures come from ModelStatistics
    assert "Successful request count:" in output
