"""A device's CPU limit (edged.partition.quota): the bound a CFS quota puts on a request's
CPU, table-tested, and the limit found in cgroup files (v1 and v2 layouts written under
tmp_path, and the real ones of this process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edged.core.errors import ConfigError
from edged.partition.quota import CpuLimit, detect

MS = 0.001
ONE_IN_EIGHT = CpuLimit(1 * MS, 8 * MS)


@pytest.mark.parametrize(
    ("cpu_ms", "wall_ms"),
    [
        (0.0, 0.0),
        (0.6, 0.6),  # within one quota: full speed
        (1.0, 1.0),  # exactly one quota: no wait
        (1.5, 8.5),  # one quota, the rest of its period, then 0.5
        (3.85, 24.85),  # measured: 3.85 ms of device CPU, 25.05 ms end to end (Run 6)
        (4.0, 25.0),
        (4.08, 32.08),  # 0.08 ms more CPU costs a whole period
        (8.95, 64.95),  # measured all local: 8.95 ms CPU, 65.3 ms
    ],
)
def test_a_quota_bounds_a_request_by_whole_periods(cpu_ms: float, wall_ms: float) -> None:
    assert ONE_IN_EIGHT.bound_s(cpu_ms * MS) == pytest.approx(wall_ms * MS)


def test_a_limit_of_a_whole_cpu_or_more_bounds_nothing() -> None:
    assert CpuLimit(100 * MS, 100 * MS).bound_s(0.5) == 0.5
    assert CpuLimit(200 * MS, 100 * MS).bound_s(0.5) == 0.5
    assert CpuLimit(50 * MS, 100 * MS).bound_s(0.04) == pytest.approx(0.04)
    assert CpuLimit(50 * MS, 100 * MS).fraction == 0.5


@pytest.mark.parametrize("text", ["8", "1/0", "a/b", "-1/8", "1/"])
def test_a_limit_that_does_not_parse_is_named(text: str) -> None:
    with pytest.raises(ConfigError, match="CPU limit"):
        CpuLimit.parse(text)


def test_a_limit_parses_from_milliseconds() -> None:
    assert CpuLimit.parse("1/8") == ONE_IN_EIGHT
    assert "12.5%" in ONE_IN_EIGHT.describe()


def _write(root: Path, rel: str, files: dict[str, str]) -> None:
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")


def test_a_v1_quota_is_found_and_the_tightest_above_wins(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text("4:memory:/x\n3:cpu,cpuacct:/gw/edged\n0::/\n")
    _write(root, "cpu,cpuacct", {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"})
    _write(root, "cpu,cpuacct/gw", {"cpu.cfs_quota_us": "25000", "cpu.cfs_period_us": "100000"})
    _write(root, "cpu,cpuacct/gw/edged", {"cpu.cfs_quota_us": "1000", "cpu.cfs_period_us": "4000"})
    assert detect(cgroup, root) == CpuLimit(1 * MS, 4 * MS)
    # the group above is tighter: it is the one that holds the device back
    _write(root, "cpu,cpuacct/gw", {"cpu.cfs_quota_us": "10000", "cpu.cfs_period_us": "100000"})
    assert detect(cgroup, root) == CpuLimit(10 * MS, 100 * MS)


def test_a_v2_quota_is_found_and_max_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text("0::/system.slice/edged.service\n")
    _write(root, "", {"cpu.max": "max 100000"})
    _write(root, "system.slice", {"cpu.max": "max 100000"})
    _write(root, "system.slice/edged.service", {"cpu.max": "max 100000"})
    assert detect(cgroup, root) is None
    _write(root, "system.slice/edged.service", {"cpu.max": "50000 100000"})  # CPUQuota=50%
    assert detect(cgroup, root) == CpuLimit(50 * MS, 100 * MS)


def test_no_cgroup_files_no_limit(tmp_path: Path) -> None:
    assert detect(tmp_path / "absent", tmp_path) is None
    garbled = tmp_path / "self-cgroup"
    garbled.write_text("nonsense\n3:cpu:/\n")
    _write(tmp_path / "cgroup", "cpu", {"cpu.cfs_quota_us": "many", "cpu.cfs_period_us": "1"})
    assert detect(garbled, tmp_path / "cgroup") is None


def test_this_process_limit_is_read_without_error() -> None:
    found = detect()  # whatever this machine says: None, or a limit that parses
    assert found is None or found.fraction > 0
