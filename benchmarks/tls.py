"""What TLS costs: c1 latency and c16 throughput over gRPC, plaintext vs TLS vs mutual TLS
(and a bearer token on plaintext), in one run on one machine.

Four `edged serve` processes serve the same model at once, one per configuration; the
measurements rotate between them round by round (so a noisy neighbour hits all alike), and
the median of the rounds is reported. Clients are stock tritonclient.grpc.aio, one channel per
run (TLS is negotiated once per connection, so this measures the per-request cost of
encryption, which is what a steady client pays). Models: the repository's digits model (tiny:
per-request overhead dominates, the worst case for TLS) and, with --models cls,digits, the
PP-OCR classifier from benchmarks/serving.py.

    .venv/bin/python benchmarks/tls.py [--seconds 3] [--rounds 3] [--models digits] [--out F]

Besides throughput and latency it reports the daemon's CPU time per request (from /proc), a
figure far steadier than throughput on a machine shared with other work. Prints a table on
stderr and JSON on stdout. Never pass/fail; the target (at most 10% fewer
requests per second at c16 with TLS) is reported, not enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving import MODELS, Daemon, _cpu_name, _drive, build_repo, fetch_cls, sample

from tests import pki

CONFIGS = ("plain", "token", "tls", "mtls")


def make_pki(folder: Path) -> dict[str, Path]:
    ca = pki.issue("bench CA", ca=True)
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    server_cert, server_key = pki.issue("bench-server", ca, server=True).write(folder, "server")
    client_cert, client_key = pki.issue("bench-client", ca).write(folder, "client")
    return {
        "ca": folder / "ca.pem",
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


def daemon_env(config: str, files: dict[str, Path], tokens_file: Path) -> dict[str, str]:
    if config == "plain":
        return {}
    if config == "token":
        return {"EDGED_AUTH_TOKENS_FILE": str(tokens_file), "EDGED_AUTH_ANONYMOUS_ROLES": ""}
    env = {"EDGED_TLS_CERT_FILE": str(files["server_cert"])}
    env["EDGED_TLS_KEY_FILE"] = str(files["server_key"])
    if config == "mtls":
        env["EDGED_TLS_CLIENT_CA_FILE"] = str(files["ca"])
        env["EDGED_AUTH_IDENTITIES"] = "bench-client=infer"
        env["EDGED_AUTH_ANONYMOUS_ROLES"] = ""
    return env


async def load(
    config: str,
    address: str,
    files: dict[str, Path],
    token: str,
    model: str,
    concurrency: int,
    seconds: float,
) -> dict[str, float]:
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput

    kwargs: dict[str, Any] = {}
    if config in ("tls", "mtls"):
        kwargs = {"ssl": True, "root_certificates": str(files["ca"])}
    if config == "mtls":
        kwargs["private_key"] = str(files["client_key"])
        kwargs["certificate_chain"] = str(files["client_cert"])
    headers = {"authorization": f"Bearer {token}"} if config == "token" else None
    x = sample(model)
    async with aioclient.InferenceServerClient(address, **kwargs) as client:

        async def call(_: int) -> None:
            tensor = InferInput(MODELS[model]["input"], list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            await client.infer(model, [tensor], headers=headers)

        return await _drive(call, concurrency, seconds)


def check_cost(token: str, tokens_file: Path) -> dict[str, float]:
    """Microseconds per access check, in process (no network, little noise): what the
    interceptor adds to every request before any TLS."""
    import time

    from edged.security.access import AccessControl, Credentials
    from edged.security.tokens import TokenStore

    store = TokenStore(tokens_file)
    store.refresh()
    open_policy = AccessControl()
    with_tokens = AccessControl(tokens=store, anonymous_roles=frozenset())
    call = "/inference.GRPCInferenceService/ModelInfer"
    anonymous = Credentials("grpc", "ipv4:127.0.0.1:5000", local=True)
    bearer = Credentials("grpc", "ipv4:127.0.0.1:5000", local=True, token=token)
    out = {}
    for name, access, creds in (
        ("anonymous_us", open_policy, anonymous),
        ("token_us", with_tokens, bearer),
    ):
        n = 100_000
        started = time.perf_counter()
        for _ in range(n):
            access.check(call, creds)
        out[name] = round(1e6 * (time.perf_counter() - started) / n, 2)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is kept")
    parser.add_argument("--models", default="digits", help="digits and/or cls")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    models = args.models.split(",")
    report: dict[str, Any] = {
        "benchmark": "tls",
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "cpu": _cpu_name(),
        },
        "seconds_per_measurement": args.seconds,
        "rounds": args.rounds,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_pki(root)
        from edged.security.roles import Role
        from edged.security.tokens import add_token

        tokens_file = root / "tokens.json"
        token = add_token(tokens_file, "bench", [Role.INFER])
        report["access_check"] = check_cost(token, tokens_file)
        cls_path = fetch_cls() if "cls" in models else None
        repo = build_repo(root, cls_path) if cls_path else _digits_repo(root)
        daemons = {c: Daemon(repo, daemon_env(c, files, tokens_file)) for c in CONFIGS}
        try:
            for d in daemons.values():
                d.wait()
            for model in models:
                runs: dict[str, dict[str, list[dict[str, float]]]] = {
                    c: {"1": [], "16": []} for c in CONFIGS
                }
                for round_ in range(args.rounds):
                    for level in (1, 16):
                        for config in CONFIGS:
                            pid = daemons[config].proc.pid
                            cpu_before = cpu_seconds(pid)
                            result = asyncio.run(
                                load(
                                    config,
                                    daemons[config].grpc,
                                    files,
                                    token,
                                    model,
                                    level,
                                    args.seconds,
                                )
                            )
                            # the daemon's CPU per request: far less sensitive than
                            # throughput to other load on the machine
                            result["daemon_cpu_us_per_request"] = round(
                                1e6 * (cpu_seconds(pid) - cpu_before) / result["requests"], 1
                            )
                            runs[config][str(level)].append(result)
                            print(
                                f"{model} round {round_ + 1} {config:6} c={level:<3} {result}",
                                file=sys.stderr,
                            )
                report["models"][model] = _summary(runs)
            report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            for d in daemons.values():
                d.stop()
    _table(report)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _digits_repo(root: Path) -> Path:
    import shutil

    repo = root / "models"
    shutil.copytree(
        Path(__file__).resolve().parent.parent / "models" / "digits",
        repo / "digits",
        ignore=shutil.ignore_patterns("*.npy", "*.py"),
    )
    return repo


def _summary(runs: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config, levels in runs.items():
        out[config] = {
            level: {
                "infer_per_s": statistics.median(r["infer_per_s"] for r in results),
                "p50_ms": statistics.median(r["p50_ms"] for r in results),
                "p99_ms": statistics.median(r["p99_ms"] for r in results),
                "daemon_cpu_us_per_request": statistics.median(
                    r["daemon_cpu_us_per_request"] for r in results
                ),
                "rounds_infer_per_s": [r["infer_per_s"] for r in results],
                "rounds_p50_ms": [r["p50_ms"] for r in results],
            }
            for level, results in levels.items()
        }
    plain = out["plain"]
    for config in CONFIGS[1:]:
        c = out[config]
        c["c16_throughput_change_pct"] = round(
            100 * (c["16"]["infer_per_s"] / plain["16"]["infer_per_s"] - 1), 1
        )
        c["c1_p50_added_ms"] = round(c["1"]["p50_ms"] - plain["1"]["p50_ms"], 3)
        c["c16_daemon_cpu_change_pct"] = round(
            100
            * (c["16"]["daemon_cpu_us_per_request"] / plain["16"]["daemon_cpu_us_per_request"] - 1),
            1,
        )
    return out


def _table(report: dict[str, Any]) -> None:
    out = sys.stderr
    print(f"\naccess check, in process: {report['access_check']}", file=out)
    for model, entry in report["models"].items():
        print(f"\n{model} (median of {report['rounds']} rounds)", file=out)
        print(
            f"{'config':7} {'c1 p50 ms':>10} {'c1 p99 ms':>10} {'c16 infer/s':>12} "
            f"{'vs plain':>9} {'c16 CPU us/req':>15} {'vs plain':>9}",
            file=out,
        )
        for config, r in entry.items():
            change = r.get("c16_throughput_change_pct", 0.0)
            cpu_change = r.get("c16_daemon_cpu_change_pct", 0.0)
            print(
                f"{config:7} {r['1']['p50_ms']:>10} {r['1']['p99_ms']:>10} "
                f"{r['16']['infer_per_s']:>12} {change:>8}% "
                f"{r['16']['daemon_cpu_us_per_request']:>15} {cpu_change:>8}%",
                file=out,
            )


if __name__ == "__main__":
    main()
