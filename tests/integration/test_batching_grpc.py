"""Dynamic batching through a real daemon: concurrent gRPC requests are merged (visible in
ModelStatistics), answers are the same batched or not, a full queue is RESOURCE_EXHAUSTED at
once, and clients that go away do not stall the batcher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from sklearn.datasets import load_digits

from tests import modelgen
from tests.conftest import write_model
from tests.daemon_process import DaemonProcess, copy_example_models

BATCHED = """max_batch_size = 32
instances = 1
[dynamic_batching]
max_queue_delay_us = 20000
preferred_batch_sizes = [16]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_example_models(tmp_path_factory.mktemp("batching") / "models")
    (repo / "digits" / "model.toml").write_text('name = "digits"\n' + BATCHED)
    write_model(
        repo,
        "slow_q1",
        lambda d: modelgen.slow_model(d, 300),
        "max_batch_size = 0\ninstances = 1\n[dynamic_batching]\nmax_queue_size = 1\n",
    )
    write_model(
        repo, "slow", lambda d: modelgen.slow_model(d, 200), "max_batch_size = 8\ninstances = 1\n"
    )
    return repo


@pytest.fixture(scope="module")
def batching_daemon(repo: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.stderr


@pytest.fixture(scope="module")
def address(batching_daemon: DaemonProcess) -> str:
    return batching_daemon.address


def digit(i: int) -> np.ndarray:
    return load_digits().data[i : i + 1].astype(np.float32)


def infer_input(name: str, value: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
    tensor.set_data_from_numpy(value)
    return tensor


def stats(address: str, model: str) -> dict:
    with grpcclient.InferenceServerClient(address) as client:
        return client.get_inference_statistics(model, as_json=True)["model_stats"][0]


def test_concurrent_requests_are_merged_and_answers_match(address: str, repo: Path) -> None:
    before = stats(address, "digits")

    async def burst() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(address) as client:
            results = await asyncio.gather(
                *(client.infer("digits", [infer_input("input", digit(i))]) for i in range(16))
            )
        return [r.as_numpy("probabilities") for r in results]

    batched = asyncio.run(burst())
    after = stats(address, "digits")
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    assert inferences == 16
    assert executions < 16  # merged
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 1
    session = ort.InferenceSession(
        str(repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    for i, probabilities in enumerate(batched):
        alone = session.run(["probabilities"], {"input": digit(i)})[0]
        np.testing.assert_allclose(probabilities, alone, rtol=1e-5, atol=1e-7)
        assert probabilities.argmax() == alone.argmax()


def test_model_config_reports_dynamic_batching(address: str) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        config = client.get_model_config("digits", as_json=True)["config"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "20000"
    assert config["dynamic_batching"]["preferred_batch_size"] == [16]


def test_full_queue_is_resource_exhausted_at_once(address: str) -> None:
    async def burst() -> list[object]:
        async with aioclient.InferenceServerClient(address) as client:

            async def one(i: int) -> object:
                try:
                    await client.infer(
                        "slow_q1", [infer_input("x", np.full((1, 4), i, np.float32))]
                    )
                    return ("ok", time.monotonic())
                except Exception as e:
                    return (e, time.monotonic())

            return await asyncio.gather(*(one(i) for i in range(5)))

    outcomes = asyncio.run(burst())
    answered = [at for o, at in outcomes if o == "ok"]
    refused = [(o, at) for o, at in outcomes if o != "ok"]
    assert len(answered) >= 2  # one running, one queued
    assert refused
    for error, at in refused:
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full" in error.message()
        # refused at once: before even the first request, running the 300 ms model, is answered
        assert at < min(answered)


def test_clients_that_go_away_do_not_stall_the_batcher(address: str) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        for i in range(4):
            with pytest.raises(grpcclient.InferenceServerException) as err:
                client.infer(
                    "slow", [infer_input("x", np.full((1, 4), i, np.float32))], client_timeout=0.05
                )
            assert "Deadline" in str(err.value) or "DEADLINE" in str(err.value.status())
        # a stalled batcher would leave this one waiting: it ends at a generous client deadline
        result = client.infer(
            "slow", [infer_input("x", np.full((1, 4), 7, np.float32))], client_timeout=60
        )
        assert np.all(result.as_numpy("y") == 7)
        # nothing is left queued behind
        time.sleep(0.5)
        after = client.get_inference_statistics("slow", as_json=True)["model_stats"][0]
    assert int(after["inference_stats"]["success"]["count"]) >= 1


def test_request_timeout_parameter(batching_daemon: DaemonProcess, address: str) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        # occupy the single instance (seen by the daemon), then ask for an answer within 50 ms
        blocker = threading.Thread(
            target=lambda: client.infer("slow", [infer_input("x", np.zeros((1, 4), np.float32))])
        )
        blocker.start()
        batching_daemon.wait_in_flight("slow", 1)
        with pytest.raises(grpcclient.InferenceServerException) as err:
            client.infer("slow", [infer_input("x", np.ones((1, 4), np.float32))], timeout=50_000)
        blocker.join()
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "timed out" in err.value.message()
