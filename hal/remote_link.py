"""The link to a KServe v2 server, measured continuously: what the ``remote`` executor's real
calls take, and small probe calls that run no model.

A call carrying B bytes (request tensors plus answered tensors) takes

    round trip + B * 8 / bandwidth + the server's own time

so a call that carries almost nothing is a round trip (``LinkEstimator.record`` with fewer
than ``MIN_TRANSFER_BYTES``), and a call that carries a payload gives the bandwidth once the
round trip (the estimate so far) and the server's time (``server_s``: the tail's profiled
latency when the daemon's re-planner knows it, else 0, so the bandwidth then reads low by the
tail's share) are taken off. Both are exponentially weighted moving averages over *time*
(``half_life_s``), not over samples: the estimate reflects the last half second or so whether ten
calls or a thousand came in it. The bandwidth is averaged as seconds per bit (a call whose
transfer rounds to nothing does not make it infinite).

One estimator per server address, shared by every model and copy that calls it
(``estimator_for``): a link belongs to the process and the address, not to one model's copy,
so a re-planned cut or a failover keeps its figures. The estimators are thread-safe: the
executor's worker threads record, the metrics thread and the re-planner read.
"""

from __future__ import annotations

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


class _Ewma:
    """An exponentially weighted moving average over time (not thread-safe: the estimator's
    lock guards it)."""

    def __init__(self, half_life_s: float) -> None:
        self._half_life_s = half_life_s
        self.value: float | None = None
        self._at = 0.0

    def add(self, sample: float, now: float) -> None:
        if self.value is None:
            self.value = sample
        else:
            weight = 1.0 - 0.5 ** (max(0.0, now - self._at) / self._half_life_s)
            self.value += weight * (sample - self.value)
        self._at = now


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
        self._rtt = _Ewma(half_life_s)
        self._seconds_per_bit = _Ewma(half_life_s)
        self._calls = 0
        self._sent = 0
        self._received = 0
        self._seconds = 0.0
        self._updated: float | None = None
        self._bandwidth_at: float | None = None

    def record(self, sent: int, received: int, seconds: float, server_s: float = 0.0) -> None:
        """One call: ``sent`` and ``received`` tensor bytes, ``seconds`` from send to answer,
        of which ``server_s`` the server spent on the model (0: unknown, or a probe)."""
        if seconds < 0 or sent < 0 or received < 0 or not math.isfinite(seconds):
            return  # a clock that stepped back; nothing to learn
        now = self._clock()
        wire_s = max(0.0, seconds - max(0.0, server_s))
        payload = sent + received
        with self._lock:
            self._calls += 1
            self._sent += sent
            self._received += received
            self._seconds += seconds
            self._updated = now
            if payload < MIN_TRANSFER_BYTES:
                self._rtt.add(wire_s, now)
                return
            rtt = self._rtt.value or 0.0
            transfer = max(_MIN_TRANSFER_S, wire_s - rtt)
            self._seconds_per_bit.add(transfer / (payload * 8), now)
            self._bandwidth_at = now

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
