"""The ``edged`` command: ``serve`` runs the daemon; ``infer`` sends one request; ``devices``
prints what the hardware probe finds; ``learn`` gives a running daemon labelled samples and
starts and lists its fine-tune jobs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged import __version__
from edged.config import describe, load_config
from edged.core.errors import ConfigError, EdgedError


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
        help="naive, ewc, lwf, replay, streaming-lda, replay+lwf or replay+ewc "
        "(default: the model's)",
    )
    start.add_argument("--wait", action="store_true", help="wait for the job to come to rest")
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
    return parser


def _serve(args: argparse.Namespace) -> int:
    from edged import logs
    from edged.daemon import Daemon

    overrides: dict[str, Any] = {}
    if args.models is not None:
        overrides["models.repository"] = str(args.models)
    if args.grpc_address is not None:
        overrides["server.grpc_address"] = args.grpc_address
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"edged: {e}", file=sys.stderr)
        return 2
    logs.configure(config.log.level, config.log.format)
    try:
        daemon = Daemon(config, reload_config=lambda: load_config(args.config, overrides=overrides))
        asyncio.run(daemon.run_until_signalled())
    except ConfigError as e:
        print(f"edged: {e}", file=sys.stderr)
        return 2
    return 0


def _load_input(spec: str) -> tuple[str, np.ndarray[Any, Any]]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--input {spec!r}: expected NAME=FILE.npy")
    array = np.load(path, allow_pickle=False)
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
    with grpc.insecure_channel(args.address) as channel:
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
            labels = np.load(args.labels, allow_pickle=False)
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
        request = mpb.StartFineTuneRequest(model=args.model, strategy=args.strategy, wait=args.wait)
    else:
        request = mpb.ListJobsRequest(model=args.model, limit=max(0, args.limit))
    with grpc.insecure_channel(args.address) as channel:
        stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
        call = {"add": stub.AddSamples, "start": stub.StartFineTune, "jobs": stub.ListJobs}
        try:
            reply = call[args.action](request, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"edged learn {args.action}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    if args.action == "start":
        state = mpb.JobState.Name(reply.job.state)
        return 0 if state in ("JOB_STATE_PROMOTED", "JOB_STATE_RUNNING") else 1
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
    if args.command == "serve":
        return _serve(args)
    if args.command == "devices":
        return _devices(args)
    if args.command == "learn":
        return _learn(args)
    return _infer(args)


if __name__ == "__main__":
    sys.exit(main())
