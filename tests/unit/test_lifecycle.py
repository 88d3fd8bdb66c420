"""The systemd notify protocol, the event-loop watchdog and the reload hooks, without systemd:
a real AF_UNIX datagram socket stands where systemd's would."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.lifecycle import Notifier, ReloadHooks, Watchdog, watchdog_interval


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's $NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting now (without waiting for more)."""
    out = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


def test_messages_are_key_value_lines(supervisor) -> None:
    sock, path = supervisor
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="serving; loading models")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving; loading models"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_namespace_address() -> None:
    name = f"edged-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
        notifier.close()


def test_without_a_supervisor_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert not Notifier({}).ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not gone.ready()  # logged once, never raised
    assert not gone.watchdog()


def test_watchdog_interval_is_half_the_usec_for_this_process() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None


def test_a_wedged_loop_stops_the_pings(supervisor) -> None:
    sock, path = supervisor

    async def main() -> tuple[int, int, int]:
        watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path}), 0.02)
        watchdog.start()
        await asyncio.sleep(0.2)
        before = len(pending(sock))
        time.sleep(0.5)  # the loop is wedged: a blocking call on it  # noqa: ASYNC251
        during = len(pending(sock))  # what a wedged loop sent: nothing
        # free again: the pings come back
        after = len([await asyncio.to_thread(sock.recv, 4096)])
        watchdog.stop()
        return before, during, after

    before, during, after = asyncio.run(main())
    assert before >= 1
    assert during == 0
    assert after == 1


def test_reload_hooks_run_in_order_and_a_failure_stops_none() -> None:
    ran: list[str] = []
    hooks = ReloadHooks()
    hooks.add("a", lambda: ran.append("a"))

    def broken() -> None:
        raise ValueError("bad file")

    hooks.add("b", broken)

    async def later() -> None:
        ran.append("c")

    hooks.add("c", later)
    results = asyncio.run(hooks.run())
    assert ran == ["a", "c"]
    assert results == {"a": "ok", "b": "ValueError: bad file", "c": "ok"}
