"""What an over-the-air swap costs the clients: request latency while digits is updated
version after version, against steady state, and how long each swap takes.

A daemon serves a copy of models/digits with OTA pointed at a fleet repository served on
127.0.0.1 (tests/tuf_fixtures.py); client threads send digits requests back to back over gRPC.
Each round publishes the next version and runs StartUpdate(wait) on it. Prints one JSON
object (never pass/fail):

- ``swap_seconds``: the daemon's own figure (``ota_switched``): load, warm-up, self-test,
  switch and drain of the old version;
- ``update_seconds``: StartUpdate to COMMITTED as the caller sees it (download, staging,
  swap, and the health window of ``--window`` seconds);
- client latency (ms) p50/p99/max in steady state (before any update), during the updates,
  and in the half second around each switch; ``failed`` counts failed requests.

    .venv/bin/python benchmarks/swap.py [--rounds 5] [--clients 2] [--window 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged._proto.edged.v1 import management_pb2 as mpb
from edged._proto.edged.v1 import management_pb2_grpc as mpb_grpc
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from edged.core.types import InferRequest
from edged.frontends.kserve_codec import request_to_proto
from tests.daemon_process import EXAMPLE_MODELS, DaemonProcess
from tests.tuf_fixtures import ServedFleetRepo, build_digits_bundle


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"n": 0}
    a = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
    }


def main() -> None:  # noqa: PLR0915 -- one linear script: set up, load, update rounds, report
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--window", type=float, default=0.5, help="ota.health_window_s")
    parser.add_argument("--steady", type=float, default=3.0, help="seconds of steady state")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edged-swap-"))
    models = tmp / "models"
    shutil.copytree(
        EXAMPLE_MODELS / "digits", models / "digits", ignore=shutil.ignore_patterns("*.npy")
    )
    fleet = ServedFleetRepo(tmp / "fleet")
    sample = np.load(EXAMPLE_MODELS / "digits" / "sample.npy")[:1]
    daemon = DaemonProcess(
        ["--models", str(models), "--grpc-address", "127.0.0.1:0"],
        env={
            "EDGED_OTA_REPOSITORY_URL": fleet.url,
            "EDGED_OTA_ROOT": str(fleet.root_path),
            "EDGED_OTA_STATE_DIR": str(tmp / "state"),
            "EDGED_OTA_HEALTH_WINDOW_S": str(args.window),
            "EDGED_OTA_MIN_FREE_BYTES": str(1 << 20),
            "EDGED_LOG_LEVEL": "info",
        },
    )
    results: list[tuple[float, float, bool]] = []  # (started, ms, ok)
    stop = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            message = request_to_proto(InferRequest("digits", {"input": sample}))
            while not stop.is_set():
                started = time.monotonic()
                try:
                    stub.ModelInfer(message, timeout=10)
                    ok = True
                except grpc.RpcError:
                    ok = False
                results.append((started, (time.monotonic() - started) * 1000, ok))

    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # connections up, caches warm
        steady_from = time.monotonic()
        time.sleep(args.steady)
        steady_to = time.monotonic()
        management = mpb_grpc.ManagementStub(grpc.insecure_channel(daemon.address))  # type: ignore[no-untyped-call]
        updates: list[tuple[float, float]] = []
        update_seconds = []
        for version in range(2, 2 + args.rounds):
            fleet.publish(build_digits_bundle(tmp / "bundles", version))
            started = time.monotonic()
            reply = management.StartUpdate(
                mpb.StartUpdateRequest(model="digits", version=str(version), wait=True),
                timeout=120,
            )
            ended = time.monotonic()
            if mpb.UpdateState.Name(reply.status.state) != "UPDATE_STATE_COMMITTED":
                raise SystemExit(f"update to {version} ended {reply.status}")
            updates.append((started, ended))
            update_seconds.append(round(ended - started, 4))
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(15)
        switches = [
            (e["_t"] + daemon.started, e["swap_seconds"])
            for e in daemon.events
            if e.get("event") == "ota_switched"
        ]
    finally:
        stop.set()
        daemon.stop()
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)

    def within(spans: list[tuple[float, float]]) -> list[float]:
        return [ms for s, ms, ok in results if ok and any(a <= s <= b for a, b in spans)]

    around = [(at - swap - 0.25, at + 0.25) for at, swap in switches]
    print(
        json.dumps(
            {
                "benchmark": "ota swap (digits, StartUpdate under load)",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "python": platform.python_version(),
                "clients": args.clients,
                "rounds": args.rounds,
                "health_window_s": args.window,
                "requests": len(results),
                "failed": sum(1 for *_, ok in results if not ok),
                "swap_seconds": [round(s, 4) for _, s in switches],
                "update_seconds": update_seconds,
                "steady": percentiles(within([(steady_from, steady_to)])),
                "during_updates": percentiles(within(updates)),
                "around_switch": percentiles(within(around)),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
