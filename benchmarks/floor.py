"""The floor under edged's per-request cost on this machine: what Python's asyncio, pyzmq and a
thread hop cost before edged does anything.

- a ZeroMQ ROUTER echo server on asyncio (as edged's frontend is) in a second process,
  driven by a synchronous DEALER client: round-trip p50/p99;
- ``loop.run_in_executor`` round trip (event loop -> worker thread -> loop), as each batch
  makes.

    .venv/bin/python benchmarks/floor.py      # prints JSON
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import zmq

SERVER = """
import asyncio, sys, zmq, zmq.asyncio
async def main():
    sock = zmq.asyncio.Context().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        await sock.send_multipart(await sock.recv_multipart(copy=False), copy=False)
asyncio.run(main())
"""


def zmq_echo(n: int = 5000) -> dict[str, float]:
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        endpoint = server.stdout.readline().strip()
        sock = zmq.Context().socket(zmq.DEALER)
        sock.connect(endpoint)
        payload = [b'{"v":1}', b"x" * 256]
        latencies = []
        for i in range(n + 500):
            started = time.perf_counter()
            sock.send_multipart(payload)
            sock.recv_multipart()
            if i >= 500:
                latencies.append(time.perf_counter() - started)
        sock.close(0)
    finally:
        server.terminate()
        server.wait()
    latencies.sort()
    return {
        "p50_ms": round(1000 * latencies[n // 2], 3),
        "p99_ms": round(1000 * latencies[int(n * 0.99)], 3),
    }


def executor_hop(n: int = 5000) -> dict[str, float]:
    pool = ThreadPoolExecutor(1)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        for _ in range(500):
            await loop.run_in_executor(pool, int)
        started = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(pool, int)
        return (time.perf_counter() - started) / n

    return {"mean_ms": round(1000 * asyncio.run(main()), 3)}


if __name__ == "__main__":
    print(
        json.dumps(
            {
                "benchmark": "floor",
                "zmq_asyncio_echo": zmq_echo(),
                "run_in_executor_round_trip": executor_hop(),
            },
            indent=2,
        )
    )
