"""The Flower client of one model on one device, a process of the federated environment:

    <federated python> -m edged.federated.client SESSION_DIR

started by the daemon (``edged.federated.devices``) under the learning worker's limits
(``edged.learn.runner``: address space, CPU time, niceness, one BLAS thread, death with the
daemon). It reads SESSION_DIR/session.json and samples.npz (the model's stored features and
labels, never raw inputs), connects to the fleet's Flower server over TLS and answers it:

* ``get_properties``: the enrolment proof (``edged.federated.enrol``);
* ``fit``: the round's global head trained on the device's training features with the
  model's continual-learning strategy (``edged.federated.local.local_fit``); it returns the
  head's arrays and the sample count, nothing else. A streaming-lda model returns its
  samples' averaged LDA statistics instead (``lda_statistics``), which FedAvg sums exactly;
  run such a federation with fedavg or fedprox (FedAdam's server step would mix them with a
  head);
* ``evaluate``: the merged head's loss and accuracy on the device's held-out samples; the
  merged head is kept in SESSION_DIR (merged.npz, merged.json) for the daemon, which offers
  it to its gate after the session.

It exits when the server ends the federation (0) or cannot be reached within
``max_wait_s`` (1, the reason on stderr). Progress goes to stdout as JSON lines.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edged.federated import enrol
from edged.federated.local import (
    RoundConfig,
    is_lda_statistics,
    lda_merge,
    lda_statistics,
    local_fit,
)
from edged.federated.params import head_from_arrays, head_to_arrays
from edged.federated.session import (
    FLOWER_ENV,
    MERGED_FILE,
    SAMPLES_FILE,
    MergedInfo,
    Session,
)
from edged.learn.head import Head, load_head, read_npz, save_head, softmax
from edged.learn.strategies import LearnState, load_state, tuned_hyper


def _say(**event: object) -> None:
    print(json.dumps(event), flush=True)  # noqa: T201 -- the daemon reads these lines


def _loss_accuracy(head: Head, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    p = softmax(head.logits(x))
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))
    return loss, float(np.mean(np.argmax(p, axis=1) == y))


class Device:
    """The client's behaviour, without Flower: what ``_FlowerClient`` calls."""

    def __init__(self, folder: Path, session: Session) -> None:
        self.folder = folder
        self.session = session
        data = read_npz(folder / SAMPLES_FILE)
        self.x_train, self.y_train = data["x_train"], data["y_train"]
        self.x_holdout, self.y_holdout = data["x_holdout"], data["y_holdout"]
        self.head = load_head(session.head)
        self.state: LearnState = load_state(session.state)
        lda = self.state.lda
        self.lda = lda if session.strategy == "streaming-lda" and lda is not None else None
        self.token = enrol.read_token(Path(session.token_file)) if session.token_file else b""

    def properties(self, config: dict[str, Any]) -> dict[str, Any]:
        nonce = str(config.get("nonce", ""))
        answer = enrol.proof(self.token, self.session.model, self.session.device_id, nonce)
        return {"model": self.session.model, "device": self.session.device_id, "proof": answer}

    def fit(self, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int]:
        server_round = int(config.get("round", 0))
        round_config = RoundConfig(
            epochs=int(config.get("epochs", 5)),
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        if self.lda is not None:  # streaming LDA: exact statistics, not a trained head
            _say(event="federated_fit", round=server_round, samples=len(self.y_train))
            return lda_statistics(self.lda, self.x_train, self.y_train), len(self.y_train)
        global_head = head_from_arrays(arrays, like=self.head)
        candidate = local_fit(
            global_head,
            self.state,
            self.x_train,
            self.y_train,
            self.session.strategy,
            round_config,
            self.session.seed + server_round,
        )
        _say(event="federated_fit", round=server_round, samples=len(self.y_train))
        return head_to_arrays(candidate), len(self.y_train)

    def merged_head(self, arrays: list[np.ndarray], config: dict[str, Any]) -> Head:
        """The round's global head; for streaming LDA, this device's statistics merged with
        the federation's (the round's average times its sample count), as an LDA head."""
        if self.lda is None or not is_lda_statistics(arrays, self.lda):
            return head_from_arrays(arrays, like=self.head)
        total = int(config.get("samples", 0))
        if total <= 0:
            raise ValueError("the server sent LDA statistics without the round's sample count")
        merged = lda_merge(self.lda, arrays, total)
        return merged.to_head(tuned_hyper("streaming-lda").lda_shrinkage)

    def evaluate(self, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int]:
        merged = self.merged_head(arrays, config)
        info = MergedInfo(
            round=int(config.get("round", 0)),
            rounds=int(config.get("rounds", 0)),
            strategy=str(config.get("strategy", "")),
            participants=int(config.get("participants", 0)),
        )
        tmp = self.folder / (MERGED_FILE + ".tmp")
        save_head(tmp, merged)
        os.replace(tmp, self.folder / MERGED_FILE)
        info.write(self.folder)
        x, y = self.x_holdout, self.y_holdout
        if len(y) == 0:
            x, y = self.x_train, self.y_train
        loss, accuracy = _loss_accuracy(merged, x, y)
        _say(event="federated_evaluate", round=info.round, accuracy=round(accuracy, 4))
        self.last_accuracy = accuracy
        return loss, len(y)


def _flower_client(device: Device) -> Any:
    from flwr.client import NumPyClient  # noqa: PLC0415 -- the federated environment only

    class FlowerClient(NumPyClient):  # type: ignore[misc]
        def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
            return device.properties(config)

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return head_to_arrays(device.head)

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            arrays, count = device.fit(parameters, config)
            return arrays, count, {}

        def evaluate(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[float, int, dict[str, Any]]:
            loss, count = device.evaluate(parameters, config)
            return loss, count, {"accuracy": device.last_accuracy}

    return FlowerClient().to_client()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edged.federated.client SESSION_DIR", file=sys.stderr)  # noqa: T201
        return 2
    folder = Path(args[0])
    os.environ.update(FLOWER_ENV)  # before Flower is imported
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")  # edged's lines say what happens
    try:
        from flwr.client import start_client  # noqa: PLC0415

        session = Session.read(folder)
        device = Device(folder, session)
        roots = Path(session.root_certificates).read_bytes() if session.root_certificates else None
        _say(event="federated_connecting", server=session.server)
        start_client(
            server_address=session.server,
            client=_flower_client(device),
            root_certificates=roots,
            insecure=session.insecure,
            max_wait_time=session.max_wait_s,
        )
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)  # noqa: T201
        return 1
    _say(event="federated_done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
