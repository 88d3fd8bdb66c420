"""``Scheduler.withdraw``: a thread-side caller that went away (a gRPC client that cancelled or
passed its deadline) drops its request while it is queued; once it runs, the answer comes as
usual. On the recording model of test_scheduler.py (a test double at the executor boundary)."""

from __future__ import annotations

import threading

from edged.core.errors import EdgedError
from edged.serving.scheduler import Result
from tests.unit.test_scheduler import Recording, started, until, x


class Replies:
    """Collects ``post`` replies from whichever thread answers."""

    def __init__(self) -> None:
        self.got: list[Result | EdgedError] = []
        self.event = threading.Event()

    def __call__(self, outcome: Result | EdgedError) -> None:
        self.got.append(outcome)
        self.event.set()


async def test_a_queued_request_is_dropped_and_never_answered() -> None:
    model = Recording()
    scheduler = await started(model)
    model.gate.clear()
    running, queued = Replies(), Replies()
    first = scheduler.post(x(1), 1, 0, 0, running)
    await until(lambda: model.entered == 1)
    second = scheduler.post(x(2), 1, 0, 0, queued)
    assert scheduler.queue_depth == 1
    assert scheduler.withdraw(second) is True
    assert scheduler.queue_depth == 0
    assert scheduler.withdraw(second) is False  # once only
    assert scheduler.withdraw(first) is False  # running: it goes on
    model.gate.set()
    await until(running.event.is_set)
    await scheduler.stop()
    assert model.batches == [[1.0]]  # the withdrawn request never ran
    assert queued.got == []
    assert not isinstance(running.got[0], EdgedError)


async def test_an_answered_request_is_not_withdrawn() -> None:
    model = Recording()
    scheduler = await started(model)
    replies = Replies()
    pending = scheduler.post(x(3), 1, 0, 0, replies, inline=True)  # idle: runs right here
    assert replies.event.is_set()
    assert scheduler.withdraw(pending) is False
    await scheduler.stop()
    assert len(replies.got) == 1
