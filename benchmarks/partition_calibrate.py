"""Calibration by the served times on a real split: profiles taken on an idle device and
server, then one side gets slower as served; does ``[partition] calibrate = true`` move the
cut to the one that is best now, how fast, and how close to the best by exhaustive
measurement?

The machinery is benchmarks/partition.py's (imported): a *server* edged (2 runtime threads)
in a network namespace behind a veth pair shaped by ``tc tbf``, a *device* edged on the host
(1 runtime thread, 1 instance) in a cgroup v1 CPU quota; here the server also runs in a
cgroup of its own, so that it can be slowed too. The model is the PP-OCR direction classifier
fed a batch of ``--lines`` rendered text lines, every cut with a head sending FP16.

1. Real profiles, as an operator takes them: ``edged partition --profile-out`` on the server
   (in its namespace, no quota) and on the device (in its cgroup, at the ``--device-quota``
   it normally has), both idle.
2. The device daemon serves ``cls`` with ``replan = true`` and ``calibrate = true`` over
   those profiles (the defaults otherwise: threshold 0.25, min_interval_ms 2000,
   probe_interval_ms 250), every profiled cut deployed (its head here, its tail there), and
   beside it one model per cut (benchmarks/partition.py's ``build_repos``) for the exhaustive
   measurement. One client sends ``cls`` sequential requests all along.
3. Per bandwidth and per change (``device``: the device's quota lowered to
   ``--slow-device-quota``, as a CPU quota applied after profiling or another process busy
   on its core; ``server``: the server's cgroup given ``--slow-server-quota`` % of one core,
   as a load on it): settle at the normal condition; apply the change; read the daemon's log
   for the factors it measured (``partition_calibrated``) and the switches
   (``partition_replanned``) until none came for ``--settle`` s and ``--change-wait`` s have
   passed; then every cut is measured under the new condition (sequential requests in
   rounds, the ``cls`` client paused) and the finalists again; then the change is undone and
   the way back is read the same way (for at least ``--back-wait`` s).

With ``calibrate = false`` the daemon keeps the cut the profiles choose on the link (which
does not change here): that cut (the pure planner on the two profiles, the shaped rate and a
1 ms round trip) is among those measured again, and its latency under the new condition is
the uncalibrated figure.

    sudo .venv/bin/python benchmarks/partition_calibrate.py [--bandwidths 25,100]
        [--changes device,server] [--device-quota 25] [--slow-device-quota 12.5]
        [--slow-server-quota 12.5] [--every 4] [--lines 6] [--out FILE]

Needs root (namespaces, tc, cgroup v1 cpu). Prints progress on stderr, JSON on stdout. Never
pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchmarks.partition as bench  # noqa: E402
from benchmarks.partition import (  # noqa: E402
    PRIORITY_SHARES,
    Daemon,
    build_repos,
    end_to_end_ms,
    in_cgroup,
    log,
    namespace,
    partition,
    set_quota,
    shape,
)
from edged.partition import graph  # noqa: E402
from edged.partition.planner import ALL_LOCAL, Link, plan  # noqa: E402
from edged.partition.profile import Profile, cost_table, select  # noqa: E402
from tests import corpus  # noqa: E402

SERVER_CGROUP = Path("/sys/fs/cgroup/cpu/edged-calib-server")
MODEL = "cls"

# names of its own for the namespace, the veth, the addresses and the device's cgroup, read
# by benchmarks/partition.py's functions: the two benchmarks can run at once on one machine
bench.NS = "edged-calib-srv"
bench.HOST_IF, bench.NS_IF = "edc-host", "edc-srv"
bench.HOST_IP, bench.NS_IP = "10.78.0.1", "10.78.0.2"
bench.CGROUP = Path("/sys/fs/cgroup/cpu/edged-calib-device")
NS_IP, SERVER_PORT = bench.NS_IP, bench.SERVER_PORT


def server_quota(percent: float | None) -> None:
    """The server's cgroup: ``percent`` of one core (1 ms per period), or no quota."""
    SERVER_CGROUP.mkdir(exist_ok=True)
    (SERVER_CGROUP / "cpu.shares").write_text(str(PRIORITY_SHARES))
    (SERVER_CGROUP / "cpu.cfs_quota_us").write_text("-1")
    if percent is not None:
        (SERVER_CGROUP / "cpu.cfs_period_us").write_text(str(round(100_000 / percent)))
        (SERVER_CGROUP / "cpu.cfs_quota_us").write_text("1000")


def in_server_cgroup() -> list[str]:
    return [
        "sh", "-c", f'echo $$ > {SERVER_CGROUP}/cgroup.procs && exec "$@"', "sh",
        "ip", "netns", "exec", bench.NS,
    ]  # fmt: skip


def calibrated_model(
    device_repo: Path, server_repo: Path, whole: Path, cuts: list[str], work: Path, wire: str
) -> None:
    """``cls`` in the device's repository (every cut's head, the two profiles, replan and
    calibrate), its own tails ``k<i>`` on the server (so the exhaustive measurement's requests
    do not enter the server's statistics of the tails ``cls`` serves)."""
    model = graph.load(whole)
    folder = device_repo / MODEL
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(whole, folder / "1" / "model.onnx")
    shutil.copyfile(work / "device.json", folder / "device.json")
    shutil.copyfile(work / "server.json", folder / "server.json")
    table = []
    for i, tensor in enumerate(cuts):
        parts = graph.split(model, tensor, "" if tensor == graph.INPUTS_CUT else wire)
        (server_repo / f"k{i}" / "1").mkdir(parents=True)
        graph.save(parts.tail, server_repo / f"k{i}" / "1" / "model.onnx")
        head = ""
        if parts.head is not None:
            graph.save(parts.head, folder / "1" / f"head_{i}.onnx")
            head = f'head = "head_{i}.onnx", '
        table.append(f'"{tensor}" = {{ {head}model = "k{i}" }}')
    (folder / "model.toml").write_text(
        f'name = "{MODEL}"\ninstances = 1\nexecutors = ["remote", "cpu-onnx"]\n\n'
        f'[remote]\naddress = "{NS_IP}:{SERVER_PORT}"\nmodel = "k0"\n'
        "insecure = true  # a private veth link on one machine\n"
        "timeout_ms = 60000\nretries = 0\n\n"
        '[partition]\nprofile = "device.json"\nserver_profile = "server.json"\n'
        "replan = true\ncalibrate = true\n\n[partition.cuts]\n" + "\n".join(table) + "\n"
    )


class Events:
    """The device daemon's log events about ``cls``'s partition, with their own timestamps."""

    def __init__(self, daemon: Daemon, keep: Path | None) -> None:
        self.daemon = daemon
        self.events: list[dict[str, Any]] = []
        self.keep = keep.open("w") if keep else None  # the whole log, for reading later
        self.cut = ""  # what [remote] names at load: the inputs cut

    def read(self) -> None:
        while True:
            try:
                line = self.daemon.lines.get_nowait()
            except queue.Empty:
                return
            if self.keep:
                self.keep.write(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if not isinstance(event, dict) or event.get("model") != MODEL:
                    continue
                if not str(event.get("event", "")).startswith("partition_"):
                    continue
                event["at"] = datetime.fromisoformat(event["timestamp"]).timestamp()
                self.events.append(event)
                if event["event"] == "partition_replanned":
                    self.cut = event["to"]

    def since(self, at: float, name: str) -> list[dict[str, Any]]:
        self.read()
        return [e for e in self.events if e["at"] >= at and e["event"] == name]

    def settle(self, since: float, quiet_s: float, limit_s: float, least_s: float = 0) -> bool:
        """Wait until no switch of cut came for ``quiet_s`` seconds, and ``least_s`` have
        passed (at most ``limit_s`` after ``since``); whether it settled."""
        while time.time() < since + limit_s:
            time.sleep(0.5)
            switches = self.since(since, "partition_replanned")
            last = switches[-1]["at"] if switches else since
            if time.time() - last >= quiet_s and time.time() >= since + least_s:
                return True
        return False


class Client:
    """One thread sending ``cls`` sequential requests, each outcome timed (pausable)."""

    def __init__(self, address: str, x: np.ndarray) -> None:
        self.outcomes: list[tuple[float, float, bool]] = []  # (end, seconds, succeeded)
        self.errors: list[str] = []
        self.go = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(address, x), daemon=True)
        self.go.set()
        self._thread.start()

    def _run(self, address: str, x: np.ndarray) -> None:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(address) as client:
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            while not self._stop.is_set():
                if not self.go.wait(0.1):
                    continue
                started = time.perf_counter()
                try:
                    client.infer(MODEL, [tensor], client_timeout=120)
                    ok = True
                except grpcclient.InferenceServerException as e:
                    ok = False
                    with self._lock:
                        self.errors.append(f"{time.time():.3f} {e.status()}: {e.message()}")
                with self._lock:
                    self.outcomes.append((time.time(), time.perf_counter() - started, ok))

    def window(self, start: float, end: float) -> dict[str, Any]:
        with self._lock:
            got = [(s, ok) for at, s, ok in self.outcomes if start <= at < end]
        good = [s for s, ok in got if ok]
        return {
            "requests": len(got),
            "failed": len(got) - len(good),
            "median_ms": round(statistics.median(good) * 1000, 3) if good else None,
        }

    def stop(self) -> None:
        self._stop.set()
        self.go.set()
        self._thread.join(timeout=150)


def changed(args: argparse.Namespace, change: str, on: bool) -> str:
    """Apply (``on``) or undo a change; says what it is."""
    if change == "device":
        set_quota(args.slow_device_quota if on else args.device_quota)
        quota = args.slow_device_quota if on else args.device_quota
        return f"device quota {quota} % of one core"
    server_quota(args.slow_server_quota if on else None)
    return f"server quota {args.slow_server_quota} % of one core" if on else "server: no quota"


def reaction(
    events: Events, client: Client, at: float, args: argparse.Namespace, least_s: float = 0
) -> dict[str, Any]:
    """What the daemon did after a change at ``at``: factors read, switches, the cut it
    settled on and when, and the latency in the last ``--window`` seconds (after at least
    ``least_s``)."""
    settled = events.settle(at, args.settle, args.limit, least_s)
    end = time.time()
    switches = events.since(at, "partition_replanned")
    factors = events.since(at, "partition_calibrated")
    failed = events.since(at, "partition_replan_failed")
    return {
        "settled": settled,
        "cut": events.cut,
        "switches": [
            {
                "after_s": round(e["at"] - at, 3),
                "from": e["from"],
                "to": e["to"],
                "swap_s": e.get("seconds"),
                "device_scale": e.get("device_scale"),
                "server_scale": e.get("server_scale"),
                "link": [e.get("rtt_ms"), e.get("bandwidth_mbit")],
            }
            for e in switches
        ],
        "first_switch_s": round(switches[0]["at"] - at, 3) if switches else None,
        "last_switch_s": round(switches[-1]["at"] - at, 3) if switches else None,
        "factors": [
            {
                "after_s": round(e["at"] - at, 3),
                "cut": e["cut"],
                "device_scale": e["device_scale"],
                "server_scale": e["server_scale"],
                "device_ms": e.get("device_ms"),
                "server_ms": e.get("server_ms"),
                "choice": e["choice"],
            }
            for e in factors
        ],
        "replan_failed": [e.get("error") for e in failed],
        "latency": client.window(end - args.window, end),
        "requests": client.window(at, end),
    }


def sweep(
    device: Daemon, names: dict[str, str], x: np.ndarray, args: argparse.Namespace, keep: set[str]
) -> dict[str, Any]:
    """Every cut measured (sequential requests, in rounds), then the three best, all local,
    all remote and ``keep`` again with ``--confirm`` requests."""
    screened = end_to_end_ms(device.address, names, x, args.requests)
    splits = sorted(
        (c for c in screened if c not in (ALL_LOCAL, graph.INPUTS_CUT)), key=lambda c: screened[c]
    )
    finalists = {ALL_LOCAL, graph.INPUTS_CUT, *splits[:3], *(keep & set(names))}
    confirmed = end_to_end_ms(
        device.address, {c: n for c, n in names.items() if c in finalists}, x, args.confirm
    )
    best = min(confirmed, key=lambda c: confirmed[c])
    return {
        "best_cut": best,
        "best_ms": round(confirmed[best], 3),
        "confirmed_ms": {c: round(v, 3) for c, v in confirmed.items()},
        "screened_ms": {c: round(v, 3) for c, v in screened.items()},
    }


def profiles_choice(results: dict[str, Any], mbit: float) -> str:
    """The cut the profiles alone choose on the shaped rate and a 1 ms round trip: what a
    daemon without ``calibrate`` serves on this link (it re-plans on the link only)."""
    device, server = (
        Profile.from_json(results["profiles"][side], side) for side in ("device", "server")
    )
    return plan(cost_table(device, server), Link(0.001, mbit * 1e6)).choice.cut


def scenario(
    args: argparse.Namespace,
    mbit: float,
    change: str,
    device: Daemon,
    events: Events,
    client: Client,
    names: dict[str, str],
    x: np.ndarray,
    results: dict[str, Any],
) -> dict[str, Any]:
    shape(mbit, 0)
    changed(args, "device", False)
    changed(args, "server", False)
    client.go.set()
    start = time.time()
    baseline_settled = events.settle(start, args.settle, args.limit)
    before_cut = events.cut
    at = time.time()
    before = client.window(at - args.window, at)
    what = changed(args, change, True)
    log(f"{mbit:g} Mbit/s: {what}; cls at {before_cut} ({before['median_ms']} ms)")
    after = reaction(events, client, at, args, args.change_wait)
    client.go.clear()
    time.sleep(0.5)
    uncalibrated = profiles_choice(results, mbit)
    measured = sweep(device, names, x, args, {before_cut, after["cut"], uncalibrated})
    confirmed = measured["confirmed_ms"]
    client.go.set()
    back_at = time.time()
    undone = changed(args, change, False)
    back = reaction(events, client, back_at, args, args.back_wait)
    row = {
        "bandwidth_mbit": mbit,
        "change": change,
        "condition": what,
        "undone": undone,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "baseline_settled": baseline_settled,
        "before": {"cut": before_cut, **before},
        "after": after,
        "exhaustive": measured,
        "calibrated_cut_ms": confirmed.get(after["cut"]),
        "profiles_choice": uncalibrated,
        "uncalibrated_cut_ms": confirmed.get(uncalibrated),
        "calibrated_over_best": (
            round(confirmed[after["cut"]] / measured["best_ms"], 3)
            if after["cut"] in confirmed
            else None
        ),
        "uncalibrated_over_best": (
            round(confirmed[uncalibrated] / measured["best_ms"], 3)
            if uncalibrated in confirmed
            else None
        ),
        "back": back,
    }
    log(
        f"  -> {after['cut']} (first switch {after['first_switch_s']} s, last "
        f"{after['last_switch_s']} s, {len(after['switches'])} switches, settled "
        f"{after['settled']}), served {after['latency']['median_ms']} ms; exhaustive best "
        f"{measured['best_cut']} {measured['best_ms']} ms, calibrated cut "
        f"{row['calibrated_cut_ms']} ms, uncalibrated (the profiles' {uncalibrated}) "
        f"{row['uncalibrated_cut_ms']} ms; undone: back to {back['cut']} "
        f"({len(back['switches'])} switches, last {back['last_switch_s']} s)"
    )
    return row


def serve(
    args: argparse.Namespace,
    results: dict[str, Any],
    server_repo: Path,
    device_repo: Path,
    names: dict[str, str],
    x: np.ndarray,
) -> None:
    """The two daemons and the client, every scenario in turn, into ``results``."""
    threads = {"EDGED_MODELS_THREADS": "2", "EDGED_MODELS_INSTANCES": "1"}
    server = Daemon(in_server_cgroup(), server_repo, f"{NS_IP}:{SERVER_PORT}", threads)
    server.wait_ready()
    try:
        shape(1000, 0)  # the device loads its models (asks the server) quickly
        device = Daemon(
            in_cgroup(),
            device_repo,
            "127.0.0.1:0",
            {"EDGED_MODELS_THREADS": "1", "EDGED_MODELS_INSTANCES": "1"},
        )
        device.wait_ready()
        events = Events(device, args.out.with_suffix(".device.log") if args.out else None)
        client = Client(device.address, x)
        try:
            for mbit in (float(b) for b in args.bandwidths.split(",")):
                for change in args.changes.split(","):
                    results["scenarios"].append(
                        scenario(args, mbit, change, device, events, client, names, x, results)
                    )
                    if args.out:  # what is measured so far survives a failure later
                        args.out.write_text(json.dumps(results, indent=2) + "\n")
        finally:
            client.stop()
            device.stop()
            events.read()
        results["requests_total"] = len(client.outcomes)
        results["requests_failed_total"] = sum(1 for *_, ok in client.outcomes if not ok)
        results["errors"] = client.errors[:10]
        results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    finally:
        server.stop()
        if args.out:
            lines = []
            while not server.lines.empty():
                lines.append(server.lines.get_nowait())
            args.out.with_suffix(".server.log").write_text("".join(lines))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", default="25,100", help="Mbit/s, comma-separated")
    parser.add_argument("--changes", default="device,server", help="device and/or server")
    parser.add_argument(
        "--device-quota", type=float, default=25.0, help="the device's normal quota, %% of a core"
    )
    parser.add_argument("--slow-device-quota", type=float, default=12.5, help="device slower")
    parser.add_argument("--slow-server-quota", type=float, default=12.5, help="server slower")
    parser.add_argument("--every", type=int, default=4, help="every N-th cut is deployed")
    parser.add_argument("--lines", type=int, default=6, help="text lines a request")
    parser.add_argument("--wire-dtype", choices=graph.WIRE_DTYPES, default="FP16")
    parser.add_argument("--requests", type=int, default=12, help="exhaustive: per cut")
    parser.add_argument("--confirm", type=int, default=30, help="exhaustive: the finalists")
    parser.add_argument("--settle", type=float, default=8.0, help="s without a switch: settled")
    parser.add_argument("--limit", type=float, default=60.0, help="s at most to settle")
    parser.add_argument("--change-wait", type=float, default=20.0, help="s at least after a change")
    parser.add_argument(
        "--back-wait", type=float, default=40.0, help="s at least after undoing a change"
    )
    parser.add_argument("--window", type=float, default=5.0, help="s of latency before/after")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        log("needs root: network namespaces, tc and the cpu cgroup")
        return 2
    os.setpriority(os.PRIO_PROCESS, 0, -10)  # as benchmarks/partition.py --priority
    from benchmarks.optimize import text_lines

    whole = corpus.fetch(next(m for m in corpus.CORPUS if m.name == "ocr_cls"))
    cuts = [c.tensor for c in select(graph.candidate_cuts(graph.load(whole)), args.every)]
    x, _ = text_lines(args.lines, seed=7)
    results: dict[str, Any] = {
        "model": "PP-OCR mobile v2.0 direction classifier (rapidocr-onnxruntime 1.4.4)",
        "input_shape": list(x.shape),
        "wire_dtype": args.wire_dtype,
        "cuts": len(cuts) + 1,
        "device": f"edged on the host, 1 thread, cgroup quota {args.device_quota} % normally",
        "server": "edged in a network namespace, 2 threads, its own cgroup (no quota normally)",
        "link": "tc tbf on a veth pair (no netem on this kernel: no delay added)",
        "cpu": os.cpu_count(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "scenarios": [],
    }
    args.input_file = None
    with tempfile.TemporaryDirectory(prefix="edged-calib-") as tmp, namespace():
        work = Path(tmp)
        args.input_file = work / "x.npy"
        np.save(args.input_file, x)
        server_repo, device_repo, names = build_repos(whole, cuts, work, args.wire_dtype)
        server_quota(None)
        set_quota(args.device_quota)
        log(f"{len(cuts)} cuts + all local; profiling the server, then the device (idle)")
        partition(in_server_cgroup(), whole, 2, args, "--profile-out", str(work / "server.json"))
        partition(in_cgroup(), whole, 1, args, "--profile-out", str(work / "device.json"))
        for side in ("server", "device"):
            profile = json.loads((work / f"{side}.json").read_text())
            results[f"{side}_whole_profiled_ms"] = round(profile["whole_s"] * 1000, 3)
        calibrated_model(device_repo, server_repo, whole, cuts, work, args.wire_dtype)
        results["profiles"] = {
            side: json.loads((work / f"{side}.json").read_text()) for side in ("server", "device")
        }
        try:
            serve(args, results, server_repo, device_repo, names, x)
        finally:
            for group in (bench.CGROUP, bench.cpuacct(), SERVER_CGROUP):
                with contextlib.suppress(OSError):
                    group.rmdir()
    log(f"requests {results.get('requests_total')}, failed {results.get('requests_failed_total')}")
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
