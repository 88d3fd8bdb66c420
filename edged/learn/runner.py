"""The fine-tune worker's process: started under its limits (address space, CPU time,
niceness, one BLAS/OpenMP thread, death with the daemon on Linux), followed through its JSON
progress lines on stdout, and stopped past its wall-clock limit. What the process does is the
worker's business (``edged.learn.worker``); any command line runs the same way."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Limits:
    """A worker's limits: address space (MiB, 0: none), CPU seconds (RLIMIT_CPU), wall-clock
    seconds (then it is killed), niceness increment (0: none)."""

    memory_mb: int
    cpu_s: float
    wall_s: float
    nice: int


def _apply(limits: Limits) -> Callable[[], None]:
    """The limits, set in the child before it runs Python, and (Linux) death with the daemon,
    so a killed daemon leaves no worker behind."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def apply() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if limits.memory_mb:
            size = limits.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
        seconds = math.ceil(limits.cpu_s)
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))
        if limits.nice:
            os.nice(limits.nice)

    return apply


async def run_process(
    argv: Sequence[str], limits: Limits, on_progress: Callable[[float], None]
) -> None:
    """Run ``argv`` under ``limits``; each stdout line ``{"progress": f}`` goes to
    ``on_progress``. Cancelling this kills the process.

    Raises:
        RuntimeError: the process exited non-zero (its last stderr line; a signal names the
            limits), or ran past ``limits.wall_s`` (it is killed).
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        preexec_fn=_apply(limits),
    )
    assert process.stdout is not None
    assert process.stderr is not None

    async def follow() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                on_progress(float(json.loads(line)["progress"]))

    stderr = asyncio.ensure_future(process.stderr.read())
    try:
        await asyncio.wait_for(follow(), limits.wall_s)
        code = await asyncio.wait_for(process.wait(), 5.0)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(
            f"the fine-tune ran past learn.job_timeout_s ({limits.wall_s:g} s) and was stopped"
        ) from None
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    finally:
        errors = (await stderr).decode(errors="replace").strip()
    if code != 0:
        last = errors.splitlines()[-1] if errors else ""
        if code < 0:
            last = f"killed by signal {-code} (learn.job_memory_mb / job_timeout_s?) {last}"
        raise RuntimeError(f"the fine-tune worker failed ({code}): {last}")
