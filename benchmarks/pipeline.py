"""A two-model pipeline through the daemon against the same models back to back in-process.

The pipeline is models/build_pipeline.py's ``ocr``: PP-OCR's text detector -> a crop of the
text -> PP-OCR's direction classifier, with the normalisation and the crop as small ONNX
models (four steps, two of them the real models; tests/corpus.py fetches the two from
rapidocr-onnxruntime's wheel). The same run measures, one request at a time and interleaved
in rounds (so a noisy box slows all of them alike):

- ``in_process``: the four ONNX files run one after the other with ONNX Runtime sessions in
  this process (the issue's "back-to-back in-process"), with the session options and threads
  the daemon's cpu-onnx executor gives each model copy (hal.cpu_onnx.session_options): the
  baseline of the ratios;
- ``in_process_ort_defaults`` (with ``--ort-defaults``): the same with ONNX Runtime's default
  options but the thread count (idle threads spin: four sessions' spinning threads contend
  on a small box, and slow what runs after them);
- ``pipeline_grpc`` / ``pipeline_zmq``: the pipeline through a real daemon on loopback with
  tritonclient.grpc and edged.client.ZmqClient (one copy per model), asking for the
  ``direction`` output only (what the in-process run keeps; the detector's text map would
  add 800 KB of reply at 320x640);
- ``steps_grpc``: the four steps sent by the client one by one to the same daemon (what a
  client does without pipelines);
- ``before_grpc`` / ``before_zmq`` (with ``--baseline-rev REV``): the pipeline through a
  second daemon, run from ``edged/`` and ``hal/`` of git revision REV (``git archive`` into a
  temporary folder), so a change is measured against what it replaced in the same rounds.

``--concurrency N``: also ``pipeline_grpc_xN`` (and ``before_grpc_xN``): N requests at once
from N threads, the time of the N together (``requests_per_second`` in the JSON), to see
what chaining does to a loaded daemon (the "inside the daemon" mean then includes them).

CPU per request: the daemons' CPU time (/proc/PID/stat, user + system, every thread) and
this process's (``time.process_time``: the client, or the in-process run) over each way's
requests, divided by their number.

    .venv/bin/python benchmarks/pipeline.py [--requests 60] [--rounds 6] [--size 320x640]
        [--threads N] [--ort-defaults] [--baseline-rev REV] [--concurrency N] [--out FILE]

Prints a table on stderr and JSON on stdout: median and p90 milliseconds of each, and the
ratios of the pipeline to in-process (the target: within 15 %, a ratio <= 1.15). Never
pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from edged.client import ZmqClient  # noqa: E402
from hal import ExecutorOptions  # noqa: E402
from hal.cpu_onnx import session_options  # noqa: E402
from models import build_pipeline  # noqa: E402
from tests import corpus, daemon_process  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

STEPS = ("ocr_pre", "ocr_det", "ocr_crop", "ocr_cls")


def text_image(height: int, width: int) -> np.ndarray:
    """Black text lines on white, RGB uint8 [1, H, W, 3]."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for row in range(20, height - 40, 60):
        draw.text((20, row), "edge gateway pipeline", fill="black", font_size=32)
    return np.asarray(canvas, dtype=np.uint8)[None]


class InProcess:
    """The four models back to back in this process."""

    def __init__(self, repo: Path, threads: int, *, edged_options: bool = True) -> None:
        if edged_options:  # what the daemon's cpu-onnx executor runs with (no spinning)
            options = session_options(ExecutorOptions(intra_op_threads=threads))
        else:  # ONNX Runtime's defaults but the thread count (its threads spin when idle)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
        self.sessions = {
            m: ort.InferenceSession(
                str(repo / m / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for m in STEPS
        }

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        s = self.sessions
        det_input, cls_image = s["ocr_pre"].run(None, {"image": image})
        (text_map,) = s["ocr_det"].run(None, {"x": det_input})
        (crop,) = s["ocr_crop"].run(None, {"image": cls_image, "prob": text_map})
        (direction,) = s["ocr_cls"].run(None, {"x": crop})
        return {"direction": direction, "text_map": text_map}


def _grpc_call(
    client: grpcclient.InferenceServerClient,
    model: str,
    inputs: dict[str, np.ndarray],
    outputs: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(
            name, list(value.shape), "UINT8" if value.dtype == np.uint8 else "FP32"
        )
        t.set_data_from_numpy(value)
        tensors.append(t)
    wanted = [grpcclient.InferRequestedOutput(name) for name in outputs] or None
    result = client.infer(model, tensors, outputs=wanted)
    response = result.get_response(as_json=True)
    return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}


def steps_by_client(client: grpcclient.InferenceServerClient, image: np.ndarray) -> dict[str, Any]:
    pre = _grpc_call(client, "ocr_pre", {"image": image})
    det = _grpc_call(client, "ocr_det", {"x": pre["det_input"]})
    crop = _grpc_call(
        client, "ocr_crop", {"image": pre["cls_image"], "prob": det["sigmoid_0.tmp_0"]}
    )
    cls = _grpc_call(client, "ocr_cls", {"x": crop["crop"]})
    return {"direction": cls["save_infer_model/scale_0.tmp_1"]}


def pipeline_time(client: grpcclient.InferenceServerClient) -> tuple[int, int]:
    """(requests, nanoseconds) the daemon's statistics count for the pipeline so far."""
    stats = client.get_inference_statistics("ocr", as_json=True)["model_stats"][0]
    success = stats["inference_stats"]["success"]
    return int(success.get("count", 0)), int(success.get("ns", 0))


def daemon_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, every thread (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def export_revision(rev: str, into: Path) -> Path:
    """``edged/`` and ``hal/`` of git revision ``rev`` written under ``into`` (git archive)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "edged", "hal"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


@contextmanager
def daemon_from(source: Path, repo: Path, threads: int) -> Iterator[DaemonProcess]:
    """A daemon serving ``repo`` whose ``edged`` and ``hal`` are imported from ``source``
    (``python -m edged.cli`` puts its working folder first on sys.path)."""
    saved = daemon_process.REPO_ROOT
    daemon_process.REPO_ROOT = source  # the folder DaemonProcess starts the daemon in
    try:
        daemon = DaemonProcess(
            ["--models", str(repo), "--grpc-address", "127.0.0.1:0"],
            env={"EDGED_MODELS_INSTANCES": "1", "EDGED_MODELS_THREADS": str(threads)},
        )
    finally:
        daemon_process.REPO_ROOT = saved
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=120)
        yield daemon
    finally:
        daemon.stop()


def together(
    pool: ThreadPoolExecutor, n: int, way: Callable[[], dict[str, Any]]
) -> Callable[[], dict[str, Any]]:
    """``way`` ``n`` times at once (one client, ``n`` threads); answers the last."""

    def run() -> dict[str, Any]:
        return [f.result() for f in [pool.submit(way) for _ in range(n)]][-1]

    return run


def add_concurrent(
    ways: dict[str, Callable[[], dict[str, Any]]],
    pids: dict[str, int],
    pool: ThreadPoolExecutor,
    n: int,
) -> None:
    """The gRPC pipeline ways again, ``n`` requests at a time (``together``)."""
    for name in ("pipeline_grpc", "before_grpc"):
        if name in ways:
            ways[f"{name}_x{n}"] = together(pool, n, ways[name])
            pids[f"{name}_x{n}"] = pids[name]


def measure(
    ways: dict[str, Callable[[], dict[str, Any]]], pids: dict[str, int], rounds: int, per_round: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each way ``per_round`` requests in turn, ``rounds`` times: the seconds of every request
    by way, and by way the CPU seconds of (its daemon, this process) over its requests."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    cpu = {name: [0.0, 0.0] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            pid = pids.get(name)
            daemon_cpu, own_cpu = daemon_cpu_s(pid) if pid else 0.0, time.process_time()
            for _ in range(per_round):
                started = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - started)
            cpu[name][0] += daemon_cpu_s(pid) - daemon_cpu if pid else 0.0
            cpu[name][1] += time.process_time() - own_cpu
    return times, cpu


def per_request(
    results: dict[str, dict[str, float]],
    cpu: dict[str, list[float]],
    calls: int,
    concurrency: int,
) -> None:
    """Add to each way's results its requests per call and per second, and its CPU time per
    request (of its daemon and of this process)."""
    for name, r in results.items():
        each = concurrency if name.endswith(f"_x{concurrency}") else 1
        r["requests_per_call"] = each
        r["requests_per_second"] = round(each / (r["median_ms"] / 1000), 1)
        r["cpu_ms_per_request_daemon"] = round(cpu[name][0] / calls / each * 1000, 3)
        r["cpu_ms_per_request_here"] = round(cpu[name][1] / calls / each * 1000, 3)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3),
        "n": len(ordered),
    }


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="per way, in all rounds")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size", default="320x640", help="image HxW (multiples of 32)")
    parser.add_argument("--threads", type=int, default=0, help="per model copy (0: cores)")
    parser.add_argument(
        "--ort-defaults",
        action="store_true",
        help="also run in-process with ONNX Runtime's default options (spinning threads, "
        "which slow whatever runs after them on a small box)",
    )
    parser.add_argument(
        "--baseline-rev",
        help="also run the pipeline through a daemon of this git revision (interleaved)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="N > 1: also N pipeline requests at once over gRPC (through each daemon); its "
        "milliseconds are those of the N together",
    )
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    load_before = os.getloadavg()
    height, width = (int(v) for v in args.size.split("x"))
    threads = args.threads or len(os.sched_getaffinity(0))
    image = text_image(height, width)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        build_pipeline.write_repository(
            repo, corpus.fetch(corpus.CORPUS[2]), corpus.fetch(corpus.CORPUS[3])
        )
        local = InProcess(repo, threads)
        spinning = InProcess(repo, threads, edged_options=False)
        with ExitStack() as stack:
            daemon = stack.enter_context(daemon_from(ROOT, repo, threads))
            client = stack.enter_context(grpcclient.InferenceServerClient(daemon.address))
            zmq_client = stack.enter_context(ZmqClient(daemon.zmq_endpoints[0], timeout=60))
            ways: dict[str, Callable[[], dict[str, Any]]] = {
                "in_process": lambda: local(image),
                "pipeline_grpc": lambda: _grpc_call(
                    client, "ocr", {"image": image}, ("direction",)
                ),
                "pipeline_zmq": lambda: zmq_client.infer("ocr", {"image": image}, ["direction"]),
                "steps_grpc": lambda: steps_by_client(client, image),
            }
            pids = {name: daemon.proc.pid for name in ways if name != "in_process"}
            if args.baseline_rev:
                source = export_revision(args.baseline_rev, Path(tmp) / "baseline")
                before = stack.enter_context(daemon_from(source, repo, threads))
                before_client = stack.enter_context(
                    grpcclient.InferenceServerClient(before.address)
                )
                before_zmq = stack.enter_context(ZmqClient(before.zmq_endpoints[0], timeout=60))
                ways["before_grpc"] = lambda: _grpc_call(
                    before_client, "ocr", {"image": image}, ("direction",)
                )
                ways["before_zmq"] = lambda: before_zmq.infer(
                    "ocr", {"image": image}, ["direction"]
                )
                pids["before_grpc"] = pids["before_zmq"] = before.proc.pid
            if args.ort_defaults:
                ways["in_process_ort_defaults"] = lambda: spinning(image)
            if args.concurrency > 1:
                pool = stack.enter_context(ThreadPoolExecutor(args.concurrency))
                add_concurrent(ways, pids, pool, args.concurrency)
            want = local(image)["direction"]
            for name, way in ways.items():  # warm up, and the same answer every way
                for _ in range(3):
                    got = way()["direction"]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
            in_daemon_before = pipeline_time(client)
            per_round = max(1, args.requests // args.rounds)
            times, cpu = measure(ways, pids, args.rounds, per_round)
            in_daemon_after = pipeline_time(client)
    results = {name: summary(samples) for name, samples in times.items()}
    base = results["in_process"]["median_ms"]
    inside_ms = (
        (in_daemon_after[1] - in_daemon_before[1])
        / max(1, in_daemon_after[0] - in_daemon_before[0])
        / 1e6
    )
    per_request(results, cpu, per_round * args.rounds, args.concurrency)
    local_mean_ms = statistics.fmean(times["in_process"]) * 1000
    report = {
        "benchmark": "pipeline",
        "pipeline": "ocr: ocr_pre -> ocr_det (PP-OCRv4 det) -> ocr_crop -> ocr_cls (PP-OCR cls)",
        "image": [height, width],
        "threads_per_model": threads,
        "requests_per_way": per_round * args.rounds,
        "rounds": args.rounds,
        "results": results,
        "ratio_pipeline_grpc": round(results["pipeline_grpc"]["median_ms"] / base, 3),
        "ratio_pipeline_zmq": round(results["pipeline_zmq"]["median_ms"] / base, 3),
        "ratio_steps_grpc": round(results["steps_grpc"]["median_ms"] / base, 3),
        **{
            f"ratio_{name}": round(results[name]["median_ms"] / base, 3)
            for name in ("before_grpc", "before_zmq")
            if name in results
        },
        "baseline_rev": args.baseline_rev,
        "target_ratio": 1.15,
        # inside the daemon (the pipeline's own statistics: request in -> outputs out, no
        # transport) against in-process, both means
        "pipeline_in_daemon_mean_ms": round(inside_ms, 3),
        "in_process_mean_ms": round(local_mean_ms, 3),
        "ratio_in_daemon_mean": round(inside_ms / local_mean_ms, 3),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
    }
    for name, r in results.items():
        sys.stderr.write(
            f"{name:24s} median {r['median_ms']:9.3f} ms  p90 {r['p90_ms']:9.3f} ms  "
            f"x{r['median_ms'] / base:.3f}  CPU/request: daemon "
            f"{r['cpu_ms_per_request_daemon']:7.2f} ms, "
            f"here {r['cpu_ms_per_request_here']:7.2f} ms  {r['requests_per_second']:7.1f}/s\n"
        )
    sys.stderr.write(
        f"inside the daemon (mean) {inside_ms:.3f} ms vs in-process (mean) "
        f"{local_mean_ms:.3f} ms: x{inside_ms / local_mean_ms:.3f}\n"
    )
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
