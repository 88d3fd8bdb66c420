"""How long one huge ModelInfer holds up other clients: a request of N one-byte inputs is sent
while another client calls ServerLive every 5 ms; prints the slowest ServerLive and the big
request's status and duration as one JSON object; never pass/fail.

    .venv/bin/python benchmarks/loop_stall.py [--inputs 200000] [--max-inputs 300000]

``--max-inputs`` sets limits.max_inputs for the daemon (0: the default, which refuses the
request before decoding it); above N the request is decoded, on a worker thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.daemon_process import DaemonProcess, copy_example_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=200_000)
    parser.add_argument("--max-inputs", type=int, default=0)
    args = parser.parse_args()
    env = {"EDGED_LIMITS_MAX_INPUTS": str(args.max_inputs)} if args.max_inputs else {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_example_models(Path(tmp) / "models")
        daemon = DaemonProcess(
            ["--models", str(repo), "--grpc-address", "127.0.0.1:0"], env=env
        )
        try:
            address = daemon.wait_live()
            daemon.wait_for("server_ready", timeout=60)
            big = pb.ModelInferRequest(model_name="digits")
            for i in range(args.inputs):
                big.inputs.add(name=f"i{i}", datatype="UINT8", shape=[1])
                big.raw_input_contents.append(b"\0")
            outcome: dict[str, object] = {}
            done = threading.Event()

            def send() -> None:
                options = [("grpc.max_send_message_length", 1 << 30)]
                with grpc.insecure_channel(address, options=options) as channel:
                    started = time.monotonic()
                    try:
                        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(big, timeout=300)
                        outcome["status"] = "OK"
                    except grpc.RpcError as e:
                        outcome["status"] = e.code().name
                    outcome["seconds"] = round(time.monotonic() - started, 3)
                done.set()

            latencies = []
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stub.ServerLive(pb.ServerLiveRequest())
                sender = threading.Thread(target=send)
                sender.start()
                while not done.is_set():
                    started = time.monotonic()
                    stub.ServerLive(pb.ServerLiveRequest())
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.005)
                sender.join()
        finally:
            daemon.stop()
    print(
        json.dumps(
            {
                "inputs": args.inputs,
                "limits.max_inputs": args.max_inputs or "default",
                "big_request": outcome,
                "server_live_calls": len(latencies),
                "server_live_max_s": round(max(latencies), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
