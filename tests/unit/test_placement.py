"""hal.placement: candidates from the probe's reports, speed ranking, the circuit breaker
(with frozen time: every call takes ``now``), failover and recovery targets, and answers
compared. All pure: no device, no clock, no thread."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hal.placement import (
    DEFAULT_EXECUTORS,
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    Plan,
    default_executors,
    failover_targets,
    median,
    next_retry_at,
    outputs_disagree,
    place,
    rank_by_speed,
    recovery_targets,
)
from hal.report import DeviceReport

CPU_ONNX = DeviceReport("cpu-onnx", True, formats=("onnx",))
CPU_LITERT = DeviceReport("cpu-litert", True, formats=("tflite",))
NO_CUDA = DeviceReport("cuda", False, reason="libcuda.so.1 not loadable", formats=("onnx",))
CUDA = DeviceReport("cuda", True, formats=("onnx",))
NO_TPU = DeviceReport("edgetpu", False, reason="no Edge TPU", formats=("edgetpu-tflite",))
NO_FPGA = DeviceReport("pynq", False, reason="no FPGA", formats=("pynq-bundle",))
HOST = [CPU_ONNX, CPU_LITERT, NO_CUDA, NO_TPU, NO_FPGA]

# -- place ----------------------------------------------------------------------------------


def test_the_format_decides_when_model_toml_lists_no_executors() -> None:
    assert default_executors("onnx") == ("cuda", "cpu-onnx")
    assert default_executors("tflite") == ("cpu-litert",)
    assert default_executors("edgetpu-tflite") == ("edgetpu",)
    assert default_executors("pynq-bundle") == ("pynq",)
    assert default_executors("savedmodel") == ()
    assert set(DEFAULT_EXECUTORS) == {"onnx", "tflite", "edgetpu-tflite", "pynq-bundle"}


PLACE_CASES = [
    pytest.param(
        ("cuda", "cpu-onnx"),
        "onnx",
        HOST,
        Plan(("cpu-onnx",), (("cuda", "libcuda.so.1 not loadable"),)),
        id="onnx-without-gpu",
    ),
    pytest.param(
        ("cuda", "cpu-onnx"),
        "onnx",
        [CPU_ONNX, CUDA],
        Plan(("cuda", "cpu-onnx")),
        id="onnx-with-gpu",
    ),
    pytest.param(
        ("edgetpu",),
        "edgetpu-tflite",
        HOST,
        Plan((), (("edgetpu", "no Edge TPU"),)),
        id="edgetpu-absent",
    ),
    pytest.param(
        ("cpu-litert",),
        "tflite",
        HOST,
        Plan(("cpu-litert",)),
        id="tflite",
    ),
    pytest.param(
        ("cpu-litert", "cpu-onnx"),
        "onnx",
        HOST,
        Plan(("cpu-onnx",), (("cpu-litert", "runs tflite, not this model's format 'onnx'"),)),
        id="wrong-format",
    ),
    pytest.param(
        ("npu", "cpu-onnx"),
        "onnx",
        HOST,
        Plan(
            ("cpu-onnx",),
            (
                (
                    "npu",
                    "no executor 'npu' is installed (installed: cpu-litert, "
                    "cpu-onnx, cuda, edgetpu, pynq)",
                ),
            ),
        ),
        id="not-installed",
    ),
    pytest.param(
        ("cpu-onnx", "cpu-onnx"),
        "onnx",
        HOST,
        Plan(("cpu-onnx",)),
        id="duplicates",
    ),
    pytest.param(
        ("cuda", "npu"),
        "onnx",
        None,
        Plan(("cuda", "npu")),
        id="no-probe-no-filter",
    ),
]


@pytest.mark.parametrize(("preference", "fmt", "reports", "expected"), PLACE_CASES)
def test_place(preference, fmt, reports, expected: Plan) -> None:
    assert place(preference, fmt, reports) == expected


def test_a_report_without_formats_takes_any_format() -> None:
    vendor = DeviceReport("npu", True)
    assert place(["npu"], "onnx", [vendor]).candidates == ("npu",)


def test_why_none_lists_every_reason() -> None:
    plan = place(("cuda", "edgetpu"), "onnx", HOST)
    assert plan.candidates == ()
    assert plan.why_none() == (
        "cuda: libcuda.so.1 not loadable; edgetpu: runs edgetpu-tflite, not this model's "
        "format 'onnx'"
    )
    assert Plan(()).why_none() == "none listed"


# -- auto: timings --------------------------------------------------------------------------


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert median([]) == math.inf


@pytest.mark.parametrize(
    ("order", "timings", "expected"),
    [
        (("a", "b"), {"a": 0.02, "b": 0.001}, ("b", "a")),
        (("a", "b"), {"a": 0.001, "b": 0.02}, ("a", "b")),
        (("a", "b", "c"), {"c": 0.01, "b": 0.01}, ("b", "c", "a")),  # tie: preference order
        (("a", "b"), {}, ("a", "b")),
    ],
)
def test_rank_by_speed(order, timings, expected) -> None:
    assert rank_by_speed(order, timings) == expected


# -- the circuit breaker, with frozen time --------------------------------------------------

POLICY = BreakerPolicy(failure_threshold=3, retry_after_s=60.0)


def test_breaker_opens_after_n_consecutive_failures() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.state(0.0) is BreakerState.CLOSED
    assert breaker.record_failure(1.0) is None
    assert breaker.record_failure(2.0) is None
    assert breaker.record_failure(3.0) is BreakerState.OPEN
    assert breaker.state(3.0) is BreakerState.OPEN
    assert breaker.retry_at() == 63.0
    assert not breaker.allows(62.9)


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(POLICY)
    for t in range(10):  # fail, fail, succeed, ... never three in a row
        breaker.record_failure(t)
        breaker.record_failure(t + 0.1)
        assert breaker.record_success(t + 0.2) is None
    assert breaker.state(100.0) is BreakerState.CLOSED


def test_open_turns_half_open_after_the_cool_down_and_a_probe_decides() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.trip(100.0)
    assert breaker.state(159.9) is BreakerState.OPEN
    assert breaker.state(160.0) is BreakerState.HALF_OPEN
    assert breaker.allows(160.0)
    # a failed probe opens it again, with a new cool-down
    assert breaker.record_failure(161.0) is BreakerState.OPEN
    assert breaker.state(200.0) is BreakerState.OPEN
    assert breaker.retry_at() == 221.0
    # a successful probe closes it
    assert breaker.record_success(221.0) is BreakerState.CLOSED
    assert breaker.state(221.0) is BreakerState.CLOSED
    assert breaker.failures == 0
    assert breaker.retry_at() is None


def test_outcomes_during_the_cool_down_change_nothing() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.trip(0.0)
    assert breaker.record_success(10.0) is None  # only a probe after the cool-down counts
    assert breaker.record_failure(20.0) is None  # and the cool-down does not restart
    assert breaker.state(60.0) is BreakerState.HALF_OPEN


def test_trip_opens_at_once_and_reports_a_change_only_once() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.trip(5.0) is BreakerState.OPEN
    assert breaker.trip(6.0) is None  # already open (the cool-down restarts)
    assert breaker.retry_at() == 66.0


def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, retry_after_s=1.0))
    assert breaker.record_failure(0.0) is BreakerState.OPEN


def test_a_threshold_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(BreakerPolicy(failure_threshold=0))


# -- where a model may move -----------------------------------------------------------------

CANDIDATES = ("edgetpu", "cuda", "cpu-onnx")


def opened(at: float) -> CircuitBreaker:
    breaker = CircuitBreaker(POLICY)
    breaker.trip(at)
    return breaker


def test_failover_takes_the_next_candidates_whose_breaker_allows() -> None:
    now = 100.0
    assert failover_targets(CANDIDATES, "edgetpu", {"edgetpu": opened(now)}, now) == [
        "cuda",
        "cpu-onnx",
    ]
    breakers = {"edgetpu": opened(now), "cuda": opened(now - 10)}
    assert failover_targets(CANDIDATES, "edgetpu", breakers, now) == ["cpu-onnx"]
    # a better kind whose cool-down has passed may take the model back in a failover
    breakers = {"edgetpu": opened(0.0), "cpu-onnx": opened(now)}
    assert failover_targets(CANDIDATES, "cpu-onnx", breakers, now) == ["edgetpu", "cuda"]
    assert failover_targets(("flaky",), "flaky", {"flaky": opened(now)}, now) == []


def test_recovery_tries_better_candidates_once_half_open() -> None:
    breakers = {"edgetpu": opened(0.0), "cuda": opened(30.0)}
    assert recovery_targets(CANDIDATES, "cpu-onnx", breakers, 59.0) == []
    assert next_retry_at(CANDIDATES, "cpu-onnx", breakers) == 60.0
    assert recovery_targets(CANDIDATES, "cpu-onnx", breakers, 60.0) == ["edgetpu"]
    assert recovery_targets(CANDIDATES, "cpu-onnx", breakers, 90.0) == ["edgetpu", "cuda"]
    # on cuda, only edgetpu is better
    assert recovery_targets(CANDIDATES, "cuda", breakers, 90.0) == ["edgetpu"]
    assert next_retry_at(CANDIDATES, "cuda", breakers) == 60.0


def test_nothing_to_recover_on_the_best_candidate_or_with_closed_breakers() -> None:
    breakers = {"edgetpu": opened(0.0)}
    assert next_retry_at(CANDIDATES, "edgetpu", breakers) is None
    assert recovery_targets(CANDIDATES, "edgetpu", breakers, 1000.0) == []
    assert next_retry_at(CANDIDATES, "cpu-onnx", {"edgetpu": CircuitBreaker(POLICY)}) is None


# -- comparing answers ----------------------------------------------------------------------


def outs(**arrays: np.ndarray) -> dict[str, np.ndarray]:
    return dict(arrays)


@pytest.mark.parametrize(
    ("expected", "actual", "problem"),
    [
        (
            outs(p=np.array([0.5, 0.5], np.float32)),
            outs(p=np.array([0.501, 0.499], np.float32)),
            None,
        ),
        (
            outs(p=np.array([0.5, 0.5], np.float32)),
            outs(p=np.array([0.9, 0.1], np.float32)),
            "output 'p' differs",
        ),
        (outs(q=np.array([10, -128], np.int8)), outs(q=np.array([11, -127], np.int8)), None),
        (outs(q=np.array([10], np.int8)), outs(q=np.array([12], np.int8)), "output 'q' differs"),
        (
            outs(label=np.array([3], np.int64)),
            outs(label=np.array([4], np.int64)),
            "output 'label' differs",
        ),
        (
            outs(label=np.array([3], np.int64)),
            outs(label=np.array([3], np.int32)),
            "output 'label' is int32[1], expected int64[1]",
        ),
        (
            outs(p=np.zeros((1, 10), np.float32)),
            outs(p=np.zeros((1, 9), np.float32)),
            "output 'p' is float32[1, 9]",
        ),
        (
            outs(p=np.zeros(1, np.float32)),
            outs(r=np.zeros(1, np.float32)),
            "outputs ['r'] where ['p'] were expected",
        ),
        (outs(s=np.array([b"a"], object)), outs(s=np.array([b"a"], object)), None),
    ],
)
def test_outputs_disagree(expected, actual, problem) -> None:
    result = outputs_disagree(expected, actual)
    if problem is None:
        assert result is None
    else:
        assert result is not None
        assert result.startswith(problem)
