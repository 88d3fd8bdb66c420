"""Per model-version statistics in Triton's shape (counts and cumulative durations) plus
fixed-bucket histograms, read by ModelStatistics and the Prometheus endpoint at scrape time so
the request path pays only a few additions."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edged.core.errors import EdgedError
from edged.core.stats import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    BatchTimes,
    Duration,
    Histogram,
    StatisticsSnapshot,
)
from edged.core.status import count_by_code

if TYPE_CHECKING:
    from edged.serving.scheduler import Execution


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
    failures_by_error: dict[type[EdgedError], int] = field(default_factory=dict)
    """Failed requests by the domain error they failed with (wire codes: ``failures_by_code``)."""
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
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
            self.queue_seconds.observe(queue_ns / 1e9)
            self.request_seconds.observe(total_ns / 1e9)

    def record_execution(self, execution: Execution) -> None:
        """One batch of ``execution.batch_size`` items ran on the model."""
        with self._lock:
            self.inference_count += execution.batch_size
            self.execution_count += 1
            batch = self.batches.setdefault(execution.batch_size, BatchStats())
            batch.compute_input.add(execution.input_ns)
            batch.compute_infer.add(execution.infer_ns)
            batch.compute_output.add(execution.output_ns)
            self.batch_size.observe(execution.batch_size)
            self.compute_seconds.observe(
                (execution.input_ns + execution.infer_ns + execution.output_ns) / 1e9
            )

    def record_failure(self, total_ns: int, error: type[EdgedError]) -> None:
        """One request that failed after it reached the model, with the type of its error."""
        with self._lock:
            self.fail.add(total_ns)
            self.failures_by_error[error] = self.failures_by_error.get(error, 0) + 1

    @property
    def failures_by_code(self) -> dict[str, int]:
        """``failures_by_error`` by status code (``edged.core.status``): the frontends' view.
        Read it under ``_lock``, as every counter here."""
        return count_by_code(self.failures_by_error)

    def snapshot(self, name: str, version: int) -> StatisticsSnapshot:
        """A consistent copy of every counter (the only reader of this object's lock outside
        its writers)."""

        def d(x: Duration) -> Duration:
            return Duration(x.count, x.ns)

        with self._lock:
            return StatisticsSnapshot(
                name=name,
                version=version,
                last_inference_ms=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                success=d(self.success),
                fail=d(self.fail),
                queue=d(self.queue),
                compute_input=d(self.compute_input),
                compute_infer=d(self.compute_infer),
                compute_output=d(self.compute_output),
                batches={
                    size: BatchTimes(d(b.compute_input), d(b.compute_infer), d(b.compute_output))
                    for size, b in self.batches.items()
                },
                failures_by_error=dict(self.failures_by_error),
                failures_by_code=self.failures_by_code,
                queue_seconds=self.queue_seconds.copy(),
                request_seconds=self.request_seconds.copy(),
                compute_seconds=self.compute_seconds.copy(),
                batch_size=self.batch_size.copy(),
            )
