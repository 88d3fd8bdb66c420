"""The daemon's lifecycle with its supervisor: systemd's notify protocol and watchdog, and the
hooks SIGHUP runs.

- ``Notifier`` speaks sd_notify(3): one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket
  named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). systemd sets
  it for ``Type=notify`` units; without it every call is a no-op. A send never blocks and
  never raises: losing a notification must not hurt serving.
- ``Watchdog`` sends ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` from a timer on the event
  loop, so the pings stop when the loop is wedged (a blocking call, a deadlock) and systemd
  restarts the daemon (``WatchdogSec=``, ``Restart=on-failure``).
- ``ReloadHooks`` is the registry SIGHUP runs: each part of the daemon that can safely take new
  settings without a restart adds a callback (the log level here; certificates and tokens are
  re-read by their own code, which hooks in the same way). A hook that fails is logged and
  the others still run; SIGHUP never stops the daemon.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger("edged.lifecycle")


def _address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]  # the abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # systemd also allows vsock addresses; edged does not run in a VM guest


class Notifier:
    """sd_notify over ``$NOTIFY_SOCKET``; every method is a no-op without it."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether a supervisor listens."""
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased) as one datagram; True if it went out."""
        if self.address is None:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as e:
            if not self._failed:  # once: a supervisor that went away must not flood the log
                log.warning("sd_notify_failed", address=self.address.lstrip("\0"), error=str(e))
                self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """READY=1: start-up is done (listeners bound)."""
        return self.send(ready=1, **({"status": status} if status else {}))

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send(stopping=1, **({"status": status} if status else {}))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping."""
        return self.send(watchdog=1)

    def status(self, text: str) -> bool:
        """STATUS=...: one line for ``systemctl status``."""
        return self.send(status=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is asked for, or it is asked of another process
    (``$WATCHDOG_PID``)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Watchdog:
    """``WATCHDOG=1`` every ``interval`` seconds from a timer on the running event loop."""

    def __init__(self, notifier: Notifier, interval: float) -> None:
        self._notifier = notifier
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Ping now, then every ``interval`` while the loop runs."""
        self._ping()

    def _ping(self) -> None:
        self._notifier.watchdog()
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._ping)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


ReloadHook = Callable[[], "Awaitable[None] | None"]


class ReloadHooks:
    """What SIGHUP reloads: named callbacks (plain or async), run in the order added."""

    def __init__(self) -> None:
        self._hooks: dict[str, ReloadHook] = {}

    def add(self, name: str, hook: ReloadHook) -> None:
        """Run ``hook`` on every reload (replacing one added under ``name`` before)."""
        self._hooks[name] = hook

    def names(self) -> list[str]:
        return list(self._hooks)

    async def run(self) -> dict[str, str]:
        """Run every hook; return {name: "ok" or the error}. A hook that raises is logged
        (``reload_failed``) and the rest still run; nothing is raised."""
        results: dict[str, str] = {}
        for name, hook in list(self._hooks.items()):
            try:
                outcome = hook()
                if inspect.isawaitable(outcome):
                    await outcome
                results[name] = "ok"
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"
                log.error("reload_failed", hook=name, error=results[name])
        return results
