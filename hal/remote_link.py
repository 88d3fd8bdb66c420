"""The link to a KServe v2 server, measured continuously: what the ``remote`` executor's real
calls take, and small probe calls that run no model.

A call carrying B bytes (request tensors plus answered tensors) takes

    round trip + B * 8 / bandwidth + the server's own time

so a call that carries a payload gives the bandwidth once the round trip and the server's
time are taken off — the *least* round trip of the last ``MIN_RTT_WINDOW_S`` (a probe that
waited for a busy CPU or a queue read more than the payload call paid: taking the average
off read 25 Mbit/s as up to 225 on a real split), the average where none is that recent —
and a call that carries almost nothing (``LinkEstimator.record`` with fewer than
``MIN_TRANSFER_BYTES``) gives the round trip once its few bytes' transfer at the bandwidth
measured so far is taken off (at 0.1 Mbit/s, 4 KiB is 0.33 s: counted as round trip it
would make every remote cut look that much slower).

The server's time is what the server itself measured, where known: the re-planner reads the
tail model's statistics on the server (KServe ModelStatistics, which edged and Triton both
answer: successful requests and their summed time, queueing included) and hands the mean
time per request since its last look to ``set_server_time``; a call of that tail
(``record(..., tail=...)``) takes it off. Without it (no re-planner, a server that refuses
statistics, no request there yet), the tail's profiled single-request latency (``server_s``)
stands in; a server that batches our calls with others' spends more than that per call, and
the bandwidth would read low by the difference. The device's end of each cut is kept beside
it: the head's time as served (``head_s`` of every call, ``cut_times``), which the
re-planner compares with the offline profile. All are moving averages over *time*
(``half_life_s``), not over samples: the estimate reflects the last half second or so whether ten
calls or a thousand came in it. The bandwidth is averaged as seconds per bit (a call whose
transfer rounds to nothing does not make it infinite).

One estimator per server address, shared by every model and copy that calls it
(``estimator_for``): a link belongs to the process and the address, not to one model's copy,
so a re-planned cut or a failover keeps its figures. The estimators are thread-safe: the
executor's worker threads record, the metrics thread and the re-planner read.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc

#: a call carrying fewer bytes than this measures the round trip, not the bandwidth
MIN_TRANSFER_BYTES = 4096
#: the weight of what an estimate knew halves every this many seconds
DEFAULT_HALF_LIFE_S = 0.25
#: the model name a probe asks for: no server has it, so it answers NOT_FOUND at once
PROBE_MODEL = "edged-link-probe"
#: a transfer shorter than this is counted as this (a bandwidth sample is never infinite)
_MIN_TRANSFER_S = 1e-6
#: a payload's transfer is its call's time less the *least* round trip of this window (BBR's
#: min_rtt): a round-trip sample that waited for a busy CPU or a queue is not the fixed cost
#: of the payload call
MIN_RTT_WINDOW_S = 2.0


@dataclass(frozen=True)
class LinkSnapshot:
    """The link to one server as measured so far."""

    address: str
    rtt_s: float | None
    """Estimated round trip, seconds (None: nothing measured yet)."""
    bandwidth_bps: float | None
    """Estimated bandwidth, bits per second (None: no payload measured yet)."""
    calls: int
    """Calls recorded (real calls and probes)."""
    bytes_sent: int
    """Tensor bytes sent in those calls."""
    bytes_received: int
    """Tensor bytes answered."""
    seconds: float
    """Time those calls took, summed."""
    updated_at: float | None
    """Monotonic time of the last sample (None: none yet)."""
    bandwidth_at: float | None = None
    """Monotonic time of the last payload sample (None: none yet)."""
    least_rtt_s: float | None = None
    """The least round trip of the last ``MIN_RTT_WINDOW_S`` (None: no sample that recent)."""


class WindowMin:
    """The least sample of the last ``window_s`` seconds (not thread-safe: its owner's lock
    guards it); None when none is that recent."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, sample: float, now: float) -> None:
        while self._samples and self._samples[-1][1] >= sample:
            self._samples.pop()  # never the least again: a smaller, newer one is here
        self._samples.append((now, sample))

    def value(self, now: float) -> float | None:
        while self._samples and self._samples[0][0] < now - self._window_s:
            self._samples.popleft()
        return self._samples[0][1] if self._samples else None


def sample_weight(since_s: float, half_life_s: float) -> float:
    """What a new sample weighs in a moving average over time whose last sample came
    ``since_s`` seconds ago: what ``half_life_s`` leaves of the old value, taken away."""
    return float(1.0 - 0.5 ** (since_s / half_life_s))


class TimeAverage:
    """An exponentially weighted moving average over time (not thread-safe: its owner's lock
    guards it): a sample's weight is what the half-life left of the old value's since the
    last sample."""

    def __init__(self, half_life_s: float) -> None:
        self._half_life_s = half_life_s
        self.value: float | None = None
        self._at = 0.0

    def add(self, sample: float, now: float) -> None:
        if self.value is None:
            self.value = sample
        else:
            weight = sample_weight(max(0.0, now - self._at), self._half_life_s)
            self.value += weight * (sample - self.value)
        self._at = now


@dataclass(frozen=True)
class CutTimes:
    """Both ends of one cut through a link, as served (each None: nothing measured yet)."""

    head_s: float | None
    """The head's time per call on the device, as served (moving average)."""
    head_at: float | None
    """Monotonic time of the last head sample."""
    server_s: float | None
    """The server's own time per request on the tail, from its statistics."""
    server_at: float | None
    """Monotonic time it was last set."""


class _Cut:
    def __init__(self, half_life_s: float) -> None:
        self.head = TimeAverage(half_life_s)
        self.head_at: float | None = None
        self.server_s: float | None = None
        self.server_at: float | None = None


def tail_key(model: str, version: str = "") -> str:
    """How a cut is named in an estimator: its tail on the server."""
    return f"{model}:{version}" if version else model


class LinkEstimator:
    """Round trip and bandwidth of one link, from the calls made over it (thread-safe)."""

    def __init__(
        self,
        address: str = "",
        *,
        half_life_s: float = DEFAULT_HALF_LIFE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s {half_life_s!r} must be > 0")
        self.address = address
        self._clock = clock
        self._lock = threading.Lock()
        self._rtt = TimeAverage(half_life_s)
        self._least_rtt = WindowMin(MIN_RTT_WINDOW_S)
        self._seconds_per_bit = TimeAverage(half_life_s)
        self._calls = 0
        self._sent = 0
        self._received = 0
        self._seconds = 0.0
        self._updated: float | None = None
        self._bandwidth_at: float | None = None
        self._half_life_s = half_life_s
        self._cuts: dict[str, _Cut] = {}

    def record(
        self,
        sent: int,
        received: int,
        seconds: float,
        server_s: float = 0.0,
        *,
        tail: str = "",
        head_s: float | None = None,
    ) -> None:
        """One call: ``sent`` and ``received`` tensor bytes, ``seconds`` from send to answer,
        of which ``server_s`` the server spent on the model (its profile; 0: unknown, or a
        probe). ``tail`` (``tail_key``): the server's measured time for that tail, when
        known, replaces ``server_s``; the call's head took ``head_s`` here."""
        if seconds < 0 or sent < 0 or received < 0 or not math.isfinite(seconds):
            return  # a clock that stepped back; nothing to learn
        now = self._clock()
        payload = sent + received
        with self._lock:
            cut = self._cut(tail) if tail else None
            if cut is not None:
                if cut.server_s is not None:
                    server_s = cut.server_s
                if head_s is not None and head_s >= 0 and math.isfinite(head_s):
                    cut.head.add(head_s, now)
                    cut.head_at = now
            wire_s = max(0.0, seconds - max(0.0, server_s))
            self._calls += 1
            self._sent += sent
            self._received += received
            self._seconds += seconds
            self._updated = now
            per_bit = self._seconds_per_bit.value
            if payload < MIN_TRANSFER_BYTES:
                # what the few bytes took at the bandwidth known so far is not round trip
                rtt_s = max(0.0, wire_s - payload * 8 * (per_bit or 0.0))
                self._rtt.add(rtt_s, now)
                self._least_rtt.add(rtt_s, now)
                return
            least = self._least_rtt.value(now)
            rtt = least if least is not None else (self._rtt.value or 0.0)
            transfer = max(_MIN_TRANSFER_S, wire_s - rtt)
            self._seconds_per_bit.add(transfer / (payload * 8), now)
            self._bandwidth_at = now

    def _cut(self, tail: str) -> _Cut:
        found = self._cuts.get(tail)
        if found is None:
            found = self._cuts[tail] = _Cut(self._half_life_s)
        return found

    def set_server_time(self, tail: str, seconds: float) -> None:
        """The server's own time per request on ``tail`` (``tail_key``), from its statistics:
        taken off that tail's calls from now on instead of its profiled time."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        now = self._clock()
        with self._lock:
            cut = self._cut(tail)
            cut.server_s = seconds
            cut.server_at = now

    def cut_times(self, tail: str) -> CutTimes:
        """Both ends of the cut whose tail is ``tail`` (``tail_key``), as measured so far."""
        with self._lock:
            cut = self._cuts.get(tail)
            if cut is None:
                return CutTimes(None, None, None, None)
            return CutTimes(cut.head.value, cut.head_at, cut.server_s, cut.server_at)

    def snapshot(self) -> LinkSnapshot:
        """The estimate now (a copy)."""
        with self._lock:
            per_bit = self._seconds_per_bit.value
            return LinkSnapshot(
                address=self.address,
                rtt_s=self._rtt.value,
                bandwidth_bps=None if per_bit is None else 1.0 / per_bit,
                calls=self._calls,
                bytes_sent=self._sent,
                bytes_received=self._received,
                seconds=self._seconds,
                updated_at=self._updated,
                bandwidth_at=self._bandwidth_at,
                least_rtt_s=self._least_rtt.value(self._clock()),
            )


_estimators: dict[str, LinkEstimator] = {}
_estimators_lock = threading.Lock()


def estimator_for(address: str) -> LinkEstimator:
    """The process's estimator of the link to ``address`` (made on first use)."""
    with _estimators_lock:
        found = _estimators.get(address)
        if found is None:
            found = _estimators[address] = LinkEstimator(address)
        return found


def snapshots() -> list[LinkSnapshot]:
    """Every link measured in this process, by address (the metrics thread calls this)."""
    with _estimators_lock:
        estimators = sorted(_estimators.items())
    return [e.snapshot() for _, e in estimators]


class ProbeError(Exception):
    """A probe call was answered with something other than 'unknown model'."""


def probe(
    channel: grpc.Channel,
    size: int = 0,
    *,
    timeout_s: float = 10.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> float:
    """Seconds of one ModelInfer call carrying ``size`` bytes on a model name no server has:
    the server reads the whole request before it answers NOT_FOUND, so the call takes the
    round trip plus the payload's transfer. Runs no model; works against edged and Triton.

    Raises:
        ProbeError: the server could not be reached or answered otherwise (the gRPC status
            and details in the message).
    """
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    message = pb.ModelInferRequest(model_name=PROBE_MODEL)
    if size:
        message.inputs.add(name="probe", datatype="UINT8", shape=[size])
        message.raw_input_contents.append(bytes(size))
    started = time.perf_counter()
    try:
        stub.ModelInfer(message, timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as e:
        # edged: NOT_FOUND; Triton: NOT_FOUND or UNAVAILABLE "Request for unknown model"
        details = e.details() or ""
        if not (e.code() is grpc.StatusCode.NOT_FOUND or "unknown model" in details):
            raise ProbeError(f"link probe: {e.code().name}: {details}") from e
    return time.perf_counter() - started


def served_requests(
    channel: grpc.Channel,
    model: str,
    version: str = "",
    *,
    timeout_s: float = 10.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[int, int]:
    """(successful requests, their summed nanoseconds) the server has counted for ``model``
    (every version when ``version`` is ""): KServe ModelStatistics, which edged and Triton
    answer alike; the time is the server's own, from a request's arrival to its answer
    (queueing and batching included, the wire not).

    Raises:
        ProbeError: the server could not be reached or refused (status and details named).
    """
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    try:
        reply = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model, version=version),
            timeout=timeout_s,
            metadata=metadata,
        )
    except grpc.RpcError as e:
        raise ProbeError(f"statistics of '{model}': {e.code().name}: {e.details() or ''}") from e
    count = sum(int(m.inference_stats.success.count) for m in reply.model_stats)
    ns = sum(int(m.inference_stats.success.ns) for m in reply.model_stats)
    return count, ns
