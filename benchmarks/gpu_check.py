"""Prove the cuda executor on a machine with an NVIDIA GPU; prints one JSON object.

    pip install -e '.[cuda]' && pip uninstall -y onnxruntime   # onnxruntime-gpu replaces it
    python benchmarks/gpu_check.py [--seconds 1.0] [--batches 1,8,32,128]

1. Correctness: the cuda executor's outputs against cpu-onnx (the same onnxruntime build, CPU
   provider) on the digits model (every image of load_digits) and on a bigger generated model
   (a stack of 1024x1024 MatMul+Relu layers), at several batch sizes.
2. Throughput: samples per second on the GPU and on the CPU at each batch size, and the ratio.
3. Host->device copy bandwidth with pycuda: pageable (numpy) memory against page-locked memory,
   which is what the executor stages its inputs through.

Without a usable GPU it prints the probe's reason (as JSON on stdout, and a line on stderr) and
exits with status 2. Never pass/fail otherwise: "ok" fields report, they do not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hal.cpu_onnx import OnnxCpuExecutor
from hal.cuda import CudaExecutor, CudaModel
from hal.executor import ExecutorOptions, LoadedModel, ModelArtifact
from hal.probe import HostPaths, probe_cuda

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "models" / "digits" / "1" / "model.onnx"
SEED = 20240517
# TF32 is on by default in ONNX Runtime's CUDA provider on Ampere and later (10-bit mantissa
# in MatMul), so a deep MatMul stack agrees with the CPU to about 1e-3 relative, not 1e-6.
BIG_RTOL = 1e-2
DIGITS_ATOL = 1e-4


def build_matmul_stack(path: Path, width: int = 1024, depth: int = 8) -> Path:
    """input [N, width] -> depth x (MatMul [width, width] + Relu) -> output, weights scaled so
    activations stay O(1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(SEED)
    nodes, inits = [], []
    prev = "input"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]))
        out = "output" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "matmul_stack",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def throughput(model: LoadedModel, x: np.ndarray, seconds: float) -> dict[str, float]:
    """Samples per second of back-to-back infer calls (after 3 warm-up calls)."""
    feed = {"input": x}
    for _ in range(3):
        model.infer(feed)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 5:
        t0 = time.perf_counter()
        model.infer(feed)
        latencies.append(time.perf_counter() - t0)
    total = sum(latencies)
    return {
        "samples_per_s": round(len(latencies) * len(x) / total, 1),
        "median_ms": round(statistics.median(latencies) * 1e3, 3),
        "calls": len(latencies),
    }


def compare(
    gpu: LoadedModel, cpu: LoadedModel, x: np.ndarray, check: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    return check(gpu.infer({"input": x}), cpu.infer({"input": x}))


def check_digits(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    diff = float(np.max(np.abs(got["probabilities"] - want["probabilities"])))
    same_labels = bool(np.array_equal(got["label"], want["label"]))
    return {
        "max_abs_diff": diff,
        "labels_identical": same_labels,
        "ok": same_labels and diff < DIGITS_ATOL,
    }


def check_big(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    g, w = got["output"], want["output"]
    rel = float(np.linalg.norm(g - w) / max(float(np.linalg.norm(w)), 1e-30))
    return {
        "max_abs_diff": float(np.max(np.abs(g - w))),
        "relative_error": rel,
        "ok": bool(g.shape == w.shape and rel < BIG_RTOL),
    }


def bandwidth(size_mib: int = 64, repeats: int = 10) -> dict[str, Any]:
    """Host->device GB/s from pageable and from page-locked memory (pycuda)."""
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        nbytes = size_mib << 20
        device = cuda.mem_alloc(nbytes)
        stream = cuda.Stream()
        pageable = np.ones(nbytes, dtype=np.uint8)
        pinned = cuda.pagelocked_empty(nbytes, np.uint8)
        pinned[:] = 1

        def measure(copy: Callable[[], None]) -> float:
            copy()  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                copy()
                times.append(time.perf_counter() - t0)
            return nbytes / statistics.median(times) / 1e9

        def pageable_copy() -> None:
            cuda.memcpy_htod(device, pageable)

        def pinned_copy() -> None:
            cuda.memcpy_htod_async(device, pinned, stream)
            stream.synchronize()

        result = {
            "bytes": nbytes,
            "pageable_gb_per_s": round(measure(pageable_copy), 2),
            "pinned_gb_per_s": round(measure(pinned_copy), 2),
        }
        result["pinned_speedup"] = round(result["pinned_gb_per_s"] / result["pageable_gb_per_s"], 2)
        device.free()
        return result
    finally:
        cuda.Context.pop()
        context.detach()


def run_model(
    name: str,
    path: Path,
    inputs: Callable[[int], np.ndarray],
    check: Callable[..., dict[str, Any]],
    batches: list[int],
    seconds: float,
) -> dict[str, Any]:
    artifact = ModelArtifact(path, "onnx")
    cpu = OnnxCpuExecutor().load(artifact, ExecutorOptions(intra_op_threads=os.cpu_count() or 1))
    gpu = CudaExecutor().load(artifact, ExecutorOptions())
    assert isinstance(gpu, CudaModel)
    result: dict[str, Any] = {
        "provider": gpu.provider,
        "gpu_memory_free_total": list(gpu.memory),
        "batches": {},
    }
    try:
        for n in batches:
            x = inputs(n)
            entry = {"correctness": compare(gpu, cpu, x, check)}
            entry["gpu"] = throughput(gpu, x, seconds)
            entry["cpu"] = throughput(cpu, x, seconds)
            entry["gpu_over_cpu"] = round(
                entry["gpu"]["samples_per_s"] / entry["cpu"]["samples_per_s"], 2
            )
            result["batches"][str(n)] = entry
        result["ok"] = all(b["correctness"]["ok"] for b in result["batches"].values())
    finally:
        gpu.close()
        cpu.close()
    print(f"gpu_check: {name} done", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per measurement")
    parser.add_argument("--batches", default="1,8,32,128", help="batch sizes, comma-separated")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    report = probe_cuda(HostPaths())
    if not report.present:
        print(json.dumps({"gpu": False, "reason": report.reason}))
        print(f"gpu_check: no usable GPU, nothing to check: {report.reason}", file=sys.stderr)
        return 2

    from sklearn.datasets import load_digits

    images = load_digits().data.astype(np.float32)
    rng = np.random.default_rng(SEED)
    results: dict[str, Any] = {
        "gpu": True,
        "device": report.details,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
    }
    # digits: every image once for correctness, then the timed batch sizes
    results["digits_all_images"] = run_model(
        "digits", DIGITS, lambda n: images, check_digits, [len(images)], 0.2
    )["batches"][str(len(images))]["correctness"]
    results["digits"] = run_model(
        "digits", DIGITS, lambda n: images[:n], check_digits, batches, args.seconds
    )
    with tempfile.TemporaryDirectory() as tmp:
        big = build_matmul_stack(Path(tmp) / "matmul_stack.onnx")
        results["matmul_stack_1024x8"] = run_model(
            "matmul_stack",
            big,
            lambda n: rng.standard_normal((n, 1024)).astype(np.float32),
            check_big,
            batches,
            args.seconds,
        )
    results["host_to_device"] = bandwidth()
    results["ok"] = bool(
        results["digits_all_images"]["ok"]
        and results["digits"]["ok"]
        and results["matmul_stack_1024x8"]["ok"]
    )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
