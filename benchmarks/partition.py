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
        [--every 6] [--requests 15] [--confirm 45] [--delay-ms 2] [--lines 6 | --shape N,3,H,W]
        [--wire-dtype FP16] [--device-emulation quota|qemu-arm64] [--profile-once]
        [--statistics wall,cpu] [--instance N] [--out FILE]

The input is random values of ``--shape`` (default 1x3x96x384), or ``--lines N`` text lines
rendered at the classifier's native 48x192 (PP-OCR classifies a page's lines in batches of
6). ``--wire-dtype FP16``: every cut with a head sends its tensor as FP16 (the inputs cut,
all remote, sends the request's FP32 inputs as they are). Every cut is screened with
``--requests`` requests, then the planner's choice, the three best, all local and all remote
are measured again with ``--confirm`` requests each: the headline figures are those.

How the slower device is simulated (``--device-emulation``):

- ``quota`` (default): host code at host speed in a cgroup v1 CPU quota of 1 ms per period.
  Not a slower CPU: work shorter than the quota can run at full speed, longer work waits a
  period at a time, so the heads near 1 ms profile at full speed in one run and a period
  slower in the next.
- ``qemu-arm64``: the device daemon (and its ``edged partition``) run this checkout's code
  under qemu-aarch64 (TCG) in an arm64 Debian root with edged's arm64 .deb installed (its
  venv: arm64 CPython, ONNX Runtime, gRPC), made from what tests/e2e/test_deb_chroot.py
  caches (``--arm64-root``). Every instruction is emulated, so there is no quota slice; but
  the slowdown is not a real core's either: ONNX Runtime's vector kernels ~120x, Python ~8x
  on this machine, and the daemon's times under it swung 5-17x between measurements
  (docs/partition.md, run 4): not the smooth device it was meant to be. ``--quotas 100``
  runs it without a quota; a quota on top slows it further. ``--profile-once`` profiles
  the device once per quota and plans each bandwidth with that profile (a profile takes
  half an hour under emulation).

``--statistics wall,cpu`` plans each setting with both head statistics of ``edged partition
--statistic`` from one device profile, side by side (both choices are confirmed). ``quota``
among them plans with the device's CPU limit (its cgroup's quota, found by ``edged partition``
itself) and the device's CPU per request besides the model, measured first on the served
all-local and all-remote cuts (the cgroup's cpuacct, less the profile's CPU for the model):
a cost per request and a cost per byte on the wire (``--request-cpu-ms``,
``--byte-cost-ns``), what a deployed device can measure of itself.
``--trial K`` prototypes a daemon that tries its finalists as served: each statistic's K cuts
of least estimate are served ``--requests`` requests each and the fastest kept (``trial`` in
the JSON; its choice is confirmed like the planner's).
``--instance N`` runs beside another run (its own namespace, veth, addresses, cgroup).

``--accuracy N``: what FP16 on the wire does to the answers, at every cut, for N rendered
text lines (no root, no daemons).

Needs root (network namespaces, tc, cgroup v1 cpu). Where cgroup v1 ``cpuacct`` is mounted
too, every confirmed cut also records the device's CPU per request (``device_cpu_ms``) and
the time its quota held it back (``throttled_ms``), beside its head's profiled CPU time
(``head_cpu_ms``). Prints a table on stderr, JSON on stdout. Never pass/fail.

``--replan``: the daemon's re-planning instead (docs/partition.md "Re-planning"). The same
namespace and veth, the server in the namespace serving the digits model's tails, the device
on the host serving digits with ``[partition] replan = true`` over *simulated* cost profiles
(tests/split_models.py: inputs cut on a fast link, all local below ~0.17 Mbit/s); clients
send requests all along while tc steps the link between ``--fast`` and ``--slow`` Mbit/s
``--rounds`` times. Reports, per step, the seconds from the tc change to the daemon's
``partition_replanned`` event and the requests that failed. Without root or network
namespaces it says why and uses a throttling TCP proxy on loopback instead (a simulation,
tests/throttle_proxy.py), as does ``--proxy``:

    sudo .venv/bin/python benchmarks/partition.py --replan [--rounds 5] [--fast 100]
        [--slow 0.1] [--clients 2] [--proxy] [--out FILE]
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
#: where cgroup v1 keeps the same processes' CPU time, to the nanosecond
CPUACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")
SHAPE = (1, 3, 96, 384)
"""The classifier's input: twice its native 48x192 per side, so that compute, not the
serving path's fixed cost, dominates (the model takes any height and width)."""
PYTHON = sys.executable
#: --device-emulation qemu-arm64: the arm64 root file system the device runs in (made from
#: the tests' cached Debian root and .debs when missing), and the Python of edged's .deb there
ARM64_ROOT = Path("/var/tmp/edged-bench-arm64")
ARM64_PYTHON = "/opt/edged/venv/bin/python"
TEST_CACHE = Path(os.environ.get("EDGED_TEST_CACHE", "/var/cache/edged-test"))
#: the device cgroup's cpu.shares with --priority (a task's weight at nice -10 is 9548)
PRIORITY_SHARES = 10240


def use_instance(n: int) -> None:
    """Names of instance ``n`` (namespace, veth, addresses, cgroup), so that two runs of
    this benchmark can share the machine."""
    global NS, HOST_IF, NS_IF, HOST_IP, NS_IP, CGROUP  # noqa: PLW0603 - set once, at start
    if n:
        NS, HOST_IF, NS_IF = f"edged-bench-srv-{n}", f"edb-host{n}", f"edb-srv{n}"
        HOST_IP, NS_IP = f"10.77.{n}.1", f"10.77.{n}.2"
        CGROUP = CGROUP.with_name(f"edged-bench-device-{n}")


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

    def __init__(
        self,
        prefix: list[str],
        models: Path,
        address: str,
        env: dict[str, str],
        python: str = PYTHON,
    ):
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        full |= {
            "EDGED_ZMQ_ENABLED": "false",
            "EDGED_METRICS_ENABLED": "false",
            "EDGED_SERVER_HTTP_ADDRESS": "",
            "EDGED_OTA_STATE_ROOTS": tempfile.gettempdir(),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        cmd = [*prefix, python, "-m", "edged.cli", "serve", "--models", str(models)]
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


def cpuacct() -> Path:
    """The device's cpuacct group: named as its cpu group (:data:`CGROUP`, which an instance
    or another benchmark renames)."""
    return CPUACCT_ROOT / CGROUP.name


def in_cgroup() -> list[str]:
    enter = f"echo $$ > {CGROUP}/cgroup.procs"
    if cpuacct().is_dir():
        enter += f" && echo $$ > {cpuacct()}/cgroup.procs"
    return ["sh", "-c", f'{enter} && exec "$@"', "sh"]


def device_clock() -> tuple[int, int] | None:
    """The device cgroup's (CPU ns used, ns throttled by its quota) so far; None where the
    kernel does not keep them (no cgroup v1 cpuacct, not root)."""
    try:
        used = int((cpuacct() / "cpuacct.usage").read_text())
        stat = dict(line.split() for line in (CGROUP / "cpu.stat").read_text().splitlines())
        return used, int(stat["throttled_time"])
    except (OSError, KeyError, ValueError):
        return None


def set_quota(percent: float) -> None:
    """``percent`` of one core: 1 ms of CPU per period (the kernel's least quota), the period
    as short as that allows (still: work shorter than 1 ms may run at full speed, longer work
    stalls a period at a time). 100 or more: no quota."""
    CGROUP.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        cpuacct().mkdir(exist_ok=True)
    # the group's weight against the rest of a shared machine: the quota, not other work,
    # is what slows the device (10240: a task's weight at nice -10)
    (CGROUP / "cpu.shares").write_text(str(PRIORITY_SHARES))
    (CGROUP / "cpu.cfs_quota_us").write_text("-1")
    if percent < 100:
        (CGROUP / "cpu.cfs_period_us").write_text(str(round(100_000 / percent)))
        (CGROUP / "cpu.cfs_quota_us").write_text("1000")


class DeviceSide:
    """How the simulated device runs a command: in the cgroup (``quota``: host code at host
    speed under the CPU quota), or also under qemu-aarch64 in an arm64 root file system
    (``qemu-arm64``: every instruction emulated, Python, gRPC and ONNX Runtime's arm64
    kernels alike; the paths in ``shared`` bind-mounted at the same place there)."""

    def __init__(self, emulation: str, arm64_root: Path) -> None:
        self.emulation = emulation
        self.root = arm64_root
        self.python = PYTHON if emulation == "quota" else ARM64_PYTHON

    def prefix(self) -> list[str]:
        if self.emulation == "quota":
            return in_cgroup()
        return [*in_cgroup(), "chroot", str(self.root), "env", "PYTHONDONTWRITEBYTECODE=1"]

    @contextlib.contextmanager
    def mounted(self, *shared: Path) -> Iterator[None]:
        if self.emulation == "quota":
            yield
            return
        arm64_root(self.root)
        points: list[Path] = []
        try:
            # not /sys: ONNX Runtime's cpuinfo, built for arm64, crashes on the host's
            # x86 /sys/devices/system/cpu (without it, it warns and runs)
            for path in (Path("/dev"), Path("/proc"), *shared):
                inside = self.root / path.relative_to("/")
                inside.mkdir(parents=True, exist_ok=True)
                sh("mount", "--bind", str(path), str(inside))
                points.append(inside)
            yield
        finally:
            for inside in reversed(points):
                sh("umount", "-l", str(inside), check=False)


def arm64_root(root: Path) -> None:
    """An arm64 Debian root with edged's .debs installed (their venv: arm64 Python, ONNX
    Runtime, gRPC, onnx), from what tests/e2e/test_deb_chroot.py caches: the root file system
    tarball and the built packages. The benchmark runs this checkout's code with that venv."""
    if (root / ARM64_PYTHON.lstrip("/")).exists():
        return
    tarball = TEST_CACHE / "rootfs-bookworm-arm64.tar"
    debs = sorted(TEST_CACHE.glob("debs/bookworm-arm64-*/*.deb"))
    if not tarball.exists() or len(debs) < 2:
        raise RuntimeError(
            f"no arm64 root at {root}, and no {tarball} and .debs to make one: run "
            "tests/e2e/test_deb_chroot.py's arm64 case once (it caches them)"
        )
    log(f"making the arm64 root {root} (the cached Debian root, dpkg -i edged's .debs)")
    root.mkdir(parents=True, exist_ok=True)
    sh("tar", "--numeric-owner", "-xf", str(tarball), "-C", str(root))
    for deb in debs:
        shutil.copy(deb, root / "tmp" / deb.name)
    sh("mount", "-t", "proc", "proc", str(root / "proc"))
    try:
        sh("chroot", str(root), "env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "-i",
           *(f"/tmp/{deb.name}" for deb in debs))  # fmt: skip
    finally:
        sh("umount", "-l", str(root / "proc"), check=False)


# -- repositories --------------------------------------------------------------------------


def build_repos(
    whole: Path, cuts: list[str], work: Path, wire_dtype: str = ""
) -> tuple[Path, Path, dict[str, str]]:
    """The server's repository (a tail per cut), the device's (per cut: the whole model, its
    head and [remote]; "local": the whole model on cpu-onnx), and cut -> device model name.
    With ``wire_dtype`` every cut that has a head sends its tensor in it."""
    server, device = work / "server", work / "device"
    model = graph.load(whole)
    names: dict[str, str] = {ALL_LOCAL: "local"}
    (device / "local" / "1").mkdir(parents=True)
    shutil.copyfile(whole, device / "local" / "1" / "model.onnx")
    (device / "local" / "model.toml").write_text('executors = ["cpu-onnx"]\n')
    for i, tensor in enumerate(cuts):
        parts = graph.split(model, tensor, "" if tensor == graph.INPUTS_CUT else wire_dtype)
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


def partition(
    prefix: list[str],
    whole: Path,
    threads: int,
    args: argparse.Namespace,
    *flags: str,
    python: str = PYTHON,
) -> str:
    """``edged partition`` behind ``prefix`` (a namespace, the device's cgroup); its stdout."""
    cmd = [*prefix, python, "-m", "edged.cli", "partition", str(whole), *flags]
    cmd += ["--threads", str(threads), "--every", str(args.every), "--runs", "9"]
    cmd += ["--input", f"x={args.input_file}"]
    if args.wire_dtype:
        cmd += ["--wire-dtype", args.wire_dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return done.stdout


def plan_flags(spec: str) -> list[str]:
    """``edged partition`` flags of a --statistics entry: ``cpu+margin=0.05``."""
    statistic, *extras = spec.split("+")
    flags = ["--statistic", statistic]
    for extra in extras:
        name, _, value = extra.partition("=")
        flags += [f"--{name}", *([value] if value else [])]
    return flags


def device_request_cost(
    address: str, names: dict[str, str], x: np.ndarray, device_profile: Path, rounds: int = 15
) -> dict[str, float]:
    """What the device spends per request besides the model, from served requests: the
    device cgroup's CPU per request all local (less the model's CPU time in the profile) is
    the cost of a request; all remote's, less that, over the bytes it sends and is answered,
    the cost of a byte. As ``edged partition`` flags' names: ``request_cpu_ms``,
    ``byte_cost_ns``."""
    cuts = (ALL_LOCAL, graph.INPUTS_CUT)
    served = end_to_end(address, {c: names[c] for c in cuts}, x, rounds)
    if any("device_cpu_ms" not in served[c] for c in cuts):
        raise SystemExit("--statistics quota: the device cgroup's CPU time is not kept (cpuacct)")
    profiled = json.loads(device_profile.read_text())
    inputs = next(c for c in profiled["cuts"] if c["cut"] == graph.INPUTS_CUT)
    request_ms = max(served[ALL_LOCAL]["device_cpu_ms"] - profiled["whole_cpu_s"] * 1000, 0.0)
    wire = inputs["sent_bytes"] + profiled["answer_bytes"]
    per_byte_ns = max(served[graph.INPUTS_CUT]["device_cpu_ms"] - request_ms, 0.0) * 1e6 / wire
    log(f"device: {request_ms:.3f} ms of CPU a request besides the model, {per_byte_ns:.3f} ns/B")
    return {"request_cpu_ms": round(request_ms, 4), "byte_cost_ns": round(per_byte_ns, 4)}


def end_to_end_ms(
    address: str, models: dict[str, str], x: np.ndarray, rounds: int
) -> dict[str, float]:
    """Median end-to-end latency per cut (``models``: cut -> device model), from sequential
    requests taken in rounds (one request per cut a round), so that load from elsewhere on
    the machine falls on every cut alike rather than on whichever was measured then."""
    return {cut: m["ms"] for cut, m in end_to_end(address, models, x, rounds).items()}


def end_to_end(
    address: str, models: dict[str, str], x: np.ndarray, rounds: int
) -> dict[str, dict[str, float]]:
    """:func:`end_to_end_ms`, with what the device cgroup spent on each request where the
    kernel says: ``ms`` (median latency), and ``device_cpu_ms`` (median CPU time of the
    device's processes during a request) and ``throttled_ms`` (mean time its CPU quota held
    them back during one)."""
    import tritonclient.grpc as grpcclient

    times: dict[str, list[float]] = {cut: [] for cut in models}
    cpu: dict[str, list[int]] = {cut: [] for cut in models}
    held: dict[str, list[int]] = {cut: [] for cut in models}
    with grpcclient.InferenceServerClient(address) as client:
        tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for model in models.values():  # warm-up: connections, first-run allocations
            client.infer(model, [tensor])
        for _ in range(rounds):
            for cut, model in models.items():
                before = device_clock()
                started = time.perf_counter()
                client.infer(model, [tensor])
                times[cut].append(time.perf_counter() - started)
                after = device_clock()
                if before is not None and after is not None:
                    cpu[cut].append(after[0] - before[0])
                    held[cut].append(after[1] - before[1])
    out: dict[str, dict[str, float]] = {}
    for cut, t in times.items():
        out[cut] = {"ms": statistics.median(t) * 1000}
        if cpu[cut]:
            out[cut]["device_cpu_ms"] = statistics.median(cpu[cut]) / 1e6
            out[cut]["throttled_ms"] = statistics.fmean(held[cut]) / 1e6
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replan", action="store_true", help="benchmark re-planning instead")
    parser.add_argument("--rounds", type=int, default=5, help="--replan: slow/fast rounds")
    parser.add_argument("--fast", type=float, default=100.0, help="--replan: fast Mbit/s")
    parser.add_argument("--slow", type=float, default=0.1, help="--replan: slow Mbit/s")
    parser.add_argument("--clients", type=int, default=2, help="--replan: client threads")
    parser.add_argument("--proxy", action="store_true", help="--replan: a TCP proxy, not tc")
    parser.add_argument("--bandwidths", default="1,10,100", help="Mbit/s, comma-separated")
    parser.add_argument(
        "--quotas",
        default="50,20",
        help="device CPU quota, %% of one core (100: none)",
    )
    parser.add_argument(
        "--device-emulation",
        choices=("quota", "qemu-arm64"),
        default="quota",
        help="how the slower device is simulated: host code in a CPU quota, or also emulated "
        "as arm64 by qemu-aarch64 (TCG: every instruction slower, no stalls; needs binfmt "
        "for aarch64 and the tests' cached arm64 root and .debs, or --arm64-root)",
    )
    parser.add_argument(
        "--statistics",
        default="wall",
        help="plan with each of these (edged partition --statistic, +margin=F for --margin "
        "F), from one device profile per setting, side by side: e.g. wall,cpu,wall+margin=0.05",
    )
    parser.add_argument(
        "--trial",
        type=int,
        default=0,
        metavar="K",
        help="also serve each statistic's K cuts of least estimate, --requests requests "
        "each, and keep the fastest (a prototype of the daemon trying finalists); its choice "
        "is confirmed with the others",
    )
    parser.add_argument(
        "--profile-once",
        action="store_true",
        help="profile the device once per quota (edged partition --profile-out in its "
        "cgroup) and plan every bandwidth with it (--explain --profile), instead of profiling "
        "again for each bandwidth (qemu-arm64: a profile takes minutes)",
    )
    parser.add_argument(
        "--arm64-root",
        type=Path,
        default=ARM64_ROOT,
        help="qemu-arm64: the arm64 root file system (made when missing)",
    )
    parser.add_argument(
        "--shape",
        default=",".join(map(str, SHAPE)),
        help="the classifier's input N,3,H,W (--lines: N text lines at the native 48x192)",
    )
    parser.add_argument(
        "--lines",
        type=int,
        default=0,
        help="send N rendered text lines at the native 48x192 (PP-OCR classifies a page's "
        "lines in batches of 6) instead of random values of --shape",
    )
    parser.add_argument(
        "--wire-dtype",
        choices=graph.WIRE_DTYPES,
        default="",
        help="cuts with a head send their tensor in this datatype (the inputs cut: FP32)",
    )
    parser.add_argument("--every", type=int, default=6, help="every N-th cut")
    parser.add_argument(
        "--requests", type=int, default=15, help="timed requests per cut (a third at 1 Mbit/s)"
    )
    parser.add_argument(
        "--confirm",
        type=int,
        default=45,
        help="requests for the confirmation round (the choice, the 3 best, local, remote)",
    )
    parser.add_argument(
        "--priority",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the server, the device's cgroup and the client ahead of other work on the "
        "machine (nice -10, cgroup cpu.shares 10240)",
    )
    parser.add_argument("--delay-ms", type=float, default=2.0, help="RTT added with netem")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--instance",
        type=int,
        default=0,
        choices=range(10),
        help="another run beside this one: its own namespace, veth, addresses and cgroup",
    )
    parser.add_argument(
        "--accuracy",
        type=int,
        default=0,
        metavar="N",
        help="instead: the wire datatype's effect on the answers for N rendered text lines, "
        "at every cut (no root needed)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    use_instance(args.instance)
    if args.replan:
        return replan_main(args)
    if args.accuracy:
        return accuracy_main(args)
    if os.geteuid() != 0:
        log("needs root: network namespaces, tc and the cpu cgroup")
        return 2
    if args.priority:
        # the server, the device's cgroup and the client stand for machines of their own: on
        # a machine shared with other work they run ahead of it (the children inherit this)
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    whole = corpus.fetch(next(m for m in corpus.CORPUS if m.name == "ocr_cls"))
    cuts = [c.tensor for c in select(graph.candidate_cuts(graph.load(whole)), args.every)]
    if args.lines:
        from benchmarks.optimize import text_lines

        x, _ = text_lines(args.lines, seed=7)
    else:
        dims = tuple(int(d) for d in args.shape.split(","))
        x = np.random.default_rng(0).random(dims, dtype=np.float32)
    results: dict[str, Any] = {
        "model": "PP-OCR mobile v2.0 direction classifier (rapidocr-onnxruntime 1.4.4)",
        "input_shape": list(x.shape),
        "input": f"{args.lines} rendered text lines" if args.lines else "random values",
        "input_bytes": int(x.nbytes),
        "wire_dtype": args.wire_dtype or "the cut tensor's own",
        "cuts": len(cuts) + 1,
        "device": (
            "edged on the host, 1 runtime thread, 1 instance, cgroup cpu quota"
            if args.device_emulation == "quota"
            else "edged under qemu-aarch64 (arm64 emulated on the host), 1 runtime thread, "
            "1 instance, in a cgroup (cpu quota when below 100 %)"
        ),
        "device_emulation": args.device_emulation,
        "server": "edged in a network namespace, 2 runtime threads, 1 instance",
        "cpu": os.cpu_count(),
        "priority": "nice -10, device cgroup cpu.shares 10240" if args.priority else "none",
        "settings": [],
    }
    side = DeviceSide(args.device_emulation, args.arm64_root)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edged-bench-")))
        stack.enter_context(namespace())
        stack.enter_context(side.mounted(ROOT, work))  # qemu-arm64: seen from its root too
        whole = Path(shutil.copyfile(whole, work / whole.name))
        args.input_file = work / "x.npy"
        np.save(args.input_file, x)
        server_repo, device_repo, names = build_repos(whole, cuts, work, args.wire_dtype)
        log(f"{len(cuts)} cuts + all local; profiling the server (2 threads)")
        ns = ["ip", "netns", "exec", NS]
        partition(ns, whole, 2, args, "--profile-out", str(work / "server.json"))
        results["server_whole_ms"] = round(
            json.loads((work / "server.json").read_text())["whole_s"] * 1000, 3
        )
        server = Daemon(
            ns,
            server_repo,
            f"{NS_IP}:{SERVER_PORT}",
            {"EDGED_MODELS_THREADS": "2", "EDGED_MODELS_INSTANCES": "1"},
        )
        server.wait_ready()
        try:
            for quota in (float(q) for q in args.quotas.split(",")):
                run_quota(args, side, quota, device_repo, whole, work, names, x, results)
        finally:
            server.stop()
            for group in (CGROUP, cpuacct()):
                with contextlib.suppress(OSError):
                    group.rmdir()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def run_quota(
    args: argparse.Namespace,
    side: DeviceSide,
    quota: float,
    device_repo: Path,
    whole: Path,
    work: Path,
    names: dict[str, str],
    x: np.ndarray,
    results: dict[str, Any],
) -> None:
    """The device daemon in ``quota``, every bandwidth measured against it."""
    set_quota(quota)
    shape(1000, 0)  # the device loads its models (asks the server) quickly
    device = Daemon(
        side.prefix(),
        device_repo,
        "127.0.0.1:0",
        {"EDGED_MODELS_THREADS": "1", "EDGED_MODELS_INSTANCES": "1"},
        python=side.python,
    )
    try:
        device.wait_ready(timeout=1800)
        args.device_profile = None
        if args.profile_once:
            log(f"quota {quota:g}%: the device is ready; profiling it once")
            args.device_profile = work / f"device-{quota:g}.json"
            flags = ("--profile-out", str(args.device_profile))
            partition(side.prefix(), whole, 1, args, *flags, python=side.python)
        for mbit in (float(b) for b in args.bandwidths.split(",")):
            server_profile = work / "server.json"
            row = measure_setting(args, side, quota, mbit, device, whole, server_profile, names, x)
            results["settings"].append(row)
            if args.out:  # what is measured so far survives a failure later
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        device.stop()


def accuracy_main(args: argparse.Namespace) -> int:
    """Per cut: the split model with ``--wire-dtype`` (default FP16) against the whole model
    on ``--accuracy`` rendered text lines (half turned 180 degrees), in ONNX Runtime."""
    import onnxruntime as ort

    from benchmarks.optimize import text_lines

    wire = args.wire_dtype or graph.WIRE_DTYPES[0]
    path = corpus.fetch(next(m for m in corpus.CORPUS if m.name == "ocr_cls"))
    model = graph.load(path)
    x, labels = text_lines(args.accuracy, seed=11)

    def session(m: Any) -> Any:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    whole = want[0]
    rows: list[dict[str, Any]] = []
    for cut in graph.candidate_cuts(model)[1:]:
        parts = graph.split(model, cut.tensor, wire)
        (middle,) = session(parts.head).run(None, {"x": x})
        (got,) = session(parts.tail).run(None, {cut.tensor: middle})
        rows.append(
            {
                "cut": cut.tensor,
                "max_abs_diff": float(np.abs(got - whole).max()),
                "argmax_agreement": float((got.argmax(1) == whole.argmax(1)).mean()),
                "accuracy": float((got.argmax(1) == labels).mean()),
            }
        )
    result = {
        "model": "PP-OCR mobile v2.0 direction classifier (rapidocr-onnxruntime 1.4.4)",
        "wire_dtype": wire,
        "lines": args.accuracy,
        "whole_accuracy": float((whole.argmax(1) == labels).mean()),
        "worst_max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "worst_argmax_agreement": min(r["argmax_agreement"] for r in rows),
        "cuts": rows,
    }
    log(
        f"{len(rows)} cuts, {wire} on the wire, {args.accuracy} lines: whole model accuracy "
        f"{result['whole_accuracy']:.4f}; worst max |diff| of the probabilities "
        f"{result['worst_max_abs_diff']:.2e}, worst argmax agreement "
        f"{result['worst_argmax_agreement']:.4f}"
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def measure_setting(
    args: argparse.Namespace,
    side: DeviceSide,
    quota: float,
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
    # no quota (100 %): nothing for --statistic quota to plan with
    stats = [s for s in args.statistics.split(",") if quota < 100 or not s.startswith("quota")]
    device_profile = args.device_profile
    quota_planned = any(spec.split("+")[0] == "quota" for spec in stats)
    if device_profile is None and (len(stats) > 1 or quota_planned):
        # one profile, planned with each statistic: the choices differ by the statistic only
        device_profile = server_profile.with_name("device-setting.json")
        flags = ("--profile-out", str(device_profile))
        partition(side.prefix(), whole, 1, args, *flags, python=side.python)
    if device_profile is not None:
        server += ["--profile", str(device_profile)]
    request_cost: dict[str, float] = {}
    if quota_planned and device_profile is not None:
        request_cost = device_request_cost(device.address, names, x, Path(device_profile))
    plans = {}
    for statistic in stats:
        measured_cost = []
        if statistic.split("+")[0] == "quota":
            measured_cost = [f"--{k.replace('_', '-')}={v:.6g}" for k, v in request_cost.items()]
        out = partition(
            side.prefix(), whole, 1, args, "--explain", "--json", *server,
            *plan_flags(statistic), *measured_cost, python=side.python,
        )  # fmt: skip
        plans[statistic] = json.loads(out)
    explained = plans[stats[0]]
    head_cpu: dict[str, float] = {}
    if device_profile is not None:
        profiled = json.loads(Path(device_profile).read_text())
        head_cpu = {c["cut"]: c.get("head_cpu_s", 0.0) * 1000 for c in profiled["cuts"]}
        head_cpu[ALL_LOCAL] = profiled.get("whole_cpu_s", 0.0) * 1000
    choice = explained["choice"]
    estimates = {e["cut"]: e["total_ms"] for e in explained["estimates"]}
    rows = {e["cut"]: e for e in explained["estimates"]}
    requests = max(5, args.requests // 3) if mbit < 5 else args.requests
    trial: dict[str, Any] = {}
    if args.trial:
        # a prototype of serving the finalists: each statistic's --trial cuts of least
        # estimate, served --requests requests each (in rounds), the fastest kept
        finalists = sorted(
            {
                e["cut"]
                for p in plans.values()
                for e in sorted(p["estimates"], key=lambda e: e["total_ms"])[: args.trial]
            }
        )
        tried = end_to_end_ms(device.address, {c: names[c] for c in finalists}, x, requests)
        trial = {"finalists": tried, "choice": min(tried, key=lambda c: tried[c])}
    screened = end_to_end_ms(device.address, names, x, requests)
    # the minimum of many noisy medians is biased low (the winner's curse), and neighbouring
    # cuts differ by less than this machine's noise: the planner's choice, all local, all
    # remote and the three best of the screening are measured again, --confirm requests each
    splits = [c for c in screened if c not in (ALL_LOCAL, graph.INPUTS_CUT)]
    best_three = sorted(splits, key=lambda c: screened[c])[:3]
    choices = {p["choice"] for p in plans.values()} | ({trial["choice"]} if trial else set())
    finalists = {*choices, ALL_LOCAL, graph.INPUTS_CUT, *best_three}
    confirm = max(5, args.confirm // 3) if mbit < 5 else args.confirm
    detail = end_to_end(
        device.address, {c: n for c, n in names.items() if c in finalists}, x, confirm
    )
    measured = {c: m["ms"] for c, m in detail.items()}
    best = min(measured, key=lambda c: measured[c])
    remote_only = measured[graph.INPUTS_CUT]
    local = measured[ALL_LOCAL]
    split_best = min(v for c, v in measured.items() if c not in (ALL_LOCAL, graph.INPUTS_CUT))
    load = os.getloadavg()[0]
    row = {
        "device_emulation": side.emulation,
        "quota_percent": quota,
        "bandwidth_mbit": mbit,
        "shaping": how,
        "load_average_1min": round(load, 2),
        "device_whole_profiled_ms": round(rows[ALL_LOCAL]["head_ms"], 3),
        "server_whole_profiled_ms": round(
            json.loads(server_profile.read_text())["whole_s"] * 1000, 3
        ),
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
        "planner_by_statistic": {
            statistic: {
                "choice": p["choice"],
                "estimated_ms": round(p["choice_total_ms"], 3),
                "measured_ms": round(measured[p["choice"]], 3),
                "choice_over_best": round(measured[p["choice"]] / measured[best], 3),
                "chosen_speedup_over_better_of_local_remote": round(
                    min(local, remote_only) / measured[p["choice"]], 3
                ),
                "noisy_heads": p.get("noisy_heads", []),
                "estimated_ms_per_cut": {e["cut"]: round(e["total_ms"], 3) for e in p["estimates"]},
            }
            for statistic, p in plans.items()
        },
        **(
            {
                "trial": {
                    "finalists_ms": {c: round(v, 3) for c, v in trial["finalists"].items()},
                    "choice": trial["choice"],
                    "measured_ms": round(measured[trial["choice"]], 3),
                    "choice_over_best": round(measured[trial["choice"]] / measured[best], 3),
                    "chosen_speedup_over_better_of_local_remote": round(
                        min(local, remote_only) / measured[trial["choice"]], 3
                    ),
                }
            }
            if trial
            else {}
        ),
        "requests_per_cut": {"screening": requests, "confirmation": confirm},
        **({"device_request_cost": request_cost} if request_cost else {}),
        "per_cut": {
            c: {
                "estimated_ms": round(estimates[c], 3),
                "measured_ms": round(m, 3),
                **({"confirmed_ms": round(measured[c], 3)} if c in measured else {}),
                **{
                    k: round(v, 3)
                    for k, v in detail.get(c, {}).items()
                    if k in ("device_cpu_ms", "throttled_ms")
                },
                "head_ms": round(rows[c]["head_ms"], 3),
                **({"head_cpu_ms": round(head_cpu[c], 3)} if c in head_cpu else {}),
                "tail_ms": round(rows[c]["tail_ms"], 3),
                "sent_bytes": rows[c]["sent_bytes"],
            }
            for c, m in screened.items()
        },
    }
    log(
        f"quota {quota}% {mbit:g} Mbit/s ({how}; measured rtt {row['link_measured']['rtt_ms']} ms,"
        f" {row['link_measured']['bandwidth_mbit']} Mbit/s): planner {choice} "
        f"{row['planner_choice_measured_ms']} ms; best {best} {row['best_measured_ms']} ms; "
        f"local {row['all_local_ms']} ms, remote {row['all_remote_ms']} ms, "
        f"best split {row['best_split_ms']} ms; by statistic: "
        + ", ".join(
            f"{k} {v['choice']} {v['measured_ms']} ms"
            for k, v in row["planner_by_statistic"].items()
        )
        + (
            f"; trial of {len(trial['finalists'])}: {trial['choice']} "
            f"{row['trial']['measured_ms']} ms"
            if trial
            else ""
        )
    )
    return row


# -- re-planning ---------------------------------------------------------------------------


class Clients:
    """Threads sending the digits sample to the device in a loop, every outcome timed."""

    def __init__(self, address: str, count: int) -> None:
        self.outcomes: list[tuple[float, bool]] = []  # (monotonic time, succeeded)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(address,), daemon=True) for _ in range(count)
        ]
        for t in self._threads:
            t.start()

    def _run(self, address: str) -> None:
        import tritonclient.grpc as grpcclient

        from tests.digits_variants import SAMPLE

        with grpcclient.InferenceServerClient(address) as client:
            tensor = grpcclient.InferInput("input", [2, 64], "FP32")
            tensor.set_data_from_numpy(SAMPLE.astype(np.float32))
            while not self._stop.is_set():
                try:
                    client.infer("digits", [tensor], client_timeout=60)
                    ok = True
                except grpcclient.InferenceServerException as e:
                    ok = False
                    with self._lock:
                        self.errors.append(f"{e.status()}: {e.message()}")
                with self._lock:
                    self.outcomes.append((time.monotonic(), ok))

    def between(self, start: float, end: float) -> tuple[int, int]:
        """(requests answered, requests failed) that ended in [start, end)."""
        with self._lock:
            window = [ok for at, ok in self.outcomes if start <= at < end]
        return sum(window), len(window) - sum(window)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def drain(daemon: Daemon) -> list[dict[str, Any]]:
    """The partition_replanned events logged and not read yet."""
    found = []
    while True:
        try:
            line = daemon.lines.get_nowait()
        except queue.Empty:
            return found
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "partition_replanned":
                found.append(event)


def wait_event(daemon: Daemon, event: str, timeout: float, **fields: str) -> tuple[float, dict]:
    """The next log event named ``event`` (with ``fields``) and when it was read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = daemon.lines.get(timeout=0.05)
        except queue.Empty:
            continue
        with contextlib.suppress(ValueError):
            found = json.loads(line)
            if found.get("event") == event and all(found.get(k) == v for k, v in fields.items()):
                return time.monotonic(), found
    raise TimeoutError(f"no {event} {fields} within {timeout}s")


def replan_link(args: argparse.Namespace) -> tuple[str, str]:
    """How the link is shaped ("" reason: tc in a namespace), and why not when not."""
    if args.proxy:
        return "--proxy", "a throttling TCP proxy on loopback (simulated; --proxy)"
    if os.geteuid() != 0:
        reason = "not root: no network namespace"
    else:
        probe = sh("ip", "netns", "add", NS + "-probe", check=False)
        sh("ip", "netns", "del", NS + "-probe", check=False)
        if probe.returncode == 0:
            return "", "tc tbf on a veth pair into a network namespace"
        reason = f"cannot create a network namespace: {probe.stderr.strip()}"
    return reason, f"a throttling TCP proxy on loopback (simulated; {reason})"


def start_server(
    stack: contextlib.ExitStack, args: argparse.Namespace, repo: Path, proxied: bool
) -> tuple[str, Any]:
    """The server daemon behind the shaped link: its address from the device, and a
    function setting the link's Mbit/s."""
    env = {"EDGED_MODELS_INSTANCES": "1"}
    if proxied:
        from tests.throttle_proxy import ThrottleProxy

        server = Daemon([], repo, "127.0.0.1:0", env)
        server.wait_ready()
        stack.callback(server.stop)
        proxy = ThrottleProxy(server.address)
        stack.callback(proxy.close)

        def set_proxy(mbit: float) -> None:
            proxy.rate_bps = mbit * 1e6

        return proxy.address, set_proxy
    stack.enter_context(namespace())
    shape(args.fast, 0)
    server = Daemon(["ip", "netns", "exec", NS], repo, f"{NS_IP}:{SERVER_PORT}", env)
    server.wait_ready()
    stack.callback(server.stop)
    return f"{NS_IP}:{SERVER_PORT}", lambda mbit: shape(mbit, 0)


def replan_step(
    device: Daemon, clients: Clients, set_link: Any, mbit: float, slow: bool
) -> dict[str, Any]:
    """Change the link; wait for the first switch it causes and, on the fast link, for the
    inputs cut (the best there); count the requests meanwhile."""
    step: dict[str, Any] = {"mbit": mbit, "replanned": False}
    # switches since the last step settled, with the link unchanged: flapping
    step["unprompted"] = [f"{e['from']} -> {e['to']}" for e in drain(device)]
    changed = time.monotonic()
    set_link(mbit)
    try:
        fields = {"to": "<local>"} if slow else {"from": "<local>"}
        at, event = wait_event(device, "partition_replanned", 60, **fields)
        settled = at
        if not slow and event["to"] != "<inputs>":
            settled, _ = wait_event(device, "partition_replanned", 60, to="<inputs>")
    except TimeoutError as e:
        log(str(e))
        return step
    time.sleep(1.0)  # requests after the switch count too
    answered, failed = clients.between(changed, time.monotonic())
    step.update(
        replanned=True,
        to=event["to"],
        seconds_to_replan=round(at - changed, 3),
        seconds_to_settle=round(settled - changed, 3),
        swap_seconds=event.get("seconds"),
        measured_rtt_ms=event.get("rtt_ms"),
        measured_bandwidth_mbit=event.get("bandwidth_mbit"),
        requests_answered=answered,
        requests_failed=failed,
    )
    step["from"] = event["from"]
    log(
        f"{mbit:g} Mbit/s: {event['from']} -> {event['to']} after {step['seconds_to_replan']} s"
        f" (settled {step['seconds_to_settle']} s; link seen: rtt {event.get('rtt_ms')} ms, "
        f"{event.get('bandwidth_mbit')} Mbit/s); {answered} answered, {failed} failed"
        + (f"; before the change: {step['unprompted']}" if step["unprompted"] else "")
    )
    return step


def replan_main(args: argparse.Namespace) -> int:
    from tests.split_models import device_repo, server_repo

    reason, how = replan_link(args)
    log(f"link: {how}")
    results: dict[str, Any] = {
        "model": "digits (example MLP), split at the inputs cut / hidden / all local",
        "profiles": "simulated (tests/split_models.py)",
        "link": how,
        "fast_mbit": args.fast,
        "slow_mbit": args.slow,
        "clients": args.clients,
        "steps": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="edged-replan-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        address, set_link = start_server(stack, args, server_repo(work), bool(reason))
        keys = "min_interval_ms = 500\nprobe_interval_ms = 100\nprobe_bytes = 4096\n"
        device = Daemon([], device_repo(work, address, partition=keys), "127.0.0.1:0", {})
        device.wait_ready()
        stack.callback(device.stop)
        clients = Clients(device.address, args.clients)
        stack.callback(clients.stop)
        time.sleep(3)  # the first plans on the fast link
        results["startup"] = [f"{e['from']} -> {e['to']}" for e in drain(device)]
        for i in range(args.rounds):
            for mbit, slow in ((args.slow, True), (args.fast, False)):
                step = replan_step(device, clients, set_link, mbit, slow)
                results["steps"].append({"round": i + 1, **step})
        clients.stop()
        results["requests_total"] = len(clients.outcomes)
        results["requests_failed_total"] = sum(1 for _, ok in clients.outcomes if not ok)
        results["errors"] = clients.errors[:10]
    done = [s for s in results["steps"] if s["replanned"]]
    for key in ("seconds_to_replan", "seconds_to_settle"):
        if done:
            results[f"{key}_median"] = round(statistics.median(s[key] for s in done), 3)
            results[f"{key}_max"] = round(max(s[key] for s in done), 3)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
