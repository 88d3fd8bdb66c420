"""Small ONNX models for tests, written on demand (no pytest fixtures in here).

Every ``*_model(directory, ...)`` function writes ``<directory>/model.onnx`` (creating the
directory) and returns the path of the file it wrote. If ``directory`` itself ends in ``.onnx``
it is taken as the file to write. Writing into ``<repo>/<model>/<version>`` therefore yields
the layout the daemon serves from::

    from tests import modelgen
    modelgen.dynamic_axes_model(tmp_path / "repo" / "dyn" / "1")

The functions verify nothing themselves; ``tests/unit/test_modelgen.py`` runs each model through
onnxruntime. Graphs are built by hand with ``onnx.helper`` at opset 17 / IR version 8 so that
onnxruntime >= 1.17 loads them. Only ``slow_model`` runs onnxruntime here, to size itself.

Each model is a corner case of signature inference that the daemon must handle:

=========================== =====================================================================
``dynamic_axes_model``      two symbolic axes: ``x`` FP32 [batch, seq, 4] -> ``y`` = 3 * x
``scalar_input_model``      a rank-0 input: ``scale`` FP32 [], ``x`` FP32 [batch, 3] -> ``y``
``slash_names_model``       tensor names with ``/`` and ``:``: ``input/0`` -> ``logits/softmax:0``
``batch_not_axis0_model``   axis 0 fixed (3), symbolic axis 1: must be served non-batching
``all_dtypes_identity_model`` one Identity per KServe datatype, ``in_<t>`` -> ``out_<t>``
``slow_model``              ``x`` -> ``y`` = x after burning roughly ``delay_ms`` of CPU
=========================== =====================================================================
"""

from __future__ import annotations

import functools
import time
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

__all__ = [
    "ALL_DTYPES",
    "IR_VERSION",
    "OPSET",
    "DtypeCase",
    "all_dtypes_identity_model",
    "batch_not_axis0_model",
    "calibrate_slow_iteration_seconds",
    "dynamic_axes_model",
    "scalar_input_model",
    "slash_names_model",
    "slow_model",
]


class DtypeCase(NamedTuple):
    """One KServe v2 datatype and what it is on the ONNX and numpy sides."""

    suffix: str  # tensor names are in_<suffix> / out_<suffix>
    kserve: str  # KServe v2 datatype string
    onnx_type: int  # onnx.TensorProto element type
    numpy_dtype: np.dtype  # what onnxruntime takes and returns (object for strings)


ALL_DTYPES: tuple[DtypeCase, ...] = (
    DtypeCase("bool", "BOOL", TensorProto.BOOL, np.dtype(np.bool_)),
    DtypeCase("uint8", "UINT8", TensorProto.UINT8, np.dtype(np.uint8)),
    DtypeCase("uint16", "UINT16", TensorProto.UINT16, np.dtype(np.uint16)),
    DtypeCase("uint32", "UINT32", TensorProto.UINT32, np.dtype(np.uint32)),
    DtypeCase("uint64", "UINT64", TensorProto.UINT64, np.dtype(np.uint64)),
    DtypeCase("int8", "INT8", TensorProto.INT8, np.dtype(np.int8)),
    DtypeCase("int16", "INT16", TensorProto.INT16, np.dtype(np.int16)),
    DtypeCase("int32", "INT32", TensorProto.INT32, np.dtype(np.int32)),
    DtypeCase("int64", "INT64", TensorProto.INT64, np.dtype(np.int64)),
    DtypeCase("fp16", "FP16", TensorProto.FLOAT16, np.dtype(np.float16)),
    DtypeCase("fp32", "FP32", TensorProto.FLOAT, np.dtype(np.float32)),
    DtypeCase("fp64", "FP64", TensorProto.DOUBLE, np.dtype(np.float64)),
    # ONNX STRING. Note: onnxruntime's Python binding wants str objects; it str()s bytes
    # objects (b"ab" arrives in the graph as the 5-character string "b'ab'").
    DtypeCase("bytes", "BYTES", TensorProto.STRING, np.dtype(object)),
)


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edged tests/modelgen.py",
        producer_version="1",
        doc_string=doc,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _write(model: onnx.ModelProto, directory: str | PathLike[str]) -> Path:
    target = Path(directory)
    if target.suffix != ".onnx":
        target = target / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model.SerializeToString(deterministic=True))
    return target


def _scalar(name: str, value: float | int, dtype: type) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name=name)


def dynamic_axes_model(directory: str | PathLike[str]) -> Path:
    """``x`` FP32 [batch, seq, 4] -> ``y`` FP32 [batch, seq, 4] = 3 * x (two symbolic axes)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"], name="times_three")],
        "dynamic_axes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        initializer=[_scalar("three", 3.0, np.float32)],
    )
    return _write(_model(graph, "y = 3 * x with two symbolic axes"), directory)


def needs_two_rows_model(directory: str | PathLike[str]) -> Path:
    """``x`` FP32 [batch, seq] -> ``y`` FP32 [batch, seq + 2]: reflect padding by 1 on the
    sequence axis, which ONNX Runtime refuses for seq < 2 (as silero-vad's STFT does): a
    model that runs on real inputs but not on the synthetic warm-up's size-1 axes."""
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="reflect")],
        "needs_two_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None])],
        initializer=[numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), name="pads")],
    )
    return _write(_model(graph, "reflect padding: seq must be >= 2"), directory)


def scalar_input_model(directory: str | PathLike[str]) -> Path:
    """``scale`` FP32 [] (rank 0) and ``x`` FP32 [batch, 3] -> ``y`` FP32 [batch, 3] = x * scale.

    The rank-0 input has no batch axis, so the model cannot be batched on axis 0 as-is.
    """
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"], name="scale_x")],
        "scalar_input",
        [
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return _write(_model(graph, "y = x * scale, scale is a rank-0 input"), directory)


def slash_names_model(directory: str | PathLike[str]) -> Path:
    """``input/0`` FP32 [batch, 5] -> ``logits/softmax:0`` FP32 [batch, 5] = softmax over axis 1.

    Tensor names as TensorFlow exporters produce them, with ``/`` and ``:`` in them.
    """
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["input/0"], ["logits/softmax:0"], name="softmax", axis=-1)],
        "slash_names",
        [helper.make_tensor_value_info("input/0", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("logits/softmax:0", TensorProto.FLOAT, ["batch", 5])],
    )
    return _write(_model(graph, "softmax with tensor names containing / and :"), directory)


def batch_not_axis0_model(directory: str | PathLike[str]) -> Path:
    """``x`` FP32 [3, batch] -> ``y`` FP32 [batch, 3] = transpose(x).

    Axis 0 of the input is fixed (3) and the symbolic axis is axis 1, so the model cannot be
    batched along axis 0: it has to be served with ``max_batch_size = 0``.
    """
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], name="transpose", perm=[1, 0])],
        "batch_not_axis0",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, "batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return _write(_model(graph, "transpose of a [3, batch] input"), directory)


def all_dtypes_identity_model(directory: str | PathLike[str]) -> Path:
    """One Identity per KServe datatype: ``in_<t>`` [batch, 2] -> ``out_<t>`` [batch, 2].

    ``<t>`` runs over :data:`ALL_DTYPES` (bool, uint8 ... uint64, int8 ... int64, fp16, fp32,
    fp64, bytes), in that order, for inputs and outputs alike. ``in_bytes``/``out_bytes`` are
    ONNX STRING tensors. onnxruntime's CPU Identity kernel accepts all 13 types.
    """
    inputs, outputs, nodes = [], [], []
    for case in ALL_DTYPES:
        src, dst = f"in_{case.suffix}", f"out_{case.suffix}"
        inputs.append(helper.make_tensor_value_info(src, case.onnx_type, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(dst, case.onnx_type, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [src], [dst], name=f"identity_{case.suffix}"))
    graph = helper.make_graph(nodes, "all_dtypes_identity", inputs, outputs)
    return _write(_model(graph, "one Identity per KServe v2 datatype"), directory)


# ---------------------------------------------------------------------------------------------
# slow_model: a model that takes a while, built from standard ops only
# ---------------------------------------------------------------------------------------------

_SLOW_SIZE = 64  # side of the square matrix multiplied on every loop iteration
_CALIBRATION_ITERATIONS = 2000


def _slow_graph(iterations: int) -> onnx.ModelProto:
    """``x`` FP32 [batch, 4] -> ``y`` = x, via a Loop of ``iterations`` MatMul+Tanh steps.

    ``x`` is threaded through the Loop as a loop-carried value, so the Loop cannot be
    constant-folded away at session creation and ``y`` is bit-for-bit ``x``. The amount of work
    does not depend on the batch size.
    """
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((_SLOW_SIZE, _SLOW_SIZE)) / np.sqrt(_SLOW_SIZE)).astype(
        np.float32
    )
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["state_in", "slow_weight"], ["product"], name="matmul"),
            helper.make_node("Tanh", ["product"], ["state_out"], name="tanh"),
            helper.make_node("Identity", ["x_in"], ["x_out"], name="carry_x"),
        ],
        "slow_body",
        [
            vi("iteration", TensorProto.INT64, []),
            vi("cond_in", TensorProto.BOOL, []),
            vi("state_in", TensorProto.FLOAT, [_SLOW_SIZE, _SLOW_SIZE]),
            vi("x_in", TensorProto.FLOAT, None),
        ],
        [
            vi("cond_out", TensorProto.BOOL, []),
            vi("state_out", TensorProto.FLOAT, [_SLOW_SIZE, _SLOW_SIZE]),
            vi("x_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Loop",
                ["trip_count", "", "slow_weight", "x"],
                ["final_state", "y"],
                name="burn",
                body=body,
            )
        ],
        "slow",
        [vi("x", TensorProto.FLOAT, ["batch", 4])],
        [vi("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), name="trip_count"),
            numpy_helper.from_array(weight, name="slow_weight"),
        ],
    )
    return _model(
        graph,
        f"y = x after {iterations} iterations of a {_SLOW_SIZE}x{_SLOW_SIZE} MatMul+Tanh loop",
    )


@functools.cache
def calibrate_slow_iteration_seconds() -> float:
    """CPU seconds one iteration of :func:`slow_model`'s loop takes here (fastest of a few runs).

    Measured once per process on a one-thread CPU onnxruntime session, by this thread's CPU
    time, not the wall clock: time the thread spends waiting for a CPU on a busy machine does
    not count. (A wall-clock calibration run while the box was starved read 1,100-4,900 us per
    iteration instead of ~7, and sized a "200 ms" model that answered in a few ms, inside a
    50 ms deadline a test relied on missing.) One thread is this loop's fastest setting, so a
    daemon's session cannot run an iteration in less, and a busy machine only makes the model
    take longer than asked, never shorter.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        _slow_graph(_CALIBRATION_ITERATIONS).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    feed = {"x": np.zeros((1, 4), dtype=np.float32)}
    sess.run(None, feed)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        sess.run(None, feed)
        best = min(best, time.thread_time() - start)
    return best / _CALIBRATION_ITERATIONS


def slow_model(
    directory: str | PathLike[str], delay_ms: float, *, iterations: int | None = None
) -> Path:
    """``x`` FP32 [batch, 4] -> ``y`` FP32 [batch, 4] = x, taking roughly ``delay_ms`` per run.

    For tests that need requests in flight (graceful shutdown, deadlines). No custom ops: the
    delay is a Loop of 64x64 MatMul+Tanh steps, whose trip count is fixed in the file. Unless
    ``iterations`` is given, the trip count is sized from a calibration run of onnxruntime on
    this CPU (about 0.05 s of CPU, once per process). The delay is therefore approximate and
    per inference call, whatever the batch size; it is a lower bound in practice: calibration
    counts CPU time on one thread (the fastest setting), so a busy machine or other thread
    settings make the model take longer than ``delay_ms``, not shorter.
    """
    if delay_ms < 0:
        raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
    if iterations is None:
        iterations = round(delay_ms / 1000.0 / calibrate_slow_iteration_seconds())
    return _write(_slow_graph(max(int(iterations), 1)), directory)
