"""A CPU bandwidth limit (the CFS quota of a cgroup: v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``
over ``cpu.cfs_period_us``; what ``docker run --cpus`` and systemd's ``CPUQuota=`` set) and
what it does to one request's time on the device.

Under a quota the kernel lets the group's threads run ``quota`` of CPU time per ``period``
and then holds them until the period ends. A request that needs more CPU than one quota
pays the rest of a period for each quota it uses up, however short its parts are: measured
on a device at 1 ms per 8 ms (docs/partition.md, "Run 6"), the latency of 6 of 7 cuts was
the greater of :meth:`CpuLimit.bound_s` of the CPU the device spent on a request and the
parts' sum, to within 5 %; the seventh took one period more. The profile's per-part wall
times had missed by a period either way.

Pure but for :func:`detect`, which reads this process's cgroup files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edged.core.errors import ConfigError

#: a quota within this of a whole number of quotas counts as that number (float noise)
_EPSILON = 1e-9


@dataclass(frozen=True)
class CpuLimit:
    """``quota_s`` of CPU time per ``period_s`` of wall time, for all of a group's threads."""

    quota_s: float
    period_s: float

    def __post_init__(self) -> None:
        for name, value in (("quota", self.quota_s), ("period", self.period_s)):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"CPU limit {name} {value!r} must be a number > 0")

    @property
    def fraction(self) -> float:
        """The share of one CPU the limit allows (may exceed 1 on several CPUs)."""
        return self.quota_s / self.period_s

    def bound_s(self, cpu_s: float) -> float:
        """The wall time ``cpu_s`` of CPU takes under the limit, starting with a period's
        quota in hand: each whole quota used up waits out the rest of its period, then the
        remainder runs. Work that fits one quota runs at full speed."""
        if cpu_s <= self.quota_s or self.quota_s >= self.period_s:
            return max(cpu_s, 0.0)
        full = math.ceil(cpu_s / self.quota_s - _EPSILON) - 1
        return full * self.period_s + (cpu_s - full * self.quota_s)

    def describe(self) -> str:
        return (
            f"{self.quota_s * 1000:g} ms of CPU per {self.period_s * 1000:g} ms "
            f"({self.fraction:.1%} of a CPU)"
        )

    @classmethod
    def parse(cls, text: str) -> CpuLimit:
        """``QUOTA_MS/PERIOD_MS``, e.g. ``1/8``.

        Raises:
            ConfigError: not two numbers > 0 separated by ``/``.
        """
        quota, sep, period = text.partition("/")
        try:
            if not sep:
                raise ValueError(text)
            return cls(float(quota) / 1000, float(period) / 1000)
        except ValueError:
            raise ConfigError(
                f"CPU limit {text!r}: expected QUOTA_MS/PERIOD_MS, e.g. 1/8"
            ) from None


def detect(
    cgroup_file: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> CpuLimit | None:
    """The CPU limit this process runs under: the most restrictive CFS quota of its cgroup
    and the cgroups above it (v2 ``cpu.max``; v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``
    under the ``cpu`` controller's mount, ``cpu`` or ``cpu,cpuacct``). None: no quota
    (``max``, ``-1``), or the files are not there to read."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    found: list[CpuLimit] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        names = controllers.split(",")
        if controllers == "":
            mounts = [root]
        elif "cpu" in names:
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        for mount in dict.fromkeys(mounts):
            if mount.is_dir():
                found += _limits(mount, path, v2=controllers == "")
                break
    return min(found, key=lambda lim: lim.fraction, default=None)


def _limits(mount: Path, path: str, *, v2: bool) -> list[CpuLimit]:
    """The quotas set on ``path`` under ``mount`` and on each cgroup above it."""
    limits = []
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        folder = mount.joinpath(*parts[:depth])
        limit = _read_v2(folder) if v2 else _read_v1(folder)
        if limit is not None:
            limits.append(limit)
    return limits


def _read_v2(folder: Path) -> CpuLimit | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return CpuLimit(int(quota) / 1e6, int(period) / 1e6)
    except (OSError, ValueError, ConfigError):
        return None


def _read_v1(folder: Path) -> CpuLimit | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        if quota <= 0:
            return None
        return CpuLimit(quota / 1e6, period / 1e6)
    except (OSError, ValueError, ConfigError):
        return None
