"""Minimal ZeroMQ prototype server: plain pyzmq, one I/O thread polling a ROUTER, the
condition-variable batcher of prototype_batcher.py (2 x 1-thread sessions), a lone request run
inline on the I/O thread. It speaks edged's ZeroMQ wire format (docs/zmq-protocol.md: a JSON
header frame, one raw frame per tensor), so edged's clients drive it unchanged.

    .venv/bin/python benchmarks/prototype_zmq.py MODEL.onnx [--workers 2] [--inline-threads 2]
        [--max-batch 8]

Prints {"zmq": ENDPOINT} on stdout once bound; serves until SIGTERM. A benchmark baseline only
(benchmarks/serving.py --servers proto-zmq): no validation beyond what decoding needs.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from prototype_batcher import KSERVE_DTYPE, NUMPY_DTYPE, Batcher, Outputs

REPLY_ENDPOINT = "inproc://replies"


class Server:
    def __init__(self, model: Path, workers: int, inline_threads: int, max_batch: int) -> None:
        self.batcher = Batcher(
            model, workers=workers, max_batch=max_batch, inline_threads=inline_threads
        )
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.replies = self.context.socket(zmq.PULL)
        self.replies.bind(REPLY_ENDPOINT)
        self._local = threading.local()
        self._specs: dict[tuple[Any, ...], bytes] = {}
        self._stop = threading.Event()
        self.in_flight = 0  # requests handed to a worker and not yet replied (I/O thread only)

    def _reply_frames(self, identity: Any, rid: bytes, outs: Outputs) -> list[Any]:
        key = tuple((o.dtype, o.shape) for o in outs)
        spec = self._specs.get(key)
        if spec is None:
            spec = json.dumps(
                [
                    {"name": n, "datatype": KSERVE_DTYPE[o.dtype], "shape": list(o.shape)}
                    for n, o in zip(self.batcher.output_names, outs, strict=True)
                ],
                separators=(",", ":"),
            ).encode()
            self._specs[key] = spec
        header = b'{"v":1,"id":' + rid + b',"ok":true,"version":"1","outputs":' + spec + b"}"
        return [identity, header, *(np.ascontiguousarray(o) for o in outs)]

    def _from_worker(self, identity: Any, rid: bytes) -> Any:
        def done(outs: Outputs) -> None:  # on a worker thread: its own PUSH to the I/O thread
            push = getattr(self._local, "push", None)
            if push is None:
                push = self._local.push = self.context.socket(zmq.PUSH)
                push.connect(REPLY_ENDPOINT)
            push.send_multipart(self._reply_frames(identity, rid, outs), copy=False)

        return done

    def _handle(self, frames: list[zmq.Frame], alone: bool) -> None:
        identity, head, *tensors = frames
        header = json.loads(head.bytes)
        rid = json.dumps(str(header.get("id", ""))).encode()
        if header.get("op") != "infer":
            result = b'{"live":true,"ready":true}'
            reply = b'{"v":1,"id":' + rid + b',"ok":true,"result":' + result + b"}"
            self.router.send_multipart([identity, reply], copy=False)
            return
        spec = header["inputs"][0]
        x = np.frombuffer(tensors[0].buffer, NUMPY_DTYPE[spec["datatype"]]).reshape(spec["shape"])
        # inline only for a request that came alone with nothing else in flight: an I/O thread
        # busy running a model under load would stop taking requests, and batches would not form
        outs = self.batcher.submit(
            x, self._from_worker(identity, rid), may_inline=alone and not self.in_flight
        )
        if outs is not None:  # ran inline on this (the I/O) thread
            self.router.send_multipart(self._reply_frames(identity, rid, outs), copy=False)
        else:
            self.in_flight += 1

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if self.replies in ready:
                while True:
                    try:
                        out = self.replies.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.router.send_multipart(out, copy=False)
                    self.in_flight -= 1
            if self.router in ready:
                arrived = []
                while True:
                    try:
                        arrived.append(self.router.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                for frames in arrived:
                    self._handle(frames, alone=len(arrived) == 1)
        self.batcher.close()

    def stop(self, *_: object) -> None:
        self._stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--inline-threads", type=int, default=2, help="0: never run inline")
    parser.add_argument("--max-batch", type=int, default=8, help="items per batch at most")
    args = parser.parse_args()
    server = Server(args.model, args.workers, args.inline_threads, args.max_batch)
    signal.signal(signal.SIGTERM, server.stop)
    print(json.dumps({"zmq": f"tcp://127.0.0.1:{server.port}"}), flush=True)
    server.serve()


if __name__ == "__main__":
    main()
