"""``edged optimize``'s arguments and output; edged/cli.py adds the command from here. Light
to import: the methods load onnx, onnxruntime.quantization and matplotlib only when run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edged.core.errors import EdgedError
from edged.optimize import gate
from edged.optimize.errors import OptimizeError
from edged.optimize.gate import DEFAULT_MAX_F1_DROP, DEFAULT_MIN_AGREEMENT
from edged.optimize.report import table

DEFAULT_PRUNE_MIN_CHANNELS = 64
"""``--prune-min-channels``' default: ``Options.prune_min_channels`` (edged.optimize.methods,
not imported here: it loads onnx), checked equal by the tests."""

DESCRIPTION = """\
Compress MODEL (an .onnx file, a model folder, a version folder or an edged bundle) and keep
only what stays within the budget. Every method makes a variant, which is measured against
the original: size, gzip size, batch-1 latency and throughput on each present executor that
runs ONNX (through the HAL), peak memory, and quality on held-out samples never used for
calibration (task accuracy when the samples carry labels, else top-1 agreement and output
error). A variant within the budget is written as OUT/<method>/<model>/ (model.toml,
1/model.onnx, 1/optimize.json with its lineage), ready for `edged-fleet bundle
OUT/<method>/<model> --version V --source OUT/<method>/<model>/1`; one over budget is never
written. OUT/report.json and OUT/pareto.png hold every variant.

DIR holds .npy files named after the model's inputs (input.npy) and/or .npz archives keyed
by input name, samples on axis 0, and optionally 'labels' (integers, one per sample) or,
for a text detector (a DBNet probability map output [N, 1, H, W], as PP-OCR's), a
boxes.json file: {"boxes": [[[x0, y0, x1, y1], ...], ...]}, each sample's known boxes in
the map's pixels, in row order; variants are then scored by detection F1 at IoU 0.5 and
--max-accuracy-drop is in points of F1.
--calibration-store PATH takes the samples a device's learning store keeps instead (its
backbone features and labels, held-out rows excluded; which rows are used is printed and
recorded in optimize.json); variants are then judged on --holdout DIR.
Default budget: --min-agreement 0.99; with boxes.json (a detector) --max-accuracy-drop 1
(points of detection F1: pixel agreement misses broken boxes). docs/optimize.md has the
methods and figures."""


def add_command(commands: Any) -> None:
    """Add ``optimize`` to edged's sub-commands (``commands``: argparse's subparsers)."""
    p = commands.add_parser(
        "optimize",
        help="quantise, prune or distil a model; keep the variants within a budget",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="calibration samples (a share is held out unless --holdout is given); or "
        "--calibration-store",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="where accepted variants, report.json and pareto.png go",
    )
    p.add_argument(
        "--methods",
        default=None,
        metavar="M[,M...]",
        help="comma-separated methods (default: int8-static-minmax, int8-static-entropy, "
        "int8-static-percentile, int8-static-excluded, int8-dynamic, fp16, litert-int8; also "
        "prune-magnitude, prune-structured, prune-channels-25, prune-channels-50, "
        "prune-channels-25+int8-static-minmax, prune-channels-50+int8-static-minmax (pruned, "
        "then quantised), fuse-hardswish (float: x*Clip(x+3,0,6)/6 chains as HardSwish), "
        "fuse-hardswish+prune-channels-50, and for [learn] models head-prune, distil, qat)",
    )
    add_budget_arguments(p)
    add_data_arguments(p)
    p.add_argument("--no-plot", action="store_true", help="do not draw pareto.png")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per variant instead of the table"
    )


def add_budget_arguments(p: argparse._ActionsContainer) -> None:
    """The budget options (``--max-accuracy-drop`` or ``--min-agreement``), shared with
    ``edged-fleet bundle --optimize``."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="P",
        help="at most P points of accuracy lost (of agreement without labels)",
    )
    budget.add_argument(
        "--min-agreement",
        type=float,
        metavar="F",
        help=f"at least F top-1 agreement (default {DEFAULT_MIN_AGREEMENT}; with boxes.json "
        f"the default is --max-accuracy-drop {DEFAULT_MAX_F1_DROP:g}, points of detection F1)",
    )


def add_data_arguments(p: argparse._ActionsContainer) -> None:
    """How variants are made and judged (held-out data, output, calibration size, sparsity,
    timing), shared with ``edged-fleet bundle --optimize``."""
    p.add_argument(
        "--holdout",
        type=Path,
        metavar="DIR",
        help="held-out samples to judge with (default: a share of --calibration; needed "
        "with --calibration-store)",
    )
    p.add_argument(
        "--calibration-store",
        type=Path,
        metavar="PATH",
        help="calibrate with a device's learning store instead (learn.sqlite3, or the state "
        "folder holding it; read-only): every sample of the model it does not hold out. It "
        "keeps backbone features, not inputs: head-prune and distil train on them, "
        "int8-dynamic, fp16 and the pruning methods need no data, the others are refused",
    )
    p.add_argument(
        "--store-model",
        metavar="NAME",
        help="whose samples in --calibration-store (default: the model's name)",
    )
    p.add_argument(
        "--holdout-share",
        type=float,
        default=0.25,
        metavar="S",
        help="share of --calibration held out when --holdout is not given (0.25)",
    )
    p.add_argument(
        "--output", metavar="NAME", help="the output quality is judged on (default: the first)"
    )
    p.add_argument(
        "--task",
        choices=("auto", "detection"),
        default="auto",
        help="auto: detection F1 when the held-out folder has boxes.json, accuracy with "
        "labels, else agreement; detection: require boxes.json (auto)",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=64,
        metavar="N",
        help="at most N samples feed the calibrators (64)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        metavar="S",
        help="share of weights (magnitude) or hidden units (structured) pruned (0.5)",
    )
    p.add_argument(
        "--prune-min-channels",
        type=int,
        default=DEFAULT_PRUNE_MIN_CHANNELS,
        metavar="N",
        help="prune-channels-* leaves channel sets narrower than N alone (a multiple of 8, at "
        f"least 8: pruned sets keep multiples of 8 channels; {DEFAULT_PRUNE_MIN_CHANNELS})",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=50,
        metavar="N",
        help="batch-1 inferences timed per variant and executor (50)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="intra-op threads while timing (1, as the daemon on a small gateway)",
    )


def settings_of(args: argparse.Namespace, methods: str | None, *, plot: bool) -> Any:
    """``edged.optimize.run.Settings`` from the options ``add_budget_arguments`` and
    ``add_data_arguments`` added; ``methods``: comma-separated (None: the defaults).

    Raises:
        OptimizeError: a bad budget (named).
        ImportError: the optimize extra is not installed.
    """
    from edged.optimize.methods import DEFAULT_METHODS, Options  # noqa: PLC0415 - onnx, onnxruntime.quantization
    from edged.optimize.run import Settings  # noqa: PLC0415 - onnx, onnxruntime.quantization

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else ()
    return Settings(
        methods=chosen or DEFAULT_METHODS,
        budget=gate.Budget.of(args.max_accuracy_drop, args.min_agreement),
        holdout=args.holdout,
        holdout_share=args.holdout_share,
        output=args.output,
        options=Options(
            calibration_samples=max(1, args.calibration_samples),
            sparsity=args.sparsity,
            prune_min_channels=prune_min_channels(args.prune_min_channels),
        ),
        runs=max(1, args.runs),
        threads=max(1, args.threads),
        plot=plot,
        calibration_store=args.calibration_store,
        store_model=args.store_model,
        task=args.task,
    )


def prune_min_channels(n: int) -> int:
    """``n`` when it is a usable ``--prune-min-channels``.

    Raises:
        OptimizeError: ``n`` under 8 or not a multiple of 8 (the message says why).
    """
    from edged.optimize.methods import CHANNEL_ALIGN  # noqa: PLC0415 - onnx, onnxruntime.quantization

    if n < CHANNEL_ALIGN or n % CHANNEL_ALIGN:
        raise OptimizeError(
            f"--prune-min-channels must be a multiple of {CHANNEL_ALIGN}, at least "
            f"{CHANNEL_ALIGN}, got {n}: pruned channel sets keep multiples of {CHANNEL_ALIGN} "
            "channels (ONNX Runtime's blocked x86 convolutions), so narrower sets cannot lose "
            f"a step and the floor is counted in the same steps"
        )
    return n


def run(args: argparse.Namespace) -> int:
    """Run ``edged optimize``; 0 when at least one variant was accepted, 1 when none was,
    2 on an unusable model, folder or option (named on stderr)."""
    from edged.optimize.run import optimize  # noqa: PLC0415 - onnx, onnxruntime.quantization

    def say(line: str) -> None:
        # which store rows calibrate is said even with --json (stdout stays JSON)
        if not args.json or line.startswith("learning store"):
            sys.stderr.write(f"edged optimize: {line}\n")

    try:
        settings = settings_of(args, args.methods, plot=not args.no_plot)
        result = optimize(args.model, args.calibration, args.out, settings, say)
    except EdgedError as e:
        sys.stderr.write(f"edged optimize: {e}\n")
        return 2
    except ImportError as e:
        sys.stderr.write(f"edged optimize: {e}: install the optimize extra (edged[optimize])\n")
        return 2
    if args.json:
        for r in result.reports:
            sys.stdout.write(json.dumps(r.to_json(), sort_keys=True, default=str) + "\n")
    else:
        sys.stdout.write(table(result.reports))
        sys.stdout.write(f"report: {result.report_path}\n")
        if result.plot_path is not None:
            sys.stdout.write(f"plot:   {result.plot_path}\n")
    return 0 if any(r.accepted for r in result.reports[1:]) else 1
