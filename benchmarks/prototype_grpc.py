"""Minimal gRPC prototype servers speaking KServe v2 ModelInfer (stock tritonclient drives them):

- ``sync``: grpcio's synchronous server; its handler threads (a pool of ``--handlers``) feed the
  condition-variable batcher of prototype_batcher.py (2 x 1-thread sessions) and block on an
  event; a lone request on an idle batcher runs inline on the handler thread;
- ``aio``: grpc.aio; the handler coroutine feeds the same batcher and awaits a future set from
  the worker thread; a lone request runs inline on the event loop;
- ``echo``, ``echo-sync``: grpc.aio / the sync server answering each ModelInfer with its own
  input tensor (no model): the cost of a Python gRPC frontend alone, against
  benchmarks/native_grpc/echo_server.cc.

    .venv/bin/python benchmarks/prototype_grpc.py {sync,aio,echo,echo-sync} [MODEL.onnx]

Prints {"grpc": ADDRESS} on stdout once bound; serves until SIGTERM. Benchmark baselines only
(benchmarks/serving.py --servers proto-grpc-sync,proto-grpc-aio; native_grpc/compare.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prototype_batcher import KSERVE_DTYPE, NUMPY_DTYPE, Batcher, Outputs

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc


def decode(request: Any) -> np.ndarray:
    tensor = request.inputs[0]
    return np.frombuffer(request.raw_input_contents[0], NUMPY_DTYPE[tensor.datatype]).reshape(
        tuple(tensor.shape)
    )


def encode(request: Any, names: list[str], outs: Outputs) -> Any:
    return pb.ModelInferResponse(
        model_name=request.model_name,
        model_version="1",
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=n, datatype=KSERVE_DTYPE[o.dtype], shape=o.shape
            )
            for n, o in zip(names, outs, strict=True)
        ],
        raw_output_contents=[o.tobytes() for o in outs],
    )


def echo(request: Any) -> Any:
    """The request's first input, returned as the only output."""
    tensor = request.inputs[0]
    return pb.ModelInferResponse(
        model_name=request.model_name,
        model_version="1",
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
            )
        ],
        raw_output_contents=[request.raw_input_contents[0]],
    )


class SyncServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, batcher: Batcher | None) -> None:
        self.batcher = batcher

    def ModelInfer(self, request: Any, context: Any) -> Any:
        if self.batcher is None:
            return echo(request)
        box: list[Outputs] = []
        ready = threading.Event()

        def done(outs: Outputs) -> None:
            box.append(outs)
            ready.set()

        outs = self.batcher.submit(decode(request), done)
        if outs is None:
            ready.wait()
            outs = box[0]
        return encode(request, self.batcher.output_names, outs)


class AioServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, batcher: Batcher | None) -> None:
        self.batcher = batcher

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if self.batcher is None:
            return echo(request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()

        def done(outs: Outputs) -> None:
            loop.call_soon_threadsafe(future.set_result, outs)

        outs = self.batcher.submit(decode(request), done)
        if outs is None:
            outs = await future
        return encode(request, self.batcher.output_names, outs)


def serve_sync(batcher: Batcher | None, handlers: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=handlers))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(SyncServicer(batcher), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"grpc": f"127.0.0.1:{port}"}), flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop(0)
    if batcher is not None:
        batcher.close()


async def serve_aio(batcher: Batcher | None) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(AioServicer(batcher), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"grpc": f"127.0.0.1:{port}"}), flush=True)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await server.stop(0)
    if batcher is not None:
        batcher.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["sync", "aio", "echo", "echo-sync"])
    parser.add_argument("model", type=Path, nargs="?", help="the .onnx file (not for echo)")
    parser.add_argument("--workers", type=int, default=2, help="1-thread sessions")
    parser.add_argument("--inline-threads", type=int, default=2, help="0: never run inline")
    parser.add_argument("--handlers", type=int, default=32, help="sync: handler threads")
    args = parser.parse_args()
    if args.mode == "echo":
        asyncio.run(serve_aio(None))
        return
    if args.mode == "echo-sync":
        serve_sync(None, args.handlers)
        return
    if args.model is None:
        parser.error(f"{args.mode} needs MODEL")
    batcher = Batcher(args.model, workers=args.workers, inline_threads=args.inline_threads)
    if args.mode == "sync":
        serve_sync(batcher, args.handlers)
    else:
        asyncio.run(serve_aio(batcher))


if __name__ == "__main__":
    main()
