"""Federated learning on scikit-learn's digits with Flower: how close FedAvg, FedProx, FedAdam
(and FedAvg with Flower's server-side DP) come to centralised training on the union of all
clients' data, in how many rounds, at what cost per client and round. Never pass/fail.

Scenario (class-incremental, as on the devices): a head trained on the digits 0-4 (the served
model) learns the digits 5-9 from clients that each hold only some of them (non-IID: with 3
clients {5,6}, {7,8}, {9}; with 5 one class each; with 10 each class split between two
clients). Every client holds out 20% of its samples (its gate's new data, never trained on).
Two feature spaces:

- ``backbone``: features of models/digits_learn's frozen backbone (through ONNX Runtime), and
  that model's own head and learning state (replay+lwf);
- ``pixels``: the 64 raw pixels; the head (64 -> 64 -> 10) is trained on 0-4 here.

Each client is edged's own Flower client (``edged.federated.client.Device``: the model's
strategy, ``local_fit``, the wire form of ``edged.federated.params``) behind an in-process
``ClientProxy``; the server is Flower's own ``Server`` loop with the strategy that
``edged-fleet federate`` builds (``edged.federated.server.build``), so the aggregation is
Flower's. (Flower's simulation engine needs Ray, which the federated environment does not
carry; the clients here run one after another in this process.) ``centralised`` is one
fine-tune of the served head on the union of the clients' training samples, with the same
strategy and the daemon's 120 epochs. Streaming LDA federates its statistics: one round of
FedAvg, compared with the centralised LDA on the same data.

Reported per feature space, client count and strategy: test accuracy (all ten digits, the
new five, the old five) after the last round, the best round, the first round within 2
points of centralised, the bytes a client sends per round, seconds per round (all clients
training in turn, one BLAS thread).

    .venv/bin/python benchmarks/federated.py [--rounds 20] [--clients 3,5,10] > result.json

It computes the backbone's features in edged's environment (ONNX Runtime), then re-runs
itself in the federated environment (``.venv-federated``, docs/adr/0012) for the Flower part.
JSON on stdout; a markdown table on stderr (and in --markdown's file).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

import argparse
import contextlib
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_DIR = ROOT / "models" / "digits_learn" / "1"
CACHE = ROOT / "benchmarks" / ".cache" / "federated_features.npz"
SEED = 20240517  # models/build.py's split of load_digits
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavg+dp")


# -- stage 1, edged's environment: the data ---------------------------------------------------


def prepare_data(path: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from edged.learn.features import WORKER_KINDS, open_backbone

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=SEED % (2**32)
    )
    backbone = open_backbone(MODEL_DIR / "backbone.onnx", "features", WORKER_KINDS)

    def features(images: np.ndarray) -> np.ndarray:
        out = backbone.features({"input": images})
        assert out is not None, "the backbone gave no features"
        return np.asarray(out, np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        pixels_train=x_train,
        pixels_test=x_test,
        backbone_train=features(x_train),
        backbone_test=features(x_test),
        y_train=y_train,
        y_test=y_test,
    )


# -- stage 2, the federated environment: Flower -------------------------------------------


def _splits(clients: int) -> list[list[int]]:
    """Classes per client (a class split between clients goes by halves)."""
    if clients == 3:
        return [[5, 6], [7, 8], [9]]
    return [[5 + (i % 5)] for i in range(clients)]


def _partition(y: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each client's samples of the new classes (non-IID)."""
    splits = _splits(clients)
    sharing = {c: [i for i, s in enumerate(splits) if c in s] for c in range(5, 10)}
    parts: list[list[np.ndarray]] = [[] for _ in splits]
    for c, owners in sharing.items():
        idx = rng.permutation(np.flatnonzero(y == c))
        for k, chunk in enumerate(np.array_split(idx, len(owners))):
            parts[owners[k]].append(chunk)
    return [np.concatenate(p) for p in parts]


class _Proxy:
    """A Flower ClientProxy that calls a client in this process."""

    def __new__(cls, cid: str, client: Any) -> Any:
        from flwr.common import DisconnectRes
        from flwr.server.client_proxy import ClientProxy

        class InProcess(ClientProxy):  # type: ignore[misc]
            def get_properties(self, ins: Any, timeout: Any, group_id: Any) -> Any:
                return client.get_properties(ins)

            def get_parameters(self, ins: Any, timeout: Any, group_id: Any) -> Any:
                return client.get_parameters(ins)

            def fit(self, ins: Any, timeout: Any, group_id: Any) -> Any:
                return client.fit(ins)

            def evaluate(self, ins: Any, timeout: Any, group_id: Any) -> Any:
                return client.evaluate(ins)

            def reconnect(self, ins: Any, timeout: Any, group_id: Any) -> Any:
                return DisconnectRes(reason="")

        return InProcess(cid)


def _initial(space: str, data: dict[str, np.ndarray], strategy: str) -> tuple[Any, Any]:
    """The served head and learning state for ``space``."""
    from edged.learn.head import init_head, load_head, standardiser
    from edged.learn.strategies import Hyper, initial_state, load_state, train_head, tuned_hyper

    x, y = data[f"{space}_train"], data["y_train"]
    old = y < 5
    rng = np.random.default_rng(SEED)
    hold = rng.random(int(old.sum())) < 0.2
    x_old, y_old = x[old], y[old]
    if space == "backbone" and strategy != "streaming-lda":
        return load_head(MODEL_DIR / "head.npz"), load_state(MODEL_DIR / "learn_state.npz")
    mean, scale = standardiser(x_old[~hold], Hyper().variance_floor)
    head = init_head((x.shape[1], 64, 10), rng, mean, scale)
    head = train_head(head, x_old[~hold], y_old[~hold], tuned_hyper("training"), seed=SEED)
    state = initial_state(
        head,
        x_old[~hold],
        y_old[~hold],
        strategy,
        Hyper(),
        seed=SEED,
        holdout=(x_old[hold], y_old[hold]),
    )
    if strategy == "streaming-lda":
        assert state.lda is not None
        head = state.lda.to_head(tuned_hyper("streaming-lda").lda_shrinkage)
    return head, state


def _scores(head: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from edged.learn.head import accuracy

    new = y >= 5
    return {
        "all": round(100 * accuracy(head, x, y), 2),
        "new": round(100 * accuracy(head, x[new], y[new]), 2),
        "old": round(100 * accuracy(head, x[~new], y[~new]), 2),
    }


def _devices(
    folder: Path, space: str, data: dict[str, np.ndarray], clients: int, strategy: str
) -> tuple[list[Any], Any, Any, tuple[np.ndarray, np.ndarray]]:
    from edged.federated.client import Device
    from edged.federated.session import Session
    from edged.learn.head import save_head, write_npz
    from edged.learn.strategies import save_state

    head, state = _initial(space, data, strategy)
    save_head(folder / "head.npz", head)
    save_state(folder / "state.npz", state)
    x, y = data[f"{space}_train"], data["y_train"]
    rng = np.random.default_rng(SEED + clients)
    devices, union_x, union_y = [], [], []
    for i, idx in enumerate(_partition(y, clients, rng)):
        hold = np.zeros(len(idx), bool)
        hold[::5] = True
        sub = folder / f"client{i}"
        sub.mkdir()
        write_npz(
            sub / "samples.npz",
            {
                "x_train": x[idx[~hold]],
                "y_train": y[idx[~hold]],
                "x_holdout": x[idx[hold]],
                "y_holdout": y[idx[hold]],
            },
        )
        union_x.append(x[idx[~hold]])
        union_y.append(y[idx[~hold]])
        session = Session(
            model="digits",
            server="in-process",
            root_certificates="",
            insecure=True,
            device_id=f"client{i}",
            token_file="",
            strategy=strategy,
            seed=SEED + i,
            head=str(folder / "head.npz"),
            state=str(folder / "state.npz"),
            max_wait_s=1.0,
        )
        devices.append(Device(sub, session))
    return devices, head, state, (np.concatenate(union_x), np.concatenate(union_y))


def _federate(
    devices: list[Any],
    head_path: Path,
    strategy: str,
    rounds: int,
    local_epochs: int,
    test: tuple[np.ndarray, np.ndarray],
    knobs: argparse.Namespace,
) -> dict[str, Any]:
    from flwr.common import parameters_to_ndarrays
    from flwr.server import Server

    from edged.federated import server as fedserver
    from edged.federated.client import _flower_client
    from edged.federated.params import head_from_arrays

    name, _, dp = strategy.partition("+")
    args = fedserver.parser().parse_args(
        [
            "digits",
            "--head",
            str(head_path),
            "--insecure",
            "--strategy",
            name,
            "--rounds",
            str(rounds),
            "--min-clients",
            str(len(devices)),
            "--local-epochs",
            str(local_epochs),
            *(["--dp-noise", str(knobs.dp_noise), "--dp-clip", str(knobs.dp_clip)] if dp else []),
            *(["--server-lr", str(knobs.server_lr)] if knobs.server_lr else []),
        ]
    )
    manager, wrapped, _ = fedserver.build(args)
    for i, device in enumerate(devices):
        manager.register(_Proxy(f"client{i}", _flower_client(device)))
    per_round: list[dict[str, Any]] = []

    def evaluate(server_round: int, parameters: Any) -> None:
        if server_round > 0:
            head = head_from_arrays(parameters_to_ndarrays(parameters))
            per_round.append({"round": server_round, **_scores(head, *test)})

    wrapped.evaluate = evaluate  # the global head after each round, on the test split
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        Server(client_manager=manager, strategy=wrapped).fit(rounds, timeout=None)
    seconds = time.perf_counter() - started
    return {
        "rounds": per_round,
        "seconds_per_round": round(seconds / rounds, 3),
        "bytes_per_client": max(r["bytes_per_client"] for r in wrapped.rounds),
    }


def _lda(
    space: str, data: dict[str, np.ndarray], clients: int, test: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """One FedAvg round of LDA statistics against the centralised LDA on the same data."""
    from flwr.server.strategy.aggregate import aggregate

    from edged.federated.local import lda_merge, lda_statistics
    from edged.federated.params import payload_bytes
    from edged.learn.strategies import tuned_hyper

    shrinkage = tuned_hyper("streaming-lda").lda_shrinkage
    with tempfile.TemporaryDirectory() as tmp:
        devices, _, state, (ux, uy) = _devices(Path(tmp), space, data, clients, "streaming-lda")
        results = [
            (lda_statistics(state.lda, d.x_train, d.y_train), len(d.y_train)) for d in devices
        ]
    averaged = aggregate(results)  # Flower's FedAvg arithmetic
    total = sum(n for _, n in results)
    federated = lda_merge(state.lda, averaged, total).to_head(shrinkage)
    central = state.lda.copy()
    central.fit(ux, uy)
    centralised = central.to_head(shrinkage)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            federated.weights + federated.biases,
            centralised.weights + centralised.biases,
            strict=True,
        )
    )
    return {
        "federated": _scores(federated, *test),
        "centralised": _scores(centralised, *test),
        "max_abs_weight_difference": diff,
        "bytes_per_client": payload_bytes(results[0][0]),
    }


def run_flower(args: argparse.Namespace, data: dict[str, np.ndarray]) -> dict[str, Any]:
    from edged.learn.strategies import fine_tune, tuned_hyper

    logging.getLogger("flwr").setLevel(logging.WARNING)
    out: dict[str, Any] = {
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "dp_noise": args.dp_noise,
        "dp_clip": args.dp_clip,
        "server_lr": args.server_lr or None,
        "runs": [],
    }
    for space in args.spaces.split(","):
        test = (data[f"{space}_test"], data["y_test"])
        for clients in args.clients:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                devices, head, state, (ux, uy) = _devices(
                    folder, space, data, clients, "replay+lwf"
                )
                central, _ = fine_tune(
                    head, state, ux, uy, "replay+lwf", tuned_hyper("replay+lwf", epochs=120), SEED
                )
                row: dict[str, Any] = {
                    "space": space,
                    "clients": clients,
                    "samples": len(uy),
                    "served": _scores(head, *test),
                    "centralised": _scores(central, *test),
                    "strategies": {},
                }
                for strategy in args.strategies:
                    result = _federate(
                        devices,
                        folder / "head.npz",
                        strategy,
                        args.rounds,
                        args.local_epochs,
                        test,
                        args,
                    )
                    target = row["centralised"]["all"] - 2.0
                    within = [r["round"] for r in result["rounds"] if r["all"] >= target]
                    result["final"] = result["rounds"][-1]
                    result["best_all"] = max(r["all"] for r in result["rounds"])
                    result["first_round_within_2_points"] = within[0] if within else None
                    row["strategies"][strategy] = result
                    print(
                        f"{space} {clients} clients {strategy}: {result['final']} "
                        f"(centralised {row['centralised']}, within 2 points from round "
                        f"{result['first_round_within_2_points']})",
                        file=sys.stderr,
                    )
                row["streaming-lda"] = _lda(space, data, clients, test)
                out["runs"].append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| features | clients | strategy | all 10 | new 5-9 | old 0-4 | centralised all "
        "| gap | within 2 points at round | KB up / client / round | s / round |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["runs"]:
        c = row["centralised"]["all"]
        for name, r in row["strategies"].items():
            f = r["final"]
            lines.append(
                f"| {row['space']} | {row['clients']} | {name} | {f['all']} | {f['new']} | "
                f"{f['old']} | {c} | {round(c - f['all'], 2)} | "
                f"{r['first_round_within_2_points'] or 'no'} | "
                f"{r['bytes_per_client'] / 1024:.1f} | {r['seconds_per_round']} |"
            )
        lda = row["streaming-lda"]
        lines.append(
            f"| {row['space']} | {row['clients']} | streaming-lda (statistics, 1 round) | "
            f"{lda['federated']['all']} | {lda['federated']['new']} | {lda['federated']['old']} "
            f"| {lda['centralised']['all']} | max weight diff "
            f"{lda['max_abs_weight_difference']:.1e} | 1 | "
            f"{lda['bytes_per_client'] / 1024:.1f} | - |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=20)
    p.add_argument("--clients", default="3,5,10")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--server-lr", type=float, default=0.0, help="FedAdam's eta (0: the default)")
    p.add_argument("--dp-noise", type=float, default=0.1)
    p.add_argument("--dp-clip", type=float, default=5.0)
    p.add_argument("--spaces", default="backbone,pixels")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--python", default=str(ROOT / ".venv-federated" / "bin" / "python"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.strategies = args.strategies.split(",")
    if importlib.util.find_spec("flwr") is None:
        prepare_data(CACHE)
        os.execv(args.python, [args.python, __file__, *(sys.argv[1:] if argv is None else argv)])
    data = dict(np.load(CACHE))
    result = run_flower(args, data)
    table = markdown(result)
    print(table, file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(table)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
