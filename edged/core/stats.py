"""Statistics as every frontend reads them: Triton-shaped counts and cumulative durations,
fixed-bucket histograms, and the immutable snapshot of one model version's counters (no I/O,
no locks: serving takes its own lock while it copies)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from edged.core.errors import EdgedError


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

    def copy(self) -> Histogram:
        """An independent copy."""
        copy = Histogram(self.bounds)
        copy.counts = list(self.counts)
        copy.total = self.total
        return copy

    def cumulative(self) -> list[tuple[str, int]]:
        """(``le``, cumulative count) pairs, ending with +Inf."""
        pairs = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs


@dataclass(frozen=True)
class BatchTimes:
    """Cumulative compute durations of the executions of one batch size."""

    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class StatisticsSnapshot:
    """A consistent copy of one served model version's counters (what ModelStatistics and the
    Prometheus endpoint report)."""

    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: dict[int, BatchTimes]
    failures_by_error: dict[type[EdgedError], int]
    """Failed requests by the domain error they failed with (the OTA health rule reads these)."""
    failures_by_code: dict[str, int]
    """The same failures by wire status code (what the frontends report)."""
    queue_seconds: Histogram
    request_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
