"""Per model-version statistics in Triton's shape: counts and cumulative durations."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edged.serving.scheduler import Execution


@dataclass
class Duration:
    """How many times something happened and how long it took in total."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class BatchStats:
    """Executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Counters for one model version; ``record_*`` are safe from any thread."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_success(
        self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One request answered; compute durations are those of the batch it ran in."""
        with self._lock:
            self.last_inference_ms = time.time_ns() // 1_000_000
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)

    def record_execution(self, execution: Execution) -> None:
        """One batch of ``execution.batch_size`` items ran on the model."""
        with self._lock:
            self.inference_count += execution.batch_size
            self.execution_count += 1
            batch = self.batches.setdefault(execution.batch_size, BatchStats())
            batch.compute_input.add(execution.input_ns)
            batch.compute_infer.add(execution.infer_ns)
            batch.compute_output.add(execution.output_ns)

    def record_failure(self, total_ns: int) -> None:
        """One request that failed after it reached the model."""
        with self._lock:
            self.fail.add(total_ns)
