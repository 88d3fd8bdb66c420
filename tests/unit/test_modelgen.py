"""The generated test models load in onnxruntime and compute what tests/modelgen.py says."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

try:
    from tests import modelgen
except ImportError:  # plain `pytest` without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests import modelgen


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(sess: ort.InferenceSession) -> tuple[list[tuple], list[tuple]]:
    def describe(args: list) -> list[tuple]:
        return [(a.name, a.type, list(a.shape)) for a in args]

    return describe(sess.get_inputs()), describe(sess.get_outputs())


def test_writes_model_onnx_into_directory_or_to_given_file(tmp_path: Path) -> None:
    in_dir = modelgen.dynamic_axes_model(tmp_path / "repo" / "dyn" / "1")
    assert in_dir == tmp_path / "repo" / "dyn" / "1" / "model.onnx"
    as_file = modelgen.dynamic_axes_model(tmp_path / "elsewhere" / "custom.onnx")
    assert as_file == tmp_path / "elsewhere" / "custom.onnx"
    assert in_dir.read_bytes() == as_file.read_bytes()  # deterministic
    model = onnx.load(str(in_dir))
    assert model.ir_version == modelgen.IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", modelgen.OPSET)]


def test_dynamic_axes_model(tmp_path: Path) -> None:
    sess = _session(modelgen.dynamic_axes_model(tmp_path))
    assert _signature(sess) == (
        [("x", "tensor(float)", ["batch", "seq", 4])],
        [("y", "tensor(float)", ["batch", "seq", 4])],
    )
    for shape in [(1, 1, 4), (2, 7, 4), (5, 3, 4)]:
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, x * np.float32(3))


def test_scalar_input_model(tmp_path: Path) -> None:
    sess = _session(modelgen.scalar_input_model(tmp_path))
    assert _signature(sess) == (
        [("scale", "tensor(float)", []), ("x", "tensor(float)", ["batch", 3])],
        [("y", "tensor(float)", ["batch", 3])],
    )
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    (y,) = sess.run(None, {"scale": np.array(2.5, dtype=np.float32), "x": x})
    np.testing.assert_array_equal(y, x * np.float32(2.5))


def test_slash_names_model(tmp_path: Path) -> None:
    sess = _session(modelgen.slash_names_model(tmp_path))
    assert _signature(sess) == (
        [("input/0", "tensor(float)", ["batch", 5])],
        [("logits/softmax:0", "tensor(float)", ["batch", 5])],
    )
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    (y,) = sess.run(["logits/softmax:0"], {"input/0": x})
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(axis=1, keepdims=True), rtol=1e-6, atol=1e-7)


def test_batch_not_axis0_model(tmp_path: Path) -> None:
    sess = _session(modelgen.batch_not_axis0_model(tmp_path))
    assert _signature(sess) == (
        [("x", "tensor(float)", [3, "batch"])],
        [("y", "tensor(float)", ["batch", 3])],
    )
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    (y,) = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y, x.T)
    with pytest.raises(Exception, match=r"(?i)dim|shape"):
        sess.run(None, {"x": np.zeros((2, 5), dtype=np.float32)})  # axis 0 really is fixed


def _sample(case: modelgen.DtypeCase, rows: int) -> np.ndarray:
    if case.kserve == "BYTES":
        values = ["", "abc", "Grüße", "世界", "with space", "x" * 40, "0", "\t"]
        return np.array(values[: rows * 2], dtype=object).reshape(rows, 2)
    if case.kserve == "BOOL":
        return (np.arange(rows * 2).reshape(rows, 2) % 3 == 0).astype(np.bool_)
    if np.issubdtype(case.numpy_dtype, np.integer):
        info = np.iinfo(case.numpy_dtype)
        extremes = [info.min, info.max, 0, 1, info.max - 1, info.min + 1, 7, info.max // 3]
        return np.array(extremes[: rows * 2], dtype=case.numpy_dtype).reshape(rows, 2)
    info = np.finfo(case.numpy_dtype)
    extremes = [info.min, info.max, -0.0, info.tiny, np.inf, -np.inf, 1.5, -3.25]
    return np.array(extremes[: rows * 2], dtype=case.numpy_dtype).reshape(rows, 2)


def test_all_dtypes_identity_model(tmp_path: Path) -> None:
    sess = _session(modelgen.all_dtypes_identity_model(tmp_path))
    ins, outs = _signature(sess)
    suffixes = [c.suffix for c in modelgen.ALL_DTYPES]
    assert [name for name, _, _ in ins] == [f"in_{s}" for s in suffixes]
    assert [name for name, _, _ in outs] == [f"out_{s}" for s in suffixes]
    assert all(shape == ["batch", 2] for _, _, shape in ins + outs)
    assert {c.kserve for c in modelgen.ALL_DTYPES} == {
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
        "FP16", "FP32", "FP64", "BYTES",
    }  # fmt: skip
    onnx_names = {i.name: i.type for i in sess.get_inputs()}
    assert onnx_names["in_bytes"] == "tensor(string)"
    assert onnx_names["in_fp16"] == "tensor(float16)"

    for rows in (1, 3, 4):
        feeds = {f"in_{c.suffix}": _sample(c, rows) for c in modelgen.ALL_DTYPES}
        results = sess.run(None, feeds)
        for case, out in zip(modelgen.ALL_DTYPES, results, strict=True):
            sent = feeds[f"in_{case.suffix}"]
            assert out.dtype == case.numpy_dtype, case
            assert out.shape == (rows, 2), case
            if case.kserve == "BYTES":
                assert out.tolist() == sent.tolist()
            else:  # bitwise, so -0.0 / inf survive
                assert out.tobytes() == sent.tobytes(), case


def _loop_and_initializers(path: Path) -> tuple[onnx.ModelProto, onnx.NodeProto, dict]:
    model = onnx.load(str(path))
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, loop, init


def _trip_count(path: Path) -> int:
    _, loop, init = _loop_and_initializers(path)
    return int(init[loop.input[0]])


def test_slow_model_is_identity_and_sized_from_calibration(tmp_path: Path) -> None:
    """Timing-free: the trip count written into the file is the delay over the (cached)
    calibrated seconds per iteration, and the output is bit-for-bit the input."""
    delay_ms = 150
    path = modelgen.slow_model(tmp_path / "a", delay_ms)
    per_iteration = modelgen.calibrate_slow_iteration_seconds()
    assert _trip_count(path) == max(round(delay_ms / 1000.0 / per_iteration), 1)
    twice = _trip_count(modelgen.slow_model(tmp_path / "b", 2 * delay_ms))
    assert abs(twice - 2 * _trip_count(path)) <= 1  # rounding
    sess = _session(path)
    assert _signature(sess) == (
        [("x", "tensor(float)", ["batch", 4])],
        [("y", "tensor(float)", ["batch", 4])],
    )
    x = np.array([[1.0, -2.0, np.nan, np.inf]] * 3, dtype=np.float32)
    (y,) = sess.run(None, {"x": x})
    assert y.tobytes() == x.tobytes()
    assert path.stat().st_size < 32_000


def test_slow_model_calibration_ignores_time_spent_waiting_for_a_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A starved test process once calibrated ~1-5 ms per iteration instead of ~7 us, and its
    "200 ms" model answered inside a 50 ms deadline. Here every wall clock jumps a second
    between two readings (a thread that waits that long for a CPU): the calibration, which
    counts the thread's CPU time, still reads less than a tenth of what a wall-clock one
    would (at least 1 s / 2000 iterations)."""
    wall = {"now": 0.0}

    def jumping() -> float:
        wall["now"] += 1.0
        return wall["now"]

    for clock in ("perf_counter", "monotonic", "time"):
        monkeypatch.setattr(modelgen.time, clock, jumping)
    per_iteration = modelgen.calibrate_slow_iteration_seconds.__wrapped__()
    assert 0 < per_iteration < 0.1 * 1.0 / modelgen._CALIBRATION_ITERATIONS


def test_slow_model_loop_runs_its_trip_count(tmp_path: Path) -> None:
    """The delay is real work: the Loop's carried state after N iterations equals N steps of
    tanh(state @ W) computed in NumPy from the file's own weight, so ONNX Runtime runs every
    iteration rather than folding the loop away. Explicit iterations win over delay_ms."""
    iterations = 3
    path = modelgen.slow_model(tmp_path, 10_000, iterations=iterations)
    assert _trip_count(path) == iterations
    model, loop, init = _loop_and_initializers(path)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(loop.output[0], onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), dtype=np.float32)
    y, state = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y, x)
    weight = init["slow_weight"]
    expected = init[loop.input[2]]  # the carried state starts as the weight itself
    for _ in range(iterations):
        expected = np.tanh(expected @ weight)
    np.testing.assert_allclose(state, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(state, np.tanh(init[loop.input[2]] @ weight), atol=1e-3)
    with pytest.raises(ValueError, match="delay_ms"):
        modelgen.slow_model(tmp_path / "bad", -1)
