"""The remote executor's failures, against real sockets: a server that accepts the
connection and never answers (hung, or a middlebox swallowing the traffic) fails the call at
its deadline as an executor timeout; a port nobody listens on fails it as an executor error
naming the server, after the bounded retries; a plaintext server is refused unless the target
says ``insecure``. Answers themselves are checked against real
daemons in tests/e2e/test_split_remote.py."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import ExecutorError, ExecutorTimeoutError, ModelLoadError
from edged.core.types import DataType, Signature, TensorSpec
from edged.partition import graph
from hal.executor import ExecutorOptions, ModelArtifact
from hal.remote import RemoteExecutor, RemoteModel, channel_for
from hal.remote_link import estimator_for
from hal.remote_target import RemoteTarget
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess

SPEC = TensorSpec("x", DataType.FP32, (-1, 4))
SIGNATURE = Signature((SPEC,), (TensorSpec("y", DataType.FP32, (-1, 4)),))


@pytest.fixture
def black_hole() -> Iterator[str]:
    """HOST:PORT of a listener that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def _model(target: RemoteTarget) -> RemoteModel:
    return RemoteModel(target, SIGNATURE, channel_for(target), None, (SPEC,), ())


def test_a_server_that_never_answers_fails_at_the_deadline(black_hole: str) -> None:
    target = RemoteTarget(address=black_hole, model="m", insecure=True, timeout_s=0.3)
    model = _model(target)
    try:
        with pytest.raises(ExecutorTimeoutError, match=f"remote {black_hole} model 'm': no answer"):
            model.infer({"x": np.zeros((1, 4), np.float32)})
    finally:
        model.close()


def test_an_unreachable_server_is_an_executor_error_after_the_retries() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free once closed: nobody listens there
    target = RemoteTarget(address=f"127.0.0.1:{port}", model="m", insecure=True, retries=2)
    model = _model(target)
    try:
        with pytest.raises(ExecutorError, match=f"remote 127.0.0.1:{port} model 'm': UNAVAILABLE"):
            model.infer({"x": np.zeros((1, 4), np.float32)})
    finally:
        model.close()
    assert model.link.snapshot().calls == 0  # nothing got through, nothing measured


@pytest.mark.slow
def test_tls_is_the_default_so_a_plaintext_server_is_refused(daemon: DaemonProcess) -> None:
    artifact = ModelArtifact(EXAMPLE_MODELS / "digits" / "1" / "model.onnx", "onnx")
    secure = RemoteTarget(address=daemon.address, model="digits", timeout_s=5)
    with pytest.raises(ModelLoadError, match="UNAVAILABLE"):  # the TLS handshake fails
        RemoteExecutor().load(artifact, ExecutorOptions(remote=secure))
    plain = RemoteTarget(address=daemon.address, model="digits", timeout_s=5, insecure=True)
    loaded = RemoteExecutor().load(artifact, ExecutorOptions(remote=plain))
    try:
        assert [t.name for t in loaded.signature.outputs] == ["probabilities", "label"]
        sample = np.load(EXAMPLE_MODELS / "digits" / "sample.npy").astype(np.float32)
        loaded.infer({"input": sample})  # the first call: the connection, not the link
        before = estimator_for(daemon.address).snapshot()
        assert loaded.infer({"input": sample})["label"].shape == (2,)
        after = estimator_for(daemon.address).snapshot()
    finally:
        loaded.close()
    # the call was measured: the request's tensor went out, the two outputs came back
    assert after.calls == before.calls + 1
    assert after.bytes_sent - before.bytes_sent == sample.nbytes
    assert after.bytes_received - before.bytes_received == 2 * 10 * 4 + 2 * 8
    assert after.rtt_s is not None
    assert after.rtt_s > 0


@pytest.mark.slow
def test_a_head_that_does_not_make_what_the_server_takes_is_refused(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    parts = graph.split(graph.load(EXAMPLE_MODELS / "digits" / "1" / "model.onnx"), "hidden")
    assert parts.head is not None
    graph.save(parts.head, tmp_path / "head.onnx")
    shutil.copyfile(EXAMPLE_MODELS / "digits" / "1" / "model.onnx", tmp_path / "model.onnx")
    # the server's digits takes "input", the head makes "hidden"
    target = RemoteTarget(
        address=daemon.address, model="digits", head="head.onnx", insecure=True, timeout_s=5
    )
    with pytest.raises(
        ModelLoadError, match=r"takes 'input', which the head head\.onnx does not make"
    ):
        RemoteExecutor().load(
            ModelArtifact(tmp_path / "model.onnx", "onnx"), ExecutorOptions(remote=target)
        )


@pytest.mark.slow
def test_a_cut_sent_as_fp16_crosses_the_wire_at_half_the_bytes(tmp_path: Path) -> None:
    """``edged partition --wire-dtype FP16``: the head here makes the cut tensor in FP16, the
    server's tail takes it so (its metadata says FP16), the call carries 2 bytes an element,
    and the answer is the whole model's."""
    whole = EXAMPLE_MODELS / "digits" / "1" / "model.onnx"
    parts = graph.split(graph.load(whole), "hidden", "FP16")
    assert parts.head is not None
    repo = tmp_path / "server"
    (repo / "tail16" / "1").mkdir(parents=True)
    graph.save(parts.tail, repo / "tail16" / "1" / "model.onnx")
    graph.save(parts.head, tmp_path / "head.onnx")
    shutil.copyfile(whole, tmp_path / "model.onnx")
    server = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
    try:
        address = server.wait_live()
        server.wait_for("server_ready", timeout=60)
        target = RemoteTarget(
            address=address, model="tail16", head="head.onnx", insecure=True, timeout_s=10
        )
        loaded = RemoteExecutor().load(
            ModelArtifact(tmp_path / "model.onnx", "onnx"), ExecutorOptions(remote=target)
        )
        try:
            sample = np.load(EXAMPLE_MODELS / "digits" / "sample.npy").astype(np.float32)
            loaded.infer({"input": sample})  # the first call: the connection, not the link
            before = estimator_for(address).snapshot()
            got = loaded.infer({"input": sample})
            after = estimator_for(address).snapshot()
        finally:
            loaded.close()
    finally:
        assert server.stop() == 0, server.stderr
    import onnxruntime as ort

    session = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    probabilities, labels = session.run(["probabilities", "label"], {"input": sample})
    np.testing.assert_array_equal(got["label"], labels)
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=0, atol=0.01)
    hidden = ort.InferenceSession(str(tmp_path / "head.onnx")).get_outputs()[0]
    assert hidden.type == "tensor(float16)"
    (middle,) = ort.InferenceSession(str(tmp_path / "head.onnx")).run(None, {"input": sample})
    assert after.bytes_sent - before.bytes_sent == middle.size * 2
