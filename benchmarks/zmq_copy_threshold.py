"""The ZeroMQ reply sockets' copy threshold: large outputs copied into the message, or sent
by reference (a zero-copy frame, released on pyzmq's garbage-collector thread)?

    .venv/bin/python benchmarks/zmq_copy_threshold.py --rounds 3 --seconds 2 \\
        --thresholds 65536,1048576,16777216 --sizes 131072,524288,1048576,4194304

The model is tests/modelgen.py's ``dynamic_axes_model`` (``y = 3 * x``, FP32 [1, seq, 4]):
a request of N bytes gets a reply of N bytes. For every round, threshold (an ``edged serve``
whose ``edged.frontends.zmq.REPLY_COPY_THRESHOLD`` is set to it, started fresh; the order
rotated per round) and output size, ``edged.client.ZmqClient`` sends single requests for
``--seconds`` (c=1) and the window records p50 and the daemon's CPU time per inference
(from /proc). The first reply of each window is compared byte for byte with in-process ONNX
Runtime on the same model file. Prints medians (ranges) per threshold and size, JSON with
``--out``. ``--realtime PRIO`` runs daemon and client under SCHED_FIFO (see paired_trees.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import serving  # noqa: E402 - benchmarks/ is not a package

from tests import modelgen  # noqa: E402 - the repository root is put on the path above

SERVE = """
import sys
import edged.frontends.zmq as frontend
frontend.REPLY_COPY_THRESHOLD = int(sys.argv[1])
from edged.cli import main
sys.exit(main(sys.argv[2:]))
"""


class ThresholdDaemon(serving.Daemon):
    """``edged serve`` with the reply sockets' copy threshold set to ``threshold``."""

    def __init__(self, repo: Path, threshold: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        env.update(
            EDGED_ZMQ_ADDRESSES="tcp://127.0.0.1:0",
            EDGED_METRICS_ADDRESS="127.0.0.1:0",
            EDGED_SERVER_HTTP_ADDRESS="127.0.0.1:0",
        )
        argv = ["serve", "--models", str(repo), "--grpc-address", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(threshold), *argv],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._ready = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()


def window(address: str, pid: int, x: np.ndarray, expected: bytes, seconds: float) -> dict:
    """c=1 for ``seconds`` with ZmqClient; p50 and the daemon's CPU per inference."""
    from edged.client import ZmqClient

    with ZmqClient(address, timeout=30) as client:
        first = client.infer("dynamic", {"x": x})["y"]
        identical = first.dtype == np.float32 and first.tobytes() == expected
        latencies = []
        meter = serving.Meter(pid)
        meter.start()
        stop_at = time.perf_counter() + seconds
        while (started := time.perf_counter()) < stop_at:
            client.infer("dynamic", {"x": x})
            latencies.append(time.perf_counter() - started)
        meter.stop(len(latencies))
    latencies.sort()
    return {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "server_cpu_ms_per_infer": meter.figures["server_cpu_ms_per_infer"],
        "client_cpu_ms_per_infer": meter.figures["client_cpu_ms_per_infer"],
        "identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--thresholds", default="65536,1048576,16777216", help="bytes")
    parser.add_argument("--sizes", default="131072,524288,1048576,4194304", help="output bytes")
    parser.add_argument("--realtime", type=int, default=0, help="SCHED_FIFO priority (0: off)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    repo = Path(tempfile.mkdtemp()) / "models"
    model = modelgen.dynamic_axes_model(repo / "dynamic" / "1")
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = {s: rng.random((1, s // 16, 4), dtype=np.float32) for s in sizes}
    expected = {s: session.run(None, {"x": x})[0].tobytes() for s, x in inputs.items()}
    if args.realtime:  # the client: this process
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime))
    rows: dict[tuple[int, int], list[dict[str, Any]]] = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for threshold in thresholds[r % len(thresholds) :] + thresholds[: r % len(thresholds)]:
            daemon = ThresholdDaemon(repo, threshold)
            try:
                daemon.wait()
                if args.realtime:
                    rt = ["chrt", "-f", "-a", "-p", str(args.realtime), str(daemon.proc.pid)]
                    subprocess.run(rt, check=True)
                for size in sizes:
                    out = window(
                        daemon.zmq, daemon.proc.pid, inputs[size], expected[size], args.seconds
                    )
                    rows.setdefault((threshold, size), []).append(out)
                    print(f"r{r} threshold {threshold} size {size}: {out}", file=sys.stderr)
            finally:
                daemon.stop()
        loads.append(os.getloadavg()[0])
    report: dict[str, Any] = {"load_1min": [round(x, 1) for x in loads], "rows": {}}
    print(f"load average (1 min) at each round's end: {report['load_1min']}")
    for (threshold, size), outs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        figures = {
            k: [o[k] for o in outs]
            for k in ("p50_ms", "server_cpu_ms_per_infer", "client_cpu_ms_per_infer")
        }
        identical = all(o["identical"] for o in outs)
        report["rows"][f"{threshold} {size}"] = {**figures, "identical": identical}
        cells = "  ".join(
            f"{k} {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
            for k, v in figures.items()
        )
        print(f"output {size:>8} B  threshold {threshold:>8}  {cells}  identical {identical}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
