"""Re-planning end to end: two real daemons on loopback, the device's link to the server
through a throttling TCP proxy (tests/throttle_proxy.py: a *simulated* slow link, no network
namespace needed). The device serves digits split at the inputs cut; when the proxy slows the
link to 0.1 Mbit/s, the device measures it from its own calls and switches to all local; when
the link is fast again, its probes see it and it switches back to the server — while a client
sends requests all along and none fails. The cost profiles are simulated
(tests/split_models.py); the link, the daemons, the swap and the clients are real."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.daemon_process import DaemonProcess
from tests.digits_variants import SAMPLE
from tests.split_models import device_repo, server_repo
from tests.throttle_proxy import ThrottleProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("replan-e2e")
    server = DaemonProcess(["--models", str(server_repo(root)), "--grpc-address", "127.0.0.1:0"])
    proxy: ThrottleProxy | None = None
    device: DaemonProcess | None = None
    try:
        server.wait_live()
        server.wait_for("server_ready", timeout=60)
        proxy = ThrottleProxy(server.address)
        repo = device_repo(
            root,
            proxy.address,
            partition="min_interval_ms = 500\nprobe_interval_ms = 100\nprobe_bytes = 4096\n",
        )
        device = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0"])
        device.wait_live()
        device.wait_for("server_ready", timeout=60)
        yield {"device": device, "server": server, "proxy": proxy, "root": Path(root)}
    finally:
        if device is not None:
            assert device.stop() == 0, device.stderr
        if proxy is not None:
            proxy.close()
        assert server.stop() == 0, server.stderr


class Client:
    """Sequential requests to the device from a thread, every answer checked."""

    def __init__(self, address: str, expected: dict[str, np.ndarray]) -> None:
        self._address = address
        self._expected = expected
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with grpcclient.InferenceServerClient(self._address) as client:
            while not self._stop.is_set():
                tensor = grpcclient.InferInput("input", [2, 64], "FP32")
                tensor.set_data_from_numpy(SAMPLE.astype(np.float32))
                try:
                    result = client.infer("digits", [tensor], client_timeout=30)
                except grpcclient.InferenceServerException as e:
                    self.failures.append(f"{e.status()}: {e.message()}")
                    continue
                label = result.as_numpy("label")
                if not np.array_equal(label, self._expected["label"]):
                    self.failures.append(f"wrong answer {label}")
                self.answers += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _expected(device: DaemonProcess) -> dict[str, np.ndarray]:
    with grpcclient.InferenceServerClient(device.address) as client:
        tensor = grpcclient.InferInput("input", [2, 64], "FP32")
        tensor.set_data_from_numpy(SAMPLE.astype(np.float32))
        return {"label": client.infer("digits", [tensor]).as_numpy("label")}


def _executor(device: DaemonProcess) -> str:
    with grpcclient.InferenceServerClient(device.address) as client:
        config = client.get_model_config("digits", as_json=True)["config"]
    return str(config["parameters"]["executor"]["string_value"])


def test_a_slower_link_moves_the_model_here_and_a_faster_one_back_with_no_failed_request(
    rig: dict[str, Any],
) -> None:
    device, proxy = rig["device"], rig["proxy"]
    assert _executor(device) == "remote"
    client = Client(device.address, _expected(device))
    try:
        proxy.rate_bps = 100_000  # 0.1 Mbit/s: a 2-row request's 608 bytes take ~50 ms
        local = device.wait_for("partition_replanned", timeout=60, to="<local>")
        assert local["from"] == "<inputs>"
        assert _executor(device) == "cpu-onnx"
        proxy.rate_bps = None  # fast again: the payload probes measure it
        back = device.wait_for("partition_replanned", timeout=60, **{"from": "<local>"})
        assert back["to"] in ("<inputs>", "hidden")
        assert _executor(device) == "remote"
        answered = client.answers
        while client.answers < answered + 5 and not client.failures:
            threading.Event().wait(0.05)
    finally:
        client.stop()
    assert client.failures == []
    assert client.answers > 0
