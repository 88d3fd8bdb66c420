"""What a native gRPC frontend would cost per call, against Python: the same KServe ModelInfer
echo (the request's tensor sent back, no model) served by

- `native`: grpc++'s synchronous server (echo_server.cc, built by build.sh from the OS's
  libgrpc++; skipped with a note when it is not built),
- `py-aio`: grpc.aio (benchmarks/prototype_grpc.py echo),
- `py-sync`: grpcio's synchronous server (prototype_grpc.py echo-sync),

each driven by the benchmark's own client (stock tritonclient.grpc.aio, benchmarks/serving.py)
with the cls model's input (1 x 3 x 48 x 192 FP32, 110 KiB) or digits' (256 B), in interleaved
repeats with every server freshly started. Per window: calls/s, p50, p99, and the CPU time per
call of the server and of this (the client) process from /proc/PID/stat.

    benchmarks/native_grpc/build.sh
    .venv/bin/python benchmarks/native_grpc/compare.py [--repeats 3] [--seconds 3]
        [--concurrency 1,16] [--payload cls] [--out FILE]

Prints a table on stderr and JSON on stdout. Never pass/fail; not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import serving  # noqa: E402  (benchmarks/serving.py: one home for the client and the meter)

ECHO_SERVER = HERE / "build" / "echo_server"
PROTOTYPE = str(HERE.parent / "prototype_grpc.py")
SERVERS: dict[str, list[str]] = {
    "native": [str(ECHO_SERVER)],
    "py-aio": [sys.executable, PROTOTYPE, "echo"],
    "py-sync": [sys.executable, PROTOTYPE, "echo-sync"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement window")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"of {','.join(SERVERS)}")
    parser.add_argument("--payload", default="cls", choices=sorted(serving.MODELS))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    notes = []
    if "native" in servers and not ECHO_SERVER.exists():
        servers.remove("native")
        notes.append(f"native skipped: {ECHO_SERVER} not built (run {HERE / 'build.sh'})")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for repeat in range(args.repeats):
        shift = repeat % len(servers)
        for name in servers[shift:] + servers[:shift]:
            server = serving.Prototype(SERVERS[name])
            try:
                server.wait()
                for level in levels:
                    meter = serving.Meter(server.proc.pid)
                    result = asyncio.run(
                        serving.grpc_load(server.grpc, args.payload, level, args.seconds, meter)
                    )
                    result = {
                        **result,
                        **meter.figures,
                        "p99_over_p50": round(result["p99_ms"] / result["p50_ms"], 2),
                    }
                    print(f"r{repeat} {name:8} c={level:<3} {result}", file=sys.stderr)
                    runs.setdefault(name, {}).setdefault(str(level), []).append(result)
            finally:
                server.stop()
    report = {
        "benchmark": "native_grpc",
        "command": " ".join(["benchmarks/native_grpc/compare.py", *sys.argv[1:]]),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "cpu": serving._cpu_name(),
            "loadavg_at_end": os.getloadavg()[0],
        },
        "payload": args.payload,
        "notes": notes,
        "servers": {
            name: {lvl: serving.spread(rs) for lvl, rs in by_level.items()}
            for name, by_level in runs.items()
        },
    }
    columns = ["infer_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_infer"]
    columns += ["client_cpu_ms_per_infer"]
    print("\n| server | conc | " + " | ".join(columns) + " |", file=sys.stderr)
    print("| --- | ---: |" + " ---: |" * len(columns), file=sys.stderr)
    for name, by_level in report["servers"].items():
        for level, r in by_level.items():
            cells = " | ".join(serving._fmt(r, key) for key in columns)
            print(f"| {name} | {level} | {cells} |", file=sys.stderr)
    for note in notes:
        print(note, file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
