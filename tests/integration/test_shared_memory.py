"""Triton's system shared memory extension with the stock tritonclient.utils.shared_memory:
inputs and outputs round-trip through /dev/shm, and every bad region is INVALID_ARGUMENT (or
NOT_FOUND / ALREADY_EXISTS), never a crash."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException


@pytest.fixture
def client(address: str) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(address) as c:
        c.unregister_system_shared_memory()
        yield c
        c.unregister_system_shared_memory()


@pytest.fixture
def regions() -> Iterator[dict]:
    created: dict = {}

    def make(name: str, size: int):
        key = f"/edged-test-{uuid.uuid4().hex[:8]}-{name}"
        handle = shm.create_shared_memory_region(name, key, size)
        created[name] = (key, handle)
        return key, handle

    yield make
    for _, handle in created.values():
        shm.destroy_shared_memory_region(handle)


def test_inputs_and_outputs_round_trip(client, regions) -> None:
    x = load_digits().data[:4].astype(np.float32)
    in_key, in_handle = regions("in", x.nbytes + 64)
    out_key, out_handle = regions("out", 4 * 10 * 4 + 4 * 8)
    shm.set_shared_memory_region(in_handle, [x], offset=64)
    client.register_system_shared_memory("in", in_key, x.nbytes + 64)
    client.register_system_shared_memory("out", out_key, 4 * 10 * 4 + 4 * 8)

    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_shared_memory("in", x.nbytes, offset=64)
    probabilities = grpcclient.InferRequestedOutput("probabilities")
    probabilities.set_shared_memory("out", 4 * 10 * 4)
    label = grpcclient.InferRequestedOutput("label")
    label.set_shared_memory("out", 4 * 8, offset=4 * 10 * 4)
    result = client.infer("digits", [tensor], outputs=[probabilities, label])

    out = result.get_output("probabilities")
    assert out.parameters["shared_memory_byte_size"].int64_param == 160
    got = shm.get_contents_as_numpy(out_handle, np.float32, [4, 10])
    labels = shm.get_contents_as_numpy(out_handle, np.int64, [4], offset=160)

    raw_input = grpcclient.InferInput("input", list(x.shape), "FP32")
    raw_input.set_data_from_numpy(x)
    raw = client.infer("digits", [raw_input])
    np.testing.assert_array_equal(got, raw.as_numpy("probabilities"))
    np.testing.assert_array_equal(labels, raw.as_numpy("label"))
    assert labels.tolist() == [0, 1, 2, 3]


def test_mixed_shared_memory_and_raw_inputs(client, regions) -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.full((2, 3), 10, dtype=np.int32)
    key, handle = regions("a", a.nbytes)
    shm.set_shared_memory_region(handle, [a])
    client.register_system_shared_memory("a", key, a.nbytes)
    in0 = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
    in0.set_shared_memory("a", a.nbytes)
    in1 = grpcclient.InferInput("INPUT1", [2, 3], "INT32")
    in1.set_data_from_numpy(b)
    result = client.infer("simple_static", [in0, in1])
    assert result.as_numpy("OUTPUT0").tolist() == (a + b).tolist()


def test_status_and_unregister(client, regions) -> None:
    key, _ = regions("s", 128)
    client.register_system_shared_memory("s", key, 64, offset=32)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]["s"]
    assert status == {"name": "s", "key": key, "offset": "32", "byte_size": "64"}
    client.unregister_system_shared_memory("s")
    assert client.get_system_shared_memory_status(as_json=True) == {}
    with pytest.raises(InferenceServerException) as err:
        client.get_system_shared_memory_status("s")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def _status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.status(), err.value.message()


def test_bad_regions_are_refused(client, regions) -> None:
    key, _ = regions("b", 256)
    code, message = _status(lambda: client.register_system_shared_memory("b", key, 512))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "past the end" in message
    code, message = _status(
        lambda: client.register_system_shared_memory("x", "/edged-no-such-key", 8)
    )
    assert code == "StatusCode.NOT_FOUND"
    code, message = _status(lambda: client.register_system_shared_memory("x", "/../etc", 8))
    assert code == "StatusCode.INVALID_ARGUMENT"
    client.register_system_shared_memory("b", key, 256)
    code, message = _status(lambda: client.register_system_shared_memory("b", key, 256))
    assert code == "StatusCode.ALREADY_EXISTS"
    # a span outside the region
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_shared_memory("b", 256, offset=128)
    code, message = _status(lambda: client.infer("digits", [tensor]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'input'" in message
    assert "outside region 'b'" in message
    # a span of the wrong size for the shape
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_shared_memory("b", 128)
    code, message = _status(lambda: client.infer("digits", [tensor]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "128 bytes" in message
    # an output that does not fit
    tensor = grpcclient.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((2, 64), np.float32))
    small = grpcclient.InferRequestedOutput("probabilities")
    small.set_shared_memory("b", 16)
    code, message = _status(lambda: client.infer("digits", [tensor], outputs=[small]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "'probabilities' needs 80 bytes" in message
    assert client.is_server_ready()


# -- confinement (issue #11) ---------------------------------------------------------------


def _shm_path(key: str) -> Path:
    return Path("/dev/shm") / key.lstrip("/")


def _digits_input(region: str, nbytes: int = 64 * 4) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_shared_memory(region, nbytes)
    return tensor


def test_server_metadata_lists_the_extension(client) -> None:
    assert "system_shared_memory" in client.get_server_metadata(as_json=True)["extensions"]


def test_truncated_region_is_refused_not_a_crash(client, regions) -> None:
    x = np.ones((1, 64), np.float32)
    key, handle = regions("t", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("t", key, x.nbytes)
    client.infer("digits", [_digits_input("t")])  # fine while it is whole
    os.truncate(_shm_path(key), 0)
    code, message = _status(lambda: client.infer("digits", [_digits_input("t")]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "shrank" in message
    assert "'t'" in message
    # an output region shrunk after registration: refused the same way
    out_key, _ = regions("o", 4 * 10)
    client.register_system_shared_memory("o", out_key, 4 * 10)
    os.truncate(_shm_path(out_key), 0)
    raw = grpcclient.InferInput("input", [1, 64], "FP32")
    raw.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("probabilities")
    out.set_shared_memory("o", 4 * 10)
    code, message = _status(lambda: client.infer("digits", [raw], outputs=[out]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "shrank" in message
    assert client.is_server_live()
    assert client.is_server_ready()


def test_replaced_region_is_refused(client, regions) -> None:
    key, _ = regions("r", 64 * 4)
    client.register_system_shared_memory("r", key, 64 * 4)
    path = _shm_path(key)
    path.unlink()
    path.write_bytes(bytes(64 * 4))  # another object under the same key
    code, message = _status(lambda: client.infer("digits", [_digits_input("r")]))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert "replaced" in message


def test_symlink_key_is_refused(client, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"daemon-only " * 100)
    secret.chmod(0o600)
    link = Path("/dev/shm") / f"edged-test-{uuid.uuid4().hex[:8]}-link"
    link.symlink_to(secret)
    try:
        code, message = _status(
            lambda: client.register_system_shared_memory("s", f"/{link.name}", 256)
        )
        assert code == "StatusCode.INVALID_ARGUMENT"
        assert "symlink" in message
        assert client.get_system_shared_memory_status(as_json=True) == {}
    finally:
        link.unlink()


def test_special_file_key_is_refused(client) -> None:
    fifo = Path("/dev/shm") / f"edged-test-{uuid.uuid4().hex[:8]}-fifo"
    os.mkfifo(fifo)
    try:
        code, message = _status(
            lambda: client.register_system_shared_memory("f", f"/{fifo.name}", 8)
        )
        assert code == "StatusCode.INVALID_ARGUMENT"
        assert "not a regular file" in message
    finally:
        fifo.unlink()


def test_registrations_are_capped_per_connection(client, regions) -> None:
    key, _ = regions("c", 64)
    for i in range(64):  # limits.shm_max_regions_per_connection
        client.register_system_shared_memory(f"c{i}", key, 64)
    code, message = _status(lambda: client.register_system_shared_memory("c64", key, 64))
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    assert "limits.shm_max_regions_per_connection" in message
    client.unregister_system_shared_memory("c0")
    client.register_system_shared_memory("c64", key, 64)  # a freed slot is usable again
    assert len(client.get_system_shared_memory_status(as_json=True)["regions"]) == 64
