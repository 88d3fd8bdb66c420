"""The scheduling half of dynamic batching, on a recording model that implements the real
LoadedModel interface (a test double at the executor boundary)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from edged.core.errors import (
    DeadlineExceededError,
    ExecutorError,
    ExecutorTimeoutError,
    InvalidInputError,
    ModelNotReadyError,
    OverloadedError,
    UnavailableError,
)
from edged.core.status import code_of, count_by_code
from edged.core.types import Array, DataType, Signature, TensorSpec
from edged.serving.batching import BatchPolicy
from edged.serving.scheduler import Execution, QueuePolicy, Scheduler, after_answers
from edged.serving.stats import ModelStats
from hal import LoadedModel
from hal.placement import BreakerPolicy, BreakerState, CircuitBreaker

SIG = Signature(
    (TensorSpec("x", DataType.FP32, (-1, 2)),), (TensorSpec("y", DataType.FP32, (-1, 2)),), 16
)


class Recording(LoadedModel):
    """y = 2x; records every batch; can be held closed or made to fail."""

    def __init__(self) -> None:
        super().__init__(SIG, "recording")
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.entered = 0

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.entered += 1
        self.gate.wait(10)
        self.batches.append(inputs["x"][:, 0].tolist())
        if self.fail:
            raise RuntimeError("device lost")
        return {"y": inputs["x"] * 2}


def x(value: float, rows: int = 1) -> dict[str, Array]:
    return {"x": np.full((rows, 2), value, dtype=np.float32)}


async def started(model: Recording, batching=BatchPolicy(16), queueing=QueuePolicy()):
    scheduler = Scheduler("m/1", [model], batching, queueing)
    scheduler.start()
    return scheduler


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_requests_queued_behind_a_busy_instance_are_merged() -> None:
    model = Recording()
    scheduler = await started(model)
    model.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)  # the first one is running
    rest = [asyncio.ensure_future(scheduler.submit(x(v, rows=2), 2)) for v in (1, 2, 3)]
    await until(lambda: scheduler.queue_depth == 3)
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.batches == [[0.0], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]
    for value, (outputs, _execution) in zip((0, 1, 2, 3), results, strict=True):
        assert np.all(outputs["y"] == 2 * value)
    assert results[1][1].batch_size == 6
    await scheduler.stop()


async def test_queue_delay_waits_for_a_fuller_batch() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(4, max_queue_delay_ns=200_000_000))
    a = asyncio.ensure_future(scheduler.submit(x(1), 1))
    await asyncio.sleep(0.05)
    assert model.batches == []  # still waiting for the delay
    b = asyncio.ensure_future(scheduler.submit(x(2), 1))
    await asyncio.gather(a, b)
    assert model.batches == [[1.0, 2.0]]
    await scheduler.stop()


async def test_different_shapes_run_in_different_batches() -> None:
    model = Recording()
    scheduler = await started(model)
    model.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)
    other = {"x": np.full((1, 3), 9, dtype=np.float32)}
    futures = [
        asyncio.ensure_future(scheduler.submit(x(1), 1)),
        asyncio.ensure_future(scheduler.submit(other, 1)),
        asyncio.ensure_future(scheduler.submit(x(2), 1)),
    ]
    await until(lambda: scheduler.queue_depth == 3)
    model.gate.set()
    await asyncio.gather(first, *futures)
    assert model.batches == [[0.0], [1.0, 2.0], [9.0]]
    await scheduler.stop()


async def test_higher_priority_runs_first() -> None:
    model = Recording()
    scheduler = await started(
        model, BatchPolicy(0), QueuePolicy(priority_levels=2, default_priority=2)
    )
    model.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)
    low = asyncio.ensure_future(scheduler.submit(x(1), 1))
    high = asyncio.ensure_future(scheduler.submit(x(2), 1, priority=1))
    await until(lambda: scheduler.queue_depth == 2)
    model.gate.set()
    await asyncio.gather(first, low, high)
    assert model.batches == [[0.0], [2.0], [1.0]]
    with pytest.raises(InvalidInputError, match="priority 3"):
        await scheduler.submit(x(0), 1, priority=3)
    await scheduler.stop()


async def test_full_queue_is_refused_at_once() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(0), QueuePolicy(max_queue_size=2))
    model.gate.clear()
    running = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)
    queued = [asyncio.ensure_future(scheduler.submit(x(v), 1)) for v in (1, 2)]
    await until(lambda: scheduler.queue_depth == 2)
    with pytest.raises(OverloadedError, match="queue is full"):
        await asyncio.wait_for(scheduler.submit(x(3), 1), 1)
    model.gate.set()
    await asyncio.gather(running, *queued)
    await scheduler.stop()


async def test_cancelled_caller_is_skipped_and_nothing_stalls() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(0))
    model.gate.clear()
    running = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)
    gone = asyncio.ensure_future(scheduler.submit(x(1), 1))
    kept = asyncio.ensure_future(scheduler.submit(x(2), 1))
    await until(lambda: scheduler.queue_depth == 2)
    gone.cancel()  # the client disconnected while queued
    model.gate.set()
    await asyncio.gather(running, kept)
    assert model.batches == [[0.0], [2.0]]
    assert scheduler.queue_depth == 0
    # a caller that goes away while its batch runs does not break the batch either
    model.gate.clear()
    leaving = asyncio.ensure_future(scheduler.submit(x(3), 1))
    await until(lambda: model.entered == 3)
    leaving.cancel()
    model.gate.set()
    outputs, _ = await scheduler.submit(x(4), 1)
    assert np.all(outputs["y"] == 8)
    await scheduler.stop()


async def test_timeout_while_queued() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(0), QueuePolicy(default_timeout_ns=50_000_000))
    model.gate.clear()
    running = asyncio.ensure_future(scheduler.submit(x(0), 1, timeout_ns=5_000_000_000))
    await until(lambda: model.entered == 1)
    with pytest.raises(DeadlineExceededError, match="timed out after 50 ms"):
        await scheduler.submit(x(1), 1)
    model.gate.set()
    await running
    assert model.batches == [[0.0]]  # the timed-out request never ran
    await scheduler.stop()


async def test_executor_failure_fails_the_batch_and_serving_goes_on() -> None:
    model = Recording()
    scheduler = await started(model)
    model.fail = True
    with pytest.raises(ExecutorError, match="device lost"):
        await scheduler.submit(x(1), 1)
    model.fail = False
    outputs, _ = await scheduler.submit(x(2), 1)
    assert np.all(outputs["y"] == 4)
    await scheduler.stop()


async def test_stop_fails_what_is_queued() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(0))
    model.gate.clear()
    running = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)
    queued = asyncio.ensure_future(scheduler.submit(x(1), 1))
    await until(lambda: scheduler.queue_depth == 1)
    stopping = asyncio.ensure_future(scheduler.stop())
    with pytest.raises(UnavailableError):
        await queued
    model.gate.set()
    await running  # the running batch finishes
    await stopping
    with pytest.raises(UnavailableError):
        await scheduler.submit(x(2), 1)


# -- what placement's failover relies on ------------------------------------------------------


async def test_a_batch_over_the_inference_timeout_fails_and_its_instance_waits() -> None:
    stuck, spare = Recording(), Recording()
    scheduler = Scheduler(
        "m/1", [stuck, spare], BatchPolicy(0), QueuePolicy(), inference_timeout_s=0.1
    )
    outcomes: list[object] = []
    scheduler.on_outcome = outcomes.append
    scheduler.start()
    stuck.gate.clear()  # the device hangs
    with pytest.raises(ExecutorTimeoutError, match=r"did not finish within 0\.1s"):
        await scheduler.submit(x(1), 1)
    assert scheduler.stuck == {stuck}
    assert isinstance(outcomes[-1], ExecutorTimeoutError)
    # the stuck instance is not handed out: the spare answers, however many ask
    for value in (2, 3, 4):
        outputs, _ = await scheduler.submit(x(value), 1)
        assert np.all(outputs["y"] == 2 * value)
    assert spare.batches == [[2.0], [3.0], [4.0]]
    assert stuck.entered == 1
    assert outcomes[-3:] == [None, None, None]
    stuck.gate.set()  # the hung call returns at last; its late answer is dropped
    await until(lambda: not scheduler.stuck)
    await scheduler.submit(x(5), 1)
    await scheduler.stop()


def test_the_timeout_error_is_deadline_exceeded_and_an_executor_error() -> None:
    error = ExecutorTimeoutError("x")
    assert isinstance(error, ExecutorError)
    assert code_of(error) == "DEADLINE_EXCEEDED"
    assert code_of(ExecutorError("x")) == "INTERNAL"


def test_statistics_count_failures_by_error_type_and_report_them_by_code() -> None:
    stats = ModelStats()
    for error in (ExecutorTimeoutError, ExecutorError, ExecutorError, InvalidInputError):
        stats.record_failure(1_000, error)
    assert stats.failures_by_error == {
        ExecutorTimeoutError: 1,
        ExecutorError: 2,
        InvalidInputError: 1,
    }
    assert stats.failures_by_code == {"DEADLINE_EXCEEDED": 1, "INTERNAL": 2, "INVALID_ARGUMENT": 1}
    assert count_by_code({UnavailableError: 2, ModelNotReadyError: 3}) == {"UNAVAILABLE": 5}
    assert stats.fail.count == 4


async def test_a_stopped_scheduler_releases_a_stuck_instance_when_it_returns() -> None:
    model = Recording()
    scheduler = Scheduler("m/1", [model], BatchPolicy(0), QueuePolicy(), inference_timeout_s=0.05)
    released: list[LoadedModel] = []
    scheduler.on_late_release = released.append
    scheduler.start()
    model.gate.clear()
    with pytest.raises(ExecutorTimeoutError):
        await scheduler.submit(x(1), 1)
    await asyncio.wait_for(scheduler.stop(), 2)  # does not wait for the hung thread
    assert released == []
    model.gate.set()
    await until(lambda: released == [model])


async def test_pause_holds_requests_and_hand_over_moves_them() -> None:
    failing, healthy = Recording(), Recording()
    old = await started(failing, BatchPolicy(0))
    new = await started(healthy, BatchPolicy(0))
    outcomes: list[object] = []

    def pause_on_failure(error: object) -> None:  # what the breaker does when it opens
        outcomes.append(error)
        if error is not None:
            old.pause()

    old.on_outcome = pause_on_failure
    failing.fail = True
    with pytest.raises(ExecutorError, match="device lost"):
        await old.submit(x(1), 1)
    assert old.paused
    # paused before the failed caller was answered: the next requests queue, none runs
    held = [asyncio.ensure_future(old.submit(x(v), 1)) for v in (2, 3)]
    await until(lambda: old.queue_depth == 2)
    await asyncio.sleep(0.02)
    assert failing.entered == 1
    assert old.hand_over(new) == 2
    assert old.queue_depth == 0
    results = await asyncio.gather(*held)
    assert [float(r[0]["y"][0, 0]) for r in results] == [4.0, 6.0]
    assert healthy.batches == [[2.0], [3.0]]
    assert isinstance(outcomes[0], ExecutorError)
    old.resume()
    failing.fail = False
    outputs, _ = await old.submit(x(7), 1)  # resumed: it runs again
    assert np.all(outputs["y"] == 14)
    await old.stop()
    await new.stop()


# -- the thread-side entry (the ZeroMQ I/O thread's) ------------------------------------------


class Answers:
    """Replies collected from any thread, each request answered exactly once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_tag: dict[object, list[object]] = {}
        self.threads: dict[object, int] = {}
        self.all = threading.Event()
        self.expected = 0

    def reply(self, tag: object):
        def answer(outcome: object) -> None:
            with self.lock:
                self.by_tag.setdefault(tag, []).append(outcome)
                self.threads[tag] = threading.get_ident()
                if len(self.by_tag) == self.expected:
                    self.all.set()

        return answer


class Threaded(Recording):
    """Also records which thread ran each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.ran_on: list[int] = []

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.ran_on.append(threading.get_ident())
        return super()._infer(inputs)


async def test_a_lone_request_on_an_idle_version_runs_inline_on_the_callers_thread() -> None:
    model = Threaded()
    scheduler = await started(model)
    answers = Answers()
    answers.expected = 1

    def caller() -> int:
        scheduler.post(x(3), 1, 0, 0, answers.reply("lone"), inline=True)
        return threading.get_ident()

    caller_thread = await asyncio.to_thread(caller)
    # answered before post returned, on the caller's own thread, with the model's outputs
    assert answers.all.is_set()
    assert model.ran_on == [caller_thread]
    assert answers.threads["lone"] == caller_thread
    ((outputs, execution),) = answers.by_tag["lone"]
    assert np.all(outputs["y"] == 6)
    assert execution.batch_size == 1
    await scheduler.stop()


async def test_inline_is_refused_while_the_instance_is_busy_or_requests_wait() -> None:
    model = Threaded()
    scheduler = await started(model)
    model.gate.clear()
    running = asyncio.ensure_future(scheduler.submit(x(0), 1))  # a worker thread runs it
    await until(lambda: model.entered == 1)
    answers = Answers()
    answers.expected = 2

    def caller() -> int:
        for value in (1, 2):
            scheduler.post(x(value), 1, 0, 0, answers.reply(value), inline=True)
        return threading.get_ident()

    caller_thread = await asyncio.to_thread(caller)  # returns at once: both queued
    assert scheduler.queue_depth == 2
    model.gate.set()
    await running
    assert await asyncio.to_thread(answers.all.wait, 5)
    assert caller_thread not in model.ran_on
    assert model.batches == [[0.0], [1.0, 2.0]]  # queued together, merged into one batch
    await scheduler.stop()


async def test_concurrent_producers_are_each_answered_once_with_their_own_outputs() -> None:
    instances = [Recording(), Recording()]
    scheduler = Scheduler("m/1", instances, BatchPolicy(8), QueuePolicy(max_queue_size=10_000))
    scheduler.start()
    answers = Answers()
    producers, each = 8, 50
    answers.expected = producers * each

    def produce(p: int) -> None:
        for i in range(each):
            value = float(p * 1000 + i)
            rows = 1 + i % 3
            # every other request asks to run inline: only an idle version takes that
            scheduler.post(
                x(value, rows), rows, 0, 0, answers.reply((value, rows)), inline=i % 2 == 0
            )

    await asyncio.gather(*(asyncio.to_thread(produce, p) for p in range(producers)))
    assert await asyncio.to_thread(answers.all.wait, 30)
    assert len(answers.by_tag) == producers * each
    for (value, rows), outcomes in answers.by_tag.items():
        assert len(outcomes) == 1, (value, outcomes)
        ((outputs, _execution),) = outcomes
        assert outputs["y"].shape == (rows, 2)
        assert np.all(outputs["y"] == 2 * value)
    ran = [v for m in instances for batch in m.batches for v in batch]
    assert len(ran) == sum(rows for _, rows in answers.by_tag)  # every row ran once
    assert sorted(set(ran)) == sorted({v for v, _ in answers.by_tag})
    assert scheduler.queue_depth == 0
    await scheduler.stop()


async def test_a_request_timing_out_while_its_batch_runs_is_answered_at_its_deadline() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(0))
    model.gate.clear()
    with pytest.raises(DeadlineExceededError, match="timed out after 50 ms"):
        await scheduler.submit(x(1), 1, timeout_ns=50_000_000)
    assert model.entered == 1  # it was running, and still is: the batch goes on
    model.gate.set()
    outputs, _ = await scheduler.submit(x(2), 1)
    assert np.all(outputs["y"] == 4)
    await scheduler.stop()


async def test_every_thread_side_success_and_failure_reaches_the_breaker_in_order() -> None:
    model = Recording()
    scheduler = await started(model, BatchPolicy(0))
    outcomes: list[object] = []
    scheduler.on_outcome = outcomes.append
    answers = Answers()
    answers.expected = 40

    def produce() -> None:
        for i in range(40):
            model.fail = i == 30  # one failed batch among successes
            done = threading.Event()
            reply = answers.reply(i)
            scheduler.post(x(i), 1, 0, 0, lambda o, r=reply, d=done: (r(o), d.set()), inline=True)
            assert done.wait(10)

    await asyncio.to_thread(produce)
    # successes of thread-side batches are counted and told together; none is lost, and
    # the ones before the failure are told before it
    await until(lambda: len(outcomes) == 40)
    assert [type(o) for o in outcomes[:31]] == [type(None)] * 30 + [ExecutorError]
    assert outcomes[31:] == [None] * 9
    await scheduler.stop()


async def test_a_batch_is_counted_before_its_asyncio_callers_are_answered() -> None:
    """An asyncio caller (``submit``) is answered through the event loop, which may run it
    before the worker thread's next statement: on_execution (the model's statistics) hears
    of the batch first, so a caller that reads the statistics once answered finds its
    batch there. (The listener dawdles to widen the window it would otherwise lose in.)"""
    counted: list[int] = []

    def count(execution: Execution) -> None:
        time.sleep(0.05)
        counted.append(execution.batch_size)

    scheduler = Scheduler("m/1", [Recording()], BatchPolicy(16), QueuePolicy(), count)
    scheduler.start()
    await scheduler.submit(x(1), 1)
    assert counted == [1]
    await scheduler.stop()


async def test_a_success_begun_before_a_failure_came_back_does_not_reset_the_breaker() -> None:
    # one device, two instances: ``late`` took a batch before the device failed and answers
    # after the other instance's failure came back (what a busy box does to a thread now and
    # then); told, that success would reset the breaker's count of consecutive failures, and
    # every instance could fail one more batch before the breaker opened
    late, failing = Recording(), Recording()
    scheduler = Scheduler("m/1", [late, failing], BatchPolicy(0), QueuePolicy())
    scheduler.start()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=2, retry_after_s=60.0))
    told: list[object] = []

    def listener(error: object) -> None:  # what the placement layer does with an outcome
        told.append(error)
        if error is None:
            breaker.record_success(0.0)
        else:
            breaker.record_failure(0.0)

    scheduler.on_outcome = listener
    late.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(x(1), 1))  # idle: it runs on ``late``
    await until(lambda: late.entered == 1)
    failing.fail = True
    with pytest.raises(ExecutorError, match="device lost"):
        await scheduler.submit(x(2), 1)  # ``late`` is busy: it runs on ``failing``
    assert breaker.failures == 1
    late.gate.set()
    outputs, _ = await first  # answered, but its success is not told
    assert np.all(outputs["y"] == 2)
    late.fail = True  # the device is down: whichever instance runs the next batch fails
    with pytest.raises(ExecutorError, match="device lost"):
        await scheduler.submit(x(3), 1)
    assert [type(o) for o in told] == [ExecutorError, ExecutorError]
    assert breaker.state(0.0) is BreakerState.OPEN  # at the threshold, not one batch later
    # a batch begun after the last failure came back is told again
    late.fail = failing.fail = False
    await scheduler.submit(x(4), 1)
    await until(lambda: len(told) == 3)
    assert told[2] is None
    await scheduler.stop()


class Refusing(Recording):
    """Refuses a batch as invalid (InvalidInputError) while ``refuse`` is set."""

    refuse = False

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        if self.refuse:
            raise InvalidInputError("input 'x': refused by the device")
        return super()._infer(inputs)


async def test_a_batch_refused_as_invalid_leaves_the_running_successes_told() -> None:
    # an invalid input says nothing of the device: the success of a batch running meanwhile
    # on the other instance still reaches the breaker
    late, refusing = Recording(), Refusing()
    scheduler = Scheduler("m/1", [late, refusing], BatchPolicy(0), QueuePolicy())
    scheduler.start()
    told: list[object] = []
    scheduler.on_outcome = told.append
    late.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(x(1), 1))  # idle: it runs on ``late``
    await until(lambda: late.entered == 1)
    refusing.refuse = True
    with pytest.raises(InvalidInputError, match="refused by the device"):
        await scheduler.submit(x(2), 1)
    late.gate.set()
    await first
    await until(lambda: len(told) == 2)
    assert type(told[0]) is InvalidInputError
    assert told[1] is None
    await scheduler.stop()


async def test_after_answers_runs_once_per_batch_after_every_caller_is_answered() -> None:
    model = Threaded()
    scheduler = await started(model)
    model.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(x(0), 1))
    await until(lambda: model.entered == 1)
    events: list[object] = []
    lock = threading.Lock()

    def flush() -> None:  # what a frontend does once per batch (wake its I/O thread)
        with lock:
            events.append(("flush", threading.get_ident()))

    def reply(tag: int):
        def answer(outcome: object) -> None:
            with lock:
                events.append((tag, after_answers(flush)))

        return answer

    for value in (1, 2, 3):
        scheduler.post(x(value), 1, 0, 0, reply(value))
    assert scheduler.queue_depth == 3
    model.gate.set()
    await first
    await until(lambda: len(events) == 4)
    # the three queued callers were answered in one batch, each deferring the same flush,
    # which ran once, after them, on the worker thread that ran the batch
    assert model.batches == [[0.0], [1.0, 2.0, 3.0]]
    assert events[:3] == [(1, True), (2, True), (3, True)]
    assert events[3] == ("flush", model.ran_on[1])
    # outside a batch's answers nothing is deferred: the caller runs it itself
    assert after_answers(flush) is False
    await scheduler.stop()
