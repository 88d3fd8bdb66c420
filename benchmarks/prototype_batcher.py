"""The minimal prototypes' shared core (benchmarks/prototype_zmq.py, prototype_grpc.py): what
edged's hot path would be with nothing but the essentials, so the headroom stays visible.

- ``workers`` ONNX Runtime sessions of one intra-op thread each, one worker thread per session;
- a condition-variable batcher: a worker takes what is queued, up to ``max_batch``, no delay;
- a lone request on an idle batcher (nothing queued, every worker waiting) runs inline on the
  caller's thread, on its own session of ``inline_threads`` threads (not spinning): no hop.

Not edged code and not a library: no priorities, timeouts, cancellation or statistics.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

Outputs = list[np.ndarray]
Done = Callable[[Outputs], None]

KSERVE_DTYPE = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}
NUMPY_DTYPE = {name: dtype for dtype, name in KSERVE_DTYPE.items()}


def session(path: Path, threads: int, *, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Batcher:
    """Thread-safe: ``submit`` may be called from any thread."""

    def __init__(
        self, model: Path, workers: int = 2, max_batch: int = 8, inline_threads: int = 2
    ) -> None:
        sessions = [session(model, 1) for _ in range(workers)]
        self._inline = session(model, inline_threads, spinning=False) if inline_threads else None
        self.input_name = sessions[0].get_inputs()[0].name
        self.output_names = [o.name for o in sessions[0].get_outputs()]
        self._max_batch = max_batch
        self._queue: deque[tuple[np.ndarray, Done]] = deque()
        self._cv = threading.Condition()
        self._idle = 0
        self._inline_busy = False
        self._workers = workers
        self._closed = False
        self.batches = self.items = 0
        for s in sessions:
            threading.Thread(target=self._work, args=(s,), daemon=True).start()

    def submit(self, x: np.ndarray, done: Done, *, may_inline: bool = True) -> Outputs | None:
        """Run ``x`` inline and return its outputs when the batcher is idle (and the caller
        allows it); otherwise queue it and return None: ``done(outputs)`` is called later on a
        worker thread."""
        with self._cv:
            inline = (
                may_inline
                and self._inline is not None
                and not self._queue
                and not self._inline_busy
                and self._idle == self._workers
            )
            if inline:
                self._inline_busy = True
            else:
                self._queue.append((x, done))
                self._cv.notify()
        if not inline:
            return None
        assert self._inline is not None
        try:
            return self._inline.run(None, {self.input_name: x})  # type: ignore[no-any-return]
        finally:
            with self._cv:
                self._inline_busy = False
                if self._queue:
                    self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _work(self, s: ort.InferenceSession) -> None:
        while True:
            with self._cv:
                self._idle += 1
                while not self._queue and not self._closed:
                    self._cv.wait()
                self._idle -= 1
                if self._closed:
                    return
                take = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(take)]
            xs = batch[0][0] if take == 1 else np.concatenate([x for x, _ in batch])
            outs = s.run(None, {self.input_name: xs})
            self.batches += 1
            self.items += take
            row = 0
            for x, done in batch:
                rows = x.shape[0]
                done([o[row : row + rows] for o in outs])
                row += rows
