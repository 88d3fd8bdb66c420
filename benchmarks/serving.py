"""Serving throughput and latency against the physical limit, paired and repeated so that a
noisy machine shows up as a range rather than as a wrong conclusion.

**The limit** is in-process ONNX Runtime on the same model file, in its best layout, measured
again right before every server is started (so each server window has its own limit, taken
under the same background load):
- throughput: two 1-thread sessions each run by its own thread at batch 8 and at batch 4
  (`2x1t-b8`, `2x1t-b4`), against
  the former limit, one default session (all cores, spinning threads) at batch 8 and 16
  (`1x2t-b8`, `1x2t-b16`); the best of them is the limit and the JSON says which won;
- latency: batch-1 p50 of a 1-thread session (`1t-b1`) and of a default session
  (`default-b1`); the lower is the limit.
Each layout's CPU time per item (`cpu_ms_per_item_LAYOUT`) is what inference alone costs; a
server's CPU per inference above it is what serving costs.

**Servers**, each started fresh for every repeat, in an order rotated per repeat:
- `edged`: a real `edged serve` process with default settings;
- `proto-zmq`, `proto-grpc-sync`, `proto-grpc-aio`: the minimal prototypes
  (benchmarks/prototype_zmq.py, prototype_grpc.py) that show the headroom of a Python server;
- `--variant NAME:KEY=VALUE[;KEY=VALUE]` (repeatable): another `edged serve` named NAME, with
  those environment variables set (EDGED_... settings), to compare a setting side by side with
  the defaults in one run.

**Transports** (each server runs those it speaks), single-item requests from `concurrency`
callers for `--seconds` after a warm-up:
- `grpc`: the stock `tritonclient.grpc.aio` client;
- `zmq`: `edged.client.AsyncZmqClient`;
- `zmq-sync`: a minimal synchronous client (one DEALER, pre-encoded header, `concurrency`
  requests kept in flight from one thread);
- `zmq-client`: `edged.client.ZmqClient` (synchronous), one client and one thread per caller;
- `grpc+shm`: tritonclient with the input in system shared memory (edged only);
- `perf_analyzer`: Triton's C++ load generator over gRPC, if installed (no CPU figures).

Per window: infer/s, p50, p99; `ratio_to_limit` (infer/s ÷ the adjacent limit's items/s),
`p50_over_limit_ms` (p50 - the adjacent limit's batch-1 p50), `p99_over_p50`, and the CPU time
per inference of the server process and of this (the client) process, from the utime+stime
deltas in /proc/PID/stat over the timed part. With `--repeats N` every figure is reported as
the median with its range (`NAME_range`: [min, max]). `cpu_ceiling_ratio` = the limit's CPU
per item ÷ (server + client CPU per inference): the ratio this pair would reach with every core
busy on it and none idle, an upper bound that a busy machine disturbs far less than infer/s.

    .venv/bin/python benchmarks/serving.py [--seconds 4] [--concurrency 1,4,16] [--repeats 1]
        [--models cls,digits] [--servers edged,proto-zmq,proto-grpc-sync,proto-grpc-aio]
        [--transports grpc,zmq,zmq-sync,zmq-client,grpc+shm,perf_analyzer] [--out FILE]
        [--variant NAME:EDGED_KEY=VALUE ...]

Models: PP-OCR's mobile text-direction classifier (ch_ppocr_mobile_v2.0_cls_infer.onnx, from
the rapidocr-onnxruntime==1.4.4 wheel, fetched with `pip download` into benchmarks/.cache) and
the repository's own digits model (tiny: it measures pure overhead).

Prints a table on stderr and JSON on stdout. Never pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
CLS_WHEEL = "rapidocr-onnxruntime==1.4.4"
CLS_MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVERS: dict[str, frozenset[str]] = {  # server -> the transports it speaks
    "edged": frozenset({"grpc", "zmq", "zmq-sync", "zmq-client", "grpc+shm", "perf_analyzer"}),
    "proto-zmq": frozenset({"zmq", "zmq-sync", "zmq-client"}),
    "proto-grpc-sync": frozenset({"grpc", "perf_analyzer"}),
    "proto-grpc-aio": frozenset({"grpc", "perf_analyzer"}),
}
#: --variant: edged servers with extra environment variables, by name
VARIANTS: dict[str, dict[str, str]] = {}
TRANSPORTS = ("grpc", "zmq", "zmq-sync", "zmq-client", "grpc+shm", "perf_analyzer")


def fetch_cls() -> Path:
    """The PP-OCR classifier, downloaded once (pip download --no-deps) and unzipped."""
    target = CACHE / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), CLS_WHEEL],
        check=True,
    )
    wheel = next(CACHE.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    with zipfile.ZipFile(wheel) as zf, zf.open(CLS_MEMBER) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


MODELS: dict[str, dict[str, Any]] = {
    "cls": {"input": "x", "shape": (3, 48, 192), "max_batch_size": 16},
    "digits": {"input": "input", "shape": (64,), "max_batch_size": 32},
}


def build_repo(root: Path, models: list[str], max_batch_size: int = 16) -> Path:
    """The served models; cls batches up to ``max_batch_size`` (``main`` passes 8 by default:
    the limit's and the prototypes' batch)."""
    repo = root / "models"
    if "cls" in models:
        (repo / "cls" / "1").mkdir(parents=True)
        shutil.copy(fetch_cls(), repo / "cls" / "1" / "model.onnx")
        (repo / "cls" / "model.toml").write_text(
            f'name = "cls"\nmax_batch_size = {max_batch_size}\n\n'
            '[[inputs]]\nname = "x"\ndims = [3, 48, 192]\n'
        )
    if "digits" in models:
        shutil.copytree(
            ROOT / "models" / "digits", repo / "digits", ignore=shutil.ignore_patterns("*.npy")
        )
    return repo


def sample(model: str, rows: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((rows, *MODELS[model]["shape"]), dtype=np.float32)


def summarize(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "infer_per_s": round(len(ordered) / seconds, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "requests": len(ordered),
    }


def spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric figure over the repeats, with its [min, max] as NAME_range."""
    out: dict[str, Any] = {"repeats": len(runs)}
    errors = [r["error"] for r in runs if "error" in r]
    if errors:  # perf_analyzer's own failures (it gives up on unstable windows)
        out["errors"] = errors
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if not values or isinstance(runs[0][key], bool):
            continue
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_range"] = [round(min(values), 3), round(max(values), 3)]
    return out


# -- the limit: in-process ONNX Runtime ------------------------------------------------------

_SESSIONS: dict[tuple[str, int, int], ort.InferenceSession] = {}


def _session(path: Path, threads: int, slot: int = 0) -> ort.InferenceSession:
    """A cached session: ``threads`` intra-op threads (0: ORT's default, all cores, spinning)."""
    key = (str(path), threads, slot)
    if key not in _SESSIONS:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        _SESSIONS[key] = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    return _SESSIONS[key]


def _throughput(
    sessions: list[ort.InferenceSession], name: str, x: np.ndarray, seconds: float
) -> tuple[float, float]:
    """Items/s with one thread per session, each running ``x`` back to back, and this
    process's CPU ms per item meanwhile."""
    for s in sessions:
        for _ in range(3):
            s.run(None, {name: x})
    counts = [0] * len(sessions)
    stop_at = time.perf_counter() + seconds

    def run(i: int) -> None:
        while time.perf_counter() < stop_at:
            sessions[i].run(None, {name: x})
            counts[i] += x.shape[0]

    cpu = cpu_seconds(os.getpid())
    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    items = max(sum(counts), 1)
    return items / elapsed, 1000 * (cpu_seconds(os.getpid()) - cpu) / items


def _p50_batch1(
    session: ort.InferenceSession, name: str, x: np.ndarray, seconds: float
) -> tuple[float, float]:
    """Batch-1 p50 in ms, and this process's CPU ms per item meanwhile."""
    for _ in range(5):
        session.run(None, {name: x})
    latencies = []
    cpu = cpu_seconds(os.getpid())
    stop_at = time.perf_counter() + seconds
    while (now := time.perf_counter()) < stop_at:
        session.run(None, {name: x})
        latencies.append(time.perf_counter() - now)
    cpu_ms = 1000 * (cpu_seconds(os.getpid()) - cpu) / max(len(latencies), 1)
    return 1000 * statistics.median(latencies), cpu_ms


def limit(model_path: Path, model: str, seconds: float) -> dict[str, Any]:
    """The limit in its best layout (module docstring), ~4 x ``seconds`` of wall time. Also the
    CPU ms per item of each layout: what inference alone costs, to set against a server's."""
    name = MODELS[model]["input"]
    x4, x8, x16, x1 = sample(model, 4), sample(model, 8), sample(model, 16), sample(model, 1)
    throughput = {
        # 4: on a 2-core x86 box, cls's 1-thread CPU per item is lowest at batch 4 (0.9 ms,
        # against 1.1 at 8 and 1.3 at 16: the batch's 110 KiB per item outgrows the cache)
        "2x1t-b4": _throughput(
            [_session(model_path, 1, 0), _session(model_path, 1, 1)], name, x4, seconds
        ),
        "2x1t-b8": _throughput(
            [_session(model_path, 1, 0), _session(model_path, 1, 1)], name, x8, seconds
        ),
        "1x2t-b8": _throughput([_session(model_path, 0)], name, x8, seconds / 2),
        "1x2t-b16": _throughput([_session(model_path, 0)], name, x16, seconds / 2),
    }
    latency = {
        "1t-b1": _p50_batch1(_session(model_path, 1, 0), name, x1, seconds / 2),
        "default-b1": _p50_batch1(_session(model_path, 0), name, x1, seconds / 2),
    }
    best = max(throughput, key=lambda k: throughput[k][0])
    fastest = min(latency, key=lambda k: latency[k][0])
    return {
        "items_per_s": round(throughput[best][0], 1),
        "p50_ms": round(latency[fastest][0], 3),
        "throughput_layout": best,
        "latency_layout": fastest,
        **{f"items_per_s_{k}": round(v[0], 1) for k, v in throughput.items()},
        **{f"p50_ms_{k}": round(v[0], 3) for k, v in latency.items()},
        **{f"cpu_ms_per_item_{k}": round(v[1], 4) for k, v in {**throughput, **latency}.items()},
    }


# -- servers under test ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


class Meter:
    """CPU seconds of the server and of this process over the timed part of a window."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start = (0.0, 0.0)
        self.figures: dict[str, float] = {}

    def start(self) -> None:
        self._start = (cpu_seconds(self.server_pid), cpu_seconds(os.getpid()))

    def stop(self, requests: int) -> None:
        server = cpu_seconds(self.server_pid) - self._start[0]
        client = cpu_seconds(os.getpid()) - self._start[1]
        n = max(requests, 1)
        self.figures = {
            "server_cpu_ms_per_infer": round(1000 * server / n, 4),
            "client_cpu_ms_per_infer": round(1000 * client / n, 4),
        }


class Server:
    """A server under test in its own process; ``grpc`` and ``zmq`` are its addresses."""

    proc: subprocess.Popen[str]
    grpc = ""
    zmq = ""

    def wait(self) -> None:
        raise NotImplementedError

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Daemon(Server):
    """`edged serve` in a subprocess; its addresses come from the `server_live` log line."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        full.update(
            {
                "EDGED_ZMQ_ADDRESSES": "tcp://127.0.0.1:0",
                "EDGED_METRICS_ADDRESS": "127.0.0.1:0",
                "EDGED_SERVER_HTTP_ADDRESS": "127.0.0.1:0",  # free ports: other servers may run
            }
        )
        full.update(env)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edged.cli",
                "serve",
                "--models",
                str(repo),
                "--grpc-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=full,
        )
        self._ready = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # keep draining so the daemon never blocks on stdout
            event = json.loads(line)
            if event.get("event") == "server_live":
                self.grpc = event["grpc_address"]
                self.zmq = event["zmq_endpoints"][0]
            elif event.get("event") in ("server_ready", "server_not_ready"):
                self._ready.set()

    def wait(self) -> None:
        deadline = time.monotonic() + 120
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"edged exited with {self.proc.returncode} before ready")
            if time.monotonic() > deadline:
                raise RuntimeError("edged did not become ready in 120 s")


class Prototype(Server):
    """A server command that prints {"grpc": ADDRESS} or {"zmq": ENDPOINT} once bound."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=HERE)

    def wait(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args} exited before binding")
        bound = json.loads(line)
        self.grpc = bound.get("grpc", "")
        self.zmq = bound.get("zmq", "")


def start(
    server: str, repo: Path, model: str, env: dict[str, str], max_batch_size: int = 8
) -> Server:
    path = str(repo / model / "1" / "model.onnx")
    if server == "edged":
        return Daemon(repo, env)
    if server in VARIANTS:
        return Daemon(repo, {**env, **VARIANTS[server]})
    if server == "proto-zmq":
        batch = ["--max-batch", str(max_batch_size)] if model == "cls" else []
        return Prototype([sys.executable, str(HERE / "prototype_zmq.py"), path, *batch])
    mode = server.removeprefix("proto-grpc-")
    return Prototype([sys.executable, str(HERE / "prototype_grpc.py"), mode, path])


# -- load generators -------------------------------------------------------------------------


async def _drive(
    call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float, meter: Meter | None
) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    for i in range(concurrency):  # warm-up
        await call(i)
    if meter:
        meter.start()
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    if meter:
        meter.stop(len(latencies))
    return summarize(latencies, elapsed)


async def grpc_load(
    address: str, model: str, concurrency: int, seconds: float, meter: Meter | None = None
) -> dict:
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput

    x = sample(model)
    async with aioclient.InferenceServerClient(address) as client:

        async def call(_: int) -> None:
            tensor = InferInput(MODELS[model]["input"], list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            await client.infer(model, [tensor])

        return await _drive(call, concurrency, seconds, meter)


async def zmq_load(
    address: str, model: str, concurrency: int, seconds: float, meter: Meter | None = None
) -> dict:
    from edged.client import AsyncZmqClient

    x = sample(model)
    async with AsyncZmqClient(address) as client:

        async def call(_: int) -> None:
            await client.infer(model, {MODELS[model]["input"]: x})

        return await _drive(call, concurrency, seconds, meter)


def zmq_sync_load(
    address: str, model: str, concurrency: int, seconds: float, meter: Meter | None = None
) -> dict:
    """The lightest Python client: one DEALER, a pre-encoded header, ``concurrency`` requests
    kept in flight from this thread (a reply's id says which request it answers)."""
    import zmq

    x = sample(model)
    spec = {"name": MODELS[model]["input"], "datatype": "FP32", "shape": list(x.shape)}
    head = json.dumps({"v": 1, "op": "infer", "model": model, "inputs": [spec], "id": ""})
    prefix, suffix = head[:-2].encode(), head[-2:].encode()  # split around the id's value
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sent: dict[str, float] = {}
    ids = itertools.count()

    def send() -> None:
        rid = str(next(ids))
        sent[rid] = time.perf_counter()
        sock.send_multipart([prefix + rid.encode() + suffix, x], copy=False)

    def receive() -> float:
        if not sock.poll(30_000):
            raise RuntimeError("zmq-sync: no reply within 30 s")
        reply = sock.recv_multipart(copy=False)
        header = json.loads(reply[0].bytes)
        if not header.get("ok"):
            raise RuntimeError(f"zmq-sync: {header}")
        return time.perf_counter() - sent.pop(header["id"])

    try:
        for _ in range(concurrency):  # warm-up
            send()
        for _ in range(concurrency):
            receive()
        latencies: list[float] = []
        if meter:
            meter.start()
        started = time.perf_counter()
        stop_at = started + seconds
        for _ in range(concurrency):
            send()
        while sent:
            latencies.append(receive())
            if time.perf_counter() < stop_at:
                send()
        elapsed = time.perf_counter() - started
        if meter:
            meter.stop(len(latencies))
    finally:
        sock.close(0)
    return summarize(latencies, elapsed)


def zmq_client_load(
    address: str, model: str, concurrency: int, seconds: float, meter: Meter | None = None
) -> dict:
    """edged's synchronous client as an application uses it: one per thread."""
    from edged.client import ZmqClient

    x = sample(model)
    inputs = {MODELS[model]["input"]: x}
    clients = [ZmqClient(address) for _ in range(concurrency)]
    latencies: list[float] = []
    stop_at = 0.0

    def worker(client: ZmqClient) -> None:
        mine = []
        while (started := time.perf_counter()) < stop_at:
            client.infer(model, inputs)
            mine.append(time.perf_counter() - started)
        latencies.extend(mine)

    try:
        for client in clients:  # warm-up
            client.infer(model, inputs)
        if meter:
            meter.start()
        started = time.perf_counter()
        stop_at = started + seconds
        threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        if meter:
            meter.stop(len(latencies))
    finally:
        for client in clients:
            client.close()
    return summarize(latencies, elapsed)


async def shm_load(
    address: str, model: str, concurrency: int, seconds: float, meter: Meter | None = None
) -> dict:
    import tritonclient.grpc.aio as aioclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.grpc import InferInput

    x = sample(model)
    handles = []
    async with aioclient.InferenceServerClient(address) as client:
        names = []
        for i in range(concurrency):
            name = f"bench{i}"
            key = f"/edged-bench-{uuid.uuid4().hex[:8]}"
            handle = shm.create_shared_memory_region(name, key, x.nbytes)
            shm.set_shared_memory_region(handle, [x])
            handles.append(handle)
            await client.register_system_shared_memory(name, key, x.nbytes)
            names.append(name)
        try:

            async def call(i: int) -> None:
                tensor = InferInput(MODELS[model]["input"], list(x.shape), "FP32")
                tensor.set_shared_memory(names[i], x.nbytes)
                await client.infer(model, [tensor])

            return await _drive(call, concurrency, seconds, meter)
        finally:
            await client.unregister_system_shared_memory()
            for handle in handles:
                shm.destroy_shared_memory_region(handle)


def perf_analyzer(address: str, model: str, concurrency: int, seconds: float) -> dict | None:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        return None
    try:
        import nvidia.cuda_runtime

        lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    except ImportError:
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib))
    with tempfile.NamedTemporaryFile(suffix=".csv") as csv:
        result = subprocess.run(
            [
                str(binary),
                "-m",
                model,
                "-u",
                address,
                "-i",
                "grpc",
                "--concurrency-range",
                str(concurrency),
                "--measurement-interval",
                str(int(seconds * 1000)),
                "--percentile",
                "99",
                "-f",
                csv.name,
                "--max-trials",
                "5",
                "--stability-percentage",
                "25",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            return {"error": result.stdout[-300:] + result.stderr[-300:]}
        header, row = Path(csv.name).read_text().splitlines()[:2]
    fields = dict(zip(header.split(","), row.split(","), strict=False))
    return {
        "infer_per_s": float(fields["Inferences/Second"]),
        "p50_ms": round(float(fields.get("p50 latency", 0)) / 1000, 3),
        "p99_ms": round(float(fields.get("p99 latency", 0)) / 1000, 3),
    }


def window(server: Server, transport: str, model: str, level: int, seconds: float) -> dict | None:
    """One measurement against a running server; None where the transport is not installed."""
    meter = Meter(server.proc.pid)
    if transport == "grpc":
        result = asyncio.run(grpc_load(server.grpc, model, level, seconds, meter))
    elif transport == "zmq":
        result = asyncio.run(zmq_load(server.zmq, model, level, seconds, meter))
    elif transport == "zmq-sync":
        result = zmq_sync_load(server.zmq, model, level, seconds, meter)
    elif transport == "zmq-client":
        result = zmq_client_load(server.zmq, model, level, seconds, meter)
    elif transport == "grpc+shm":
        result = asyncio.run(shm_load(server.grpc, model, level, seconds, meter))
    else:
        return perf_analyzer(server.grpc, model, level, seconds)
    return {**result, **meter.figures}


def against(result: dict[str, Any], lim: dict[str, Any]) -> dict[str, Any]:
    """A window's ratios to the limit measured beside it."""
    if "infer_per_s" not in result:
        return result
    out = {
        **result,
        "ratio_to_limit": round(result["infer_per_s"] / lim["items_per_s"], 3),
        # against the limit as it was measured before 2x1t-b4 joined it (tables up to
        # 2026-12-05)
        "ratio_to_2x1t_b8": round(result["infer_per_s"] / lim["items_per_s_2x1t-b8"], 3),
        "p50_over_limit_ms": round(result["p50_ms"] - lim["p50_ms"], 3),
        "p99_over_p50": round(result["p99_ms"] / max(result["p50_ms"], 1e-9), 2),
    }
    if "server_cpu_ms_per_infer" in result:
        spent = result["server_cpu_ms_per_infer"] + result["client_cpu_ms_per_infer"]
        inference = lim[f"cpu_ms_per_item_{lim['throughput_layout']}"]
        out["cpu_ceiling_ratio"] = round(inference / max(spent, 1e-9), 3)
    return out


# -- the run ---------------------------------------------------------------------------------


def run_model(
    repo: Path, model: str, servers: list[str], transports: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    path = repo / model / "1" / "model.onnx"
    env = {"EDGED_MODELS_INSTANCES": str(args.instances)} if args.instances else {}
    levels = [int(c) for c in args.concurrency.split(",")]
    limit_seconds = args.limit_seconds if args.limit_seconds else args.seconds / 2
    limits: list[dict[str, Any]] = []
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    rss: dict[str, list[float]] = {}
    raw: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        shift = repeat % len(servers)
        for name in servers[shift:] + servers[:shift]:
            lim = limit(path, model, limit_seconds)
            limits.append(lim)
            print(f"{model:7} r{repeat} limit {lim}", file=sys.stderr)
            server = start(name, repo, model, env, args.max_batch_size)
            try:
                server.wait()
                rss.setdefault(name, []).append(round(server.rss_mib(), 1))
                for transport in transports:
                    if transport not in SERVERS[name]:
                        continue
                    for level in levels:
                        result = window(server, transport, model, level, args.seconds)
                        if result is None:
                            continue
                        result = against(result, lim)
                        print(
                            f"{model:7} r{repeat} {name:15} {transport:13} c={level:<3} {result}",
                            file=sys.stderr,
                        )
                        raw.append(
                            {
                                "repeat": repeat,
                                "server": name,
                                "transport": transport,
                                "concurrency": level,
                                "limit": lim,
                                **result,
                            }
                        )
                        runs.setdefault(name, {}).setdefault(transport, {}).setdefault(
                            str(level), []
                        ).append(result)
            finally:
                server.stop()
    by_server = {
        name: {t: {lvl: spread(rs) for lvl, rs in levels_.items()} for t, levels_ in ts.items()}
        for name, ts in runs.items()
    }
    summary_limit = spread(limits)
    summary_limit["throughput_wins"] = dict(Counter(lim["throughput_layout"] for lim in limits))
    summary_limit["latency_wins"] = dict(Counter(lim["latency_layout"] for lim in limits))
    entry: dict[str, Any] = {
        "limit": summary_limit,
        "servers": by_server,
        "server_rss_mib_ready": {k: statistics.median(v) for k, v in rss.items()},
        "windows": raw,
    }
    if "edged" in by_server:
        entry["edged"] = by_server["edged"]  # the key earlier versions of this report had
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement window")
    parser.add_argument(
        "--limit-seconds", type=float, default=0.0, help="per limit layout (0: --seconds / 2)"
    )
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--models", default="cls,digits")
    parser.add_argument("--servers", default="edged", help=f"of {','.join(SERVERS)}")
    parser.add_argument(
        "--transports", default="grpc,zmq,grpc+shm,perf_analyzer", help=f"of {','.join(TRANSPORTS)}"
    )
    parser.add_argument("--repeats", type=int, default=1, help="every server freshly started")
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="EDGED_MODELS_INSTANCES for the daemon (0: its default)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="how many cls items edged (model.toml's max_batch_size) and proto-zmq batch at "
        "most (8: the issue's policy; the tables up to 2026-12-05 ran edged at 16)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;KEY=VALUE]",
        help="another edged server named NAME (usable in --servers) with these environment "
        "variables",
    )
    args = parser.parse_args()
    for spec in args.variant:
        name, _, assignments = spec.partition(":")
        pairs = [a.partition("=") for a in assignments.split(";") if a]
        if not name or name in SERVERS or not pairs or any(not k or not e for k, e, _ in pairs):
            parser.error(f"--variant {spec!r}: expected a new NAME:KEY=VALUE[;KEY=VALUE]")
        VARIANTS[name] = {k: v for k, _, v in pairs}
        SERVERS[name] = SERVERS["edged"]
    models = args.models.split(",")
    servers = args.servers.split(",")
    transports = args.transports.split(",")
    for value, known, flag in (
        (models, MODELS, "--models"),
        (servers, SERVERS, "--servers"),
        (transports, TRANSPORTS, "--transports"),
    ):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    report: dict[str, Any] = {
        "benchmark": "serving",
        "command": " ".join(["benchmarks/serving.py", *sys.argv[1:]]),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "cpu": _cpu_name(),
            "loadavg_at_start": os.getloadavg()[0],
        },
        "seconds_per_measurement": args.seconds,
        "cls_max_batch_size": args.max_batch_size,  # edged and proto-zmq
        "repeats": args.repeats,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp), models, args.max_batch_size)
        for model in models:
            report["models"][model] = run_model(repo, model, servers, transports, args)
    report["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    _table(report)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(r: dict[str, Any], key: str) -> str:
    if key not in r:
        return "-"
    low, high = r[f"{key}_range"]
    if r["repeats"] == 1:
        return _num(r[key])
    return f"{_num(r[key])} ({_num(low)}-{_num(high)})"


def _num(value: float) -> str:
    """Three significant figures, whole numbers from 100 up: the table is for reading."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _table(report: dict[str, Any]) -> None:
    out = sys.stderr
    columns = [
        ("infer/s", "infer_per_s"),
        ("ratio", "ratio_to_limit"),
        ("ratio to 2x1t-b8", "ratio_to_2x1t_b8"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("p50-lim ms", "p50_over_limit_ms"),
        ("p99/p50", "p99_over_p50"),
        ("CPU ceiling", "cpu_ceiling_ratio"),
        ("server CPU ms/inf", "server_cpu_ms_per_infer"),
        ("client CPU ms/inf", "client_cpu_ms_per_infer"),
    ]
    for model, entry in report["models"].items():
        lim = entry["limit"]
        print(
            f"\n{model}: limit {_fmt(lim, 'items_per_s')} items/s (wins: {lim['throughput_wins']}),"
            f" batch-1 p50 {_fmt(lim, 'p50_ms')} ms (wins: {lim['latency_wins']});"
            f" {lim['repeats']} measurements",
            file=out,
        )
        print("| server | transport | conc | " + " | ".join(c for c, _ in columns) + " |", file=out)
        print("| --- | --- | ---: |" + " ---: |" * len(columns), file=out)
        for server, transports in entry["servers"].items():
            for transport, levels in transports.items():
                for level, r in levels.items():
                    cells = " | ".join(_fmt(r, key) for _, key in columns)
                    print(f"| {server} | {transport} | {level} | {cells} |", file=out)


if __name__ == "__main__":
    main()
