"""``edged-fleet federate``: run the Flower server of a federation for one model across the
devices that take part (docs/federated.md).

The server runs in the federated environment (docs/adr/0012): this module checks the
arguments and files here, in edged's environment, so that a mistake is named before Flower
starts, then runs ``<federated python> -m edged.federated.server`` with the same arguments
and passes its per-round lines through. Exit status: the server's (0: every round completed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from edged.core.errors import EdgedError
from edged.federated import enrol
from edged.federated.server import add_arguments
from edged.federated.session import FLOWER_ENV, default_python
from edged.learn.head import load_head

#: why --secagg is refused (docs/adr/0012, point 5)
SECAGG_UNAVAILABLE = (
    "--secagg: Flower's SecAgg+ runs only as a ServerApp workflow over a SuperLink; edged's "
    "devices join over Flower's gRPC stream transport (docs/adr/0012), which has no secure "
    "aggregation. TLS, --enrolled and --dp-noise are what this transport offers"
)


def _file(path: Path | None, flag: str) -> Path:
    if path is None:
        raise EdgedError(f"{flag} is required (or --insecure, on loopback only)")
    if not path.is_file():
        raise EdgedError(f"{flag} {path}: no such file")
    return path


def check(args: argparse.Namespace) -> None:
    """Raises: EdgedError: an argument or file is wrong (named)."""
    if args.secagg:
        raise EdgedError(SECAGG_UNAVAILABLE)
    if not 0.0 < args.fraction <= 1.0:
        raise EdgedError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.round_timeout <= 0 or args.wait_clients <= 0:
        raise EdgedError("--round-timeout and --wait-clients must be positive")
    if args.dp_noise < 0 or (args.dp_noise > 0 and args.dp_clip <= 0):
        raise EdgedError("--dp-noise needs a positive --dp-clip (and is >= 0)")
    try:
        load_head(args.head)
    except (OSError, ValueError) as e:
        raise EdgedError(f"--head {args.head}: {e}") from e
    if args.enrolled is None and not args.insecure:
        raise EdgedError(
            "--enrolled is required: only the devices the operator enrolled take part "
            "(--insecure, for loopback tests, admits any)"
        )
    if args.enrolled is not None:
        try:
            enrol.read_enrolled(args.enrolled)
        except (OSError, ValueError) as e:
            raise EdgedError(f"--enrolled: {e}") from e


def server_argv(args: argparse.Namespace) -> list[str]:
    """The server's command line, after every check (``check``).

    Raises:
        EdgedError: an argument or file is wrong (named).
    """
    check(args)
    python = args.python or default_python()
    if not Path(python).is_file():
        raise EdgedError(
            f"the federated environment's interpreter {python} is missing: make "
            "federated-env, or --python (docs/adr/0012)"
        )
    argv = [python, "-m", "edged.federated.server", args.model]
    argv += ["--head", str(args.head), "--address", args.address]
    for flag in (
        "rounds",
        "strategy",
        "min_clients",
        "start_clients",
        "fraction",
        "round_timeout",
        "wait_clients",
        "local_epochs",
        "proximal_mu",
        "server_lr",
        "dp_noise",
        "dp_clip",
    ):
        argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.insecure:
        argv.append("--insecure")
    else:
        argv += ["--tls-cert", str(_file(args.tls_cert, "--tls-cert"))]
        argv += ["--tls-key", str(_file(args.tls_key, "--tls-key"))]
        argv += ["--tls-ca", str(_file(args.tls_ca, "--tls-ca"))]
    if args.enrolled is not None:
        argv += ["--enrolled", str(args.enrolled)]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Check, then run the server to the end; its lines go to stdout as they come."""
    argv = server_argv(args)
    process = subprocess.run(argv, env={**os.environ, **FLOWER_ENV}, check=False)  # noqa: S603
    sys.stdout.flush()
    return process.returncode


__all__ = ["add_arguments", "check", "run", "server_argv"]
