"""edged.learn.runner: a worker process's progress is followed, and each way it can fail
(non-zero exit, killed by its CPU limit, out of address space, past its wall-clock limit) is
one RuntimeError that says which. Real child processes (``python -c``), no mocks."""

from __future__ import annotations

import signal
import sys

import pytest

from edged.learn.runner import Limits, run_process

_LOOSE = Limits(memory_mb=0, cpu_s=60, wall_s=60, nice=0)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_progress_lines_are_followed_and_other_output_is_ignored() -> None:
    seen: list[float] = []
    code = (
        "import json\n"
        "print(json.dumps({'progress': 0.25}))\n"
        "print('not json')\n"
        "print(json.dumps({'other': 1}))\n"
        "print(json.dumps({'progress': 1.0}))\n"
    )
    await run_process(_python(code), _LOOSE, seen.append)
    assert seen == [0.25, 1.0]


async def test_the_worker_gets_one_blas_thread_and_its_niceness() -> None:
    code = (
        "import json, os\n"
        "assert os.environ['OMP_NUM_THREADS'] == '1', os.environ['OMP_NUM_THREADS']\n"
        "assert os.nice(0) >= 5, os.nice(0)\n"
        "print(json.dumps({'progress': 1}))\n"
    )
    seen: list[float] = []
    await run_process(_python(code), Limits(0, 60, 60, nice=5), seen.append)
    assert seen == [1.0]


async def test_a_non_zero_exit_fails_with_the_last_stderr_line() -> None:
    code = "import sys\nprint('first', file=sys.stderr)\nsys.exit('ValueError: bad task')"
    with pytest.raises(RuntimeError, match=r"worker failed \(1\): ValueError: bad task"):
        await run_process(_python(code), _LOOSE, lambda _: None)


async def test_a_worker_over_its_address_space_fails() -> None:
    code = "blob = bytearray(2 * 1024**3)"
    with pytest.raises(RuntimeError, match=r"worker failed \(1\): MemoryError"):
        await run_process(_python(code), Limits(256, 60, 60, 0), lambda _: None)


async def test_a_worker_past_its_cpu_limit_is_killed_by_the_kernel() -> None:
    code = "while True:\n    pass"
    xcpu = int(signal.SIGXCPU)
    with pytest.raises(RuntimeError, match=rf"worker failed \(-{xcpu}\): killed by signal {xcpu}"):
        await run_process(_python(code), Limits(0, cpu_s=1, wall_s=300, nice=0), lambda _: None)


async def test_a_worker_past_its_wall_clock_limit_is_stopped() -> None:
    code = "import time\ntime.sleep(300)"
    with pytest.raises(RuntimeError, match=r"ran past learn.job_timeout_s \(0.5 s\)"):
        await run_process(_python(code), Limits(0, 60, wall_s=0.5, nice=0), lambda _: None)
