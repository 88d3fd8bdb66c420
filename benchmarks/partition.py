"""Split execution: the planner's choice against exhaustive measurement of every cut.

Two real daemons: a *server* (2 runtime threads) in its own network namespace, joined to the
host by a veth pair whose both ends are shaped by the kernel (tc tbf, GSO off so that packets
stay MTU-sized); and a *device* daemon on the host, in a cgroup with 1 runtime thread and a
CPU quota (a slower gateway, simulated). For each bandwidth and quota:

- the planner runs as an operator would run it: the server's profile taken in its namespace
  (``edged partition --profile-out``), then ``edged partition --explain --server-profile
  --server`` in the device's cgroup, which profiles the heads there, measures the link from
  there (ModelInfer probes) and picks a cut;
- every candidate cut is then served for real (a device model per cut with its head and the
  ``remote`` executor, a tail model per cut on the server, and the whole model on cpu-onnx for
  "all local") and its end-to-end latency measured from a gRPC client on the host.

tc netem (delay) is used when the kernel has it; without it (no sch_netem) the link has the
veth's own round trip and only the bandwidth is shaped: the output says which.

    sudo .venv/bin/python benchmarks/partition.py [--bandwidths 1,10,100] [--quotas 50,20]
        [--every 6] [--requests 15] [--delay-ms 2] [--out FILE]

Needs root (network namespaces, tc, cgroup v1 cpu). Prints a table on stderr, JSON on stdout.
Never pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edged.partition import graph  # noqa: E402
from edged.partition.planner import ALL_LOCAL  # noqa: E402
from edged.partition.profile import select  # noqa: E402
from tests import corpus  # noqa: E402

NS = "edged-bench-srv"
HOST_IF, NS_IF = "edb-host", "edb-srv"
HOST_IP, NS_IP = "10.77.0.1", "10.77.0.2"
SERVER_PORT = 18001
CGROUP = Path("/sys/fs/cgroup/cpu/edged-bench-device")
SHAPE = (1, 3, 96, 384)
"""The classifier's input: twice its native 48x192 per side, so that compute, not the
serving path's fixed cost, dominates (the model takes any height and width)."""
PYTHON = sys.executable


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# -- the link ------------------------------------------------------------------------------


@contextlib.contextmanager
def namespace() -> Iterator[None]:
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "gso_max_size", "1500", "up")
        ns = ("ip", "netns", "exec", NS)
        sh(*ns, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
        sh(*ns, "ip", "link", "set", NS_IF, "gso_max_size", "1500", "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        yield
    finally:
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "netns", "del", NS, check=False)


def shape(mbit: float, delay_ms: float) -> str:
    """Shape both directions of the veth at ``mbit``; netem delay when the kernel has it.
    Returns how ("tbf" or "netem")."""
    rate = f"{mbit}mbit"
    burst = str(max(3200, int(mbit * 1e6 / 8 / 1000)))  # ~1 ms of traffic, >= 2 packets
    how = "tbf"
    for prefix in ((), ("ip", "netns", "exec", NS)):
        dev = NS_IF if prefix else HOST_IF
        sh(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        netem = sh(
            *prefix, "tc", "qdisc", "add", "dev", dev, "root", "netem",
            "delay", f"{delay_ms / 2}ms", "rate", rate, "limit", "10000",
            check=False,
        )  # fmt: skip
        if netem.returncode != 0:
            sh(
                *prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                "rate", rate, "burst", burst, "latency", "5s",
            )  # fmt: skip
        else:
            how = "netem"
    return how


# -- daemons -------------------------------------------------------------------------------


class Daemon:
    """``edged serve`` behind a command prefix (a namespace, a cgroup), its JSON log read."""

    def __init__(self, prefix: list[str], models: Path, address: str, env: dict[str, str]):
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        full |= {
            "EDGED_ZMQ_ENABLED": "false",
            "EDGED_METRICS_ENABLED": "false",
            "EDGED_SERVER_HTTP_ADDRESS": "",
            "EDGED_OTA_STATE_ROOTS": tempfile.gettempdir(),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        cmd = [*prefix, PYTHON, "-m", "edged.cli", "serve", "--models", str(models)]
        self.proc = subprocess.Popen(
            [*cmd, "--grpc-address", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        tail: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            tail = [*tail[-20:], line]
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "server_live":
                    self.address = event["grpc_address"]
                if event.get("event") == "server_ready":
                    return
        raise RuntimeError("daemon did not get ready:\n" + "".join(tail))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def in_cgroup() -> list[str]:
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh"]


def set_quota(percent: int) -> None:
    """``percent`` of one core: 1 ms of CPU per period (the kernel's least quota), the period
    as short as that allows, so that the slowdown is smooth rather than bursts and stalls."""
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpu.cfs_quota_us").write_text("-1")
    (CGROUP / "cpu.cfs_period_us").write_text(str(100_000 // percent))
    (CGROUP / "cpu.cfs_quota_us").write_text("1000")


# -- repositories --------------------------------------------------------------------------


def build_repos(whole: Path, cuts: list[str], work: Path) -> tuple[Path, Path, dict[str, str]]:
    """The server's repository (a tail per cut), the device's (per cut: the whole model, its
    head and [remote]; "local": the whole model on cpu-onnx), and cut -> device model name."""
    server, device = work / "server", work / "device"
    model = graph.load(whole)
    names: dict[str, str] = {ALL_LOCAL: "local"}
    (device / "local" / "1").mkdir(parents=True)
    shutil.copyfile(whole, device / "local" / "1" / "model.onnx")
    (device / "local" / "model.toml").write_text('executors = ["cpu-onnx"]\n')
    for i, tensor in enumerate(cuts):
        parts = graph.split(model, tensor)
        tail, head = f"t{i}", f"c{i}"
        names[tensor] = head
        (server / tail / "1").mkdir(parents=True)
        graph.save(parts.tail, server / tail / "1" / "model.onnx")
        (device / head / "1").mkdir(parents=True)
        shutil.copyfile(whole, device / head / "1" / "model.onnx")
        head_line = ""
        if parts.head is not None:
            graph.save(parts.head, device / head / "1" / graph.HEAD_FILE)
            head_line = f'head = "{graph.HEAD_FILE}"\n'
        (device / head / "model.toml").write_text(
            'executors = ["remote"]\n\n[remote]\n'
            f'address = "{NS_IP}:{SERVER_PORT}"\nmodel = "{tail}"\n{head_line}'
            "insecure = true  # a private veth link on one machine\n"
            "timeout_ms = 60000\nretries = 0\n"
        )
    return server, device, names


# -- measurements --------------------------------------------------------------------------


def partition(prefix: list[str], whole: Path, threads: int, every: int, *flags: str) -> str:
    """``edged partition`` behind ``prefix`` (a namespace, the device's cgroup); its stdout."""
    cmd = [*prefix, PYTHON, "-m", "edged.cli", "partition", str(whole), *flags]
    cmd += ["--threads", str(threads), "--every", str(every), "--runs", "9"]
    cmd += ["--shape", "x=" + ",".join(map(str, SHAPE))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return done.stdout


def end_to_end_ms(
    address: str, models: dict[str, str], x: np.ndarray, rounds: int
) -> dict[str, float]:
    """Median end-to-end latency per cut (``models``: cut -> device model), from sequential
    requests taken in rounds (one request per cut a round), so that load from elsewhere on
    the machine falls on every cut alike rather than on whichever was measured then."""
    import tritonclient.grpc as grpcclient

    times: dict[str, list[float]] = {cut: [] for cut in models}
    with grpcclient.InferenceServerClient(address) as client:
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for model in models.values():  # warm-up: connections, first-run allocations
            client.infer(model, [tensor])
        for _ in range(rounds):
            for cut, model in models.items():
                started = time.perf_counter()
                client.infer(model, [tensor])
                times[cut].append(time.perf_counter() - started)
    return {cut: statistics.median(t) * 1000 for cut, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", default="1,10,100", help="Mbit/s, comma-separated")
    parser.add_argument("--quotas", default="50,20", help="device CPU quota, % of one core")
    parser.add_argument("--every", type=int, default=6, help="every N-th cut")
    parser.add_argument(
        "--requests", type=int, default=15, help="timed requests per cut (a third at 1 Mbit/s)"
    )
    parser.add_argument("--delay-ms", type=float, default=2.0, help="RTT added with netem")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("needs root: network namespaces, tc and the cpu cgroup")
        return 2
    whole = corpus.fetch(next(m for m in corpus.CORPUS if m.name == "ocr_cls"))
    cuts = [c.tensor for c in select(graph.candidate_cuts(graph.load(whole)), args.every)]
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    results: dict[str, Any] = {
        "model": "PP-OCR mobile v2.0 direction classifier (rapidocr-onnxruntime 1.4.4)",
        "input_shape": list(SHAPE),
        "cuts": len(cuts) + 1,
        "device": "edged on the host, 1 runtime thread, 1 instance, cgroup cpu quota",
        "server": "edged in a network namespace, 2 runtime threads, 1 instance",
        "cpu": os.cpu_count(),
        "settings": [],
    }
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp, namespace():
        work = Path(tmp)
        server_repo, device_repo, names = build_repos(whole, cuts, work)
        log(f"{len(cuts)} cuts + all local; profiling the server (2 threads)")
        ns = ["ip", "netns", "exec", NS]
        partition(ns, whole, 2, args.every, "--profile-out", str(work / "server.json"))
        server = Daemon(
            ns,
            server_repo,
            f"{NS_IP}:{SERVER_PORT}",
            {"EDGED_MODELS_THREADS": "2", "EDGED_MODELS_INSTANCES": "1"},
        )
        server.wait_ready()
        try:
            for quota in (int(q) for q in args.quotas.split(",")):
                set_quota(quota)
                shape(1000, 0)  # the device loads its models (asks the server) quickly
                device = Daemon(
                    in_cgroup(),
                    device_repo,
                    "127.0.0.1:0",
                    {"EDGED_MODELS_THREADS": "1", "EDGED_MODELS_INSTANCES": "1"},
                )
                device.wait_ready()
                try:
                    for mbit in (float(b) for b in args.bandwidths.split(",")):
                        results["settings"].append(
                            measure_setting(
                                args, quota, mbit, device, whole, work / "server.json", names, x
                            )
                        )
                finally:
                    device.stop()
        finally:
            server.stop()
            with contextlib.suppress(OSError):
                CGROUP.rmdir()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def measure_setting(
    args: argparse.Namespace,
    quota: int,
    mbit: float,
    device: Daemon,
    whole: Path,
    server_profile: Path,
    names: dict[str, str],
    x: np.ndarray,
) -> dict[str, Any]:
    how = shape(mbit, args.delay_ms)
    # the operator's command, run on the "device" (its cgroup): profiles the heads there,
    # measures the link from there, and plans with the server's profile
    server = ["--server-profile", str(server_profile), "--server", f"{NS_IP}:{SERVER_PORT}"]
    out = partition(in_cgroup(), whole, 1, args.every, "--explain", "--json", *server)
    explained = json.loads(out)
    choice = explained["choice"]
    estimates = {e["cut"]: e["total_ms"] for e in explained["estimates"]}
    requests = max(5, args.requests // 3) if mbit < 5 else args.requests
    measured = end_to_end_ms(device.address, names, x, requests)
    best = min(measured, key=lambda c: measured[c])
    remote_only = measured[graph.INPUTS_CUT]
    local = measured[ALL_LOCAL]
    split_best = min(v for c, v in measured.items() if c not in (ALL_LOCAL, graph.INPUTS_CUT))
    row = {
        "quota_percent": quota,
        "bandwidth_mbit": mbit,
        "shaping": how,
        "link_measured": {
            "rtt_ms": round(explained["link"]["rtt_ms"], 3),
            "bandwidth_mbit": round(explained["link"]["bandwidth_mbit"], 3),
        },
        "planner_choice": choice,
        "planner_choice_estimated_ms": round(explained["choice_total_ms"], 3),
        "planner_choice_measured_ms": round(measured[choice], 3),
        "best_cut": best,
        "best_measured_ms": round(measured[best], 3),
        "choice_over_best": round(measured[choice] / measured[best], 3),
        "all_local_ms": round(local, 3),
        "all_remote_ms": round(remote_only, 3),
        "best_split_ms": round(split_best, 3),
        "split_speedup_over_better_of_local_remote": round(min(local, remote_only) / split_best, 3),
        "chosen_speedup_over_better_of_local_remote": round(
            min(local, remote_only) / measured[choice], 3
        ),
        "per_cut": {
            c: {"estimated_ms": round(estimates[c], 3), "measured_ms": round(m, 3)}
            for c, m in measured.items()
        },
    }
    log(
        f"quota {quota}% {mbit:g} Mbit/s ({how}; measured rtt {row['link_measured']['rtt_ms']} ms,"
        f" {row['link_measured']['bandwidth_mbit']} Mbit/s): planner {choice} "
        f"{row['planner_choice_measured_ms']} ms; best {best} {row['best_measured_ms']} ms; "
        f"local {row['all_local_ms']} ms, remote {row['all_remote_ms']} ms, "
        f"best split {row['best_split_ms']} ms"
    )
    return row


if __name__ == "__main__":
    sys.exit(main())
