"""Start-up time and idle memory of `edged serve` on the example repository.

For each run: spawn the daemon, poll ServerLive and ServerReady over gRPC, send a few
requests to every example model, wait, then read the process's resident memory (VmRSS).
Prints one JSON object; never pass/fail.

    .venv/bin/python benchmarks/startup.py [--runs 5] [--models models]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_until(check, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic()
        except grpc.RpcError:
            pass
        time.sleep(0.002)
    raise TimeoutError


def one_run(models: Path) -> dict[str, float]:
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edged.cli",
            "serve",
            "--models",
            str(models),
            "--grpc-address",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "EDGED_ZMQ_ADDRESSES": "tcp://127.0.0.1:0",
            "EDGED_METRICS_ADDRESS": "127.0.0.1:0",
        },
    )
    try:
        assert proc.stdout is not None
        address = ""
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "server_live":
                address = event["grpc_address"]
                break
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            live = wait_until(lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=1).live)
            ready = wait_until(lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready)
            rss_ready = rss_mib(proc.pid)
            request = pb.ModelInferRequest(model_name="digits")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
            for _ in range(200):
                stub.ModelInfer(request, timeout=5)
        time.sleep(1.0)
        rss_idle = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "start_to_live_s": live - start,
        "start_to_ready_s": ready - start,
        "rss_ready_mib": rss_ready,
        "rss_idle_after_requests_mib": rss_idle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", type=Path, default=Path(__file__).parent.parent / "models")
    args = parser.parse_args()
    runs = [one_run(args.models) for _ in range(args.runs)]
    summary = {
        key: {
            "median": round(statistics.median(r[key] for r in runs), 3),
            "min": round(min(r[key] for r in runs), 3),
            "max": round(max(r[key] for r in runs), 3),
        }
        for key in runs[0]
    }
    print(
        json.dumps(
            {
                "benchmark": "startup",
                "runs": args.runs,
                "models": str(args.models),
                "machine": {
                    "cpus": len(__import__("os").sched_getaffinity(0)),
                    "python": platform.python_version(),
                },
                "results": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
