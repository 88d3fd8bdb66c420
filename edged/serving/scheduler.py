"""The scheduling half of dynamic batching: a bounded priority queue per model version and
one asyncio task that hands batches to free instances running on worker threads.

The event loop only queues, picks and wakes; merging, inference and splitting run on the
instance's worker thread. A request whose caller went away (cancelled future) is skipped
before it is batched, and its result is dropped if it was already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from edged.core.errors import (
    DeadlineExceededError,
    EdgedError,
    ExecutorError,
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


class Scheduler:
    """Queues requests for one model version and runs them in batches on its instances."""

    def __init__(
        self,
        label: str,
        instances: Sequence[LoadedModel],
        batching: BatchPolicy,
        queueing: QueuePolicy,
        on_execution: ExecutionListener | None = None,
    ) -> None:
        self._label = label
        self._instances = list(instances)
        self._batching = batching
        self._queueing = queueing
        self._on_execution = on_execution
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
            while self._waiting:
                instance = await self._free.get()
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
        dispatched = time.monotonic_ns()
        loop = asyncio.get_running_loop()
        try:
            parts, execution = await loop.run_in_executor(
                self._pool, batch[0].context.run, self._work, instance, batch, dispatched
            )
        except EdgedError as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        except Exception as e:  # a bug below the HAL contract: fail the batch, keep serving
            log.exception("batch_failed", model=self._label)
            error = ExecutorError(f"model {self._label}: batch failed: {e}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
        else:
            for p, part in zip(batch, parts, strict=True):
                if not p.future.done():
                    p.future.set_result((part, execution))
            if self._on_execution is not None:
                self._on_execution(execution)
        finally:
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
        """Fail what is still queued, wait for running batches, stop the threads."""
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
        await asyncio.to_thread(self._pool.shutdown, True)
