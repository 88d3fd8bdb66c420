"""edged optimize's float graph methods: ``fuse-hardswish`` (hard-swish chains an older
exporter spelled out become ONNX HardSwish, same function) on graphs built with
onnx.helper and run by real ONNX Runtime."""

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
