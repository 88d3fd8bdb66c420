"""Federated learning end to end (issue #17): three real `edged serve` processes on loopback,
each with samples of different new classes of the example trainable model
(models/digits_learn: backbone and head trained on digits 0-4), a Flower server started by
`edged-fleet federate` over TLS with enrolled devices; Flower's clients run in the federated
environment (docs/adr/0012) under the learning worker's limits.

(a) after the rounds, each device has judged the merged head with its own gate and promoted
    it through the update path (version 2, lineage naming the round, strategy, participant
    count), and answers correctly on the new classes it never saw locally;
(b) with differential privacy on and one device killed mid-round, every round still
    completes with the survivors, and the noisy federation still trains; a device whose gate
    rejects the merged head keeps its own;
(c) a device that is not enrolled is refused by the server and trains nothing;
(d) differential privacy changes the result but the federation still trains (Flower's server
    loop with edged's clients in process: benchmarks/federated.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged._proto.inference import grpc_service_pb2 as ipb
from edged.federated.session import FLOWER_ENV, default_python
from tests import pki
from tests.daemon_process import EXAMPLE_MODELS, REPO_ROOT, DaemonProcess

pytestmark = pytest.mark.slow

MODEL = "digits_learn"
PYTHON = default_python()
SPLITS = [(5, 6), (7, 8), (9,)]  # the new classes each device sees (non-IID)
PER_CLASS = 60


def _flower_missing() -> str | None:
    if not Path(PYTHON).is_file():
        return f"no federated environment at {PYTHON} (make federated-env; docs/adr/0012)"
    check = subprocess.run(
        [PYTHON, "-c", "import flwr"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        return f"flwr does not import in {PYTHON}: {check.stderr.strip()[-200:]}"
    return None


MISSING = _flower_missing()
if MISSING:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=MISSING)]


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """load_digits split as models/build_trainable.py splits it: devices learn from the
    training split, the test checks on the test split."""
    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=20240517
    )
    return x_train, y_train, x_test, y_test


X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = _digits()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """The PKI, enrolment and device folders of one federation."""

    def __init__(self, root: Path, devices: int) -> None:
        self.root = root
        ca = pki.issue("fleet CA", ca=True)
        server = pki.issue("localhost", ca, server=True)
        self.ca = root / "ca.pem"
        self.ca.write_bytes(ca.cert_pem)
        self.cert, self.key = server.write(root, "server")
        self.port = _free_port()
        self.tokens = {f"dev{i}": secrets.token_hex(16) for i in range(devices)}
        self.enrolled = root / "enrolled.txt"
        self.enrolled.write_text("".join(f"{d} {t}\n" for d, t in self.tokens.items()))

    def serve(self, i: int, device: str, token: str, **keys: str) -> DaemonProcess:
        folder = self.root / device
        models = folder / "models"
        shutil.copytree(
            EXAMPLE_MODELS / MODEL, models / MODEL, ignore=shutil.ignore_patterns("test_*.npz")
        )
        (folder / "token").write_text(token + "\n")
        env = {
            "EDGED_LEARN_ENABLED": "true",
            "EDGED_LEARN_MAX_OLD_DROP": "5",
            "EDGED_OTA_STATE_DIR": str(folder / "state"),
            "EDGED_OTA_HEALTH_WINDOW_S": "0.3",
            "EDGED_OTA_MIN_FREE_BYTES": str(1024 * 1024),
            "EDGED_MODELS_INSTANCES": "1",
            "EDGED_FEDERATED_ENABLED": "true",
            "EDGED_FEDERATED_SERVER": f"localhost:{self.port}",
            "EDGED_FEDERATED_ROOT_CERTIFICATES": str(self.ca),
            "EDGED_FEDERATED_DEVICE_ID": device,
            "EDGED_FEDERATED_TOKEN_FILE": str(folder / "token"),
            "EDGED_FEDERATED_RETRY_S": "0.5",
            "EDGED_FEDERATED_PYTHON": PYTHON,
            **keys,
        }
        daemon = DaemonProcess(["--models", str(models), "--grpc-address", "127.0.0.1:0"], env)
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        daemon.wait_for("federated_started", timeout=30)
        return daemon

    def federate(self, *extra: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "edged.fleet", "federate", MODEL]
        argv += ["--head", str(EXAMPLE_MODELS / MODEL / "1" / "head.npz")]
        argv += ["--address", f"localhost:{self.port}", "--tls-ca", str(self.ca)]
        argv += ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        argv += ["--enrolled", str(self.enrolled), "--out", str(self.root / "history.json")]
        argv += ["--python", PYTHON, *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            env={**env, **FLOWER_ENV},
        )


def add_samples(address: str, classes: tuple[int, ...]) -> int:
    idx = np.concatenate([np.flatnonzero(np.equal(Y_TRAIN, c))[:PER_CLASS] for c in classes])
    x = np.ascontiguousarray(X_TRAIN[idx])
    request = mpb.AddSamplesRequest(
        model=MODEL,
        inputs=[
            ipb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[x.tobytes()],
        labels=[int(v) for v in Y_TRAIN[idx]],
    )
    with grpc.insecure_channel(address) as channel:
        stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
        return int(stub.AddSamples(request).accepted)


def accuracy(address: str, classes: list[int], version: str = "") -> float:
    mask = np.isin(Y_TEST, classes)
    x, y = X_TEST[mask], Y_TEST[mask]
    client = triton.InferenceServerClient(address)
    labels = []
    try:
        for start in range(0, len(y), 100):  # the model's max_batch_size is 128
            chunk = x[start : start + 100]
            inp = triton.InferInput("input", list(chunk.shape), "FP32")
            inp.set_data_from_numpy(chunk)
            labels.append(client.infer(MODEL, [inp], model_version=version).as_numpy("label"))
    finally:
        client.close()
    return float((np.concatenate(labels) == y).mean())


def follow(process: subprocess.Popen[str], lines: list[str], cond: threading.Condition) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        with cond:
            lines.append(line.rstrip())
            cond.notify_all()


@pytest.fixture
def stopper() -> Iterator[list[DaemonProcess]]:
    daemons: list[DaemonProcess] = []
    yield daemons
    for d in daemons:
        d.stop()


def test_federation_teaches_each_device_the_classes_it_never_saw(
    tmp_path: Path, stopper: list[DaemonProcess]
) -> None:
    fleet = Fleet(tmp_path, 3)
    daemons = [fleet.serve(i, d, t) for i, (d, t) in enumerate(fleet.tokens.items())]
    stopper.extend(daemons)
    for daemon, classes in zip(daemons, SPLITS, strict=True):
        assert add_samples(daemon.address, classes) == PER_CLASS * len(classes)
        unseen = [c for c in range(5, 10) if c not in classes]
        assert accuracy(daemon.address, unseen) == 0.0  # the served head knows 0-4 only

    server = fleet.federate("--rounds", "8", "--min-clients", "3", "--local-epochs", "20")
    out, _ = server.communicate(timeout=240)
    (tmp_path / "federate.out").write_text(out)  # what the operator's terminal shows
    assert server.returncode == 0, out
    assert out.count("client joined: device dev") == 3, out
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["clients"] for r in history["rounds"]] == [3] * 8
    # only head parameters travel: the example head (64 -> 64 -> 10 with its standardisation)
    assert all(r["bytes_per_client"] <= 100 * 1024 for r in history["rounds"])

    for daemon, classes, device in zip(daemons, SPLITS, fleet.tokens, strict=True):
        judged = daemon.wait_for("federated_candidate_judged", timeout=120)
        assert judged["state"] == "PROMOTED", judged
        lineage = json.loads(
            (tmp_path / device / "models" / MODEL / "2" / "lineage.json").read_text()
        )
        assert lineage["federated"]["round"] == 8
        assert lineage["federated"]["strategy"] == "fedavg"
        assert lineage["federated"]["participants"] == 3
        unseen = [c for c in range(5, 10) if c not in classes]
        assert accuracy(daemon.address, unseen, "2") >= 0.6, (device, unseen)
        assert accuracy(daemon.address, list(range(5))) >= 0.9


def test_dp_and_a_device_killed_mid_round_do_not_stall_the_federation(
    tmp_path: Path, stopper: list[DaemonProcess]
) -> None:
    fleet = Fleet(tmp_path, 3)
    # dev1's gate asks the impossible: it must reject the merged head and keep its own
    strict = {"EDGED_LEARN_MIN_NEW_GAIN": "101"}
    daemons = [
        fleet.serve(i, d, t, **(strict if d == "dev1" else {}))
        for i, (d, t) in enumerate(fleet.tokens.items())
    ]
    stopper.extend(daemons)
    for daemon, classes in zip(daemons, SPLITS, strict=True):
        add_samples(daemon.address, classes)
    server = fleet.federate(
        *("--rounds", "6", "--start-clients", "3", "--min-clients", "2", "--local-epochs", "10"),
        *("--round-timeout", "30", "--dp-noise", "0.02", "--dp-clip", "5"),
    )
    lines: list[str] = []
    cond = threading.Condition()
    reader = threading.Thread(target=follow, args=(server, lines, cond), daemon=True)
    reader.start()
    with cond:  # round 1 had all three; round 2 is starting
        first = cond.wait_for(lambda: any(line.startswith("round 1/6") for line in lines), 180)
    assert first, lines
    daemons[2].stop(signal.SIGKILL)  # its Flower client dies with it (PR_SET_PDEATHSIG)
    assert server.wait(timeout=240) == 0, lines
    reader.join(10)
    rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert len(rounds) == 6, rounds
    assert all("accuracy" in r for r in rounds), rounds  # every round completed
    clients = [r["clients"] for r in rounds]
    assert clients[0] == 3, rounds
    # the kill lands in round 2 (or later, when this process is starved for a round or more):
    # the rounds before it had all three, every round from the first without it has the two
    # survivors, and the federation went on without it to the end
    assert clients[-1] == 2, rounds
    died = clients.index(2)
    assert all(c == 3 for c in clients[:died]), rounds
    assert all(c == 2 for c in clients[died:]), rounds
    assert rounds[-1]["accuracy"] > 0.3, rounds  # noisy, but it trains
    judged = daemons[0].wait_for("federated_candidate_judged", timeout=120)
    assert judged["strategy"] == "fedavg+dp"
    if judged["state"] == "PROMOTED":  # PROMOTED: version 2 committed
        # noisy, but it trained: the device's own new classes are learnt
        assert accuracy(daemons[0].address, list(SPLITS[0]), "2") >= 0.5
    rejected = daemons[1].wait_for("federated_candidate_judged", timeout=120)
    assert rejected["state"] == "REJECTED", rejected
    assert rejected["verdict"].startswith("rejected: "), rejected
    assert not (tmp_path / "dev1" / "models" / MODEL / "2").exists()
    assert accuracy(daemons[1].address, [7, 8, 9]) == 0.0  # its own head, as before


def test_a_device_that_is_not_enrolled_is_refused(
    tmp_path: Path, stopper: list[DaemonProcess]
) -> None:
    fleet = Fleet(tmp_path, 2)
    intruder = fleet.serve(0, "intruder", secrets.token_hex(16))
    honest = fleet.serve(1, "dev1", fleet.tokens["dev1"])
    stopper.extend([intruder, honest])
    add_samples(intruder.address, (5, 6))
    add_samples(honest.address, (7, 8))
    server = fleet.federate(
        "--rounds", "1", "--min-clients", "2", "--wait-clients", "15", "--local-epochs", "2"
    )
    out, _ = server.communicate(timeout=120)
    assert "client refused: device 'intruder' is not enrolled" in out, out
    assert server.returncode == 1, out  # never two enrolled devices: no round ran
    assert not any(e.get("event") == "federated_candidate_judged" for e in intruder.events)


def test_dp_changes_the_result_but_still_trains(tmp_path: Path) -> None:
    """Flower's server loop and the strategies `edged-fleet federate` builds, with edged's
    own clients in process (benchmarks/federated.py), with and without server-side DP."""
    argv = [sys.executable, str(REPO_ROOT / "benchmarks" / "federated.py"), "--rounds", "4"]
    argv += ["--clients", "3", "--spaces", "backbone", "--strategies", "fedavg,fedavg+dp"]
    argv += ["--dp-noise", "0.01", "--python", PYTHON]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(done.stdout)["runs"]
    plain = run["strategies"]["fedavg"]["rounds"]
    noisy = run["strategies"]["fedavg+dp"]["rounds"]
    assert [r["all"] for r in plain] != [r["all"] for r in noisy]  # the noise changes it
    assert run["served"]["new"] == 0.0
    assert noisy[-1]["new"] > 50.0  # ... and it still learns the new classes (75% measured)
