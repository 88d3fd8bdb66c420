"""Failover and recovery in process (edged.serving.failover): the real ModelManager over the
digits model, placed on the simulated flaky accelerator (tests/flaky_sim.py, registered as a
vendor would register it) with cpu-onnx as the next candidate, and timed by a fake clock, so
the breaker's retry comes when the test advances time, not after a wait.

tests/e2e/test_failover.py is the same story through a daemon process and gRPC clients.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import ExecutorError
from edged.core.types import InferRequest
from edged.serving.manager import ModelManager
from hal import registry
from hal.cpu_onnx import OnnxCpuExecutor
from hal.placement import BreakerPolicy, BreakerState
from tests import flaky_sim
from tests.daemon_process import EXAMPLE_MODELS
from tests.digits_variants import SAMPLE

RETRY_AFTER_S = 30.0


class FakeClock:
    """Monotonic time that moves only when the test says; ``sleep`` returns once it has."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._moved = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        while self.now < until:
            await self._moved.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()


@dataclass
class Rig:
    manager: ModelManager
    clock: FakeClock
    fault: Path

    def kind(self) -> str:
        return self.manager.get("flaky").kind

    def breaker(self, kind: str) -> BreakerState | None:
        states = {b.executor: b.state for b in self.manager.breakers() if b.model == "flaky"}
        return states.get(kind)


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    # the simulated device, installed like a vendor's package: found through entry points
    monkeypatch.syspath_prepend(str(flaky_sim.install(tmp_path / "vendor")))
    registry._entry_points.cache_clear()
    fault = tmp_path / "fault"
    monkeypatch.setenv("FLAKY_SIM_FAULT_FILE", str(fault))
    repo = tmp_path / "models"
    # "flaky" may fail over to cpu-onnx; "alone" has nowhere else to go
    for name, executors in (("flaky", '"flaky-sim", "cpu-onnx"'), ("alone", '"flaky-sim"')):
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(
            EXAMPLE_MODELS / "digits" / "1" / "model.onnx", repo / name / "1" / "model.onnx"
        )
        (repo / name / "model.toml").write_text(
            f'name = "{name}"\nformat = "onnx"\nmax_batch_size = 8\ninstances = 1\n'
            f"executors = [{executors}]\n"
        )
    clock = FakeClock()
    manager = ModelManager(
        repo,
        devices=[flaky_sim.FlakySimExecutor.probe(), OnnxCpuExecutor.probe()],
        breaker=BreakerPolicy(failure_threshold=2, retry_after_s=RETRY_AFTER_S),
        clock=clock,
        sleep=clock.sleep,
    )
    assert await manager.load_all() == {}
    yield Rig(manager, clock, fault)
    await manager.unload_all()
    registry._entry_points.cache_clear()


def _request(model: str = "flaky") -> InferRequest:
    return InferRequest(model, {"input": SAMPLE[:2]})


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never got there")


async def test_a_failing_executor_fails_over_and_recovers_after_the_trial(rig: Rig) -> None:
    assert rig.kind() == "flaky-sim"
    healthy = (await rig.manager.infer(_request())).outputs
    flaky_sim.set_fault(rig.fault, "raise")
    for _ in range(2):  # failure_threshold: the second failure opens the breaker
        with pytest.raises(ExecutorError, match="simulated device fault"):
            await rig.manager.infer(_request())
    assert rig.breaker("flaky-sim") is BreakerState.OPEN

    # the version is paused and moving: this request waits for the move, then is answered
    moved = await rig.manager.infer(_request())
    assert rig.kind() == "cpu-onnx"
    for name, value in healthy.items():
        np.testing.assert_allclose(moved.outputs[name], value, rtol=1e-5)
    await _until(lambda: bool(rig.manager.failovers))  # counted once the failing copy drained
    assert rig.manager.failovers == {("flaky", "1", "flaky-sim", "cpu-onnx"): 1}
    assert rig.manager.executor_failures[("flaky", "1", "flaky-sim")] == 2

    # the breaker's retry comes; the device still fails its trial: the model stays put
    rig.clock.advance(RETRY_AFTER_S + 1)
    await _until(lambda: rig.breaker("flaky-sim") is BreakerState.OPEN)
    assert rig.kind() == "cpu-onnx"
    assert not rig.manager.recoveries
    await rig.manager.infer(_request())

    # the device is fixed; at the next retry the trial passes and the model moves back
    rig.fault.unlink()
    rig.clock.advance(RETRY_AFTER_S + 1)
    await _until(lambda: rig.kind() == "flaky-sim")
    await _until(lambda: bool(rig.manager.recoveries))  # counted once the swap has returned
    assert rig.manager.recoveries == {("flaky", "1", "cpu-onnx", "flaky-sim"): 1}
    assert rig.breaker("flaky-sim") is BreakerState.CLOSED
    back = await rig.manager.infer(_request())
    for name, value in healthy.items():
        np.testing.assert_allclose(back.outputs[name], value, rtol=1e-5)


async def test_a_trial_that_answers_differently_is_refused(rig: Rig) -> None:
    flaky_sim.set_fault(rig.fault, "raise")
    for _ in range(2):
        with pytest.raises(ExecutorError):
            await rig.manager.infer(_request())
    await rig.manager.infer(_request())
    assert rig.kind() == "cpu-onnx"
    flaky_sim.set_fault(rig.fault, "corrupt")  # the device answers again, but wrongly
    rig.clock.advance(RETRY_AFTER_S + 1)
    await _until(lambda: rig.breaker("flaky-sim") is BreakerState.OPEN)
    assert rig.kind() == "cpu-onnx"
    assert not rig.manager.recoveries


async def test_a_reload_keeps_the_moved_copy_and_an_unload_ends_recovery(rig: Rig) -> None:
    flaky_sim.set_fault(rig.fault, "raise")
    for _ in range(2):
        with pytest.raises(ExecutorError):
            await rig.manager.infer(_request())
    await rig.manager.infer(_request())
    assert rig.kind() == "cpu-onnx"
    await rig.manager.load("flaky")  # the same spec and version: kept as it serves
    assert rig.kind() == "cpu-onnx"
    await rig.manager.unload("flaky")
    rig.fault.unlink()
    rig.clock.advance(RETRY_AFTER_S + 1)
    await rig.manager.failover.idle()  # the recovery ended: nothing to recover any more
    assert not rig.manager.recoveries
    assert not rig.manager.is_ready("flaky")


async def test_without_another_candidate_the_version_stays_and_resumes(rig: Rig) -> None:
    flaky_sim.set_fault(rig.fault, "raise")
    for _ in range(2):
        with pytest.raises(ExecutorError):
            await rig.manager.infer(_request("alone"))
    await rig.manager.failover.idle()  # the failover found nowhere to go and ended
    served = rig.manager.get("alone")
    assert served.kind == "flaky-sim"
    assert not served.scheduler.paused
    assert not rig.manager.failovers
    rig.fault.unlink()  # requests keep going to the only executor there is
    assert (await rig.manager.infer(_request("alone"))).model_version == "1"


def test_the_sim_changes_fault_mode_without_a_moment_of_empty_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty control file means "raise": a mode written in place (truncate, then write) let
    # a request that read it in between fail with the device error instead of hanging (the
    # e2e hanging-executor test's INTERNAL failure). set_fault replaces the file whole: a
    # device that opened it before the change still reads all of the old mode, never "".
    fault = tmp_path / "fault"
    monkeypatch.setenv("FLAKY_SIM_FAULT_FILE", str(fault))
    flaky_sim.set_fault(fault, "corrupt")
    with fault.open() as before:
        flaky_sim.set_fault(fault, "hang")
        assert before.read() == "corrupt"
    assert flaky_sim._fault() == "hang"
    assert not list(tmp_path.glob(".fault.tmp-*"))
