"""The data plane's thread-side entry (what the ZeroMQ I/O thread calls), in process on a
real repository and real ONNX Runtime: requests from a plain thread keep being answered, none
failing, while the manager swaps the version under them (load beside -> switch -> drain)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import EdgedError
from edged.core.types import InferRequest, InferResponse
from edged.serving.dataplane import DataPlane
from edged.serving.manager import ModelManager
from tests.daemon_process import EXAMPLE_MODELS


def _request(i: int) -> InferRequest:
    return InferRequest(
        "simple_static",
        {"INPUT0": np.full((2, 3), i, np.int32), "INPUT1": np.ones((2, 3), np.int32)},
        id=f"r{i}",
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLE_MODELS / "simple_static", tmp_path / "simple_static")
    (tmp_path / "simple_static" / "ACTIVE").write_text("1\n")
    return tmp_path


async def test_thread_side_requests_survive_a_swap_with_none_failed(repo: Path) -> None:
    manager = ModelManager(repo)
    await manager.load("simple_static")
    plane = DataPlane(manager, is_ready=lambda: True)
    outcomes: list[InferResponse | EdgedError] = []
    lock = threading.Lock()
    stop = threading.Event()

    def produce() -> int:
        sent = 0
        while not stop.is_set() or sent < 50:
            done = threading.Event()

            def reply(outcome: InferResponse | EdgedError, done=done) -> None:
                with lock:
                    outcomes.append(outcome)
                done.set()

            plane.submit(_request(sent), reply, inline=sent % 2 == 0)
            assert done.wait(10)
            sent += 1
        return sent

    producer = asyncio.ensure_future(asyncio.to_thread(produce))
    await asyncio.sleep(0.05)
    (repo / "simple_static" / "ACTIVE").write_text("2\n")
    await manager.load("simple_static")  # version 2 beside, switch, drain and close 1
    await asyncio.sleep(0.05)
    stop.set()
    sent = await producer
    await manager.unload_all()
    assert len(outcomes) == sent
    failed = [o for o in outcomes if isinstance(o, EdgedError)]
    assert failed == []
    versions = {o.model_version for o in outcomes if isinstance(o, InferResponse)}
    assert versions == {"1", "2"}
    for i, o in enumerate(outcomes):
        assert isinstance(o, InferResponse)
        assert o.id == f"r{i}"
        assert o.outputs["OUTPUT0"].tolist() == [[i + 1] * 3] * 2


async def test_thread_side_errors_are_raised_or_answered_like_infer(repo: Path) -> None:
    manager = ModelManager(repo)
    await manager.load("simple_static")
    plane = DataPlane(manager, is_ready=lambda: True)
    with pytest.raises(EdgedError, match="unknown model"):
        plane.submit(InferRequest("nope", {}), lambda outcome: None)
    answered: list[object] = []
    bad = InferRequest("simple_static", {"INPUT0": np.ones((2, 4), np.int32)})
    await asyncio.to_thread(plane.submit, bad, answered.append, inline=True)
    assert len(answered) == 1
    assert isinstance(answered[0], EdgedError)
    with pytest.raises(type(answered[0])):
        await plane.infer(bad)
    await manager.unload_all()
