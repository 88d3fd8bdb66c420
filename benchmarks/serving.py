"""Serving throughput and latency against the physical limit, in one run on one machine.

The limit is in-process ONNX Runtime on the same model file (batch 1, and the best batch
size). Against it: a real `edged serve` process driven over gRPC (stock tritonclient.grpc.aio),
over ZeroMQ (edged.client.AsyncZmqClient), and over gRPC with inputs in system shared memory
(tritonclient.utils.shared_memory); single-item requests at each concurrency. Optionally also
Triton's C++ load generator perf_analyzer over gRPC, which costs the client far less CPU.

Models: PP-OCR's mobile text-direction classifier (ch_ppocr_mobile_v2.0_cls_infer.onnx, from
the rapidocr-onnxruntime==1.4.4 wheel, fetched with `pip download` into benchmarks/.cache) and
the repository's own digits model (tiny: it measures pure overhead).

    .venv/bin/python benchmarks/serving.py [--seconds 4] [--concurrency 1,4,16] [--out FILE]

Prints a table on stderr and JSON on stdout. Never pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
CLS_WHEEL = "rapidocr-onnxruntime==1.4.4"
CLS_MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"


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


def build_repo(root: Path, cls_path: Path) -> Path:
    repo = root / "models"
    (repo / "cls" / "1").mkdir(parents=True)
    shutil.copy(cls_path, repo / "cls" / "1" / "model.onnx")
    (repo / "cls" / "model.toml").write_text(
        'name = "cls"\nmax_batch_size = 16\n\n[[inputs]]\nname = "x"\ndims = [3, 48, 192]\n'
    )
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


def in_process(model_path: Path, model: str, seconds: float) -> dict[str, Any]:
    """The limit: ONNX Runtime in this process, default threading (all cores)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = MODELS[model]["input"]
    by_batch = {}
    latency_b1: list[float] = []
    for batch in (1, 2, 4, 8, 16):
        x = sample(model, batch)
        for _ in range(5):
            session.run(None, {name: x})
        items = 0
        started = time.perf_counter()
        while (now := time.perf_counter()) - started < seconds / 2:
            session.run(None, {name: x})
            if batch == 1:
                latency_b1.append(time.perf_counter() - now)
            items += batch
        by_batch[batch] = round(items / (time.perf_counter() - started), 1)
    best = max(by_batch, key=lambda b: by_batch[b])
    return {
        "items_per_s_by_batch": by_batch,
        "best_batch": best,
        "best_items_per_s": by_batch[best],
        "batch1_p50_ms": round(1000 * statistics.median(latency_b1), 3),
    }


class Daemon:
    """`edged serve` in a subprocess; its addresses come from the `server_live` log line."""

    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        full.update(
            {"EDGED_ZMQ_ADDRESSES": "tcp://127.0.0.1:0", "EDGED_METRICS_ADDRESS": "127.0.0.1:0"}
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
        self.grpc = self.zmq = ""
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
        if not self._ready.wait(120):
            raise RuntimeError("edged did not become ready")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def _drive(call, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    for i in range(concurrency):  # warm-up
        await call(i)
    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return summarize(latencies, time.perf_counter() - started)


async def grpc_load(address: str, model: str, concurrency: int, seconds: float) -> dict:
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput

    x = sample(model)
    async with aioclient.InferenceServerClient(address) as client:

        async def call(_: int) -> None:
            tensor = InferInput(MODELS[model]["input"], list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            await client.infer(model, [tensor])

        return await _drive(call, concurrency, seconds)


async def zmq_load(address: str, model: str, concurrency: int, seconds: float) -> dict:
    from edged.client import AsyncZmqClient

    x = sample(model)
    async with AsyncZmqClient(address) as client:

        async def call(_: int) -> None:
            await client.infer(model, {MODELS[model]["input"]: x})

        return await _drive(call, concurrency, seconds)


async def shm_load(address: str, model: str, concurrency: int, seconds: float) -> dict:
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

            return await _drive(call, concurrency, seconds)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--models", default="cls,digits")
    parser.add_argument("--transports", default="grpc,zmq,grpc+shm,perf_analyzer")
    parser.add_argument(
        "--instances",
        type=int,
        default=0,
        help="EDGED_MODELS_INSTANCES for the daemon (0: its default)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    transports = args.transports.split(",")
    cls_path = fetch_cls()
    report: dict[str, Any] = {
        "benchmark": "serving",
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "cpu": _cpu_name(),
        },
        "seconds_per_measurement": args.seconds,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp), cls_path)
        env = {"EDGED_MODELS_INSTANCES": str(args.instances)} if args.instances else {}
        for model in args.models.split(","):
            path = repo / model / "1" / "model.onnx"
            limit = in_process(path, model, args.seconds)
            entry: dict[str, Any] = {"limit": limit, "edged": {}}
            daemon = Daemon(repo, env)
            try:
                daemon.wait()
                entry["daemon_rss_mib_ready"] = round(daemon.rss_mib(), 1)
                for transport in transports:
                    for level in levels:
                        if transport == "grpc":
                            result = asyncio.run(grpc_load(daemon.grpc, model, level, args.seconds))
                        elif transport == "zmq":
                            result = asyncio.run(zmq_load(daemon.zmq, model, level, args.seconds))
                        elif transport == "grpc+shm":
                            result = asyncio.run(shm_load(daemon.grpc, model, level, args.seconds))
                        else:
                            result = perf_analyzer(daemon.grpc, model, level, args.seconds)
                            if result is None:
                                continue
                        if "infer_per_s" in result:
                            result["ratio_to_best_batch"] = round(
                                result["infer_per_s"] / limit["best_items_per_s"], 3
                            )
                            result["p50_over_batch1_ms"] = round(
                                result["p50_ms"] - limit["batch1_p50_ms"], 3
                            )
                            result["p99_over_p50"] = round(
                                result["p99_ms"] / max(result["p50_ms"], 1e-9), 2
                            )
                        entry["edged"].setdefault(transport, {})[str(level)] = result
                        print(f"{model:7} {transport:13} c={level:<3} {result}", file=sys.stderr)
                entry["daemon_rss_mib_after"] = round(daemon.rss_mib(), 1)
            finally:
                daemon.stop()
            report["models"][model] = entry
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


def _table(report: dict[str, Any]) -> None:
    out = sys.stderr
    for model, entry in report["models"].items():
        limit = entry["limit"]
        print(
            f"\n{model}: in-process ONNX Runtime {limit['items_per_s_by_batch']} items/s by "
            f"batch; batch-1 p50 {limit['batch1_p50_ms']} ms",
            file=out,
        )
        print(
            f"{'transport':14} {'conc':>4} {'infer/s':>9} {'ratio':>6} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'p50-lim':>8}",
            file=out,
        )
        for transport, levels in entry["edged"].items():
            for level, r in levels.items():
                if "infer_per_s" not in r:
                    print(f"{transport:14} {level:>4} {r}", file=out)
                    continue
                print(
                    f"{transport:14} {level:>4} {r['infer_per_s']:>9} "
                    f"{r['ratio_to_best_batch']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                    f"{r['p50_over_batch1_ms']:>8}",
                    file=out,
                )


if __name__ == "__main__":
    main()
