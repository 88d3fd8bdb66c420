"""gRPC inference on the threaded server (edged/frontends/grpc.py ``ThreadInference``): a
client that goes away while its request waits in the queue -- a unary call past its deadline,
a stream cancelled -- has that request dropped (it never runs) and counted out of the model's
in-flight requests (a leak would hold a swap's or the shutdown's drain); the calls bridged to
the event loop (statistics, repository) answer alongside."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests import modelgen
from tests.conftest import write_model
from tests.daemon_process import DaemonProcess
from tests.integration.test_batching_grpc import infer_input


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    repo = tmp_path_factory.mktemp("threads") / "models"
    write_model(
        repo, "slow", lambda d: modelgen.slow_model(d, 1000), "max_batch_size = 0\ninstances = 1\n"
    )
    daemon = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.stderr


def executions(address: str) -> int:
    with grpcclient.InferenceServerClient(address) as client:
        stats = client.get_inference_statistics("slow", as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0))


def occupy(daemon: DaemonProcess, value: float) -> threading.Thread:
    """Start a request that keeps the single instance busy (~1 s); return once it runs."""

    def call() -> None:
        with grpcclient.InferenceServerClient(daemon.address) as client:
            client.infer("slow", [infer_input("x", np.full((1, 4), value, np.float32))])

    thread = threading.Thread(target=call)
    thread.start()
    daemon.wait_in_flight("slow", 1)
    return thread


def settled(daemon: DaemonProcess) -> None:
    """Wait until the model has nothing in flight (fails if it never gets there)."""
    for _ in range(2000):
        if daemon.in_flight("slow") == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"still in flight: {daemon.in_flight('slow')}")


def test_a_unary_call_past_its_deadline_is_dropped_from_the_queue(daemon: DaemonProcess) -> None:
    before = executions(daemon.address)
    blocker = occupy(daemon, 1.0)
    with grpcclient.InferenceServerClient(daemon.address) as client:
        with pytest.raises(grpcclient.InferenceServerException) as err:
            client.infer(
                "slow", [infer_input("x", np.full((1, 4), 2, np.float32))], client_timeout=0.1
            )
        assert "DEADLINE" in str(err.value.status())
    blocker.join(60)
    settled(daemon)
    assert executions(daemon.address) - before == 1  # only the blocker ran


def test_a_cancelled_stream_drops_its_queued_requests(daemon: DaemonProcess) -> None:
    before = executions(daemon.address)
    outgoing: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (message := outgoing.get()) is not None:
            yield message

    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = stub.ModelStreamInfer(requests(), timeout=60)
        for i in range(3):
            message = pb.ModelInferRequest(model_name="slow", id=str(i))
            message.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            message.raw_input_contents.append(np.full((1, 4), i, np.float32).tobytes())
            outgoing.put(message)
        daemon.wait_in_flight("slow", 3)  # all three in: one running, two queued
        assert daemon.in_flight("slow") == 3
        replies.cancel()
        outgoing.put(None)
    settled(daemon)
    assert executions(daemon.address) - before == 1  # the two queued never ran


def test_bridged_calls_answer_while_inference_waits(daemon: DaemonProcess) -> None:
    blocker = occupy(daemon, 3.0)
    try:
        with grpcclient.InferenceServerClient(daemon.address) as client:
            assert client.is_server_live()
            assert client.is_model_ready("slow")
            index = client.get_model_repository_index(as_json=True)["models"]
            assert [m["name"] for m in index] == ["slow"]
    finally:
        blocker.join(60)
    settled(daemon)


def test_repository_load_runs_through_the_bridge(daemon: DaemonProcess) -> None:
    with grpcclient.InferenceServerClient(daemon.address) as client:
        with pytest.raises(grpcclient.InferenceServerException) as err:
            client.load_model("no-such-model")
        assert "NOT_FOUND" in str(err.value.status())
        client.load_model("slow")  # a reload of what is served
        assert client.is_model_ready("slow")
