"""Running a pipeline in process (issue #16 item 1): each step is posted from the reply of
the step before it, on the thread that answered it, so a request never waits for the event
loop between steps; withdrawing a request or a failing step withdraws the steps still
queued, and every count (the pipeline's and the step models') is settled.

Real ModelManager, real ONNX Runtime models (tests/modelgen.py's y = 3x). ``held`` waits up
to 5 s for a second request (preferred batch size 2): a step sent to it stays queued, which
is how a queued step is observed (its scheduler's queue depth), never by timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import EdgedError, ModelNotReadyError
from edged.core.types import InferRequest, InferResponse
from edged.serving.manager import ModelManager
from edged.serving.pipeline import Pipeline
from tests import modelgen
from tests.conftest import write_model

HELD = """max_batch_size = 8
dynamic_batching = { max_queue_delay_us = 5000000, preferred_batch_sizes = [2] }
"""

_X = """max_batch_size = 4
[[inputs]]
name = "x"
datatype = "FP32"
dims = [-1, 4]
"""

PIPELINES = {
    # y = 27x: three steps one after the other, all on "dyn" (which never waits)
    "chain": _X
    + """[[outputs]]
name = "out"
[[pipeline.step]]
name = "one"
model = "dyn"
input_map = { x = "x" }
output_map = { y = "a" }
[[pipeline.step]]
name = "two"
model = "dyn"
input_map = { x = "a" }
output_map = { y = "b" }
[[pipeline.step]]
name = "three"
model = "dyn"
input_map = { x = "b" }
output_map = { y = "out" }
""",
    # "first" runs at once, "then" waits in held's queue for company
    "then_held": _X
    + """[[outputs]]
name = "out"
[[pipeline.step]]
name = "first"
model = "dyn"
input_map = { x = "x" }
output_map = { y = "a" }
[[pipeline.step]]
name = "then"
model = "held"
input_map = { x = "a" }
output_map = { y = "out" }
""",
    # two independent steps: "left" queues on held, "right" on "gone" (unloaded below)
    "fork": _X
    + """[[outputs]]
name = "l"
[[outputs]]
name = "r"
[[pipeline.step]]
name = "left"
model = "held"
input_map = { x = "x" }
output_map = { y = "l" }
[[pipeline.step]]
name = "right"
model = "gone"
input_map = { x = "x" }
output_map = { y = "r" }
""",
}


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ModelManager]:
    for name, toml in (("dyn", "max_batch_size = 8\n"), ("held", HELD), ("gone", "")):
        write_model(tmp_path, name, modelgen.dynamic_axes_model, toml)
    for name, toml in PIPELINES.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.toml").write_text(toml)
    manager = ModelManager(tmp_path)
    for name in ("dyn", "held", "gone", *PIPELINES):
        await manager.load(name)
    yield manager
    await manager.unload_all()


def _x(rows: int = 1) -> np.ndarray:
    return np.arange(rows * 2 * 4, dtype=np.float32).reshape(rows, 2, 4)


class _Reply:
    """A reply callback that remembers the outcome and the thread it came on."""

    def __init__(self) -> None:
        self.outcomes: list[InferResponse | EdgedError] = []
        self.threads: list[int] = []
        self.done = threading.Event()

    def __call__(self, outcome: InferResponse | EdgedError) -> None:
        self.outcomes.append(outcome)
        self.threads.append(threading.get_ident())
        self.done.set()


def _submit_from_a_thread(
    pipeline: Pipeline, request: InferRequest, reply: _Reply
) -> Callable[[], bool]:
    withdraws: list[Callable[[], bool]] = []
    thread = threading.Thread(target=lambda: withdraws.append(pipeline.submit(request, reply)))
    thread.start()
    thread.join(30)
    return withdraws[0]


def _wait_queued(manager: ModelManager, model: str, depth: int = 1) -> None:
    deadline = time.monotonic() + 30
    while manager.get(model).scheduler.queue_depth != depth:
        assert time.monotonic() < deadline, f"no request queued on {model}"
        time.sleep(0.005)


async def test_steps_are_chained_on_the_worker_threads_without_the_event_loop(
    manager: ModelManager,
) -> None:
    pipeline = manager.pipeline("chain")
    assert pipeline is not None
    before = manager.get("dyn").stats.inference_count
    reply = _Reply()
    _submit_from_a_thread(pipeline, InferRequest("chain", {"x": _x()}, id="c1"), reply)
    # the event loop is blocked here (a plain wait, not an await): a step that needed a hop
    # through it would never start, and the request would never be answered
    assert reply.done.wait(30)
    (outcome,) = reply.outcomes
    assert isinstance(outcome, InferResponse), outcome
    np.testing.assert_allclose(outcome.outputs["out"], 27 * _x())
    assert outcome.id == "c1"
    assert reply.threads[0] != threading.get_ident()  # answered on a worker thread
    assert manager.get("dyn").stats.inference_count - before == 3
    assert pipeline.in_flight == 0
    assert pipeline.stats.success.count == 1


async def test_the_asyncio_face_answers_like_the_steps_by_hand(manager: ModelManager) -> None:
    pipeline = manager.pipeline("chain")
    assert pipeline is not None
    responses = await asyncio.gather(
        *(pipeline.infer(InferRequest("chain", {"x": _x(rows)})) for rows in (1, 2, 3))
    )
    for rows, response in zip((1, 2, 3), responses, strict=True):
        np.testing.assert_allclose(response.outputs["out"], 27 * _x(rows))
    assert pipeline.in_flight == 0


async def test_withdrawing_a_request_drops_its_queued_step_and_settles_the_counts(
    manager: ModelManager,
) -> None:
    pipeline = manager.pipeline("then_held")
    assert pipeline is not None
    held = manager.get("held")
    reply = _Reply()
    withdraw = _submit_from_a_thread(pipeline, InferRequest("then_held", {"x": _x()}), reply)
    await asyncio.to_thread(_wait_queued, manager, "held")  # "first" ran, "then" waits
    assert withdraw() is True
    assert withdraw() is False  # once
    assert held.scheduler.queue_depth == 0
    assert (pipeline.in_flight, held.in_flight) == (0, 0)
    assert await pipeline.drain(1.0)
    # the withdrawn step never runs: the next two direct requests make one batch of two
    before = (held.stats.inference_count, held.stats.execution_count)
    answers = await asyncio.gather(
        *(held.infer(InferRequest("held", {"x": _x()})) for _ in range(2))
    )
    assert [a.outputs["y"].shape for a in answers] == [(1, 2, 4)] * 2
    after = (held.stats.inference_count, held.stats.execution_count)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
    assert reply.outcomes == []  # a withdrawn request is never answered


async def test_a_failing_step_fails_the_request_named_and_withdraws_its_queued_sibling(
    manager: ModelManager,
) -> None:
    pipeline = manager.pipeline("fork")
    assert pipeline is not None
    await manager.unload("gone")
    held = manager.get("held")
    before = held.stats.inference_count
    reply = _Reply()
    _submit_from_a_thread(pipeline, InferRequest("fork", {"x": _x()}), reply)
    assert reply.done.wait(30)
    (outcome,) = reply.outcomes
    assert isinstance(outcome, ModelNotReadyError)
    assert "pipeline 'fork' step 'right' (model 'gone')" in str(outcome)
    # "left" was queued on held first (waiting for company): withdrawn, never run
    assert held.scheduler.queue_depth == 0
    assert (pipeline.in_flight, held.in_flight) == (0, 0)
    assert held.stats.inference_count == before
    assert pipeline.stats.fail.count == 1


async def test_cancelling_the_asyncio_caller_withdraws_the_queued_step(
    manager: ModelManager,
) -> None:
    pipeline = manager.pipeline("then_held")
    assert pipeline is not None
    held = manager.get("held")
    task = asyncio.ensure_future(pipeline.infer(InferRequest("then_held", {"x": _x()})))
    await asyncio.to_thread(_wait_queued, manager, "held")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held.scheduler.queue_depth == 0
    assert (pipeline.in_flight, held.in_flight) == (0, 0)
