"""The edged command: serve runs the daemon; infer sends one request; devices prints what
the hardware probe finds; learn gives a running daemon labelled samples and starts and lists
its fine-tune jobs; partition splits a model between this device and a server (cuts, profile,
plan); optimize compresses a model and keeps the variants within a budget; token adds, lists
and revokes bearer tokens; zmq-keys writes a ZeroMQ CURVE key pair."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged import __version__
from edged.config import describe, load_config
from edged.core.errors import ConfigError, EdgedError
from edged.core.types import LEARN_STRATEGIES
from edged.optimize.cli import add_command as add_optimize
from edged.optimize.cli import run as run_optimize
from edged.partition import command as partition_command
from edged.security import client as client_auth


def _config_epilog() -> str:
    lines = ["configuration keys (TOML [section] key, or the environment variable):"]
    for key, env, default, doc in describe():
        lines.append(f"  {key:32} {env:36} default {default!r}")
        lines.append(f"      {doc}")
    return "\n".join(lines)


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        required=True,
        help="an input tensor from a .npy file (repeat per input)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Serve a model repository over the KServe v2 gRPC protocol until SIGTERM "
        "or SIGINT.",
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML config file (default /etc/edged/edged.toml when it exists)",
    )
    serve.add_argument("--models", type=Path, help="model repository folder (models.repository)")
    serve.add_argument("--grpc-address", help="HOST:PORT to listen on (server.grpc_address)")
    serve.add_argument(
        "--http-address",
        help="HOST:PORT of the KServe v2 HTTP/REST listener, '' for none (server.http_address)",
    )

    devices = commands.add_parser(
        "devices",
        help="list the executors this host can run, and why the others cannot",
        description="Probe this host (hal.probe()): every executor kind, built in or added by "
        "a package through the edged.executors entry points, whether it is present, the "
        "artifact formats it runs, and what was found or why it is absent. The daemon "
        "places models with the same probe.",
    )
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")

    infer = commands.add_parser(
        "infer",
        help="send one inference request to a running daemon",
        description="Send one ModelInfer request and print the outputs as JSON.",
    )
    infer.add_argument("model", help="model name")
    _add_inputs(infer)
    infer.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="NAME",
        help="return only these outputs (repeatable; default all)",
    )
    infer.add_argument("--model-version", default="", help="version to ask for (default latest)")
    infer.add_argument("--address", default="127.0.0.1:8001", help="daemon's gRPC HOST:PORT")
    infer.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    infer.add_argument(
        "--save", type=Path, metavar="DIR", help="also write each output to DIR/NAME.npy"
    )
    client_auth.add_arguments(infer)

    learn = commands.add_parser(
        "learn",
        help="on-device learning: add samples, start and list fine-tune jobs",
        description="Talk to a running daemon's on-device learning (edged.v1.Management; "
        "learn.enabled must be on; docs/learning.md). Prints the reply as JSON.",
    )
    actions = learn.add_subparsers(dest="action", required=True)
    add = actions.add_parser(
        "add",
        help="store labelled samples of a trainable model (AddSamples)",
        description="Send the inputs (one sample per row of the batch axis) and one integer "
        "label per sample; the daemon stores their backbone features.",
    )
    add.add_argument("model", help="a model whose model.toml has a [learn] table")
    _add_inputs(add)
    add.add_argument(
        "--labels", type=Path, required=True, metavar="FILE.npy", help="integer labels, shape [N]"
    )
    start = actions.add_parser(
        "start",
        help="fine-tune a model on the samples waiting for it (StartFineTune)",
        description="Start a fine-tune job; with --wait, answer once it is PROMOTED, "
        "REJECTED or FAILED. Exits 1 unless the job was promoted (with --wait) or started.",
    )
    start.add_argument("model", help="a trainable model")
    start.add_argument(
        "--strategy",
        default="",
        help=f"{', '.join(LEARN_STRATEGIES)} (default: the model's)",
    )
    start.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job to come to rest, printing its progress on stderr (training, "
        "then the update that publishes the new version: warm-up, health window, commit)",
    )
    jobs = actions.add_parser(
        "jobs",
        help="past and running jobs, and the sample store (ListJobs)",
        description="Jobs newest first, and each trainable model's sample counts.",
    )
    jobs.add_argument("model", nargs="?", default="", help="only this model")
    jobs.add_argument("--limit", type=int, default=0, help="at most this many jobs")
    for sub in (add, start, jobs):
        sub.add_argument("--address", default="127.0.0.1:8001", help="daemon's gRPC HOST:PORT")
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
        client_auth.add_arguments(sub)
    _add_token_commands(commands)
    add_optimize(commands)
    keys = commands.add_parser(
        "zmq-keys",
        help="write a ZeroMQ CURVE key pair (NAME.key, NAME.key_secret)",
        description="Write NAME.key (the public key: give it to the other side) and "
        "NAME.key_secret (both halves: keep it private) into DIR, as zmq.auth reads them. "
        "The daemon's pair goes to zmq.curve_secret_key_file; each client's NAME.key goes "
        "into zmq.curve_clients_dir.",
    )
    keys.add_argument("dir", type=Path, metavar="DIR")
    keys.add_argument("name", metavar="NAME")
    return parser


def _add_token_commands(commands: Any) -> None:
    token = commands.add_parser(
        "token",
        help="add, list and revoke bearer tokens (auth.tokens_file)",
        description="Bearer tokens for gRPC (authorization: Bearer TOKEN) and ZeroMQ (the "
        "header's token). The file keeps each token's name, roles and a salted hash; a "
        "running daemon re-reads it within a second. Roles: infer, read, manage, learn "
        "(docs/security.md).",
    )
    actions = token.add_subparsers(dest="action", required=True)
    add = actions.add_parser(
        "add", help="make a token and print it (once: only its hash is stored)"
    )
    add.add_argument("name", help="who or what holds it (shown in the audit log)")
    add.add_argument(
        "--roles", required=True, metavar="ROLE,...", help="comma-separated: infer,read,..."
    )
    listing = actions.add_parser("list", help="names, ids, roles and creation times")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", help="remove a token by name")
    revoke.add_argument("name")
    partition = commands.add_parser(
        "partition",
        help="split a model between this device and a server: cuts, profile, plan",
        description=partition_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    partition_command.add_arguments(partition)
    for sub in (add, listing, revoke):
        sub.add_argument(
            "--file",
            type=Path,
            help="the tokens file (default: auth.tokens_file of the configuration)",
        )
        sub.add_argument("--config", type=Path, help="TOML config file to take it from")


def _serve(args: argparse.Namespace) -> int:
    from edged import logs

    overrides: dict[str, Any] = {}
    if args.models is not None:
        overrides["models.repository"] = str(args.models)
    if args.grpc_address is not None:
        overrides["server.grpc_address"] = args.grpc_address
    if args.http_address is not None:
        overrides["server.http_address"] = args.http_address
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"{logs.stderr_prefix()}edged: {e}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    logs.quiet_native_libraries(config.log.level)  # before gRPC starts

    from edged.daemon import Daemon

    try:
        daemon = Daemon(config, reload_config=lambda: load_config(args.config, overrides=overrides))
        with logs.native_stderr_captured(config.log.capture_native_stderr):
            asyncio.run(daemon.run_until_signalled())
    except ConfigError as e:  # after the capture ends: its native lines come first
        print(f"{logs.stderr_prefix()}edged: {e}", file=sys.stderr)
        return 2
    return 0


_NPY_MAGIC = b"\x93NUMPY"


def load_npy(path: str | Path, flag: str) -> np.ndarray[Any, Any]:
    """One array from a .npy file (numpy.save's format), for the command-line option ``flag``
    (edged and edged-fleet).

    Raises:
        ValueError: the file is missing, is not a .npy file, or holds Python objects; the
            message names the flag and the file.
        OSError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except FileNotFoundError:
        where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
        raise ValueError(f"{flag} {path}: no such file{where}") from None
    if head != _NPY_MAGIC:
        kind = "a .npz archive" if head.startswith(b"PK") else "not a .npy file"
        raise ValueError(
            f"{flag} {path}: {kind}; give one array saved with numpy.save (a .npy file)"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(
            f"{flag} {path}: a .npy file that holds Python objects (pickled) or is damaged "
            f"({e}); save numeric or string arrays"
        ) from e
    return array  # type: ignore[no-any-return]


def _load_input(spec: str) -> tuple[str, np.ndarray[Any, Any]]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--input {spec!r}: expected NAME=FILE.npy")
    array = load_npy(path, "--input")
    if array.dtype.kind in "SU":  # fixed-width strings stand for a BYTES tensor
        flat = np.empty(array.size, dtype=object)
        flat[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
        array = flat.reshape(array.shape)
    return name, array


def _jsonable(array: np.ndarray[Any, Any]) -> Any:
    if array.dtype == object:
        return [v.decode(errors="replace") for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def _infer(args: argparse.Namespace) -> int:
    import grpc

    from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
    from edged.core.types import InferRequest
    from edged.frontends.kserve_codec import request_to_proto, response_from_proto

    try:
        inputs = dict(_load_input(s) for s in args.input)
    except (OSError, ValueError) as e:
        print(f"edged infer: {e}", file=sys.stderr)
        return 2
    request = InferRequest(
        model_name=args.model,
        model_version=args.model_version,
        inputs=inputs,
        requested_outputs=tuple(args.output),
        id="edged-cli",
    )
    with client_auth.ClientAuth.from_args(args).channel(args.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.ModelInfer(request_to_proto(request), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"edged infer: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    try:
        response = response_from_proto(reply)
    except EdgedError as e:
        print(f"edged infer: bad reply: {e}", file=sys.stderr)
        return 1
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, array in response.outputs.items():
            np.save(args.save / f"{name.replace('/', '_')}.npy", array, allow_pickle=True)
    print(
        json.dumps(
            {
                "model_name": response.model_name,
                "model_version": response.model_version,
                "id": response.id,
                "outputs": {
                    name: {
                        "datatype": str(array.dtype),
                        "shape": list(array.shape),
                        "data": _jsonable(array),
                    }
                    for name, array in response.outputs.items()
                },
            },
            indent=2,
        )
    )
    return 0


def _learn(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import Message

    from edged._proto.edged.v1 import management_pb2 as mpb
    from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
    from edged._proto.inference import grpc_service_pb2 as ipb
    from edged.core.types import InferRequest
    from edged.frontends.kserve_codec import request_to_proto

    request: Message
    if args.action == "add":
        try:
            inputs = dict(_load_input(s) for s in args.input)
            labels = load_npy(args.labels, "--labels")
        except (OSError, ValueError) as e:
            print(f"edged learn add: {e}", file=sys.stderr)
            return 2
        if labels.dtype.kind not in "iu":
            print(f"edged learn add: --labels holds {labels.dtype}, not integers", file=sys.stderr)
            return 2
        wire: ipb.ModelInferRequest = request_to_proto(
            InferRequest(model_name=args.model, inputs=inputs)
        )
        request = mpb.AddSamplesRequest(
            model=args.model,
            inputs=wire.inputs,
            raw_input_contents=wire.raw_input_contents,
            labels=[int(v) for v in labels.reshape(-1)],
        )
    elif args.action == "start":
        # --wait polls and reports progress rather than asking the daemon to hold the call
        request = mpb.StartFineTuneRequest(model=args.model, strategy=args.strategy)
    else:
        request = mpb.ListJobsRequest(model=args.model, limit=max(0, args.limit))
    with client_auth.ClientAuth.from_args(args).channel(args.address) as channel:
        stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
        call = {"add": stub.AddSamples, "start": stub.StartFineTune, "jobs": stub.ListJobs}
        deadline = time.monotonic() + args.timeout
        try:
            reply = call[args.action](request, timeout=args.timeout)
            if args.action == "start" and args.wait:
                reply = mpb.StartFineTuneResponse(
                    job=_follow_job(stub, reply.job, deadline, _progress("edged learn start"))
                )
        except grpc.RpcError as e:
            print(f"edged learn {args.action}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except TimeoutError as e:
            print(f"edged learn {args.action}: DEADLINE_EXCEEDED: {e}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    if args.action == "start":
        state = mpb.JobState.Name(reply.job.state)
        return 0 if state in ("JOB_STATE_PROMOTED", "JOB_STATE_RUNNING") else 1
    return 0


_AT_REST = ("JOB_STATE_PROMOTED", "JOB_STATE_REJECTED", "JOB_STATE_FAILED")
POLL_S = 0.5


def _progress(prefix: str) -> Callable[[str], None]:
    """Progress lines on stderr (stdout keeps the one JSON reply)."""

    def say(line: str) -> None:
        print(f"{prefix}: {line}", file=sys.stderr, flush=True)

    return say


def _follow_job(stub: Any, job: Any, deadline: float, say: Callable[[str], None]) -> Any:
    """Poll a fine-tune job (GetJob) until it comes to rest, saying each change: its state,
    training progress in tenths, and, once it publishes, every state of the update that
    carries the new version (warming, the health window, commit or rollback). Returns the job
    at rest.

    Raises:
        grpc.RpcError: a call failed.
        TimeoutError: ``deadline`` passed first.
    """
    from edged._proto.edged.v1 import management_pb2 as mpb

    said: tuple[str, int] | None = None
    update_states_said = 0
    while True:
        state = mpb.JobState.Name(job.state)
        tenth = int(job.progress * 10) if state == "JOB_STATE_RUNNING" else -1
        if job.update_id and state in _AT_REST:  # the update's last states, then the verdict
            update_states_said = _say_update(stub, job, update_states_said, say)
        if (state, tenth) != said:
            said = (state, tenth)
            training = f" (training {tenth * 10}%)" if tenth >= 0 else ""
            say(f"job {job.id} {state.removeprefix('JOB_STATE_')}{training}")
        if state in _AT_REST:
            return job
        if job.update_id:
            update_states_said = _say_update(stub, job, update_states_said, say)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job.id} is still {state} after --timeout")
        time.sleep(min(POLL_S, left))
        job = stub.GetJob(mpb.GetJobRequest(job_id=job.id), timeout=left).job


def _say_update(stub: Any, job: Any, already: int, say: Callable[[str], None]) -> int:
    """Say the states of the job's update not said yet; returns how many are said."""
    from edged._proto.edged.v1 import management_pb2 as mpb

    listed = stub.ListUpdates(mpb.ListUpdatesRequest(model=job.model, limit=10)).updates
    update = next((u for u in listed if u.update_id == job.update_id), None)
    if update is None:
        return already
    meaning = {
        "WARMING": "loading, warming up and self-testing",
        "ACTIVE_TRIAL": "serving; health window open",
        "COMMITTED": "health window passed; committed",
        "ROLLING_BACK": "rolling back",
        "ROLLED_BACK": "rolled back",
        "FAILED": "failed",
    }
    for transition in update.transitions[already:]:
        name = mpb.UpdateState.Name(transition.state).removeprefix("UPDATE_STATE_")
        why = f": {transition.reason}" if transition.reason else ""
        detail = f" ({meaning[name]})" if name in meaning else ""
        say(f"update {update.update_id} to version {update.to_version}: {name}{detail}{why}")
    return len(update.transitions)


def _token(args: argparse.Namespace) -> int:
    from edged.security import tokens
    from edged.security.roles import parse_roles

    try:
        path = args.file
        if path is None:
            configured = load_config(args.config).auth.tokens_file
            if not configured:
                raise ConfigError("no --file, and auth.tokens_file is not configured")
            path = Path(configured)
        if args.action == "add":
            token = tokens.add_token(path, args.name, parse_roles(args.roles, "--roles"))
            print(token)
            print(
                f"edged token: added {args.name!r} to {path}; the token is shown only now",
                file=sys.stderr,
            )
        elif args.action == "revoke":
            if not tokens.revoke_token(path, args.name):
                print(f"edged token: no token named {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"edged token: revoked {args.name!r}", file=sys.stderr)
        else:
            entries = sorted(tokens.read_tokens(path).values(), key=lambda e: e.name)
            rows = [
                {
                    "name": e.name,
                    "id": e.id,
                    "roles": sorted(r.value for r in e.roles),
                    "created": e.created,
                }
                for e in entries
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    print(f"{r['name']:24} {r['id']:8}  {','.join(r['roles']):24} {r['created']}")
    except (ConfigError, OSError) as e:
        print(f"edged token {args.action}: {e}", file=sys.stderr)
        return 2
    return 0


def _zmq_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(args.dir, args.name)
    except OSError as e:
        print(f"edged zmq-keys: {e}", file=sys.stderr)
        return 2
    Path(secret).chmod(0o600)
    print(f"public key (share it): {public}")
    print(f"secret key (keep it):  {secret}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from hal.probe import format_table, probe

    reports = probe()
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(format_table(reports), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edged`` console script."""
    args = _parser().parse_args(argv)
    run = {
        "serve": _serve,
        "devices": _devices,
        "learn": _learn,
        "infer": _infer,
        "token": _token,
        "zmq-keys": _zmq_keys,
        "optimize": run_optimize,
        "partition": partition_command.run,
    }
    try:
        code = run[args.command](args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        return stdout_closed()
    except ConfigError as e:  # a client command's TLS files (--ca, --cert, --key)
        print(f"edged {args.command}: {e}", file=sys.stderr)
        return 2
    return code


def stdout_closed() -> int:
    """The reader of our output went away (``edged devices --json | head -1``): exit quietly
    as a killed-by-SIGPIPE tool does, with nothing left to flush into the closed pipe (edged
    and edged-fleet)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
