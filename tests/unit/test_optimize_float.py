"""edged optimize's float graph methods on graphs built with onnx.helper and run by real
ONNX Runtime: ``fuse-hardswish`` (hard-swish chains an older exporter spelled out become
ONNX HardSwish, same function) and ``fp16`` keeping in FP32 what FP16 cannot hold."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edged.optimize.data import Samples
from edged.optimize.methods import METHODS, Options, Refused

CHANNELS = 8


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def hardswish_model(path: Path) -> Path:
    """conv -> x*Clip(x+3,0,6)/6 -> conv -> x*(Clip(3+x,0,6)*(1/6)) -> conv -> a chain whose
    Clip output is also a graph output (must stay) -> out; opset 11 (Clip bounds as inputs),
    as Paddle2ONNX wrote PP-OCR's classifier."""
    rng = np.random.default_rng(0)
    inits = [_const("three", 3.0), _const("zero", 0.0), _const("six", 6.0), _const("sixth", 1 / 6)]
    for i in range(3):
        w = rng.normal(size=(CHANNELS, CHANNELS if i else 3, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1])]
    nodes += [
        helper.make_node("Add", ["c0", "three"], ["a0"]),
        helper.make_node("Clip", ["a0", "zero", "six"], ["r0"]),
        helper.make_node("Mul", ["c0", "r0"], ["m0"]),
        helper.make_node("Div", ["m0", "six"], ["h0"]),
        helper.make_node("Conv", ["h0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["three", "c1"], ["a1"]),
        helper.make_node("Clip", ["a1", "zero", "six"], ["r1"]),
        helper.make_node("Mul", ["r1", "sixth"], ["s1"]),
        helper.make_node("Mul", ["c1", "s1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "three"], ["a2"]),
        helper.make_node("Clip", ["a2", "zero", "six"], ["r2"]),
        helper.make_node("Mul", ["c2", "r2"], ["m2"]),
        helper.make_node("Div", ["m2", "six"], ["out"]),
    ]
    shape = [1, CHANNELS, 6, 6]
    graph = helper.make_graph(
        nodes,
        "hswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("r2", TensorProto.FLOAT, shape),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(["out", "r2"], {"x": x})]


def test_fuse_hardswish_replaces_each_chain_and_keeps_the_function(tmp_path: Path) -> None:
    source = hardswish_model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(4, 3, 6, 6)).astype(np.float32) * 3
    produced = METHODS["fuse-hardswish"](
        source, tmp_path / "fused.onnx", Samples({"x": x}), Options()
    )
    fused = onnx.load(str(produced.path))
    ops = Counter(n.op_type for n in fused.graph.node)
    # both spellings fused; the third chain's Clip output is a graph output: left alone
    assert produced.notes == {"hardswish_fused": 2, "opset": 14}
    assert ops["HardSwish"] == 2
    assert ops["Clip"] == 1
    assert ops["Div"] == 1
    assert next(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 14
    for want, got in zip(_run(source, x), _run(produced.path, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_fuse_hardswish_refuses_a_model_without_a_chain(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(Refused, match="no hard-swish"):
        METHODS["fuse-hardswish"](path, tmp_path / "out.onnx", Samples({}), Options())


def _fp16_trap(path: Path) -> Path:
    """x -> BatchNormalization with a running variance of 1e8 (beyond FP16's 65,504; gamma
    scaled to match, as PP-OCR's detector head has) -> *300 -> *300 (an activation beyond
    FP16 for |x| > 0.73) -> /90000 -> y."""
    var = np.array([1e8, 4.0], np.float32)
    inits = [
        numpy_helper.from_array(np.sqrt(var), "gamma"),
        numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "beta"),
        numpy_helper.from_array(np.zeros(2, np.float32), "mean"),
        numpy_helper.from_array(var, "var"),
        _const("k", 300.0),
        _const("inv", 1 / 90000),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["b"]),
            helper.make_node("Mul", ["b", "k"], ["m1"]),
            helper.make_node("Mul", ["m1", "k"], ["m2"]),
            helper.make_node("Mul", ["m2", "inv"], ["y"]),
        ],
        "trap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_fp16_keeps_in_fp32_what_fp16_cannot_hold(tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = _fp16_trap(tmp_path / "trap.onnx")
    x = np.random.default_rng(2).normal(size=(4, 2, 4, 4)).astype(np.float32) * 3
    produced = METHODS["fp16"](source, tmp_path / "fp16.onnx", Samples({"x": x}), Options())
    kept = produced.notes["kept_float32"]
    assert kept["BatchNormalization_0"] == "constant var reaches 1e+08 > 65504"
    assert kept["Mul_2"].startswith("activation m2 reaches")
    assert kept["Mul_3"].startswith("activation m2 reaches")
    assert "Mul_1" not in kept  # |m1| stays in range
    # m2 passes between two FP32 nodes: not through FP16 (the converter's cast pair dropped)
    assert produced.notes["fp16_round_trips_dropped"] >= 1
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    got = ort.InferenceSession(str(produced.path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    # the converter alone clamps the variance and overflows the activation
    plain = tmp_path / "plain.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(plain))
    naive = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert not np.allclose(naive, want, rtol=2e-2, atol=2e-2, equal_nan=False)


def test_fp16_without_inputs_still_keeps_out_of_range_constants(tmp_path: Path) -> None:
    source = _fp16_trap(tmp_path / "trap.onnx")
    produced = METHODS["fp16"](source, tmp_path / "fp16.onnx", Samples({}), Options())
    assert list(produced.notes["kept_float32"]) == ["BatchNormalization_0"]
