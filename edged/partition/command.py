"""``edged partition MODEL.onnx``: list a model's cuts, write the head and tail of one, profile
this machine, and explain the planner's choice (docs/partition.md)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged.core.errors import ConfigError
from edged.core.types import Array
from edged.partition import graph
from edged.partition.planner import OBJECTIVES, Link, Plan, plan
from edged.partition.profile import (
    DEFAULT_RUNS,
    NOISY_SPREAD,
    STATISTICS,
    Profile,
    cost_table,
    measure_link,
    noisy_heads,
    profile,
)
from edged.partition.quota import CpuLimit, detect
from edged.security import client as client_auth
from edged.storage import write_atomic

DESCRIPTION = """\
Split execution of one ONNX model between this device and a server (docs/partition.md).

  --list                      the candidate cuts (tensors that separate the graph)
  --cut TENSOR --out DIR      write DIR/head.onnx (runs here) and DIR/tail.onnx (serve it on
                              the server, edged or Triton); --cut '<inputs>': no head
  --cut A --cut B .. --out DIR  several cuts for re-planning: DIR/device/head_<cut>.onnx,
                              DIR/server/<name>_<cut>/1/model.onnx (--name, default the
                              file's stem), and model.toml's [partition.cuts] on stdout
  --profile-out FILE          time every cut's head and tail on this machine (run it on the
                              server too: its tails are the plan's tail latencies)
  --wire-dtype FP16           send an FP32 cut tensor as FP16: heads end with a Cast, tails
                              begin with one back (half the bytes; give it to --cut and to
                              both profiles alike)
  --explain                   the per-cut estimate table and the chosen cut, from this
                              machine's profile, --server-profile FILE (else this machine's
                              own figures stand in for the server's: say so), and the link:
                              --rtt-ms/--bandwidth-mbit, or measured with --server HOST:PORT;
                              --objective device_cpu (--byte-cost-ns N) minimises the device's
                              CPU time instead of the latency
  --explain --profile FILE    plan with this machine's profile written before by
                              --profile-out (profile once, plan for many links)
  --statistic cpu             a head costs its CPU time times the device's wall/CPU ratio,
                              not its median wall time (a CPU quota's stalls; one thread)
  --statistic quota           on a device under a CPU limit (a CFS quota: --cpu-limit, else
                              this process's cgroup): a head costs its CPU time, and a cut
                              costs at least what the limit lets the device's CPU per
                              request take (--request-cpu-ms, plus --byte-cost-ns per byte
                              on the wire, plus the head); one thread
  --margin 0.1                a split only where it is estimated >10 % faster than the
                              better of all local and all remote
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``edged partition``."""
    parser.add_argument("model", type=Path, help="the whole model (.onnx)")
    parser.add_argument("--list", action="store_true", help="list the candidate cuts")
    parser.add_argument(
        "--cut",
        action="append",
        default=[],
        metavar="TENSOR",
        help="write the head and tail cut here (repeat it for several cuts)",
    )
    parser.add_argument(
        "--name", help="several cuts: the model's name on the server (default: the file's stem)"
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="where --cut writes them")
    parser.add_argument("--explain", action="store_true", help="print the plan and its choice")
    parser.add_argument("--profile-out", type=Path, metavar="FILE", help="write this profile")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="--explain: this machine's profile, written before with --profile-out (instead "
        "of profiling now: profile once, plan for many links)",
    )
    parser.add_argument(
        "--server-profile", type=Path, metavar="FILE", help="the server's --profile-out file"
    )
    parser.add_argument("--rtt-ms", type=float, help="link round-trip time (else measured)")
    parser.add_argument("--bandwidth-mbit", type=float, help="link Mbit/s (else measured)")
    parser.add_argument("--server", metavar="HOST:PORT", help="measure the link to this server")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D,D,..",
        help="shape of an input to profile with (random values); default: its static dims, "
        "1 for a dynamic one",
    )
    parser.add_argument(
        "--input", action="append", default=[], metavar="NAME=FILE.npy", help="an input's values"
    )
    parser.add_argument("--executor", default="cpu-onnx", help="executor kind to profile on")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs per part")
    parser.add_argument("--every", type=int, default=1, help="profile every N-th cut only")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="latency",
        help="what the plan minimises: end-to-end latency (default) or the device's CPU time",
    )
    parser.add_argument(
        "--byte-cost-ns",
        type=float,
        default=0.0,
        help="device_cpu and --statistic quota: the device's CPU nanoseconds per byte sent "
        "or answered",
    )
    parser.add_argument(
        "--request-cpu-ms",
        type=float,
        default=0.0,
        help="--statistic quota: the device's CPU milliseconds per request besides the model "
        "and the bytes (reading the request, answering it; measure the served daemon's)",
    )
    parser.add_argument(
        "--cpu-limit",
        default="auto",
        metavar="QUOTA_MS/PERIOD_MS",
        help="--statistic quota: the device's CPU limit, e.g. 1/8; auto (default): this "
        "process's cgroup's CFS quota",
    )
    parser.add_argument(
        "--wire-dtype",
        choices=graph.WIRE_DTYPES,
        default="",
        help="send the cut tensor in this datatype (the cuts that have a head; default: its own)",
    )
    parser.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="wall",
        help="what a head costs: its median wall time (default); cpu: its median CPU time "
        "times the device's wall/CPU ratio over the profile; quota: its CPU time, each cut "
        "bounded by the device's CPU limit (--cpu-limit); cpu and quota need --threads 1",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="choose a split only if it is estimated faster than the better of all local and "
        "all remote by more than this fraction of it (default 0)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    client_auth.add_arguments(parser)


def _feed(model: Any, args: argparse.Namespace) -> dict[str, Array]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in args.shape:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise ConfigError(f"--shape {item}: expected NAME=D,D,...") from None
    given: dict[str, Array] = {}
    for item in args.input:
        name, _, file = item.partition("=")
        try:
            given[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--input {item}: {e}") from e
    import onnx  # noqa: PLC0415 - graph.load has checked it is there

    rng = np.random.default_rng(0)
    feed: dict[str, Array] = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in given:
            feed[value.name] = given[value.name]
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        dims = shapes.get(value.name) or tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
            for d in tensor.shape.dim
        )
        feed[value.name] = rng.random(dims).astype(dtype)
    return feed


def _link(args: argparse.Namespace) -> tuple[Link, str]:
    if args.rtt_ms is not None and args.bandwidth_mbit is not None:
        return Link(args.rtt_ms / 1000, args.bandwidth_mbit * 1e6), "given"
    if not args.server:
        raise ConfigError("--explain needs the link: --rtt-ms and --bandwidth-mbit, or --server")
    auth = client_auth.ClientAuth.from_args(args)
    channel = auth.channel(args.server)
    try:
        measured = measure_link(channel)
    finally:
        channel.close()
    link = Link(
        measured.rtt_s if args.rtt_ms is None else args.rtt_ms / 1000,
        measured.bandwidth_bps if args.bandwidth_mbit is None else args.bandwidth_mbit * 1e6,
    )
    return link, f"measured to {args.server}"


def _read_profile(path: Path, flag: str = "--server-profile") -> Profile:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: {e}") from e
    return Profile.from_json(data, str(path))


def explain_json(
    result: Plan,
    link: Link,
    link_source: str,
    server: str,
    statistic: str = "wall",
    noisy: Sequence[str] = (),
    cpu_limit: CpuLimit | None = None,
) -> dict[str, Any]:
    """The plan as JSON: every row's parts in milliseconds, the link, the choice, the
    statistic of the heads, the cuts whose heads' runs disagreed, and the device's CPU limit
    with each row's bound where one was planned with."""
    return {
        "link": {
            "rtt_ms": link.rtt_s * 1000,
            "bandwidth_mbit": link.bandwidth_bps / 1e6,
            "source": link_source,
        },
        "server": server,
        "estimates": [
            {
                "cut": e.cut,
                "head_ms": e.head_s * 1000,
                "link_ms": e.transfer_s * 1000,
                "tail_ms": e.tail_s * 1000,
                "sent_bytes": e.sent_bytes,
                "total_ms": e.total_s * 1000,
                **({"device_cpu_ms": e.objective_s * 1000} if e.cost_s is not None else {}),
                **({"bound_ms": e.bound_s * 1000} if cpu_limit is not None else {}),
            }
            for e in result.estimates
        ],
        **(
            {
                "cpu_limit": {
                    "quota_ms": cpu_limit.quota_s * 1000,
                    "period_ms": cpu_limit.period_s * 1000,
                }
            }
            if cpu_limit is not None
            else {}
        ),
        "objective": result.objective,
        "statistic": statistic,
        "noisy_heads": list(noisy),
        "choice": result.choice.cut,
        "choice_total_ms": result.choice.total_s * 1000,
        **(
            {"choice_device_cpu_ms": result.choice.objective_s * 1000}
            if result.objective == "device_cpu"
            else {}
        ),
    }


def explain_text(
    result: Plan,
    link: Link,
    link_source: str,
    server: str,
    statistic: str = "wall",
    noisy: Sequence[str] = (),
    cpu_limit: CpuLimit | None = None,
) -> str:
    """The plan as a table, the chosen row marked, noisy heads named."""
    width = max(len(e.cut) for e in result.estimates)
    cpu = result.objective == "device_cpu"
    lines = [
        f"{'cut':{width}}  {'head ms':>9}  {'link ms':>9}  {'tail ms':>9}  "
        f"{'sent KiB':>9}"
        + (f"  {'limit ms':>9}" if cpu_limit is not None else "")
        + f"  {'total ms':>9}"
        + ("  device CPU ms" if cpu else "")
    ]
    for e in result.estimates:
        mark = "  <- chosen" if e is result.choice else ""
        extra = f"  {e.objective_s * 1000:13.3f}" if cpu else ""
        bound = f"  {e.bound_s * 1000:9.3f}" if cpu_limit is not None else ""
        lines.append(
            f"{e.cut:{width}}  {e.head_s * 1000:9.3f}  {e.transfer_s * 1000:9.3f}  "
            f"{e.tail_s * 1000:9.3f}  {e.sent_bytes / 1024:9.1f}{bound}  "
            f"{e.total_s * 1000:9.3f}{extra}{mark}"
        )
    what = (
        f"{result.choice.objective_s * 1000:.3f} ms of device CPU, "
        f"{result.choice.total_s * 1000:.3f} ms end to end estimated"
        if cpu
        else f"{result.choice.total_s * 1000:.3f} ms estimated"
    )
    lines += [
        f"link: rtt {link.rtt_s * 1000:.3f} ms, {link.bandwidth_bps / 1e6:.3f} Mbit/s "
        f"({link_source})",
        f"server: {server}",
    ]
    if statistic == "cpu":
        lines.append(f"heads: {statistic} time x the device's wall/CPU ratio")
    if cpu_limit is not None:
        lines.append(
            f"heads: CPU time; the device's CPU limit, {cpu_limit.describe()}, bounds each "
            "cut by its CPU per request (limit ms)"
        )
    if noisy:
        lines.append(
            f"noisy: {len(noisy)} heads' runs disagree (interquartile range over "
            f"{NOISY_SPREAD:.0%} of the median): {', '.join(noisy)}; a CPU quota's stalls? "
            "--statistic cpu charges each its CPU time"
        )
    lines.append(f"choice: {result.choice.cut} ({what})")
    return "\n".join(lines) + "\n"


def _write(out: Mapping[str, Any] | str, as_json: bool) -> None:
    sys.stdout.write(json.dumps(out, indent=2) + "\n" if as_json else str(out))


def run(args: argparse.Namespace) -> int:
    """Run ``edged partition``; 0 on success.

    Raises:
        ConfigError: a bad flag, a tensor that is no cut, a file that is no model.
    """
    if args.profile is not None and not args.explain:
        raise ConfigError("--profile is what --explain plans with: add --explain")
    if not (args.list or args.cut or args.explain or args.profile_out):
        raise ConfigError("say what to do: --list, --cut, --profile-out or --explain")
    model = graph.load(args.model)
    if args.list:
        cuts = graph.candidate_cuts(model)
        if args.json:
            _write({"cuts": [{"tensor": c.tensor, "op": c.op} for c in cuts]}, True)
        else:
            _write("".join(f"{c.tensor}\t{c.op or '(the inputs)'}\n" for c in cuts), False)
    if args.cut:
        _cut(model, args)
    if args.explain or args.profile_out:
        _profile_and_plan(model, args)
    return 0


def _cut(model: Any, args: argparse.Namespace) -> None:
    if args.out is None:
        raise ConfigError("--cut needs --out DIR")
    if len(args.cut) > 1:
        _cuts(model, args)
        return
    parts = graph.split(model, args.cut[0], _wire(args, args.cut[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    if parts.head is not None:
        graph.save(parts.head, args.out / graph.HEAD_FILE)
    graph.save(parts.tail, args.out / graph.TAIL_FILE)


def _wire(args: argparse.Namespace, tensor: str) -> str:
    """The wire datatype of cut ``tensor``: ``--wire-dtype``, but the inputs cut sends the
    request's inputs as they are."""
    return "" if tensor == graph.INPUTS_CUT else str(args.wire_dtype)


def _file_part(tensor: str) -> str:
    """``tensor`` as part of a file or model name (letters, digits, ``_.-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tensor).lstrip(".") or "_"


def _cuts(model: Any, args: argparse.Namespace) -> None:
    """Heads (device/) and tails (server/, a model repository) of every cut, and the
    ``[partition.cuts]`` table naming them (docs/partition.md "Re-planning")."""
    name = args.name or args.model.stem
    if len(set(args.cut)) != len(args.cut):
        raise ConfigError("--cut: a cut is given twice")
    device, server = args.out / "device", args.out / "server"
    device.mkdir(parents=True, exist_ok=True)
    lines = ["[partition.cuts]"]
    for tensor in args.cut:
        parts = graph.split(model, tensor, _wire(args, tensor))
        tail = name if parts.head is None else f"{name}_{_file_part(tensor)}"
        (server / tail / "1").mkdir(parents=True, exist_ok=True)
        graph.save(parts.tail, server / tail / "1" / "model.onnx")
        entry = f'model = "{tail}"'
        if parts.head is not None:
            head = f"head_{_file_part(tensor)}.onnx"
            graph.save(parts.head, device / head)
            entry = f'head = "{head}", {entry}'
        lines.append(f"{json.dumps(tensor)} = {{ {entry} }}")
    sys.stdout.write("\n".join(lines) + "\n")


def _profile_and_plan(model: Any, args: argparse.Namespace) -> None:
    if args.profile is not None:
        if args.profile_out:
            raise ConfigError("--profile reads a profile, --profile-out writes one: not both")
        mine = _read_profile(args.profile, "--profile")
    else:
        mine = profile(
            args.model,
            _feed(model, args),
            executor=args.executor,
            threads=args.threads,
            runs=args.runs,
            every=args.every,
            wire_dtype=args.wire_dtype,
        )
    if args.profile_out:
        data = (json.dumps(mine.to_json(), indent=2) + "\n").encode()
        write_atomic(args.profile_out, lambda f: f.write(data))
    if not args.explain:
        return
    if args.server_profile:
        theirs = _read_profile(args.server_profile)
        server = f"profile {args.server_profile} ({theirs.executor}, {theirs.threads} threads)"
    else:
        theirs = mine
        server = "this machine's own profile stands in for the server's (no --server-profile)"
    limit = _cpu_limit(args)
    link, source = _link(args)
    table = cost_table(
        mine,
        theirs,
        args.statistic,
        request_cpu_s=args.request_cpu_ms / 1000,
        byte_cost_s=args.byte_cost_ns * 1e-9,
    )
    result = plan(table, link, args.objective, args.byte_cost_ns * 1e-9, args.margin, limit)
    noisy = noisy_heads(mine)
    if args.json:
        _write(explain_json(result, link, source, server, args.statistic, noisy, limit), True)
    else:
        _write(explain_text(result, link, source, server, args.statistic, noisy, limit), False)


def _cpu_limit(args: argparse.Namespace) -> CpuLimit | None:
    """The device's CPU limit for ``--statistic quota`` (None for the other statistics).

    Raises:
        ConfigError: --cpu-limit does not parse, or is auto and this process has no quota;
            or a per-request cost is negative.
    """
    if args.request_cpu_ms < 0 or args.byte_cost_ns < 0:
        raise ConfigError("--request-cpu-ms and --byte-cost-ns must be >= 0")
    if args.statistic != "quota":
        return None
    if args.cpu_limit != "auto":
        return CpuLimit.parse(args.cpu_limit)
    found = detect()
    if found is None:
        raise ConfigError(
            "--statistic quota: this process runs under no CPU quota (cgroup cpu.max or "
            "cpu.cfs_quota_us); give the device's as --cpu-limit QUOTA_MS/PERIOD_MS"
        )
    return found
