"""The ZeroMQ endpoint of a real daemon, driven by edged.client and by raw pyzmq sockets:
the same outputs as gRPC, the same error codes, many requests in flight per connection."""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import zmq
from sklearn.datasets import load_digits
from zmq.auth.thread import ThreadAuthenticator

from edged.client import COPY_THRESHOLD, AsyncZmqClient, ZmqClient, ZmqClientError
from edged.core.types import InferResponse
from edged.frontends import zmq_wire
from tests import modelgen
from tests.daemon_process import DaemonProcess, copy_example_models
from tests.integration.test_grpc_triton import make_inputs, multi_io_inputs


@pytest.fixture
def client(zmq_address: str):
    with ZmqClient(zmq_address, timeout=10) as c:
        yield c


def grpc_outputs(address: str, model: str, inputs: dict[str, np.ndarray]) -> dict:
    with grpcclient.InferenceServerClient(address) as c:
        result = c.infer(model, make_inputs(inputs))
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert value.shape == b[name].shape, name
        if value.dtype == object:
            assert value.tolist() == b[name].tolist(), name
        else:
            assert value.dtype == b[name].dtype, name
            assert value.tobytes() == b[name].tobytes(), name


def test_health_and_metadata(client: ZmqClient, onnx_executor: str) -> None:
    assert client.is_live()
    assert client.is_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("nope")
    assert client.server_metadata()["name"] == "edged"
    meta = client.model_metadata("digits")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["max_batch_size"] == 32
    assert meta["executor"] == onnx_executor


@pytest.mark.parametrize("model", ["digits", "multi_io", "all_dtypes", "simple_static"])
def test_zmq_and_grpc_return_identical_outputs(client: ZmqClient, address: str, model: str) -> None:
    rng = np.random.default_rng(11)
    if model == "digits":
        inputs = {"input": load_digits().data[:3].astype(np.float32)}
    elif model == "multi_io":
        inputs = multi_io_inputs(3)
    elif model == "simple_static":
        inputs = {
            "INPUT0": np.arange(6, dtype=np.int32).reshape(2, 3),
            "INPUT1": np.full((2, 3), 5, dtype=np.int32),
        }
    else:
        inputs = {}
        for case in modelgen.ALL_DTYPES:
            if case.kserve == "BYTES":
                value = np.array([[b"a", "ü\x00".encode()], [b"", b"xyz"]], dtype=object)
            elif case.kserve == "BOOL":
                value = rng.random((2, 2)) > 0.5
            else:
                value = (rng.random((2, 2)) * 100).astype(case.numpy_dtype)
            inputs[f"in_{case.suffix}"] = value
    assert_identical(client.infer(model, inputs), grpc_outputs(address, model, inputs))


def test_requested_outputs_and_version(client: ZmqClient) -> None:
    x = load_digits().data[:2].astype(np.float32)
    out = client.infer("digits", {"input": x}, outputs=["label"], version="1")
    assert list(out) == ["label"]
    assert out["label"].tolist() == [0, 1]


ERRORS = [
    ("unknown-model", "nope", {"input": np.zeros((1, 64), np.float32)}, "NOT_FOUND"),
    ("wrong-shape", "digits", {"input": np.zeros((1, 63), np.float32)}, "INVALID_ARGUMENT"),
    ("wrong-dtype", "digits", {"input": np.zeros((1, 64), np.float64)}, "INVALID_ARGUMENT"),
    ("missing-input", "digits", {}, "INVALID_ARGUMENT"),
    ("batch-too-big", "digits", {"input": np.zeros((33, 64), np.float32)}, "INVALID_ARGUMENT"),
]


@pytest.mark.parametrize(
    ("model", "inputs", "code"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_same_error_codes_as_grpc(
    client: ZmqClient, address: str, model, inputs, code: str
) -> None:
    with pytest.raises(ZmqClientError) as zmq_err:
        client.infer(model, inputs)
    assert zmq_err.value.code == code
    with (
        grpcclient.InferenceServerClient(address) as c,
        pytest.raises(grpcclient.InferenceServerException) as grpc_err,
    ):
        c.infer(model, make_inputs(inputs) if inputs else [])
    assert grpc_err.value.status() == f"StatusCode.{code}"
    assert client.is_live()


def test_many_requests_in_flight_on_one_connection(zmq_address: str) -> None:
    data = load_digits().data.astype(np.float32)

    async def main() -> list[dict]:
        async with AsyncZmqClient(zmq_address, timeout=20) as c:
            return await asyncio.gather(
                *(
                    c.infer("digits", {"input": data[i : i + 1]}, outputs=["label"])
                    for i in range(100)
                )
            )  # under the queue bound (128)

    results = asyncio.run(main())
    labels = [int(r["label"][0]) for r in results]
    with ZmqClient(zmq_address) as c:
        expected = c.infer("digits", {"input": data[:32]}, outputs=["label"])["label"].tolist()
        expected += c.infer("digits", {"input": data[32:64]}, outputs=["label"])["label"].tolist()
    assert labels[:64] == expected  # each reply went to its own request


def test_every_reply_arrives_from_many_clients_in_flight_at_once(zmq_address: str) -> None:
    """Replies made on the model's worker threads reach the I/O thread through its outbox
    and wake-up pipe: none may be lost, whatever the interleaving (thousands of them)."""
    data = load_digits().data.astype(np.float32)
    with ZmqClient(zmq_address) as c:
        expected = c.infer("digits", {"input": data[:32]}, outputs=["label"])["label"].tolist()

    async def client(k: int) -> list[tuple[int, int]]:
        seen = []
        async with AsyncZmqClient(zmq_address, timeout=20) as c:
            for round_ in range(25):
                rows = [(k * 7 + round_ * 3 + j) % 32 for j in range(8)]
                outs = await asyncio.gather(
                    *(
                        c.infer("digits", {"input": data[r : r + 1]}, outputs=["label"])
                        for r in rows
                    )
                )
                seen += [(r, int(o["label"][0])) for r, o in zip(rows, outs, strict=True)]
        return seen

    async def main() -> list[list[tuple[int, int]]]:
        return await asyncio.gather(*(client(k) for k in range(6)))

    seen = [pair for pairs in asyncio.run(main()) for pair in pairs]
    assert len(seen) == 6 * 25 * 8
    assert all(label == expected[row] for row, label in seen)


def _raw(zmq_address: str, frames: list[bytes], kind: int = zmq.DEALER) -> list[bytes]:
    with zmq.Context() as ctx, ctx.socket(kind) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(zmq_address)
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no reply"
        return sock.recv_multipart()


def test_malformed_message_gets_a_clear_error_and_serving_goes_on(
    zmq_address: str, client: ZmqClient
) -> None:
    reply = json.loads(_raw(zmq_address, [b"garbage"])[0])
    assert reply["ok"] is False
    assert reply["code"] == "INVALID_ARGUMENT"
    assert "JSON" in reply["error"]
    header = {
        "v": 1,
        "op": "infer",
        "id": "z",
        "model": "digits",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64]}],
    }
    reply = json.loads(_raw(zmq_address, [json.dumps(header).encode(), b"\x00" * 255])[0])
    assert reply["id"] == "z"
    assert reply["code"] == "INVALID_ARGUMENT"
    assert "'input'" in reply["error"]
    assert "255 bytes" in reply["error"]
    assert client.is_ready()


def test_req_sockets_work_too(zmq_address: str) -> None:
    reply = _raw(
        zmq_address, [json.dumps({"v": 1, "op": "live", "id": "q"}).encode()], kind=zmq.REQ
    )
    assert json.loads(reply[0]) == {"v": 1, "id": "q", "ok": True, "result": {"live": True}}


def test_ipc_transport(tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "edged.sock"
    daemon = DaemonProcess(
        [
            "--models",
            str(copy_example_models(tmp_path / "models")),
            "--grpc-address",
            "127.0.0.1:0",
        ],
        env={"EDGED_ZMQ_ADDRESSES": f"ipc://{socket_path},tcp://127.0.0.1:0"},
    )
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready")
        assert daemon.zmq_endpoints[0] == f"ipc://{socket_path}"
        with ZmqClient(f"ipc://{socket_path}") as c:
            out = c.infer("digits", {"input": np.load("models/digits/sample.npy")})
        assert out["label"].tolist() == [0, 1]
        assert oct(socket_path.stat().st_mode & 0o777) == "0o660"
    finally:
        assert daemon.stop() == 0
    assert not socket_path.exists()  # removed on shutdown


def test_grpc_channel_unaffected_by_zmq_load(address: str, zmq_address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)


def _infer_header(**changes: object) -> dict:
    header = {
        "v": 1,
        "op": "infer",
        "id": "m",
        "model": "digits",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64]}],
    }
    header.update(changes)
    return header


def _tensor(**changes: object) -> list[dict]:
    return [{"name": "input", "datatype": "FP32", "shape": [1, 64], **changes}]


MALFORMED = [
    # (id, header frame, words the error must contain); issue #11: INVALID_ARGUMENT, not
    # INTERNAL, and never an error that echoes kilobytes of client text
    ("deep-nesting", b'{"v": 1, "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", ["deeply"]),
    ("5000-digit-int", b'{"v": 1, "op": "live", "n": ' + b"7" * 5000 + b"}", ["digits"]),
    ("10**30-dim", json.dumps(_infer_header(inputs=_tensor(shape=[0, 10**30]))), ["digits"]),
    ("huge-dim", json.dumps(_infer_header(inputs=_tensor(shape=[0, 2**63 - 1]))), ["too large"]),
    ("65-dims", json.dumps(_infer_header(inputs=_tensor(shape=[1] * 65))), ["65 dimensions"]),
    ("float-dim", json.dumps(_infer_header(inputs=_tensor(shape=[1.5, 64]))), ["integers"]),
    ("nan", b'{"v": 1, "op": "live", "x": NaN}', ["NaN"]),
    ("10kb-datatype", json.dumps(_infer_header(inputs=_tensor(datatype="X" * 10_000))), ["chars"]),
    ("60kb-model", json.dumps(_infer_header(model="m" * 60_000)), ["chars"]),
    ("60kb-op", json.dumps(_infer_header(op="o" * 60_000)), ["chars"]),
]


@pytest.mark.parametrize(
    ("frame", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_headers_are_invalid_argument(
    zmq_address: str, client: ZmqClient, frame, words
) -> None:
    data = frame if isinstance(frame, bytes) else frame.encode()
    reply = json.loads(_raw(zmq_address, [data, b"\x00" * 256])[0])
    assert reply["ok"] is False
    assert reply["code"] in ("INVALID_ARGUMENT", "NOT_FOUND"), reply
    for word in words:
        assert word in reply["error"], reply["error"][:300]
    assert len(reply["error"]) <= 1024
    assert client.is_ready()


def test_async_client_times_out_each_request_at_its_own_deadline() -> None:
    """One timer per client, not per request: a short timeout asked after a long one still
    fails on its own (a silent ROUTER stands in for a daemon that never answers), and the
    long one is still waiting afterwards."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        router.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        x = np.zeros((1, 64), dtype=np.float32)

        async def main() -> None:
            async with AsyncZmqClient(address, timeout=60) as client:
                patient = asyncio.ensure_future(client.infer("digits", {"input": x}))
                await asyncio.sleep(0.05)
                for _ in range(2):  # the second: the timer is set again after the first
                    with pytest.raises(ZmqClientError) as late:
                        # bounded here only so that a missed deadline fails instead of hanging
                        await asyncio.wait_for(
                            client.infer("digits", {"input": x}, timeout=0.2), 20
                        )
                    assert late.value.code == "DEADLINE_EXCEEDED"
                assert not patient.done()
                patient.cancel()

        asyncio.run(main())


def test_too_many_inputs_are_resource_exhausted(zmq_address: str, client: ZmqClient) -> None:
    inputs = [{"name": f"i{i}", "datatype": "UINT8", "shape": [1]} for i in range(300)]
    frames = [json.dumps(_infer_header(inputs=inputs)).encode()] + [b"\x00"] * 300
    reply = json.loads(_raw(zmq_address, frames)[0])
    assert reply["code"] == "RESOURCE_EXHAUSTED"
    assert "limits.max_inputs" in reply["error"]
    assert client.is_ready()


def test_the_async_client_raises_error_and_malformed_replies_for_their_request() -> None:
    """AsyncZmqClient decodes replies as they are read: an error reply fails its own request
    with the reply's code, a malformed one with INTERNAL, and a good infer reply after them
    (its layout remembered from the first) still carries its own tensors."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        router.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

        def answer(kind: str, value: float = 0.0) -> None:
            frames = router.recv_multipart()
            rid = json.loads(frames[1])["id"]
            if kind == "error":
                reply = [zmq_wire.encode_error(rid, "NOT_FOUND", "no such model")[0]]
            else:
                y = np.full((1, 2), value, dtype=np.float32)
                reply = zmq_wire.encode_response(rid, InferResponse("m", "1", {"y": y}))
                if kind == "short":
                    reply = [reply[0], b"\0\0\0"]
            router.send_multipart([frames[0], *map(bytes, reply)])

        async def main() -> None:
            async with AsyncZmqClient(address, timeout=20) as client:
                x = {"x": np.zeros((1, 2), dtype=np.float32)}
                for kind, value in (("ok", 1.5), ("error", 0), ("short", 0), ("ok", 2.5)):
                    answering = threading.Thread(target=answer, args=(kind, value))
                    answering.start()
                    try:
                        if kind == "ok":
                            outputs = await client.infer("m", x)
                            assert outputs["y"].tolist() == [[value, value]]
                            continue
                        with pytest.raises(ZmqClientError) as failed:
                            await client.infer("m", x)
                        code = "NOT_FOUND" if kind == "error" else "INTERNAL"
                        assert failed.value.code == code
                    finally:
                        await asyncio.to_thread(answering.join)

        asyncio.run(main())


def test_clients_time_out_and_drop_a_late_reply() -> None:
    """A peer that answers late (a raw ROUTER standing in for a slow daemon): the request
    fails with DEADLINE_EXCEEDED, and its late reply is not taken for the next request's."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        router.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

        def answer(live: bool) -> None:
            frames = router.recv_multipart()
            rid = json.loads(frames[1])["id"]
            reply = {"v": 1, "id": rid, "ok": True, "result": {"live": live}}
            router.send_multipart([frames[0], json.dumps(reply).encode()])

        with ZmqClient(address, timeout=0.2) as client:
            with pytest.raises(ZmqClientError) as late:
                client.is_live()
            assert late.value.code == "DEADLINE_EXCEEDED"
            answer(False)  # the first request's reply, late: it waits in the client's queue
            answering = threading.Thread(target=answer, args=(True,))
            answering.start()
            assert client.is_live() is True  # the late False was dropped
            answering.join()

        async def main() -> None:
            async with AsyncZmqClient(address, timeout=0.2) as client:
                with pytest.raises(ZmqClientError) as late:
                    await client.is_live()
                assert late.value.code == "DEADLINE_EXCEEDED"
                answer(False)  # late again
                answering = threading.Thread(target=answer, args=(True,))
                answering.start()
                assert await client.is_live() is True
                answering.join()

        asyncio.run(main())


def test_clients_time_out_when_the_handshake_is_refused_around_the_send() -> None:
    """A plain client against a CURVE listener with a ZAP handler (as the daemon's): when the
    refused handshake ends while the request is being sent, libzmq 4.3 leaves the DEALER
    without a pipe and a blocking send waits forever (about 1 connect in 15 here). The send
    is bounded by the request's deadline: every try of either client fails with
    DEADLINE_EXCEEDED."""
    public, secret = zmq.curve_keypair()
    with (
        zmq.Context() as ctx,
        ctx.socket(zmq.ROUTER) as router,
        tempfile.TemporaryDirectory() as keys,
    ):
        authenticator = ThreadAuthenticator(ctx)
        authenticator.start()
        try:
            authenticator.configure_curve(domain="edged", location=keys)
            router.setsockopt(zmq.LINGER, 0)
            router.curve_server = True
            router.curve_publickey, router.curve_secretkey = public, secret
            router.zap_domain = b"edged"
            address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
            jitter = random.Random(7)
            for _ in range(60):
                with ZmqClient(address, timeout=0.05) as client:
                    time.sleep(jitter.random() * 0.003)  # land the send around the refusal
                    with pytest.raises(ZmqClientError) as refused:
                        client.is_live()
                    assert refused.value.code == "DEADLINE_EXCEEDED"

            async def tries() -> None:
                for _ in range(60):
                    async with AsyncZmqClient(address, timeout=0.05) as client:
                        await asyncio.sleep(jitter.random() * 0.003)
                        with pytest.raises(ZmqClientError) as refused:
                            await asyncio.wait_for(client.is_live(), 20)
                        assert refused.value.code == "DEADLINE_EXCEEDED"

            asyncio.run(tries())
        finally:
            authenticator.stop()


@pytest.mark.parametrize("rows", [2_000, 8_000, 20_000, 70_000])  # 31, 125, 312, 1094 KiB
def test_clients_send_tensors_copied_or_by_reference_alike(zmq_address: str, rows: int) -> None:
    """Frames under ``COPY_THRESHOLD`` are copied when sent, larger ones go by reference,
    requests and the daemon's replies alike: the same bytes arrive either way, and a
    copied tensor may be changed by the caller as soon as the request is sent."""
    x = np.random.default_rng(rows).random((1, rows, 4), dtype=np.float32)
    expected = 3 * x  # what ONNX Runtime's Mul computes, to the bit
    with ZmqClient(zmq_address, timeout=20) as client:
        y = client.infer("dynamic", {"x": x})["y"]
        assert y.dtype == expected.dtype
        assert y.shape == expected.shape
        assert y.tobytes() == expected.tobytes()

    async def main() -> np.ndarray:
        async with AsyncZmqClient(zmq_address, timeout=20) as c:
            sent = x.copy()
            task = asyncio.create_task(c.infer("dynamic", {"x": sent}))
            await asyncio.sleep(0)  # the request is on its way: the task waits for its reply
            if sent.nbytes <= COPY_THRESHOLD:
                sent[:] = -1.0
            return (await task)["y"]

    np.testing.assert_array_equal(asyncio.run(main()), expected)
