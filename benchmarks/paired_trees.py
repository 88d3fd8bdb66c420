"""Paired A/B of edged builds on a busy machine: daemons *and clients* from different code
trees, interleaved rounds, every daemon freshly started, the limit measured right before it.

    git archive BASE edged hal | tar -x -C /tmp/base          # the tree to compare against
    cd /tmp && /path/to/.venv/bin/python /path/to/benchmarks/paired_trees.py \\
        --rounds 6 --seconds 3 --transports zmq,zmq-client,grpc --concurrency 1 --realtime 20 \\
        base:PYTHONPATH=/tmp/base new:

Each positional argument is a variant, ``NAME:KEY=VALUE[;KEY=VALUE]``: environment variables
for its daemon (``EDGED_*`` settings) and, for ``PYTHONPATH``, for its load generator too, so
that a tree's client (``edged.client``) is measured with its own daemon. Run it from a
directory that holds no ``edged`` package (``python -m`` puts the working directory first on
``sys.path``, ahead of ``PYTHONPATH``); a variant without ``PYTHONPATH`` runs the installed
(editable) tree. Each load window runs in its own process (benchmarks/serving.py's load
generators and CPU meter) and prints which tree it imported.

``--realtime PRIO`` runs the limit, every daemon (all its threads) and every load generator
under SCHED_FIFO at PRIO (``chrt``): on a 2-core machine shared with other work, the measured
processes then preempt it, and a c=1 p50 is as steady as on a quiet machine (p99/p50 ~1.2
instead of 4-10). Use it at c=1 only: at c=16 client and daemon keep both cores busy and the
rest of the machine would get only the kernel's 5 % real-time reserve. Figures: per variant,
transport and concurrency, the median over rounds with its range, of the p50, p50 - limit (the
limit: batch-1 p50 of a 1-thread session, measured before each daemon; it varies by itself),
the ratio to the 2x1t-b8 limit (without --realtime), p99/p50, and server and client CPU ms
per inference; the JSON (--out) keeps every round's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serving  # noqa: E402 - benchmarks/ is not a package

WINDOW = """
import asyncio, json, sys
sys.path.insert(0, {here!r})
import serving as S
import edged
transport, address = sys.argv[1], sys.argv[2]
conc, secs, pid, model = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
meter = S.Meter(pid)
if transport == "zmq":
    out = asyncio.run(S.zmq_load(address, model, conc, secs, meter))
elif transport == "zmq-sync":
    out = S.zmq_sync_load(address, model, conc, secs, meter)
elif transport == "zmq-client":
    out = S.zmq_client_load(address, model, conc, secs, meter)
else:
    out = asyncio.run(S.grpc_load(address, model, conc, secs, meter))
print(json.dumps({{**out, **meter.figures, "edged": edged.__file__}}))
"""

LIMIT = """
import json, sys
sys.path.insert(0, {here!r})
import serving as S
path, seconds, model = S.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[4]
full = sys.argv[3] == "1"
if full:  # the throughput layouts too; the latency limit stays the 1-thread session's
    lim = S.limit(path, model, seconds)
    print(json.dumps({{**lim, "p50_ms": lim["p50_ms_1t-b1"]}}))
else:
    name = S.MODELS[model]["input"]
    p50 = S._p50_batch1(S._session(path, 1, 0), name, S.sample(model, 1), seconds)[0]
    print(json.dumps({{"p50_ms": p50}}))
"""


def _variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    pairs = [a.partition("=") for a in rest.split(";") if a]
    if not name or any(not k or not sep for k, sep, _ in pairs):
        raise SystemExit(f"variant {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE] or NAME:")
    return name, {k: v for k, _, v in pairs}


def _run(
    rt: list[str], script: str, argv: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script`` (LIMIT or WINDOW) in its own process (under ``rt``); its JSON line."""
    done = subprocess.run(
        [*rt, sys.executable, "-c", script.format(here=str(HERE)), *argv],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME:KEY=VALUE[;KEY=VALUE]")
    parser.add_argument("--model", default="cls", choices=sorted(serving.MODELS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--limit-seconds", type=float, default=1.0, help="per limit layout")
    parser.add_argument("--seconds", type=float, default=3.0, help="per load window")
    parser.add_argument("--transports", default="zmq,grpc", help="zmq, zmq-sync, zmq-client, grpc")
    parser.add_argument("--concurrency", default="1")
    parser.add_argument("--realtime", type=int, default=0, help="SCHED_FIFO priority (0: off)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    variants = dict(_variant(v) for v in args.variants)
    transports = args.transports.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    rt = ["chrt", "-f", str(args.realtime)] if args.realtime else []
    repo = serving.build_repo(Path(tempfile.mkdtemp()), [args.model], 8)
    path = repo / args.model / "1" / "model.onnx"
    full = "0" if args.realtime else "1"
    trees: dict[str, str] = {}  # the code tree each variant's load generator imported
    rows: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            env = variants[name]
            load_env = {**os.environ, **{k: v for k, v in env.items() if k == "PYTHONPATH"}}
            limit = _run(rt, LIMIT, [str(path), str(args.limit_seconds), full, args.model])
            daemon = serving.Daemon(repo, env)
            try:
                daemon.wait()
                if args.realtime:
                    subprocess.run([*rt[:2], "-a", "-p", rt[2], str(daemon.proc.pid)], check=True)
                for transport in transports:
                    for level in levels:
                        address = daemon.zmq if transport.startswith("zmq") else daemon.grpc
                        pid = str(daemon.proc.pid)
                        argv = [transport, address, str(level), str(args.seconds), pid, args.model]
                        out = _run(rt, WINDOW, argv, load_env)
                        trees[name] = str(Path(out["edged"]).parent.parent)
                        row = rows.setdefault((name, transport, level), {})
                        figures = {
                            "p50_ms": out["p50_ms"],
                            "p50_over_limit_ms": out["p50_ms"] - limit["p50_ms"],
                            "limit_p50_ms": limit["p50_ms"],
                            "p99_over_p50": out["p99_ms"] / out["p50_ms"],
                            "server_cpu_ms_per_infer": out["server_cpu_ms_per_infer"],
                            "client_cpu_ms_per_infer": out["client_cpu_ms_per_infer"],
                        }
                        if "items_per_s_2x1t-b8" in limit:
                            figures["ratio_to_2x1t_b8"] = (
                                out["infer_per_s"] / limit["items_per_s_2x1t-b8"]
                            )
                        for key, value in figures.items():
                            row.setdefault(key, []).append(value)
                        print(
                            f"r{r} {name} {transport} c={level} "
                            f"{figures['p50_over_limit_ms']:+.3f} ms ({out['edged']})",
                            file=sys.stderr,
                        )
            finally:
                daemon.stop()
        loads.append(os.getloadavg()[0])
    _report(args, rows, trees, loads)


def _report(
    args: argparse.Namespace,
    rows: dict[tuple[str, str, int], dict[str, list[float]]],
    trees: dict[str, str],
    loads: list[float],
) -> None:
    report = {
        "load_1min": [round(x, 1) for x in loads],
        "realtime": args.realtime,
        "trees": trees,
        "rows": {
            f"{n} {t} c={c}": {
                k: {"median": round(statistics.median(v), 3), "rounds": v}
                for k, v in figures.items()
            }
            for (n, t, c), figures in rows.items()
        },
    }
    print(f"load average (1 min) at each round's end: {report['load_1min']}")
    for key in sorted(rows, key=lambda k: (k[1], k[2], k[0])):
        cells = "  ".join(
            f"{k} {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
            for k, v in rows[key].items()
        )
        print(f"{key[0]} {key[1]} c={key[2]}  {cells}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
