"""Per model-version statistics in Triton's shape (counts and cumulative durations) plus
fixed-bucket histograms, read by ModelStatistics and the Prometheus endpoint at scrape time so
the request path pays only a few additions."""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edged.core.errors import EdgedError
from edged.core.status import count_by_code

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


#: seconds
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Histogram:
    """Counts per upper bound (Prometheus ``le`` buckets, not cumulative here) and the sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(``le``, cumulative count) pairs, ending with +Inf."""
        pairs = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs


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
