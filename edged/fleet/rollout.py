"""The rules of a fleet rollout, with no I/O: which devices go next, what one device's update
came to, when to halt, and the verdict (``edged-fleet rollout``, docs/ota.md).

``edged.fleet.cli`` does the I/O (StartUpdate and GetUpdateStatus over each device's management
API, the clock, the threads) and asks this module what to do, as ``edged.ota.updater`` asks
``edged.ota.state``::

    plan = Rollout(devices, canary=1, wave_size=1, max_failures=0)
    while wave := plan.next_wave():
        plan.record([update(device) for device in wave])   # settle() judges each status
    verdict = plan.verdict()                                # exit_code 0 or 1

The first ``canary`` devices are wave 1; the rest follow in waves of ``wave_size``, in the
order given. Each wave comes to rest whole before the next starts, and no further wave starts
once more than ``max_failures`` devices have failed: the devices not started are SKIPPED.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edged.ota.state import State

#: The update states a device's update comes to rest in.
AT_REST = frozenset({State.COMMITTED, State.FAILED, State.ROLLED_BACK})


class Outcome(enum.StrEnum):
    """What a rollout did on one device."""

    COMMITTED = "COMMITTED"
    """The update came to rest committed: the device serves the new version."""
    ALREADY = "ALREADY_AT_VERSION"
    """Nothing to do: the version asked for (or the latest) is committed on the device."""
    FAILED = "FAILED"
    """The update stopped before the new version served; the old version serves."""
    ROLLED_BACK = "ROLLED_BACK"
    """The new version failed its health window; the old version serves again."""
    ERROR = "ERROR"
    """The device refused StartUpdate, could not be reached, or its status went missing."""
    TIMED_OUT = "TIMED_OUT"
    """The update had not come to rest within the health timeout."""
    SKIPPED = "SKIPPED"
    """Never asked to update: the rollout halted before this device's wave."""

    @property
    def succeeded(self) -> bool:
        return self in (Outcome.COMMITTED, Outcome.ALREADY)

    @property
    def failed(self) -> bool:
        return self in (Outcome.FAILED, Outcome.ROLLED_BACK, Outcome.ERROR, Outcome.TIMED_OUT)


@dataclass(frozen=True)
class UpdateView:
    """What a device's management API says about one model's latest update (the fields of
    edged.v1.UpdateStatus a rollout reads), as plain values."""

    update_id: int
    state: str
    """An ``edged.ota.state.State`` name ("DOWNLOADING", "COMMITTED", ...)."""
    from_version: str = ""
    to_version: str = ""
    committed_version: str = ""
    last_error: str = ""


@dataclass(frozen=True)
class DeviceResult:
    """One device's line in the rollout report."""

    device: str
    outcome: Outcome
    from_version: str = ""
    to_version: str = ""
    last_error: str = ""
    wave: int = 0
    """The wave the device was in (1: the canary wave); 0 until the plan records it."""
    note: str = ""
    """Why nothing was done, for ALREADY_AT_VERSION (StartUpdate's reason)."""


# -- judging one device ----------------------------------------------------------------------


def settle(device: str, update_id: int, now: UpdateView) -> DeviceResult | None:
    """The result of the update ``update_id`` that StartUpdate began on ``device``, judged
    on its latest status ``now``; None while it is still under way."""
    if now.update_id != update_id:
        return DeviceResult(
            device,
            Outcome.ERROR,
            now.from_version,
            now.to_version,
            f"update {update_id} was superseded by update {now.update_id} ({now.state}) "
            "before it was seen at rest",
        )
    if now.state not in AT_REST:
        return None
    outcome = {
        State.COMMITTED: Outcome.COMMITTED,
        State.FAILED: Outcome.FAILED,
        State.ROLLED_BACK: Outcome.ROLLED_BACK,
    }[State(now.state)]
    return DeviceResult(device, outcome, now.from_version, now.to_version, now.last_error)


def already(device: str, now: UpdateView, reason: str) -> DeviceResult:
    """StartUpdate answered started=false: the version asked for is committed already."""
    version = now.committed_version
    return DeviceResult(device, Outcome.ALREADY, version, version, note=reason)


def refused(device: str, error: str) -> DeviceResult:
    """StartUpdate failed (an RPC error: refused, or the device unreachable)."""
    return DeviceResult(device, Outcome.ERROR, last_error=error)


def timed_out(
    device: str, last: UpdateView | None, timeout_s: float, rpc_error: str = ""
) -> DeviceResult:
    """The update did not come to rest within ``timeout_s`` of StartUpdate."""
    where = f"still {last.state}" if last is not None else "no status"
    error = f"not at rest within the health timeout ({timeout_s:g} s): {where}"
    if rpc_error:
        error += f"; last status call failed: {rpc_error}"
    if last is not None and last.last_error:
        error += f"; {last.last_error}"
    return DeviceResult(
        device,
        Outcome.TIMED_OUT,
        last.from_version if last else "",
        last.to_version if last else "",
        error,
    )


# -- the plan --------------------------------------------------------------------------------


def parse_device(text: str) -> str:
    """``text`` if it is HOST:PORT ("10.0.0.7:50051", "gw-3.lan:50051", "[::1]:50051").

    Raises:
        ValueError: no host, or a port that is not a number from 1 to 65535.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{text!r} is not HOST:PORT (an IPv6 host is written [ADDR])")
    elif ":" in host:
        raise ValueError(f"{text!r} is not HOST:PORT (write an IPv6 host as [ADDR]:PORT)")
    if any(c.isspace() for c in host):
        raise ValueError(f"{text!r} is not HOST:PORT (the host has a space)")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return text.strip()


@dataclass(frozen=True)
class Verdict:
    """How a rollout ended."""

    status: str
    """"completed" (every device asked, failures within the limit), "halted" (stopped with
    devices left unasked), "failed" (every device asked, more failures than allowed), or
    "unfinished" (asked while waves are still to run)."""
    succeeded: int
    failed: int
    skipped: int
    max_failures: int
    waves: int
    """Waves started."""
    summary: str

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "completed" else 1


class Rollout:
    """Which devices update next, and whether to go on, for one rollout.

    Devices are updated in waves, in the order given: the first ``canary`` devices, then
    ``wave_size`` at a time. ``next_wave()`` hands out the next wave only after ``record()``
    has the results of the previous one, and none once more than ``max_failures`` devices
    have failed.

    Raises (constructor):
        ValueError: no devices, a device listed twice, ``canary`` below 1 or above the number
            of devices, ``wave_size`` below 1, or ``max_failures`` below 0.
    """

    def __init__(
        self,
        devices: Sequence[str],
        *,
        canary: int = 1,
        wave_size: int | None = None,
        max_failures: int = 0,
    ) -> None:
        if not devices:
            raise ValueError("no devices to update")
        seen: set[str] = set()
        for device in devices:
            if device in seen:
                raise ValueError(f"device {device} is listed twice")
            seen.add(device)
        if not 1 <= canary <= len(devices):
            raise ValueError(
                f"canary must be from 1 to the number of devices ({len(devices)}), not {canary}"
            )
        wave_size = canary if wave_size is None else wave_size
        if wave_size < 1:
            raise ValueError(f"wave size must be at least 1, not {wave_size}")
        if max_failures < 0:
            raise ValueError(f"max failures must be 0 or more, not {max_failures}")
        self.devices = list(devices)
        self.canary = canary
        self.wave_size = wave_size
        self.max_failures = max_failures
        self._waves = [self.devices[:canary]] + [
            self.devices[i : i + wave_size] for i in range(canary, len(self.devices), wave_size)
        ]
        self._results: dict[str, DeviceResult] = {}
        self._started = 0  # waves handed out
        self._open: list[str] = []  # the wave handed out and not yet recorded

    @property
    def waves(self) -> list[list[str]]:
        """Every wave the plan would run, none halted."""
        return [list(w) for w in self._waves]

    @property
    def waves_started(self) -> int:
        """Waves handed out so far (the current one included)."""
        return self._started

    @property
    def failures(self) -> int:
        return sum(r.outcome.failed for r in self._results.values())

    @property
    def halted(self) -> bool:
        """More than ``max_failures`` devices failed: no further wave starts."""
        return self.failures > self.max_failures

    def next_wave(self) -> list[str]:
        """The devices to update now (wave number ``len(waves started)``), or [] when the
        rollout is over: every wave ran, or it halted.

        Raises:
            RuntimeError: the previous wave's results are not all recorded.
        """
        if self._open:
            raise RuntimeError(f"wave {self._started} is not recorded yet: {self._open}")
        if self.halted or self._started == len(self._waves):
            return []
        wave = self._waves[self._started]
        self._started += 1
        self._open = list(wave)
        return list(wave)

    def record(self, results: Iterable[DeviceResult]) -> None:
        """The results of the current wave's devices (all of them, in any order).

        Raises:
            ValueError: a result for a device outside the current wave, or a SKIPPED one.
            RuntimeError: results missing for some of the wave's devices.
        """
        got: dict[str, DeviceResult] = {}
        for result in results:
            if result.device not in self._open or result.device in got:
                raise ValueError(f"{result.device} is not an open device of the current wave")
            if result.outcome is Outcome.SKIPPED:
                raise ValueError(f"{result.device}: a started device cannot be SKIPPED")
            got[result.device] = result
        missing = [d for d in self._open if d not in got]
        if missing:
            raise RuntimeError(f"wave {self._started} lacks results for {missing}")
        for device, result in got.items():
            self._results[device] = DeviceResult(
                device,
                result.outcome,
                result.from_version,
                result.to_version,
                result.last_error,
                self._started,
                result.note,
            )
        self._open = []

    def results(self) -> list[DeviceResult]:
        """One result per device, in the order given; devices never started are SKIPPED."""
        return [
            self._results.get(device, DeviceResult(device, Outcome.SKIPPED))
            for device in self.devices
        ]

    def verdict(self) -> Verdict:
        """How the rollout ended (or stands, if waves are still to run)."""
        results = self.results()
        succeeded = sum(r.outcome.succeeded for r in results)
        failed = sum(r.outcome.failed for r in results)
        skipped = sum(r.outcome is Outcome.SKIPPED for r in results)
        limit = f"{failed} failed (at most {self.max_failures} allowed)"
        if skipped and self.halted:
            status = "halted"
            wave = "the canary wave" if self._started == 1 else f"wave {self._started}"
            summary = (
                f"rollout halted after {wave} of {len(self._waves)}: {limit}; "
                f"{succeeded} succeeded, {skipped} not started"
            )
        elif skipped:
            status = "unfinished"  # asked before every wave ran
            summary = f"rollout not finished: {skipped} devices not started yet"
        elif failed > self.max_failures:
            status = "failed"
            summary = f"rollout failed: {limit}; {succeeded} succeeded, every device was asked"
        else:
            status = "completed"
            summary = f"rollout completed: {succeeded} of {len(results)} devices succeeded, {limit}"
        return Verdict(
            status, succeeded, failed, skipped, self.max_failures, self._started, summary
        )
