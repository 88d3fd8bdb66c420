"""benchmarks/serving.py and its minimal prototypes, run briefly: the harness's JSON has the
shape docs/performance.md reads (paired limit, medians with ranges, CPU per inference), and the
prototypes it compares edged against answer what ONNX Runtime answers in-process. No figure is
judged: timings are never asserted here."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from edged.client import AsyncZmqClient, ZmqClient

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
DIGITS = ROOT / "models" / "digits" / "1" / "model.onnx"


@pytest.mark.slow
def test_serving_harness_pairs_every_server_window_with_a_limit() -> None:
    servers = ["edged", "proto-zmq", "proto-grpc-sync", "edged-1i"]
    command = [
        sys.executable,
        str(BENCH / "serving.py"),
        "--models=digits",
        f"--servers={','.join(servers)}",
        "--transports=grpc,zmq-sync",
        "--concurrency=1,2",
        "--seconds=0.2",
        "--limit-seconds=0.1",
        "--repeats=2",
        # an edged variant: another daemon with its own settings, side by side
        "--variant=edged-1i:EDGED_MODELS_INSTANCES=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["repeats"] == 2
    entry = report["models"]["digits"]

    limit = entry["limit"]
    assert limit["repeats"] == 2 * len(servers)  # one limit beside every server window
    assert sum(limit["throughput_wins"].values()) == 2 * len(servers)
    assert set(limit["throughput_wins"]) <= {"2x1t-b4", "2x1t-b8", "1x2t-b8", "1x2t-b16"}
    assert set(limit["latency_wins"]) <= {"1t-b1", "default-b1"}
    assert limit["items_per_s_range"][0] <= limit["items_per_s"] <= limit["items_per_s_range"][1]

    # each server runs only the transports it speaks
    assert {s: set(t) for s, t in entry["servers"].items()} == {
        "edged": {"grpc", "zmq-sync"},
        "proto-zmq": {"zmq-sync"},
        "proto-grpc-sync": {"grpc"},
        "edged-1i": {"grpc", "zmq-sync"},
    }
    assert entry["edged"] == entry["servers"]["edged"]
    for transports in entry["servers"].values():
        for levels in transports.values():
            assert set(levels) == {"1", "2"}
            for r in levels.values():
                assert r["repeats"] == 2
                assert r["infer_per_s"] > 0
                low, high = r["infer_per_s_range"]
                assert low <= r["infer_per_s"] <= high
                for key in (
                    "ratio_to_limit",
                    "ratio_to_2x1t_b8",
                    "p50_over_limit_ms",
                    "p99_over_p50",
                    "cpu_ceiling_ratio",
                ):
                    assert key in r
                assert r["server_cpu_ms_per_infer"] >= 0
                assert r["client_cpu_ms_per_infer"] >= 0

    windows = entry["windows"]
    assert len(windows) == 2 * (4 + 2 + 2 + 4)
    first = [next(w["server"] for w in windows if w["repeat"] == r) for r in (0, 1)]
    assert first == ["edged", "proto-zmq"]  # the order rotates between repeats
    for w in windows:  # each ratio is against the limit measured beside that window
        assert w["ratio_to_limit"] == round(w["infer_per_s"] / w["limit"]["items_per_s"], 3)
        b8 = w["limit"]["items_per_s_2x1t-b8"]
        assert w["ratio_to_2x1t_b8"] == round(w["infer_per_s"] / b8, 3)


@pytest.mark.slow
def test_paired_trees_runs_each_variant_with_its_own_code_tree(tmp_path: Path) -> None:
    """benchmarks/paired_trees.py: a variant with PYTHONPATH runs the daemon and the load
    generator from that tree (here a copy of this one), the other from the installed tree;
    every round of every variant has its figures, the limit measured beside it."""
    import shutil

    tree = tmp_path / "tree"
    for package in ("edged", "hal"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("*.pyc"))
    out = tmp_path / "pairs.json"
    command = [
        sys.executable,
        str(BENCH / "paired_trees.py"),
        "--model=digits",
        "--rounds=2",
        "--seconds=0.2",
        "--limit-seconds=0.1",
        "--transports=zmq,grpc",
        "--concurrency=1",
        f"--out={out}",
        f"copy:PYTHONPATH={tree};EDGED_MODELS_INSTANCES=1",
        "here:",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["trees"] == {"copy": str(tree), "here": str(ROOT)}
    assert set(report["rows"]) == {
        f"{v} {t} c=1" for v in ("copy", "here") for t in ("zmq", "grpc")
    }
    for figures in report["rows"].values():
        for key in ("p50_ms", "p50_over_limit_ms", "limit_p50_ms", "ratio_to_2x1t_b8"):
            assert len(figures[key]["rounds"]) == 2, key
        p50, limit, over = (
            figures[k]["rounds"] for k in ("p50_ms", "limit_p50_ms", "p50_over_limit_ms")
        )
        assert over == pytest.approx([a - b for a, b in zip(p50, limit, strict=True)])


@pytest.mark.slow
def test_the_copy_threshold_benchmark_answers_as_onnx_runtime(tmp_path: Path) -> None:
    """benchmarks/zmq_copy_threshold.py: a daemon per reply threshold, large outputs copied
    or sent by reference; every window's answer is byte-identical to in-process ONNX
    Runtime (the benchmark compares), and each threshold and size has its figures."""
    out = tmp_path / "threshold.json"
    command = [
        sys.executable,
        str(BENCH / "zmq_copy_threshold.py"),
        "--rounds=1",
        "--seconds=0.2",
        "--thresholds=65536,16777216",
        "--sizes=131072,1048576",
        f"--out={out}",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {f"{t} {s}" for t in (65536, 16777216) for s in (131072, 1048576)}
    for row in rows.values():
        assert row["identical"] is True
        assert len(row["server_cpu_ms_per_infer"]) == 1


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, cwd=BENCH)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


@pytest.fixture
def expected() -> tuple[np.ndarray, list[np.ndarray]]:
    x = np.random.default_rng(7).random((1, 64), dtype=np.float32)
    session = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    return x, session.run(None, {"input": x})


def test_prototype_zmq_answers_as_onnx_runtime(
    expected: tuple[np.ndarray, list[np.ndarray]],
) -> None:
    x, want = expected
    proc, bound = _start([str(BENCH / "prototype_zmq.py"), str(DIGITS)])
    try:
        with ZmqClient(bound["zmq"], timeout=20) as client:  # a lone request: runs inline
            got = client.infer("digits", {"input": x})
        assert [g.tobytes() for g in got.values()] == [w.tobytes() for w in want]

        async def burst() -> list[dict[str, np.ndarray]]:  # queued ones: batched by workers
            async with AsyncZmqClient(bound["zmq"], timeout=20) as client:
                return await asyncio.gather(
                    *(client.infer("digits", {"input": x}) for _ in range(24))
                )

        for got in asyncio.run(burst()):
            assert np.allclose(got["probabilities"], want[0], atol=1e-6)
            assert got["label"].tolist() == want[1].tolist()
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_prototype_grpc_answers_as_onnx_runtime(
    mode: str, expected: tuple[np.ndarray, list[np.ndarray]]
) -> None:
    x, want = expected
    proc, bound = _start([str(BENCH / "prototype_grpc.py"), mode, str(DIGITS)])
    try:
        client = grpcclient.InferenceServerClient(bound["grpc"])
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("digits", [tensor])
        assert result.as_numpy("probabilities").tobytes() == want[0].tobytes()
        assert result.as_numpy("label").tolist() == want[1].tolist()
        client.close()
    finally:
        proc.terminate()
        proc.wait(20)
