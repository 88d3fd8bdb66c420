"""The Flower server of a federation, a process of the federated environment, started by
``edged-fleet federate`` (``edged.fleet.federate``, which checks the arguments first):

    <federated python> -m edged.federated.server --model M --head HEAD.npz ...

Flower's own strategies aggregate (FedAvg, FedProx, FedAdam; weighted by the clients' sample
counts), optionally wrapped in Flower's server-side differential privacy (fixed clipping plus
Gaussian noise). Clients are admitted only after the enrolment check
(``edged.federated.enrol``) when an enrolment file is given. One line per round goes to
stdout; ``--out`` gets the history as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edged.federated import enrol
from edged.federated.params import head_to_arrays, payload_bytes
from edged.federated.session import FLOWER_ENV
from edged.learn.head import load_head

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 -- the operator's terminal


def add_arguments(p: argparse.ArgumentParser, positive_int: Callable[[str], int] = int) -> None:
    """The arguments of ``edged-fleet federate`` (which passes them on to this module)."""
    p.add_argument("model", metavar="MODEL", help="the trainable model to federate")
    p.add_argument(
        "--head",
        required=True,
        type=Path,
        help="head.npz of the version the devices serve: the first round's global head",
    )
    p.add_argument("--address", default="0.0.0.0:9092", help="where the server listens")
    p.add_argument("--rounds", type=positive_int, default=10, help="rounds (default 10)")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="fedavg",
        help="Flower's aggregation, weighted by each device's sample count (default fedavg)",
    )
    p.add_argument(
        "--min-clients",
        type=positive_int,
        default=2,
        help="devices needed to start a round (and evaluated after it); default 2",
    )
    p.add_argument(
        "--start-clients",
        type=positive_int,
        default=0,
        help="devices to wait for before the first round (default: --min-clients); later "
        "rounds need only --min-clients, so a device that drops out does not stall them",
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="share of the connected devices asked to train each round (default 1.0)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=120.0,
        help="seconds a round waits for devices; late or dead ones count as failures",
    )
    p.add_argument(
        "--wait-clients",
        type=float,
        default=600.0,
        help="seconds to wait for --min-clients devices before giving up",
    )
    p.add_argument(
        "--local-epochs", type=positive_int, default=20, help="passes per device per round"
    )
    p.add_argument("--proximal-mu", type=float, default=0.1, help="FedProx's mu")
    p.add_argument("--server-lr", type=float, default=0.1, help="FedAdam's server step (eta)")
    p.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        help="differential privacy: Gaussian noise multiplier of Flower's server-side fixed "
        "clipping wrapper (0: off)",
    )
    p.add_argument("--dp-clip", type=float, default=0.0, help="DP: clipping norm of an update")
    p.add_argument("--secagg", action="store_true", help="Flower SecAgg+ (refused: see docs)")
    p.add_argument("--tls-cert", type=Path, help="the server's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="the CA bundle the devices trust (PEM)")
    p.add_argument("--insecure", action="store_true", help="no TLS: loopback tests only")
    p.add_argument(
        "--enrolled",
        type=Path,
        help="'DEVICE_ID TOKEN' lines: only these devices are admitted (docs/federated.md)",
    )
    p.add_argument("--out", type=Path, help="write the per-round history here (JSON)")
    p.add_argument(
        "--python",
        default=os.environ.get("EDGED_FEDERATED_PYTHON", ""),
        help="the federated environment's interpreter (default: $EDGED_FEDERATED_PYTHON, "
        "else <prefix>-federated/bin/python)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edged.federated.server", description=__doc__)
    add_arguments(p)
    return p


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(client manager, strategy, server config) for ``args``."""
    from flwr.common import GetPropertiesIns, ndarrays_to_parameters  # noqa: PLC0415
    from flwr.server import ServerConfig, SimpleClientManager  # noqa: PLC0415
    from flwr.server import strategy as fl  # noqa: PLC0415

    tokens = enrol.read_enrolled(args.enrolled) if args.enrolled else None
    head = load_head(args.head)
    initial = ndarrays_to_parameters(head_to_arrays(head))
    report: dict[str, Any] = {"participants": 0, "samples": 0}

    class Enrolled(SimpleClientManager):  # type: ignore[misc]
        """Admits a client once it proves its enrolment for this model."""

        def register(self, client: Any) -> bool:
            if tokens is None:
                return bool(super().register(client))
            threading.Thread(target=self._check, args=(client,), daemon=True).start()
            return True

        def _check(self, client: Any) -> None:
            nonce = secrets.token_hex(16)
            try:
                res = client.get_properties(
                    GetPropertiesIns({"nonce": nonce}), timeout=30.0, group_id=None
                )
                props = res.properties
                ok = (
                    tokens is not None
                    and props.get("model") == args.model
                    and enrol.verify(
                        tokens, args.model, str(props.get("device")), nonce, str(props.get("proof"))
                    )
                )
            except Exception as e:
                _say(f"client refused: enrolment check failed ({type(e).__name__}: {e})")
                return
            if not ok:
                device = props.get("device")
                _say(f"client refused: device {device!r} is not enrolled for {args.model}")
                return
            _say(f"client joined: device {props.get('device')}")
            super().register(client)

        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            return bool(super().wait_for(num_clients, timeout=int(args.wait_clients)))

    def fit_config(server_round: int) -> dict[str, Any]:
        return {"round": server_round, "epochs": args.local_epochs}

    def evaluate_config(server_round: int) -> dict[str, Any]:
        return {
            "round": server_round,
            "rounds": args.rounds,
            "strategy": args.strategy + ("+dp" if args.dp_noise > 0 else ""),
            "participants": report["participants"],
            "samples": report["samples"],  # streaming LDA: average x samples = sum
        }

    def weighted_accuracy(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        total = sum(n for n, _ in metrics)
        accuracy = sum(n * float(m.get("accuracy", 0.0)) for n, m in metrics) / max(total, 1)
        return {"accuracy": accuracy, "samples": total}

    common = {
        "fraction_fit": args.fraction,
        "fraction_evaluate": 1.0,
        "min_fit_clients": args.min_clients,
        "min_evaluate_clients": args.min_clients,
        "min_available_clients": args.min_clients,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": evaluate_config,
        "initial_parameters": initial,
        "evaluate_metrics_aggregation_fn": weighted_accuracy,
        "accept_failures": True,
    }
    if args.strategy == "fedprox":
        inner = fl.FedProx(proximal_mu=args.proximal_mu, **common)
    elif args.strategy == "fedadam":
        inner = fl.FedAdam(eta=args.server_lr, eta_l=0.01, tau=1e-3, **common)
    else:
        inner = fl.FedAvg(**common)
    if args.dp_noise > 0:
        inner = fl.DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=args.dp_noise,
            clipping_norm=args.dp_clip,
            num_sampled_clients=args.min_clients,
        )
    return (
        Enrolled(),
        _reporting(inner, args, report),
        ServerConfig(num_rounds=args.rounds, round_timeout=args.round_timeout),
    )


def _reporting(inner: Any, args: argparse.Namespace, report: dict[str, Any]) -> Any:
    """``inner`` with one line per round on stdout and a history for --out."""
    from flwr.common import parameters_to_ndarrays  # noqa: PLC0415
    from flwr.server.strategy import Strategy  # noqa: PLC0415

    class Reporting(Strategy):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.rounds: list[dict[str, Any]] = []
            self.started = time.monotonic()

        def __repr__(self) -> str:
            return f"Reporting({inner!r})"

        def initialize_parameters(self, client_manager: Any) -> Any:
            return inner.initialize_parameters(client_manager)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            if server_round == 1 and args.start_clients > args.min_clients:
                client_manager.wait_for(args.start_clients)
            instructions = inner.configure_fit(server_round, parameters, client_manager)
            self.started = time.monotonic()  # once the round's devices are sampled
            return instructions

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            report["participants"] = len(results)
            report["samples"] = sum(r.num_examples for _, r in results)
            sizes = [payload_bytes(parameters_to_ndarrays(r.parameters)) for _, r in results]
            samples = sum(r.num_examples for _, r in results)
            self.rounds.append(
                {
                    "round": server_round,
                    "clients": len(results),
                    "failures": len(failures),
                    "samples": samples,
                    "bytes_per_client": max(sizes, default=0),
                }
            )
            return inner.aggregate_fit(server_round, results, failures)

        def configure_evaluate(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> Any:
            return inner.configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            loss, metrics = inner.aggregate_evaluate(server_round, results, failures)
            last = self.rounds[-1] if self.rounds else {}
            row = last if last.get("round") == server_round else {}
            row.update(
                {
                    "loss": None if loss is None else round(float(loss), 4),
                    "accuracy": round(float(metrics.get("accuracy", float("nan"))), 4),
                    "seconds": round(time.monotonic() - self.started, 3),
                }
            )
            _say(
                f"round {server_round}/{args.rounds}: {row.get('clients', 0)} clients "
                f"({row.get('failures', 0)} failed), {row.get('samples', 0)} samples, "
                f"{row.get('bytes_per_client', 0) / 1024:.1f} KiB up per client; held-out "
                f"accuracy {100 * row['accuracy']:.1f}% on {len(results)} devices; "
                f"{row['seconds']:.2f} s"
            )
            return loss, metrics

        def evaluate(self, server_round: int, parameters: Any) -> Any:
            return inner.evaluate(server_round, parameters)

    return Reporting()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.update(FLOWER_ENV)  # before Flower is imported
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")  # edged's lines say what happens
    from flwr.server import start_server  # noqa: PLC0415

    manager, strategy, config = build(args)
    certificates = None
    if not args.insecure:
        certificates = (
            args.tls_ca.read_bytes(),
            args.tls_cert.read_bytes(),
            args.tls_key.read_bytes(),
        )
    _say(
        f"federating {args.model} on {args.address} ({args.strategy}"
        f"{', DP' if args.dp_noise > 0 else ''}, {args.rounds} rounds, at least "
        f"{args.min_clients} clients, TLS {'off' if args.insecure else 'on'})"
    )
    start_server(
        server_address=args.address,
        config=config,
        strategy=strategy,
        client_manager=manager,
        certificates=certificates,
    )
    rounds = strategy.rounds
    done = [r for r in rounds if "accuracy" in r]
    _say(f"federation of {args.model} done: {len(done)} of {args.rounds} rounds completed")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "rounds": rounds}, indent=2) + "\n")
    return 0 if len(done) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
