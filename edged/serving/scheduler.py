"""The scheduling half of dynamic batching: a bounded, thread-safe priority queue per model
version, pulled by one worker thread per instance.

Requests arrive from any thread. ``post`` queues one with a reply callback (the ZeroMQ I/O
thread's entry, see edged/frontends/zmq.py); ``submit`` is the asyncio face of the same queue
(the gRPC and HTTP frontends): it posts with a reply that settles a future through
``loop.call_soon_threadsafe``. One lock guards the queues, the free instances and the batches
running; each instance's worker waits on a condition variable, takes what is queued (oldest
highest-priority request and the compatible ones behind it, as ``batching.take`` allows),
merges, runs, splits and answers on its own thread. A lone request on an idle version posted
with ``inline=True`` runs on the caller's thread: no hop at all.

Deadlines cost no timer per request or batch: expired requests are dropped when a batch is
taken, and one watchdog thread per scheduler sleeps until the earliest deadline (a request's
timeout, or a running batch's ``inference_timeout_s``). A batch over the inference timeout
fails with ``ExecutorTimeoutError`` (DEADLINE_EXCEEDED); its thread cannot be interrupted, so
its instance is *stuck*: not handed out again until that thread returns (and passed to
``on_late_release`` then, if the scheduler stopped meanwhile).

Every batch's outcome goes to ``on_outcome`` (the placement layer's circuit breaker) on the
event loop, before the callers of a failed batch are answered and before its instance takes
another batch, so that a breaker that opens can ``pause`` the scheduler first; ``hand_over``
then moves what queued meanwhile to the scheduler of the executor the model moved to.
Successes are told in order with failures, several coalesced into one call under load; a
success of a batch that began before the last failure came back is not told: it says how the
device was before it failed, and would reset the breaker's count of consecutive failures
(with several instances, one more failed batch per instance before the breaker opens).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

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

T = TypeVar("T")

log = structlog.get_logger("edged.serving")

#: how often successes of thread-side batches are told to ``on_outcome`` at most while the
#: last outcome told was a success (a breaker's cool-down is tens of seconds: a success told
#: up to this much later changes nothing); after a failure the next success is told at once
SUCCESS_TELL_NS = 1_000_000_000


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


Result = tuple[dict[str, Array], Execution]
#: how a request is answered: its outputs and the batch's cost, or the error it failed with;
#: called exactly once, on whichever thread settled it (keep it short, never block)
Reply = Callable[[Result | EdgedError], None]
ExecutionListener = Callable[[Execution], None]
#: called on the event loop after every batch, before the callers of a failed one are
#: answered: None when the batch ran, else the error it failed with
OutcomeListener = Callable[[EdgedError | None], None]
#: called (on the event loop) when a stuck instance's thread returns after the scheduler stopped
ReleaseListener = Callable[[LoadedModel], None]


_answering = threading.local()  # ``after``: callbacks to run once the batch is answered


def after_answers(callback: Callable[[], None]) -> bool:
    """From a reply callback: run ``callback`` once, on this thread, after the scheduler has
    answered every request of the batch it is answering here, rather than now (a frontend
    that wakes its I/O thread per reply wakes it once per batch, and only after this
    thread's Python work for the batch is done). The same callback asked for twice runs
    once. False when this thread is not answering a batch: the caller runs it itself."""
    after: list[Callable[[], None]] | None = getattr(_answering, "after", None)
    if after is None:
        return False
    if callback not in after:
        after.append(callback)
    return True


class Pending:
    """One queued request; ``finished`` is set (under the owning scheduler's lock) by
    whoever answers it, or by a caller that went away."""

    __slots__ = (
        "deadline_ns",
        "enqueued_ns",
        "finished",
        "future",
        "inputs",
        "key",
        "reply",
        "size",
    )

    def __init__(
        self,
        inputs: Mapping[str, Array],
        size: int,
        enqueued_ns: int,
        deadline_ns: int,
        reply: Reply,
    ) -> None:
        self.inputs = inputs
        self.size = size
        self.key: BatchKey = batch_key(inputs)
        self.enqueued_ns = enqueued_ns
        self.deadline_ns = deadline_ns
        self.reply = reply
        self.finished = False
        self.future: asyncio.Future[Result] | None = None
        """``submit``'s future: a caller that went away (cancelled) is skipped."""


class _Running:
    """A batch on an instance, for the watchdog and ``stop``."""

    __slots__ = ("batch", "deadline_ns", "inline", "instance", "started_ns", "timed_out")

    def __init__(
        self, instance: LoadedModel, batch: list[Pending], started_ns: int, deadline_ns: int
    ) -> None:
        self.instance = instance
        self.batch = batch
        self.started_ns = started_ns
        self.deadline_ns = deadline_ns
        self.timed_out = False
        self.inline = False


def settle(future: asyncio.Future[T], outcome: T | EdgedError) -> None:
    """Answer an asyncio caller from the loop (``call_soon_threadsafe``): the outcome, or
    the error; nothing when the caller went away."""
    if future.done():  # the caller went away
        return
    if isinstance(outcome, EdgedError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


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
        self._timeout_ns = int(inference_timeout_s * 1e9)
        self.on_outcome: OutcomeListener | None = None
        """Told every batch's outcome (the placement layer's breaker), on the event loop;
        not a success of a batch begun before the last failure came back (it is stale)."""
        self.on_late_release: ReleaseListener | None = None
        """Told when a stuck instance's thread returns after ``stop``."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here
        self._watch = threading.Condition(self._lock)  # the watchdog waits here
        self._quiet = threading.Condition(self._lock)  # ``stop`` waits here for batches
        self._queues: list[deque[Pending]] = [deque() for _ in range(queueing.priority_levels)]
        self._waiting = 0
        self._free: deque[LoadedModel] = deque(self._instances)
        self._running: set[_Running] = set()
        self._ready: deque[_Running] = deque()  # dispatched to a worker, not started yet
        self._stuck: set[LoadedModel] = set()
        self._paused = False
        self._closed = False
        self._inline = True  # off after an inline batch hung its caller's thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._watchdog: threading.Thread | None = None
        self._watch_at: int | None = None  # when the watchdog wakes next (None: asleep)
        # successes not told yet; a tell is on its way to the loop; when the last went;
        # whether the last outcome told was a failure (see ``_owe_success``)
        self._owed = 0
        self._telling = False
        self._told_ns = 0
        self._last_failed = False
        self._failed_ns = 0  # when the last executor failure came back (or timed out)

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
        with self._lock:
            self._paused = False
            self._work.notify_all()

    def hand_over(self, to: Scheduler) -> int:
        """Move every queued request to ``to`` (the same model version on another executor),
        keeping its priority and waiting time; their callers are answered with what ``to``
        computes. Returns how many moved. Call on the event loop."""
        with self._lock:
            moving = [(level, p) for level, q in enumerate(self._queues) for p in q]
            for q in self._queues:
                q.clear()
            self._waiting = 0
        moved = 0
        with to._lock:
            for level, p in moving:
                if p.finished:
                    continue
                to._queues[min(level, len(to._queues) - 1)].append(p)
                moved += 1
                if p.deadline_ns:
                    to._watch_deadline_locked(p.deadline_ns)
            to._waiting += moved
            if moved:
                to._work.notify_all()
        return moved

    def start(self) -> None:
        """Start one worker thread per instance (and the watchdog when batches have a
        timeout); the running event loop is where ``on_outcome`` is told."""
        if self._threads:
            return
        self._loop = asyncio.get_running_loop()
        for i in range(len(self._instances)):
            thread = threading.Thread(
                target=self._worker, name=f"edged-{self._label}-{i}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        if self._timeout_ns:
            with self._lock:
                self._start_watchdog_locked()

    # -- intake ----------------------------------------------------------------------------

    def post(
        self,
        inputs: Mapping[str, Array],
        size: int,
        priority: int,
        timeout_ns: int,
        reply: Reply,
        *,
        inline: bool = False,
        future: asyncio.Future[Result] | None = None,
    ) -> Pending:
        """Queue one validated request of ``size`` items from any thread; ``reply`` is
        called once with its outputs or error. With ``inline``, a lone request on an idle
        version (nothing queued, every instance free, a policy that would not wait for
        company) runs on this thread before ``post`` returns. ``future``: the asyncio
        caller's, whose cancellation drops the request while it is queued.

        Raises:
            OverloadedError: the queue is full (at once, never blocks).
            InvalidInputError: ``priority`` is outside 1..priority_levels.
            UnavailableError: the scheduler is stopping.
        """
        queueing = self._queueing
        level = priority or queueing.default_priority
        if not 1 <= level <= queueing.priority_levels:
            raise InvalidInputError(f"priority {priority} is outside 1..{queueing.priority_levels}")
        timeout_ns = timeout_ns or queueing.default_timeout_ns
        now = time.monotonic_ns()
        pending = Pending(inputs, size, now, now + timeout_ns if timeout_ns else 0, reply)
        pending.future = future
        run: _Running | None = None
        with self._lock:
            if self._closed:
                raise UnavailableError(f"model {self._label} is unloading")
            if self._waiting >= queueing.max_queue_size:
                raise OverloadedError(
                    f"model {self._label}: queue is full ({queueing.max_queue_size} waiting)"
                )
            if (
                not self._waiting
                and not self._paused
                and len(self._free) == len(self._instances)
                and take(self._batching, (size,), 0)
            ):
                # idle, and the policy would not wait for company: it runs now (on this
                # thread, or handed to a worker), never counted as waiting
                run = self._begin_locked(self._free.popleft(), [pending], now)
                if inline and self._inline:
                    run.inline = True
                else:
                    self._ready.append(run)
                    self._work.notify()
                    run = None
            else:
                self._queues[level - 1].append(pending)
                self._waiting += 1
                self._work.notify()
            if pending.deadline_ns:
                self._watch_deadline_locked(pending.deadline_ns)
        if run is not None:
            self._execute(run)
        return pending

    def withdraw(self, pending: Pending) -> bool:
        """Drop ``pending`` if it is still queued here (its caller went away): True if it
        was, and then its reply is never called; False if it already runs, was answered, or
        was handed over (its reply comes as usual)."""
        with self._lock:
            if pending.finished:
                return False
            for q in self._queues:
                try:
                    q.remove(pending)
                except ValueError:
                    continue
                pending.finished = True
                self._waiting -= 1
                return True
        return False

    async def submit(
        self, inputs: Mapping[str, Array], size: int, priority: int = 0, timeout_ns: int = 0
    ) -> Result:
        """Queue one validated request of ``size`` items and wait for its outputs (the
        asyncio face of ``post``; a cancelled caller's request is skipped if still queued).

        Raises:
            OverloadedError: the queue is full (at once, never blocks).
            DeadlineExceededError: the request's timeout expired first.
            InvalidInputError: ``priority`` is outside 1..priority_levels.
            UnavailableError: the scheduler is stopping.
            ExecutorError: the batch it ran in failed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()

        def reply(outcome: Result | EdgedError) -> None:
            loop.call_soon_threadsafe(settle, future, outcome)

        self.post(inputs, size, priority, timeout_ns, reply, future=future)
        return await future

    # -- taking batches --------------------------------------------------------------------

    def _take_locked(self) -> tuple[list[Pending], float | None, list[Pending]]:
        """The next batch (may be empty), how long to wait for company when the policy
        holds it back (None: nothing to wait for), and expired requests now dropped."""
        now = time.monotonic_ns()
        head: Pending | None = None
        chosen: list[Pending] = []
        dropped: list[Pending] = []
        for q in self._queues:
            for p in q:
                if (
                    p.finished
                    or (p.deadline_ns and p.deadline_ns <= now)
                    or (p.future is not None and p.future.done())
                ):
                    dropped.append(p)
                    continue
                if head is None:
                    head = p
                if p.key == head.key:
                    chosen.append(p)
        expired = [
            p for p in dropped if not p.finished and (p.future is None or not p.future.done())
        ]
        for p in dropped:
            p.finished = True
        batch: list[Pending] = []
        wait_s: float | None = None
        if head is not None:
            waited = now - head.enqueued_ns
            count = take(self._batching, [p.size for p in chosen], waited)
            if count:
                batch = chosen[:count]
            else:
                wait_s = max(self._batching.max_queue_delay_ns - waited, 0) / 1e9
        if dropped or batch:
            self._remove_locked(dropped + batch)
        return batch, wait_s, expired

    def _remove_locked(self, gone: list[Pending]) -> None:
        left = len(gone)
        for q in self._queues:
            while left and q and q[0] in gone:  # the common case: a prefix of one queue
                q.popleft()
                left -= 1
            if left and q:
                ids = {id(p) for p in gone}
                kept = [p for p in q if id(p) not in ids]
                left -= len(q) - len(kept)
                q.clear()
                q.extend(kept)
        self._waiting -= len(gone)

    def _begin_locked(self, instance: LoadedModel, batch: list[Pending], now: int) -> _Running:
        run = _Running(instance, batch, now, now + self._timeout_ns if self._timeout_ns else 0)
        self._running.add(run)
        return run

    def _worker(self) -> None:
        while True:
            with self._lock:
                run, expired = self._next_locked()
                if run is None and not expired:
                    return  # stopped
            for p in expired:
                self._answer(p, self._deadline_error(p))
            if run is not None:
                self._execute(run)

    def _next_locked(self) -> tuple[_Running | None, list[Pending]]:
        """Wait for work: a request dispatched while idle, else a batch from the queue
        (and the expired requests dropped taking it); (None, []) once stopped."""
        while True:
            if self._ready:  # dispatched while idle (runs even if stopping)
                return self._ready.popleft(), []
            if self._closed:
                return None, []
            if self._waiting and not self._paused and self._free:
                batch, wait_s, expired = self._take_locked()
                if batch:
                    now = time.monotonic_ns()
                    return self._begin_locked(self._free.popleft(), batch, now), expired
                if expired:
                    return None, expired
                self._work.wait(wait_s)
            else:
                self._work.wait()

    # -- running a batch -------------------------------------------------------------------

    def _execute(self, run: _Running) -> None:
        """Run ``run`` on this thread, then answer its callers."""
        instance, batch = run.instance, run.batch
        outcome: tuple[list[dict[str, Array]], Execution] | EdgedError
        try:
            outcome = self._work_on(instance, batch, run.started_ns)
        except EdgedError as e:
            outcome = e
        except Exception as e:  # a bug below the HAL contract: fail the batch, keep serving
            log.exception("batch_failed", model=self._label)
            outcome = ExecutorError(f"model {self._label}: batch failed: {e}")
        live, late = self._finish(
            run,
            failed=isinstance(outcome, EdgedError),
            device_failed=isinstance(outcome, ExecutorError),
        )
        if run.timed_out:
            log.info("inference_returned_after_timeout", model=self._label, executor=instance.kind)
            if late:
                self._on_loop(self._late_release, instance)
            return
        if isinstance(outcome, EdgedError):
            # the breaker first, then the callers, then the instance: on the event loop
            answer = [p for p, ok in zip(batch, live, strict=True) if ok]
            self._on_loop(self._fail, answer, outcome, instance)
            return
        parts, execution = outcome
        if self.on_outcome is not None:
            self._owe_success(run)
        self._deliver(batch, parts, live, execution)

    def _deliver(
        self,
        batch: list[Pending],
        parts: list[dict[str, Array]],
        live: list[bool],
        execution: Execution,
    ) -> None:
        """Answer the callers of a batch that ran (those still waiting: ``live``) and count
        it (``on_execution``). An asyncio caller is answered through the event loop, which
        may run it before this thread's next statement: such a batch is counted first, so
        that the statistics its callers read once answered hold it. Thread-side callers
        (ZeroMQ's I/O thread) are answered first, their replies on the wire before the count
        (which would cost the c=1 path)."""
        count = self._on_execution
        first = count is not None and any(p.future is not None for p in batch)
        after: list[Callable[[], None]] = []
        _answering.after = after
        try:
            if first and count is not None:
                count(execution)
            for p, part, ok in zip(batch, parts, live, strict=True):
                if ok:
                    self._answer(p, (part, execution))
            if not first and count is not None:
                count(execution)
        finally:
            _answering.after = None
            for callback in after:
                try:
                    callback()
                except Exception:  # the caller's bug must not take this thread down
                    log.exception("reply_failed", model=self._label)

    def _finish(
        self, run: _Running, *, failed: bool, device_failed: bool = False
    ) -> tuple[list[bool], bool]:
        """Take ``run`` off the running set: which of its callers still wait for an answer
        (now marked answered), and whether its instance came back late after ``stop``. The
        instance of a batch that ran goes back to the free ones here; a failed batch's
        goes back after the breaker heard of it (``_fail``). An executor failure
        (``device_failed``) makes the batches running now stale (``_owe_success``)."""
        instance = run.instance
        late = False
        with self._lock:
            self._running.discard(run)
            live = [not p.finished for p in run.batch]
            for p in run.batch:
                p.finished = True
            if run.timed_out:  # the watchdog answered; the instance was stuck until now
                self._stuck.discard(instance)
                late = self._closed
                if not late:
                    self._free.append(instance)
                    self._work.notify()
            elif not failed:
                self._free.append(instance)
                if self._waiting:
                    self._work.notify()
            elif device_failed:
                self._failed_ns = time.monotonic_ns()
            if self._closed:
                self._quiet.notify_all()
        return live, late

    def _answer(self, p: Pending, outcome: Result | EdgedError) -> None:
        try:
            p.reply(outcome)
        except Exception:  # the caller's bug must not take this thread down
            log.exception("reply_failed", model=self._label)

    @staticmethod
    def _work_on(
        instance: LoadedModel, batch: list[Pending], dispatched: int
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

    # -- on the event loop -----------------------------------------------------------------

    def _on_loop(self, callback: Callable[..., None], *args: object) -> None:
        """Run ``callback`` on the event loop (here, when there is none any more)."""
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(callback, *args)
                return
            except RuntimeError:  # the loop closed (shutdown)
                pass
        callback(*args)

    def _tell(self, error: EdgedError | None) -> None:
        listener = self.on_outcome
        if listener is None:
            return
        try:
            listener(error)
        except Exception:  # the listener's bug must not lose this batch's answers
            log.exception("outcome_listener_failed", model=self._label)

    def _owe_success(self, run: _Running) -> None:
        """A batch ran: tell the breaker on the event loop, unless it began before the last
        failure came back (stale: another instance's batch already running when the device
        failed). A hop per batch costs the thread-side callers (ZeroMQ) more than it tells a
        breaker that heard a success last, so their successes are counted and told at most
        once per ``SUCCESS_TELL_NS``; after a failure, and for batches with asyncio callers
        (whose answers hop to the loop anyway), at once."""
        batch = run.batch
        with self._lock:
            if run.started_ns < self._failed_ns:
                return
            self._owed += 1
            if self._telling:
                return
            self._telling = True
        wait_ns = SUCCESS_TELL_NS - (time.monotonic_ns() - self._told_ns)
        if self._last_failed or wait_ns <= 0 or any(p.future is not None for p in batch):
            self._on_loop(self._tell_successes)
        else:
            self._on_loop(self._tell_successes_in, wait_ns)

    def _tell_successes_in(self, wait_ns: int) -> None:
        assert self._loop is not None
        self._loop.call_later(wait_ns / 1e9, self._tell_successes)

    def _tell_successes(self) -> None:
        with self._lock:
            self._telling = False
            self._told_ns = time.monotonic_ns()
            owed, self._owed = self._owed, 0
        if owed:
            self._last_failed = False
        for _ in range(owed):
            self._tell(None)

    def _fail(self, batch: list[Pending], error: EdgedError, instance: LoadedModel | None) -> None:
        """A failed batch: tell the breaker (which may pause this scheduler), answer the
        callers, then hand the instance out again (None: it is stuck)."""
        with self._lock:  # the successes before it first, in order
            owed, self._owed = self._owed, 0
        for _ in range(owed):
            self._tell(None)
        self._last_failed = True
        self._tell(error)
        for p in batch:
            self._answer(p, error)
        if instance is not None:
            with self._lock:
                self._free.append(instance)
                self._work.notify()
                if self._closed:
                    self._quiet.notify_all()

    def _late_release(self, instance: LoadedModel) -> None:
        if self.on_late_release is not None:
            self.on_late_release(instance)

    # -- deadlines -------------------------------------------------------------------------

    def _deadline_error(self, p: Pending) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"model {self._label}: request timed out after "
            f"{(p.deadline_ns - p.enqueued_ns) / 1e6:g} ms"
        )

    def _start_watchdog_locked(self) -> None:
        if self._watchdog is None and not self._closed:
            self._watchdog = threading.Thread(
                target=self._watch_deadlines, name=f"edged-{self._label}-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch_deadline_locked(self, deadline_ns: int) -> None:
        """A new deadline: wake the watchdog if it would sleep past it."""
        self._start_watchdog_locked()
        if self._watch_at is None or deadline_ns < self._watch_at:
            self._watch.notify()

    def _watch_deadlines(self) -> None:
        """Fail requests past their deadline and batches past the inference timeout; sleep
        until the next deadline (at most the inference timeout, so that a batch started
        meanwhile is never missed)."""
        while True:
            with self._lock:
                if self._closed:
                    return
                expired, late = self._expire_locked(time.monotonic_ns())
            for p in expired:
                self._answer(p, self._deadline_error(p))
            for run, answer in late:
                self._report_timeout(run, answer)
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic_ns()
                wake = self._next_deadline_locked()
                if self._timeout_ns:
                    wake = min(wake or now + self._timeout_ns, now + self._timeout_ns)
                self._watch_at = wake
                self._watch.wait(None if wake is None else max(wake - now, 0) / 1e9)
                self._watch_at = None

    def _expire_locked(
        self, now: int
    ) -> tuple[list[Pending], list[tuple[_Running, list[Pending]]]]:
        """Requests past their deadline (queued: removed; running: answered early, their
        batch goes on) and batches past the inference timeout, each marked finished."""
        expired = [
            p
            for q in self._queues
            for p in q
            if p.deadline_ns and p.deadline_ns <= now and not p.finished
        ]
        if expired:
            self._remove_locked(expired)
        late: list[tuple[_Running, list[Pending]]] = []
        for run in self._running:
            if run.timed_out:
                continue
            if run.deadline_ns and run.deadline_ns <= now:
                run.timed_out = True
                self._failed_ns = now
                self._stuck.add(run.instance)
                if run.inline:
                    self._inline = False  # the caller's thread hung: never again inline
                answer = [p for p in run.batch if not p.finished]
                for p in answer:
                    p.finished = True
                late.append((run, answer))
            else:
                expired += [
                    p
                    for p in run.batch
                    if p.deadline_ns and p.deadline_ns <= now and not p.finished
                ]
        for p in expired:
            p.finished = True
        if late:
            self._quiet.notify_all()
        return expired, late

    def _next_deadline_locked(self) -> int | None:
        deadlines = [
            p.deadline_ns for q in self._queues for p in q if p.deadline_ns and not p.finished
        ]
        for run in self._running:
            if not run.timed_out:
                if run.deadline_ns:
                    deadlines.append(run.deadline_ns)
                deadlines += [p.deadline_ns for p in run.batch if p.deadline_ns and not p.finished]
        return min(deadlines) if deadlines else None

    def _report_timeout(self, run: _Running, answer: list[Pending]) -> None:
        log.warning(
            "inference_timeout",
            model=self._label,
            executor=run.instance.kind,
            timeout_s=self._timeout_s,
            batch_size=sum(p.size for p in run.batch),
            inline=run.inline,
        )
        error = ExecutorTimeoutError(
            f"model {self._label}: {run.instance.kind} inference did not finish within "
            f"{self._timeout_s:g}s (executors.inference_timeout_s); the instance is out "
            f"of use until it returns"
        )
        self._on_loop(self._fail, answer, error, None)

    # -- stopping --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Fail what is still queued, wait for running batches, stop the threads (without
        waiting for stuck ones)."""
        with self._lock:
            self._closed = True
            queued = [p for q in self._queues for p in q if not p.finished]
            for p in queued:
                p.finished = True
            for q in self._queues:
                q.clear()
            self._waiting = 0
            self._work.notify_all()
            self._watch.notify_all()
        error = UnavailableError(f"model {self._label} is unloading")
        for p in queued:
            self._answer(p, error)
        # A stuck thread may never return: do not wait for it (its instance is released
        # through on_late_release when it does).
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        with self._lock:
            while any(not run.timed_out for run in self._running):
                self._quiet.wait()
            stuck_threads = len(self._stuck)
        if stuck_threads:
            return  # a worker is inside a hung call; the rest exit on their own
        for thread in self._threads:
            thread.join()
        if self._watchdog is not None:
            self._watchdog.join()
