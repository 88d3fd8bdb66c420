"""The ``edged-fleet`` command: build model bundles, publish them to the fleet's TUF
repository, and roll them out to devices (docs/ota.md); federate a trainable model's head
across devices with Flower (docs/federated.md).

    edged-fleet init DIR                      new repository and keys
    edged-fleet bundle MODEL_DIR --version V --out FILE [--json]
    edged-fleet bundle MODEL_DIR --version V --out FILE --optimize METHODS --calibration DIR
                [--holdout DIR] [--min-agreement F | --max-accuracy-drop P] [--pick HOW]
    edged-fleet inspect BUNDLE [--json]       a bundle's manifest, self-test and evidence
    edged-fleet publish DIR BUNDLE [--force]  sign a bundle in as models/<model>/<V>.tar.gz
    edged-fleet refresh DIR                   re-sign snapshot and timestamp (run from cron)
    edged-fleet status DIR [--json]
    edged-fleet rollout --devices H:P,... --model M --version V [--canary N] [--max-failures K]
    edged-fleet federate MODEL --head HEAD.npz [--strategy fedavg|fedprox|fedadam] ...

``rollout`` is the I/O around ``edged.fleet.rollout`` (which devices next, halt or go on, the
verdict): StartUpdate and GetUpdateStatus on each device's edged.v1.Management service.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from edged import __version__
from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged.cli import load_npy, stdout_closed
from edged.core.errors import EdgedError
from edged.core.types import Array
from edged.fleet import federate, optimized, publish
from edged.fleet import rollout as plan
from edged.fleet.build import build_bundle
from edged.optimize import cli as optimize_cli
from edged.optimize.cli import add_budget_arguments, add_data_arguments
from edged.ota import archive, bundle
from edged.ota.errors import BundleError
from edged.security.client import ClientAuth, add_arguments
from edged.serving.versions import parse_version

#: The longest one StartUpdate or GetUpdateStatus call may take.
RPC_TIMEOUT_S = 10.0
#: Devices updated at once at most (threads, each with its own channel).
MAX_PARALLEL = 32
#: GetUpdateStatus errors that may pass (a busy or restarting daemon): polling goes on until
#: the health timeout. Any other error fails the device at once.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: days must be > 0")
    return value


def _tensor_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FILE.npy")
    return name, Path(path)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number, ``minimum`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {minimum} or more")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be > 0")
    return value


def _device_list(text: str) -> list[str]:
    devices = []
    for item in text.split(","):
        if not item.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: an empty entry (HOST:PORT,HOST:PORT,...)")
        try:
            device = plan.parse_device(item)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if device in devices:
            raise argparse.ArgumentTypeError(f"{device} is listed twice")
        devices.append(device)
    return devices


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the model name is empty")
    return text.strip()


def _target_version(text: str) -> str:
    value = text.strip().lower()
    if value != "latest" and parse_version(value) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a version number (1, 2, ...) nor 'latest'"
        )
    return value


def _add_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys",
        type=Path,
        metavar="KEYS_DIR",
        help="folder holding offline/ and online/ key files (default DIR/keys)",
    )


def _add_expiry(parser: argparse.ArgumentParser, roles: Sequence[str]) -> None:
    defaults = publish.Expiry()
    for role in roles:
        parser.add_argument(
            f"--{role}-days",
            type=_days,
            metavar="DAYS",
            help=f"{role} metadata expires after DAYS (default {defaults.of(role).days})",
        )


def _add_optimize(build: argparse.ArgumentParser) -> None:
    opt = build.add_argument_group(
        "optimised bundles",
        "With --optimize, MODEL_DIR (or --source) is the parent: edged optimize runs the "
        "METHODS on it with the --calibration samples and bundles the accepted variant "
        "--pick prefers; with no variant within the budget nothing is written and the "
        "command exits 2 with each method's reason. The bundle carries the evidence: "
        "optimize.json (lineage: parent model and SHA-256, method, calibration set SHA-256, "
        "budget; every variant's figures), bundle.toml [optimize] (the figures the device "
        "must reproduce), and optimize.npz (held-out inputs and the parent's outputs, which "
        "the device's self-test runs the variant on: docs/optimize.md).",
    )
    opt.add_argument(
        "--optimize",
        metavar="M[,M...]",
        help="methods to try, comma-separated, as edged optimize --methods "
        "(e.g. int8-static-minmax,int8-static-entropy,fp16)",
    )
    opt.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="calibration samples (.npy/.npz keyed by input name); --optimize needs this or "
        "--calibration-store",
    )
    add_budget_arguments(opt)
    add_data_arguments(opt)
    opt.add_argument(
        "--pick",
        choices=optimized.PICKS,
        default="smallest",
        help="which accepted variant becomes the bundle (default smallest)",
    )
    opt.add_argument(
        "--check-samples",
        type=_positive_int,
        default=optimized.DEFAULT_CHECK_SAMPLES,
        metavar="N",
        help="held-out samples the bundle carries for the device's check (default "
        f"{optimized.DEFAULT_CHECK_SAMPLES}; fewer past {optimized.MAX_CHECK_BYTES} bytes)",
    )
    opt.add_argument(
        "--optimize-out",
        type=Path,
        metavar="DIR",
        help="keep the optimiser's output (every accepted variant, report.json) in DIR",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edged-fleet",
        description="Build model bundles, publish them to the fleet's TUF repository, and "
        "roll them out to devices (docs/ota.md); federate a trainable model's head across "
        "devices (docs/federated.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edged-fleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser(
        "init",
        help="create a TUF repository and its keys",
        description="Create DIR/metadata (root with consistent snapshots, empty targets, "
        "snapshot, timestamp) and one ed25519 key per role: root and targets in "
        "KEYS_DIR/offline, snapshot and timestamp in KEYS_DIR/online (mode 0600). Ship "
        "DIR/metadata/root.json to devices as ota.root. Serve only DIR/metadata and "
        "DIR/targets, never DIR/keys.",
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    _add_keys(init)
    _add_expiry(init, publish.ROLES)

    build = commands.add_parser(
        "bundle",
        help="build a model bundle (.tar.gz) from a model folder",
        description="Bundle MODEL_DIR/model.toml (empty when there is none) and the files of "
        "a version folder with a self-test: inputs and the outputs the model must answer. "
        "For onnx and tflite models the expected outputs are computed here by running the "
        "model on the CPU; other formats need --selftest-output (or --no-selftest).",
    )
    build.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    build.add_argument(
        "--version",
        type=int,
        required=True,
        dest="model_version",
        metavar="V",
        help="the version number the bundle carries (models/<model>/<V>.tar.gz once published)",
    )
    build.add_argument("--out", type=Path, required=True, metavar="FILE", help="bundle to write")
    build.add_argument(
        "--source",
        type=Path,
        metavar="VERSION_DIR",
        help="the folder whose files are bundled (default MODEL_DIR/V)",
    )
    build.add_argument(
        "--selftest-input",
        type=_tensor_file,
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="a self-test input (repeat per input; default: seeded values for every input)",
    )
    build.add_argument(
        "--selftest-output",
        type=_tensor_file,
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an expected output (repeat per output; default: computed by running the model)",
    )
    build.add_argument(
        "--no-selftest",
        action="store_true",
        help="bundle no test vectors: a device tests the new version with the reference sample "
        "of the version it serves (its warm-up sample, or its first request that succeeded)",
    )
    build.add_argument(
        "--rtol",
        type=float,
        default=bundle.DEFAULT_RTOL,
        help=f"self-test relative tolerance (default {bundle.DEFAULT_RTOL:g})",
    )
    build.add_argument(
        "--atol",
        type=float,
        default=bundle.DEFAULT_ATOL,
        help=f"self-test absolute tolerance (default {bundle.DEFAULT_ATOL:g})",
    )
    build.add_argument("--json", action="store_true", help="print one JSON object")
    _add_optimize(build)
    build.set_defaults(usage_error=build.error)

    ins = commands.add_parser(
        "inspect",
        help="show a bundle: manifest, self-test, and an optimised variant's evidence",
        description="Check BUNDLE as a device will and show its manifest, self-test and, for "
        "a bundle made with --optimize, its evidence: bundle.toml [optimize] and the lineage "
        "and every variant's figures from optimize.json.",
    )
    ins.add_argument("bundle", type=Path, metavar="BUNDLE")
    ins.add_argument("--json", action="store_true", help="print one JSON object")

    pub = commands.add_parser(
        "publish",
        help="publish a bundle as models/<model>/<version>.tar.gz",
        description="Check BUNDLE as a device will, copy it into DIR/targets, and sign new "
        "targets, snapshot and timestamp metadata. A version at or below one already "
        "published for the model is refused unless --force.",
    )
    pub.add_argument("dir", type=Path, metavar="DIR")
    pub.add_argument("bundle", type=Path, metavar="BUNDLE")
    pub.add_argument(
        "--force",
        action="store_true",
        help="publish even a version at or below one already published (devices running a "
        "newer or the same version will not take it)",
    )
    _add_keys(pub)
    _add_expiry(pub, publish.ROLES[1:])

    ref = commands.add_parser(
        "refresh",
        help="re-sign snapshot and timestamp before they expire",
        description="Sign new snapshot and timestamp versions with the online keys. Run it "
        "more often than the timestamp expires (e.g. hourly from cron).",
    )
    ref.add_argument("dir", type=Path, metavar="DIR")
    _add_keys(ref)
    _add_expiry(ref, publish.ROLES[2:])

    st = commands.add_parser(
        "status",
        help="what the repository publishes, and when its metadata expires",
        description="Models and versions published, each role's metadata version, expiry "
        "and signature check, and any problem found. Exits 1 when there is a problem.",
    )
    st.add_argument("dir", type=Path, metavar="DIR")
    st.add_argument("--json", action="store_true", help="print JSON")

    ro = commands.add_parser(
        "rollout",
        help="update a model on devices: a canary wave first, halting on failures",
        description="Update MODEL to VERSION on each device through its management API "
        "(edged.v1.Management: StartUpdate, then GetUpdateStatus until the update comes to "
        "rest). The first N devices (--canary) are the canary wave; the rest follow in "
        "waves of --wave-size, in the order given, each wave once the previous one is at "
        "rest. COMMITTED, or the version being committed already, is a success; FAILED, "
        "ROLLED_BACK, an RPC error or an unreachable device, or no rest within "
        "--health-timeout is a failure. Once more than --max-failures devices have failed, "
        "no further wave starts and the devices left are reported as SKIPPED. Exits 0 when "
        "every device was asked and at most --max-failures failed, 1 otherwise, 2 on a "
        "usage error.",
    )
    ro.add_argument(
        "--devices",
        type=_device_list,
        required=True,
        metavar="HOST:PORT,...",
        help="the devices' gRPC addresses, comma-separated, in rollout order",
    )
    ro.add_argument(
        "--model",
        type=_model_name,
        required=True,
        metavar="MODEL",
        help="the model to update (its name in the devices' model repositories)",
    )
    ro.add_argument(
        "--version",
        type=_target_version,
        required=True,
        dest="model_version",
        metavar="V",
        help="a version number, or 'latest' (each device resolves it from the repository)",
    )
    ro.add_argument(
        "--canary",
        type=_positive_int,
        default=1,
        metavar="N",
        help="the first N devices are the canary wave (default 1)",
    )
    ro.add_argument(
        "--wave-size",
        type=_positive_int,
        metavar="W",
        help="devices updated at once after the canary wave (default: N, as --canary)",
    )
    ro.add_argument(
        "--max-failures",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="halt once more than K devices have failed (default 0)",
    )
    ro.add_argument(
        "--health-timeout",
        type=_seconds,
        default=600.0,
        metavar="S",
        help="seconds an update may take to come to rest, health window included (default 600)",
    )
    ro.add_argument(
        "--poll-interval",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="seconds between GetUpdateStatus calls (default 2)",
    )
    ro.add_argument("--json", action="store_true", help="print one JSON object")
    add_arguments(ro)
    ro.set_defaults(usage_error=ro.error)

    fed = commands.add_parser(
        "federate",
        help="run the Flower server of a federated-learning round series",
        description="Federate MODEL's head across the devices that take part (their "
        "[federated] config points at --address): Flower's FedAvg, FedProx or FedAdam over "
        "TLS, enrolled devices only, one line per round. Each device judges the final merged "
        "head with its own gate and keeps its own head if the gate rejects it "
        "(docs/federated.md).",
    )
    federate.add_arguments(fed, _positive_int)
    return parser


def _expiry(args: argparse.Namespace) -> publish.Expiry:
    defaults = publish.Expiry()
    periods = {}
    for role in publish.ROLES:
        days = getattr(args, f"{role}_days", None)
        periods[role] = timedelta(days=days) if days is not None else defaults.of(role)
    return publish.Expiry(**periods)


def _load_tensors(pairs: Sequence[tuple[str, Path]], flag: str) -> dict[str, Array] | None:
    if not pairs:
        return None
    tensors: dict[str, Array] = {}
    for name, path in pairs:
        if name in tensors:
            raise BundleError(f"{flag}: tensor {name!r} is given twice")
        try:
            tensors[name] = load_npy(path, flag)
        except (OSError, ValueError) as e:
            raise BundleError(str(e)) from e
    return tensors


def _print_status(report: dict[str, Any]) -> None:
    _out(f"repository {report['repository']}")
    _out(f"{'role':10} {'version':>7}  {'expires':25}  {'keys':7}  state")
    for role, r in report["roles"].items():
        state = "EXPIRED" if r["expired"] else "ok" if r["verified"] else "UNVERIFIED"
        _out(f"{role:10} {r['version']:>7}  {r['expires']:25}  {r['key_place']:7}  {state}")
    _out("models")
    if not report["models"]:
        _out("  (none)")
    for model, versions in report["models"].items():
        for v in versions:
            _out(f"  {model} {v['version']}: {v['target']} ({v['format']}, {v['length']} bytes)")
    _out("problems")
    for problem in report["problems"] or ["(none)"]:
        _out(f"  {problem}")


# -- rollout: the I/O around edged.fleet.rollout---------------------------------------------


def _view(status: mpb.UpdateStatus) -> plan.UpdateView:
    return plan.UpdateView(
        update_id=status.update_id,
        state=mpb.UpdateState.Name(status.state).removeprefix("UPDATE_STATE_"),
        from_version=status.from_version,
        to_version=status.to_version,
        committed_version=status.committed_version,
        last_error=status.last_error,
    )


def _rpc_error(e: Exception) -> str:
    if isinstance(e, grpc.RpcError) and isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


class _DeviceUpdate:
    """Update one model on one device: StartUpdate, then GetUpdateStatus every
    ``poll_interval`` seconds until the update is at rest or ``timeout`` has passed."""

    def __init__(
        self,
        model: str,
        version: str,
        timeout: float,
        poll_interval: float,
        stop: threading.Event,
        say: Callable[[str], None] = lambda _: None,
        auth: ClientAuth | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.stop = stop
        self.say = say
        self.auth = auth or ClientAuth()

    def __call__(self, device: str) -> plan.DeviceResult:
        deadline = time.monotonic() + self.timeout

        def rpc_timeout() -> float:
            return max(0.1, min(RPC_TIMEOUT_S, deadline - time.monotonic()))

        with self.auth.channel(device) as channel:
            stub = mpb_grpc.ManagementStub(channel)  # type: ignore[no-untyped-call]
            try:
                reply = stub.StartUpdate(
                    mpb.StartUpdateRequest(model=self.model, version=self.version),
                    timeout=rpc_timeout(),
                )
            except grpc.RpcError as e:
                return plan.refused(device, f"StartUpdate: {_rpc_error(e)}")
            now = _view(reply.status)
            if not reply.started:
                return plan.already(device, now, reply.reason)
            update_id = now.update_id
            rpc_error = ""
            said = now.state
            self.say(f"  {device}: update {update_id} {now.state}")
            while (result := plan.settle(device, update_id, now)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.stop.is_set():
                    return plan.timed_out(device, now, self.timeout, rpc_error)
                if self.stop.wait(min(self.poll_interval, left)):
                    continue
                try:
                    answer = stub.GetUpdateStatus(
                        mpb.GetUpdateStatusRequest(model=self.model), timeout=rpc_timeout()
                    )
                except grpc.RpcError as e:
                    rpc_error = _rpc_error(e)
                    if e.code().name in TRANSIENT_CODES:
                        continue
                    return plan.DeviceResult(
                        device,
                        plan.Outcome.ERROR,
                        now.from_version,
                        now.to_version,
                        f"GetUpdateStatus: {rpc_error}",
                    )
                rpc_error = ""
                mine = [s for s in answer.models if s.model == self.model]
                if not mine:
                    return plan.DeviceResult(
                        device,
                        plan.Outcome.ERROR,
                        now.from_version,
                        now.to_version,
                        f"GetUpdateStatus has no status for model {self.model!r}",
                    )
                now = _view(mine[0])
                if now.update_id == update_id and now.state != said:
                    said = now.state
                    self.say(f"  {device}: update {update_id} {now.state}")
            return result


_PROGRESS_LOCK = threading.Lock()


def _progress(text: str) -> None:
    """One progress line on stderr (from any thread; stdout keeps the report)."""
    with _PROGRESS_LOCK:
        sys.stderr.write(f"edged-fleet: {text}\n")
        sys.stderr.flush()


def _versions(r: plan.DeviceResult) -> str:
    if r.outcome is plan.Outcome.SKIPPED or not (r.from_version or r.to_version):
        return "-"
    if r.from_version == r.to_version:
        return r.from_version
    return f"{r.from_version or '-'} -> {r.to_version or '?'}"


def _rollout(args: argparse.Namespace) -> int:
    if args.canary > len(args.devices):
        args.usage_error(
            f"argument --canary: {args.canary} is more than the {len(args.devices)} "
            "devices in --devices"
        )
    rollout = plan.Rollout(
        args.devices, canary=args.canary, wave_size=args.wave_size, max_failures=args.max_failures
    )
    update = _DeviceUpdate(
        args.model,
        args.model_version,
        args.health_timeout,
        args.poll_interval,
        threading.Event(),
        _progress,
        ClientAuth.from_args(args),
    )
    total = len(rollout.waves)
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(args.devices))) as pool:
        try:
            while wave := rollout.next_wave():
                number = rollout.waves_started
                name = f"wave {number} of {total}" + (" (canary)" if number == 1 else "")
                _progress(f"{name}: {args.model} {args.model_version} on {', '.join(wave)}")
                results = list(pool.map(update, wave))
                for r in results:
                    detail = r.last_error or r.note
                    _progress(f"  {r.device}: {r.outcome} {_versions(r)} {detail}".rstrip())
                rollout.record(results)
        except KeyboardInterrupt:
            # stop polling before the pool waits for its threads; the updates already
            # started go on on their devices
            update.stop.set()
            raise
    verdict = rollout.verdict()
    results = rollout.results()
    if args.json:
        report = {
            "model": args.model,
            "requested": args.model_version,
            "canary": rollout.canary,
            "wave_size": rollout.wave_size,
            "max_failures": rollout.max_failures,
            "verdict": verdict.status,
            "summary": verdict.summary,
            "exit_code": verdict.exit_code,
            "waves": verdict.waves,
            "succeeded": verdict.succeeded,
            "failed": verdict.failed,
            "skipped": verdict.skipped,
            "devices": [
                {
                    "device": r.device,
                    "wave": r.wave or None,
                    "state": str(r.outcome),
                    "from_version": r.from_version,
                    "to_version": r.to_version,
                    "last_error": r.last_error,
                    "note": r.note,
                }
                for r in results
            ],
        }
        _out(json.dumps(report, indent=2))
    else:
        rows = [("device", "wave", "state", "version", "last_error")] + [
            (r.device, str(r.wave or "-"), str(r.outcome), _versions(r), r.last_error or r.note)
            for r in results
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            _out(("  ".join(cells) + "  " + row[4]).rstrip())
        _out(verdict.summary)
    return verdict.exit_code


def _bundle(args: argparse.Namespace) -> int:
    selftest_inputs = _load_tensors(args.selftest_input, "--selftest-input")
    expected = _load_tensors(args.selftest_output, "--selftest-output")
    evidence: dict[str, Any] | None = None
    if args.optimize is None:
        if args.calibration is not None or args.calibration_store is not None:
            args.usage_error("--calibration and --calibration-store go only with --optimize")
        path = build_bundle(
            args.model_dir,
            args.model_version,
            args.out,
            selftest_inputs,
            source=args.source,
            expected=expected,
            rtol=args.rtol,
            atol=args.atol,
            selftest=not args.no_selftest,
        )
    else:
        made = _bundle_optimized(args, selftest_inputs, expected)
        if isinstance(made, int):
            return made
        path, evidence = made
    manifest = bundle.read_manifest(path)
    if args.json:
        _out(json.dumps(_bundle_json(path, manifest, evidence), indent=2, default=str))
    else:
        _out(
            f"{path}: {manifest.name} version {manifest.version} ({manifest.format}; "
            f"{', '.join(manifest.artifacts)}; {path.stat().st_size} bytes)"
        )
        if manifest.optimize is not None:
            _print_evidence(manifest.optimize)
    return 0


def _bundle_optimized(
    args: argparse.Namespace,
    selftest_inputs: dict[str, Array] | None,
    expected: dict[str, Array] | None,
) -> tuple[Path, dict[str, Any]] | int:
    """``bundle --optimize``: the bundle and its evidence, or the exit status (2: no variant
    within the budget, or an unusable model, folder or option)."""
    if (args.calibration is None) == (args.calibration_store is None):
        args.usage_error("--optimize needs one of --calibration DIR and --calibration-store")
    if args.no_selftest or expected is not None:
        args.usage_error(
            "--no-selftest and --selftest-output do not go with --optimize (the variant's "
            "expected outputs are computed from it)"
        )
    try:
        settings = optimize_cli.settings_of(args, args.optimize, plot=False)
        done, result = optimized.bundle_optimized(
            args.source or args.model_dir,
            args.calibration,
            args.model_version,
            args.out,
            settings,
            pick=args.pick,
            check_samples=args.check_samples,
            work=args.optimize_out,
            progress=_progress,
            bundle_options={
                "selftest_inputs": selftest_inputs,
                "rtol": args.rtol,
                "atol": args.atol,
            },
        )
    except optimized.NoVariantError as e:
        sys.stderr.write(f"edged-fleet: no bundle written: {e}\n")
        if args.json:
            _out(json.dumps({"bundle": None, "refused": dict(e.reasons)}, indent=2))
        return 2
    except ImportError as e:
        sys.stderr.write(f"edged-fleet: {e}: install the optimize extra (edged[optimize])\n")
        return 2
    except EdgedError as e:
        if isinstance(e, BundleError):
            raise
        sys.stderr.write(f"edged-fleet: error: {e}\n")
        return 2
    if not args.json:
        from edged.optimize.report import table  # noqa: PLC0415

        sys.stderr.write(table(result.reports))
    return done.bundle, optimized.summary(done)


def _bundle_json(
    path: Path, manifest: bundle.Manifest, evidence: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "bundle": str(path),
        "name": manifest.name,
        "version": manifest.version,
        "format": manifest.format,
        "artifacts": list(manifest.artifacts),
        "bytes": path.stat().st_size,
        "selftest": manifest.selftest_file or None,
        "signature": bundle.signature_table(manifest),
        "optimize": evidence,
    }


def _print_evidence(e: bundle.OptimizeEvidence) -> None:
    _out(f"  optimised: {e.method} of {e.parent} (sha256 {e.parent_sha256})")
    _out(f"  calibration set sha256 {e.calibration_sha256}")
    _out(
        f"  check: {e.samples} held-out samples in {e.file}, output {e.output!r}: agreement "
        f"{e.agreement:.4f}, relative error {e.rel_l2_error:.4g}; lineage and figures in "
        f"{e.lineage}"
    )


def _inspect(args: argparse.Namespace) -> int:
    info = bundle.inspect_bundle(args.bundle)
    manifest = info.manifest
    evidence: dict[str, Any] | None = None
    if manifest.optimize is not None:
        name = manifest.optimize.lineage
        raw = archive.read_files(args.bundle, [name], bundle.MAX_TOML_BYTES * 16)[name]
        try:
            lineage = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BundleError(f"{args.bundle}/{name}: not valid JSON: {e}") from e
        evidence = {"evidence": dataclasses.asdict(manifest.optimize), "lineage": lineage}
    if args.json:
        report = _bundle_json(args.bundle, manifest, evidence)
        report["selftest_inputs"] = list(info.selftest_inputs)
        report["selftest_outputs"] = list(info.selftest_outputs)
        _out(json.dumps(report, indent=2, default=str))
        return 0
    _out(
        f"{args.bundle}: {manifest.name} version {manifest.version} ({manifest.format}; "
        f"{', '.join(manifest.artifacts)}; {info.archive_bytes} bytes)"
    )
    if manifest.selftest_file:
        _out(
            f"  self-test: inputs {', '.join(info.selftest_inputs)}; expected "
            f"{', '.join(info.selftest_outputs)} (rtol {manifest.rtol:g}, atol {manifest.atol:g})"
        )
    else:
        _out("  self-test: none (the device tests it with its reference sample)")
    if manifest.optimize is not None:
        assert evidence is not None
        _print_evidence(manifest.optimize)
        from edged.optimize.report import VariantReport, table  # noqa: PLC0415

        fields = set(VariantReport.__dataclass_fields__)
        variants = evidence["lineage"].get("variants", [])
        reports = [
            VariantReport(**{"path": None, **{k: v for k, v in item.items() if k in fields}})
            for item in variants
            if isinstance(item, dict)
        ]
        if reports:
            _out(table(reports).rstrip("\n"))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "init":
        publish.init(args.dir, keys_dir=args.keys, expiry=_expiry(args))
        _out(f"created a TUF repository in {args.dir}")
        _out(f"  devices trust:  {args.dir / publish.METADATA_DIR / 'root.json'} (ota.root)")
        keys = args.keys or args.dir / publish.KEYS_DIR
        _out(f"  offline keys:   {keys / 'offline'} (root, targets: keep them off the server)")
        _out(f"  online keys:    {keys / 'online'} (snapshot, timestamp: for refresh)")
        _out(f"  serve only:     {args.dir / publish.METADATA_DIR}, {args.dir / 'targets'}")
    elif args.command == "bundle":
        return _bundle(args)
    elif args.command == "inspect":
        return _inspect(args)
    elif args.command == "publish":
        done = publish.publish(
            args.dir,
            args.bundle,
            force=args.force,
            keys_dir=args.keys,
            expiry=_expiry(args),
            progress=_progress,
        )
        signed = ", ".join(f"{k} v{v}" for k, v in done.versions.items())
        _out(f"published {done.target} (sha256 {done.sha256}, {done.length} bytes): {signed}")
    elif args.command == "rollout":
        return _rollout(args)
    elif args.command == "federate":
        return federate.run(args)
    elif args.command == "refresh":
        new = publish.refresh(args.dir, keys_dir=args.keys, expiry=_expiry(args))
        _out("signed " + ", ".join(f"{k} v{v}" for k, v in new.items()))
    else:
        report = publish.status(args.dir)
        if args.json:
            _out(json.dumps(report, indent=2, sort_keys=True))
        else:
            _print_status(report)
        return 1 if report["problems"] else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edged-fleet``; returns the exit status (1: the operation failed, named)."""
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        return stdout_closed()
    except EdgedError as e:
        sys.stderr.write(f"edged-fleet: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
