"""The scheduling half of dynamic batching: a bounded priority queue per model version and
one asyncio task that hands batches to free instances running on worker threads.

The event loop only queues, picks and wakes; merging, inference and splitting run on the
instance's worker thread. A request whose caller went away (cancelled future) is skipped
before it is batched, and its result is dropped if it was already running.

A batch that runs longer than ``inference_timeout_s`` fails with ``ExecutorTimeoutError``
(DEADLINE_EXCEEDED). Its thread cannot be interrupted, so its instance is *stuck*: it is not
handed out again until that thread returns (and is closed then, if the scheduler stopped in
the meantime). Every batch's outcome goes to ``on_outcome`` (the placement layer's circuit
breaker) before its callers are answered, so that a breaker that opens can ``pause`` the
scheduler before the next request arrives; ``hand_over`` then moves what queued meanwhile
to the scheduler of the executor the model moved to.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog

from edged.core.errors import (
    DeadlineExceededError,
    EdgedError,
    ExecutorError,
    ExecutorTimeoutError,
    InvalidInputError,
    OverloadedError,
    UnavailableError,
)
from edged.core.types import Array
from edged.serving.batching import BatchKey, BatchPolicy, batch_key, merge, split, take
from hal import LoadedModel

log = structlog.get_logger("edged.serving")


@dataclass(frozen=True)
class QueuePolicy:
    """Bounds of one model version's queue."""

    max_queue_size: int = 128
    """Requests waiting (not yet running); one more is refused with OverloadedError at once."""
    default_timeout_ns: int = 0
    """How long a request may wait and run before it fails; 0: no limit."""
    priority_levels: int = 1
    """Levels 1 (highest) .. N; a request without a priority gets ``default_priority``."""
    default_priority: int = 1


@dataclass(frozen=True)
class Execution:
    """What one batch cost, shared by the requests in it."""

    batch_size: int
    dispatched_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, Array]
    size: int
    key: BatchKey
    enqueued_ns: int
    future: asyncio.Future[tuple[dict[str, Array], Execution]]
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


ExecutionListener = Callable[[Execution], None]
#: called on the event loop after every batch, before its callers are answered: None when
#: the batch ran, else the error it failed with
OutcomeListener = Callable[[EdgedError | None], None]
#: called when a stuck instance's thread returns after the scheduler stopped
ReleaseListener = Callable[[LoadedModel], None]


class Scheduler:
    """Queues requests for one model version and runs them in batches on its instances."""

    def __init__(
        self,
        label: str,
        instances: Sequence[LoadedModel],
        batching: BatchPolicy,
        queueing: QueuePolicy,
        on_execution: ExecutionListener | None = None,
        inference_timeout_s: float = 0.0,
    ) -> None:
        self._label = label
        self._instances = list(instances)
        self._batching = batching
        self._queueing = queueing
        self._on_execution = on_execution
        self._timeout_s = inference_timeout_s
        self.on_outcome: OutcomeListener | None = None
        """Told every batch's outcome (the placement layer's breaker)."""
        self.on_late_release: ReleaseListener | None = None
        """Told when a stuck instance's thread returns after ``stop``."""
        self._stuck: set[LoadedModel] = set()
        self._paused = False
        self._queues: list[list[_Pending]] = [[] for _ in range(queueing.priority_levels)]
        self._waiting = 0
        self._pool = ThreadPoolExecutor(
            max_workers=len(self._instances), thread_name_prefix=f"edged-{label}"
        )
        self._free: asyncio.Queue[LoadedModel] = asyncio.Queue()
        for instance in self._instances:
            self._free.put_nowait(instance)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Requests waiting for an instance now."""
        return self._waiting

    @property
    def stuck(self) -> frozenset[LoadedModel]:
        """Instances whose thread is still running a batch that timed out."""
        return frozenset(self._stuck)

    @property
    def paused(self) -> bool:
        """Whether batches are held back (requests queue but do not run)."""
        return self._paused

    def pause(self) -> None:
        """Start no new batch (requests still queue, up to the queue's bound); batches
        running go on."""
        self._paused = True

    def resume(self) -> None:
        """Run queued requests again."""
        self._paused = False
        self._wake.set()

    def hand_over(self, to: Scheduler) -> int:
        """Move every queued request to ``to`` (the same model version on another executor),
        keeping its priority and waiting time; the callers' ``submit`` calls here answer with
        what ``to`` computes. Returns how many moved. Call on the event loop."""
        moved = 0
        for level, queue in enumerate(self._queues, start=1):
            target = to._queues[min(level, len(to._queues)) - 1]
            for p in queue:
                if not p.future.done():
                    target.append(p)
                    moved += 1
            queue.clear()
        self._waiting = 0
        to._waiting += moved
        if moved:
            to._wake.set()
        return moved

    def start(self) -> None:
        """Start the dispatch task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._dispatch(), name=f"scheduler-{self._label}"
            )

    async def submit(
        self, inputs: Mapping[str, Array], size: int, priority: int = 0, timeout_ns: int = 0
    ) -> tuple[dict[str, Array], Execution]:
        """Queue one validated request of ``size`` items and wait for its outputs.

        Raises:
            OverloadedError: the queue is full (at once, never blocks).
            DeadlineExceededError: the request's timeout expired first.
            InvalidInputError: ``priority`` is outside 1..priority_levels.
            UnavailableError: the scheduler is stopping.
            ExecutorError: the batch it ran in failed.
        """
        if self._closed:
            raise UnavailableError(f"model {self._label} is unloading")
        level = priority or self._queueing.default_priority
        if not 1 <= level <= self._queueing.priority_levels:
            raise InvalidInputError(
                f"priority {priority} is outside 1..{self._queueing.priority_levels}"
            )
        if self._waiting >= self._queueing.max_queue_size:
            raise OverloadedError(
                f"model {self._label}: queue is full ({self._queueing.max_queue_size} waiting)"
            )
        future: asyncio.Future[tuple[dict[str, Array], Execution]] = (
            asyncio.get_running_loop().create_future()
        )
        pending = _Pending(inputs, size, batch_key(inputs), time.monotonic_ns(), future)
        if (
            self._waiting == 0
            and not self._paused
            and self._free.qsize() == len(self._instances)
            and take(self._batching, [size], 0)
        ):
            # Fast path when idle: nothing queued, every instance free, and the policy would
            # not wait for company: run now, without a trip through the dispatch task. Under
            # load requests queue instead, so that they merge into batches.
            self._start(self._free.get_nowait(), [pending])
        else:
            self._queues[level - 1].append(pending)
            self._waiting += 1
            self._wake.set()
        timeout_ns = timeout_ns or self._queueing.default_timeout_ns
        if not timeout_ns:
            return await future
        try:
            return await asyncio.wait_for(future, timeout_ns / 1e9)
        except TimeoutError:
            raise DeadlineExceededError(
                f"model {self._label}: request timed out after {timeout_ns / 1e6:g} ms"
            ) from None

    # -- the dispatch task -----------------------------------------------------------------

    def _compatible(self) -> list[_Pending]:
        """Live requests that can share a batch with the oldest highest-priority one."""
        head: _Pending | None = None
        chosen: list[_Pending] = []
        for queue in self._queues:
            dead = [p for p in queue if p.future.done()]
            for p in dead:
                queue.remove(p)
                self._waiting -= 1
            for p in queue:
                if head is None:
                    head = p
                if p.key == head.key:
                    chosen.append(p)
        return chosen

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and not self._paused:
                instance = await self._free.get()
                if self._paused:  # paused while this task waited for an instance
                    self._free.put_nowait(instance)
                    break
                candidates = self._compatible()
                if not candidates:
                    self._free.put_nowait(instance)
                    break
                waited = time.monotonic_ns() - candidates[0].enqueued_ns
                count = take(self._batching, [p.size for p in candidates], waited)
                if count == 0:
                    self._free.put_nowait(instance)
                    left = (self._batching.max_queue_delay_ns - waited) / 1e9
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), max(left, 0.0))
                    self._wake.clear()
                    continue
                batch = candidates[:count]
                for p in batch:
                    for queue in self._queues:
                        if p in queue:
                            queue.remove(p)
                            break
                self._waiting -= len(batch)
                self._start(instance, batch)

    def _start(self, instance: LoadedModel, batch: list[_Pending]) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(instance, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(self, instance: LoadedModel, batch: list[_Pending]) -> None:
        try:
            outcome = await self._run(instance, batch)
            error = outcome if isinstance(outcome, EdgedError) else None
            try:
                if self.on_outcome is not None:
                    self.on_outcome(error)
            except Exception:  # the listener's bug must not lose this batch's answers
                log.exception("outcome_listener_failed", model=self._label)
            if isinstance(outcome, EdgedError):
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(outcome)
                return
            parts, execution = outcome
            for p, part in zip(batch, parts, strict=True):
                if not p.future.done():
                    p.future.set_result((part, execution))
            if self._on_execution is not None:
                self._on_execution(execution)
        finally:
            if instance not in self._stuck:
                self._free.put_nowait(instance)
            self._wake.set()

    async def _run(
        self, instance: LoadedModel, batch: list[_Pending]
    ) -> tuple[list[dict[str, Array]], Execution] | EdgedError:
        """Run ``batch`` on ``instance``'s worker thread, bounded by the inference timeout:
        its outputs, or the error it failed with."""
        dispatched = time.monotonic_ns()
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(
            self._pool, batch[0].context.run, self._work, instance, batch, dispatched
        )
        try:
            if self._timeout_s > 0:
                return await asyncio.wait_for(asyncio.shield(running), self._timeout_s)
            return await running
        except TimeoutError:
            if running.done():  # finished as the deadline passed
                return self._timed_out_error(running)
            self._stuck.add(instance)
            running.add_done_callback(lambda f: self._release(instance, f))
            log.warning(
                "inference_timeout",
                model=self._label,
                executor=instance.kind,
                timeout_s=self._timeout_s,
                batch_size=sum(p.size for p in batch),
            )
            return ExecutorTimeoutError(
                f"model {self._label}: {instance.kind} inference did not finish within "
                f"{self._timeout_s:g}s (executors.inference_timeout_s); the instance is out "
                f"of use until it returns"
            )
        except EdgedError as e:
            return e
        except Exception as e:  # a bug below the HAL contract: fail the batch, keep serving
            log.exception("batch_failed", model=self._label)
            return ExecutorError(f"model {self._label}: batch failed: {e}")

    def _timed_out_error(self, running: asyncio.Future[Any]) -> EdgedError:
        """The outcome of a batch that finished just as its deadline passed: an error stays
        that error; outputs are dropped, and it fails as a timeout (it did take that long)."""
        error = running.exception()
        if isinstance(error, EdgedError):
            return error
        return ExecutorTimeoutError(
            f"model {self._label}: inference did not finish within {self._timeout_s:g}s "
            f"(executors.inference_timeout_s)"
        )

    def _release(self, instance: LoadedModel, running: asyncio.Future[Any]) -> None:
        """A stuck instance's thread returned (on the event loop): hand it out again, or,
        when the scheduler has stopped meanwhile, pass it to ``on_late_release``."""
        if not running.cancelled():
            running.exception()  # retrieved: nobody else will
        self._stuck.discard(instance)
        log.info("inference_returned_after_timeout", model=self._label, executor=instance.kind)
        if self._closed:
            if self.on_late_release is not None:
                self.on_late_release(instance)
            return
        self._free.put_nowait(instance)
        self._wake.set()

    @staticmethod
    def _work(
        instance: LoadedModel, batch: list[_Pending], dispatched: int
    ) -> tuple[list[dict[str, Array]], Execution]:
        t0 = time.monotonic_ns()
        merged = merge([p.inputs for p in batch])
        t1 = time.monotonic_ns()
        outputs = instance.infer(merged)
        t2 = time.monotonic_ns()
        parts = split(outputs, [p.size for p in batch])
        t3 = time.monotonic_ns()
        size = sum(p.size for p in batch)
        return parts, Execution(size, dispatched, t1 - t0, t2 - t1, t3 - t2)

    async def stop(self) -> None:
        """Fail what is still queued, wait for running batches, stop the threads (without
        waiting for stuck ones)."""
        self._closed = True
        for queue in self._queues:
            for p in queue:
                if not p.future.done():
                    p.future.set_exception(UnavailableError(f"model {self._label} is unloading"))
            queue.clear()
        self._waiting = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A stuck thread may never return: do not wait for it (its instance is released
        # through on_late_release when it does).
        await asyncio.to_thread(self._pool.shutdown, not self._stuck)
