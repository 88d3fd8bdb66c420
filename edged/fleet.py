"""The ``edged-fleet`` command: build model bundles and publish them to the fleet's TUF
repository (docs/ota.md).

    edged-fleet init DIR                      new repository and keys
    edged-fleet bundle MODEL_DIR --version V --out FILE
    edged-fleet publish DIR BUNDLE [--force]  sign a bundle in as models/<model>/<V>.tar.gz
    edged-fleet refresh DIR                   re-sign snapshot and timestamp (run from cron)
    edged-fleet status DIR [--json]

Rolling updates out to devices (their management API) is not part of this command yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edged import __version__
from edged.core.errors import EdgedError
from edged.core.types import Array
from edged.ota import bundle, publish
from edged.ota.errors import BundleError


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edged-fleet",
        description="Build model bundles and publish them to the fleet's TUF repository "
        "(docs/ota.md).",
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
        description="Bundle MODEL_DIR/model.toml and the files of a version folder with a "
        "self-test: inputs and the outputs the model must answer. For onnx and tflite models "
        "the expected outputs are computed here by running the model on the CPU; other "
        "formats need --selftest-output.",
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
    # `rollout` (StartUpdate on devices through the management API) is not here yet.
    return parser


def _expiry(args: argparse.Namespace) -> publish.Expiry:
    defaults = publish.Expiry()
    periods = {}
    for role in publish.ROLES:
        days = getattr(args, f"{role}_days", None)
        periods[role] = timedelta(days=days) if days is not None else defaults.of(role)
    return publish.Expiry(**periods)


def _load_tensors(pairs: Sequence[tuple[str, Path]]) -> dict[str, Array] | None:
    if not pairs:
        return None
    tensors: dict[str, Array] = {}
    for name, path in pairs:
        if name in tensors:
            raise BundleError(f"tensor {name!r} is given twice")
        try:
            tensors[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: not a .npy file without pickles: {e}") from e
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
        path = bundle.build_bundle(
            args.model_dir,
            args.model_version,
            args.out,
            _load_tensors(args.selftest_input),
            source=args.source,
            expected=_load_tensors(args.selftest_output),
            rtol=args.rtol,
            atol=args.atol,
        )
        manifest = bundle.read_manifest(path)
        _out(
            f"{path}: {manifest.name} version {manifest.version} ({manifest.format}; "
            f"{', '.join(manifest.artifacts)}; {path.stat().st_size} bytes)"
        )
    elif args.command == "publish":
        done = publish.publish(
            args.dir, args.bundle, force=args.force, keys_dir=args.keys, expiry=_expiry(args)
        )
        signed = ", ".join(f"{k} v{v}" for k, v in done.versions.items())
        _out(f"published {done.target} (sha256 {done.sha256}, {done.length} bytes): {signed}")
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
        return _run(args)
    except EdgedError as e:
        sys.stderr.write(f"edged-fleet: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
