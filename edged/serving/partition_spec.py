"""model.toml's ``[partition]``: the cuts a split model may serve, their measured costs, and
whether (and how) the daemon re-plans the cut as the measured link changes
(docs/partition.md "Re-planning"; the work itself is ``edged.serving.replan``).

```toml
executors = ["remote", "cpu-onnx"]

[remote]                               # the cut served at load: one of partition.cuts
address = "server.example:8001"
model = "cls_tail_a"
head = "head_a.onnx"

[partition]
profile = "device.json"                # this device's `edged partition --profile-out`
server_profile = "server.json"         # the server's; default: the device's stands in
replan = true
objective = "latency"                  # or "device_cpu"
threshold = 0.25                       # re-plan when bandwidth (or RTT) moved by this fraction
min_interval_ms = 2000                 # at most one switch of cut per this
probe_interval_ms = 250                # a round-trip probe this often (and a payload probe
probe_bytes = 65536                    #   of this size while all local: no traffic to measure)
byte_cost_ns = 0                       # device_cpu: CPU per byte on the wire
calibrate = false                      # scale the profiles by what the served cut measures

[partition.cuts]                       # cut tensor -> its head here and its tail there
"elementwise_add_3" = { head = "head_a.onnx", model = "cls_tail_a" }
"<inputs>" = { model = "cls" }         # all remote: no head, the whole model there
```

All local (``<local>``: the whole model on the next executor of ``executors``) is always a
choice. Pure rules, no I/O but reading the profile files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.core.errors import ConfigError, ModelLoadError
from edged.partition.graph import INPUTS_CUT
from edged.partition.planner import ALL_LOCAL, OBJECTIVES, CutCost, Objective
from edged.partition.profile import Profile, cost_table
from hal.remote_target import RemoteTarget

_KEYS = {
    "profile",
    "server_profile",
    "replan",
    "objective",
    "threshold",
    "min_interval_ms",
    "probe_interval_ms",
    "probe_bytes",
    "byte_cost_ns",
    "calibrate",
    "cuts",
}


@dataclass(frozen=True)
class CutTarget:
    """Where one cut runs: its head in the version folder, its tail on the server."""

    cut: str
    """The cut tensor (``<inputs>``: no head, the request's inputs are sent)."""
    head: str
    """File of the head in the version folder; "" for ``<inputs>``."""
    model: str
    """The tail's model on the server."""
    version: str = ""
    """Its version there; "": the server's latest."""


@dataclass(frozen=True)
class PartitionSpec:
    """model.toml's ``[partition]``, validated, with the cost table its profiles make."""

    cuts: tuple[CutTarget, ...]
    """The cuts that may be served (their heads here, tails there), besides all local."""
    costs: tuple[CutCost, ...]
    """The planner's table for those cuts and all local (device heads, server tails)."""
    served_at_load: str
    """The cut ``[remote]`` names: what serves before the first plan."""
    replan: bool = False
    """Re-plan as the measured link changes, switching cuts through the swap."""
    objective: Objective = "latency"
    """What the planner minimises: end-to-end ``latency`` or the device's CPU time."""
    byte_cost_s: float = 0.0
    """device_cpu: the device's CPU seconds per byte sent or answered."""
    threshold: float = 0.25
    """Re-plan when the bandwidth (or the round trip, past 1 ms) moved by more than this
    fraction of the figures of the last plan; 0.01 to 10."""
    min_interval_s: float = 2.0
    """At most one switch of cut per this many seconds (no flapping); 0 to 3600."""
    probe_interval_s: float = 0.25
    """A round-trip probe (an empty call) this often; 0.05 to 60."""
    probe_bytes: int = 65536
    """Payload of the probe that measures the bandwidth while all local (no real traffic
    crosses the link then); 4096 to 16 MiB."""
    calibrate: bool = False
    """Scale the profiles' device costs by how much slower (or faster) the served cut's
    head (all local: the whole model) runs on the serving path than its profile says, and
    the server's by the tail's time from the server's statistics, then plan on them (and
    re-plan when a factor moves by ``threshold``). Off for profiles that are not this
    device's and that server's (simulated ones)."""

    def target(self, cut: str) -> CutTarget:
        """The cut's head and tail.

        Raises:
            KeyError: not one of ``cuts``.
        """
        for c in self.cuts:
            if c.cut == cut:
                return c
        raise KeyError(cut)


def _fail(path: Path, message: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {message}")


def _number(
    path: Path, raw: dict[str, Any], key: str, default: float, low: float, high: float
) -> float:
    value = raw.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and low <= value <= high)
    ):
        raise _fail(path, f"'partition.{key}' must be a number from {low:g} to {high:g}")
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _profile(path: Path, key: str, file: str) -> Profile:
    where = path.parent / file
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _fail(path, f"'partition.{key}' {where}: {e}") from e
    try:
        return Profile.from_json(data, str(where))
    except ConfigError as e:
        raise _fail(path, f"'partition.{key}': {e}") from e


def _cuts(path: Path, raw: Any) -> tuple[CutTarget, ...]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "'partition.cuts' must be a table: cut tensor = { head, model }")
    cuts = []
    for cut, item in raw.items():
        where = f"partition.cuts.{cut}"
        if cut == ALL_LOCAL:
            raise _fail(path, f"'{where}': all local is always a choice; do not list it")
        if not isinstance(item, dict):
            raise _fail(path, f"'{where}' must be a table {{ head, model }}")
        unknown = set(item) - {"head", "model", "version"}
        if unknown:
            raise _fail(path, f"unknown key '{where}.{sorted(unknown)[0]}'")
        head, model, version = item.get("head", ""), item.get("model"), item.get("version", "")
        if not isinstance(model, str) or not model:
            raise _fail(path, f"'{where}.model' must be the tail's model name on the server")
        if not isinstance(version, str) or not (version == "" or version.isdigit()):
            raise _fail(path, f"'{where}.version' must be a version number (or empty)")
        if not isinstance(head, str) or "/" in head or "\\" in head or head.startswith("."):
            raise _fail(path, f"'{where}.head' must be a file name inside the version folder")
        if (cut == INPUTS_CUT) != (head == ""):
            raise _fail(
                path,
                f"'{where}.head' must be "
                + ("empty: the inputs cut has no head" if cut == INPUTS_CUT else "given"),
            )
        cuts.append(CutTarget(cut, head, model, version))
    return tuple(cuts)


def _costs(path: Path, raw: dict[str, Any], cuts: tuple[CutTarget, ...]) -> dict[str, CutCost]:
    """The profiles' cost table by cut; every listed cut must be in it."""
    for key in ("profile", "server_profile"):
        if key in raw and not (isinstance(raw[key], str) and raw[key]):
            raise _fail(path, f"'partition.{key}' must be a file name (in the model folder)")
    if "profile" not in raw:
        raise _fail(
            path,
            "'partition.profile' is missing: this device's profile "
            "(edged partition MODEL --profile-out FILE)",
        )
    device = _profile(path, "profile", raw["profile"])
    server = (
        _profile(path, "server_profile", raw["server_profile"])
        if "server_profile" in raw
        else device
    )
    try:
        table = cost_table(device, server)
    except ConfigError as e:
        raise _fail(path, f"'partition.server_profile': {e}") from e
    by_cut = {c.cut: c for c in table}
    for c in cuts:
        if c.cut not in by_cut:
            raise _fail(path, f"'partition.cuts.{c.cut}': not a cut both profiles measured")
    return by_cut


def parse_partition(path: Path, raw: Any, remote: RemoteTarget | None) -> PartitionSpec:
    """model.toml's ``[partition]`` (``path``: the model.toml), reading its profiles.

    Raises:
        ModelLoadError: an unknown key, a bad value, an unreadable profile, a cut the
            profiles lack, or ``[remote]`` serving a cut not listed; each named.
    """
    if not isinstance(raw, dict):
        raise _fail(path, "'partition' must be a table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise _fail(path, f"unknown key 'partition.{sorted(unknown)[0]}'")
    if remote is None:
        raise _fail(path, "'partition' needs a [remote] table (the server of the tails)")
    for key in ("replan", "calibrate"):
        if not isinstance(raw.get(key, False), bool):
            raise _fail(path, f"'partition.{key}' must be true or false")
    objective = raw.get("objective", "latency")
    if objective not in OBJECTIVES:
        raise _fail(path, f"'partition.objective' must be one of {', '.join(OBJECTIVES)}")
    if not _is_int(raw.get("probe_bytes", 65536)):
        raise _fail(path, "'partition.probe_bytes' must be an integer from 4096 to 16777216")
    cuts = _cuts(path, raw.get("cuts"))
    by_cut = _costs(path, raw, cuts)
    served = [
        c.cut
        for c in cuts
        if (c.head, c.model, c.version) == (remote.head, remote.model, remote.version)
    ]
    if not served:
        raise _fail(
            path,
            f"[remote] (head '{remote.head}', model '{remote.model}') is none of "
            "'partition.cuts': list the cut it serves there",
        )
    return PartitionSpec(
        cuts=cuts,
        costs=(*(by_cut[c.cut] for c in cuts), by_cut[ALL_LOCAL]),
        served_at_load=served[0],
        replan=raw.get("replan", False),
        calibrate=raw.get("calibrate", False),
        objective=objective,
        byte_cost_s=_number(path, raw, "byte_cost_ns", 0.0, 0.0, 1e9) * 1e-9,
        threshold=_number(path, raw, "threshold", 0.25, 0.01, 10.0),
        min_interval_s=_number(path, raw, "min_interval_ms", 2000, 0, 3_600_000) / 1000,
        probe_interval_s=_number(path, raw, "probe_interval_ms", 250, 50, 60_000) / 1000,
        probe_bytes=int(_number(path, raw, "probe_bytes", 65536, 4096, 16 * 1024 * 1024)),
    )
