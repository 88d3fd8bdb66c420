"""Cutting an ONNX graph in two (edged.partition.graph): the head then the tail answers what
the whole model answers, in ONNX Runtime, at every candidate cut of a real third-party CNN
(RapidOCR's PP-OCR direction classifier, a MobileNetV3 with hard-swish and squeeze-excite
branches) and of the example MLP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edged.core.errors import ConfigError
from edged.partition import graph
from tests import corpus

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models/digits/1/model.onnx"
OCR_CLS = next(m for m in corpus.CORPUS if m.name == "ocr_cls")


def _session(model: object) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def _run_split(whole: object, tensor: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    parts = graph.split(whole, tensor)  # type: ignore[arg-type]
    if parts.head is None:
        middle = feed
    else:
        (value,) = _session(parts.head).run(None, feed)
        middle = {tensor: value}
    return _session(parts.tail).run(None, middle)


def _check_every_cut(path: Path, feed: dict[str, np.ndarray]) -> list[graph.Cut]:
    whole = graph.load(path)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    cuts = graph.candidate_cuts(whole)
    for cut in cuts:
        got = _run_split(whole, cut.tensor, feed)
        assert len(got) == len(expected), cut
        for want, have in zip(expected, got, strict=True):
            assert have.dtype == want.dtype, cut
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, err_msg=str(cut))
    return cuts


def test_every_cut_of_the_digits_mlp_answers_like_the_whole() -> None:
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32) * 16
    cuts = _check_every_cut(DIGITS, {"input": x})
    # the inputs cut, then one cut after each node but the last two (which both make outputs)
    assert [c.tensor for c in cuts] == [
        graph.INPUTS_CUT,
        "centered",
        "standardized",
        "fc1",
        "hidden",
        "logits",
    ]


@pytest.mark.slow
def test_every_cut_of_a_real_cnn_answers_like_the_whole() -> None:
    path = corpus.fetch(OCR_CLS)
    x = np.random.default_rng(1).random((2, 3, 48, 192), dtype=np.float32)
    cuts = _check_every_cut(path, {"x": x})
    assert len(cuts) > 20  # a MobileNet: a cut between most blocks


def test_a_tensor_inside_a_residual_branch_is_no_cut() -> None:
    whole = graph.load(corpus.fetch(OCR_CLS))
    cuts = {c.tensor for c in graph.candidate_cuts(whole)}
    # a squeeze-excite branch: the pooled tensor is read while the block's input is still live
    pooled = next(n.output[0] for n in whole.graph.node if n.op_type == "GlobalAveragePool")
    assert pooled not in cuts
    with pytest.raises(ConfigError, match=f"tensor '{pooled}' is not a cut"):
        graph.split(whole, pooled)


def test_the_head_and_tail_are_written_atomically(tmp_path: Path) -> None:
    whole = graph.load(DIGITS)
    parts = graph.split(whole, "hidden")
    assert parts.head is not None
    graph.save(parts.head, tmp_path / graph.HEAD_FILE)
    graph.save(parts.tail, tmp_path / graph.TAIL_FILE)
    head = ort.InferenceSession(str(tmp_path / graph.HEAD_FILE))
    tail = ort.InferenceSession(str(tmp_path / graph.TAIL_FILE))
    assert [i.name for i in head.get_outputs()] == ["hidden"]
    assert [i.name for i in tail.get_inputs()] == ["hidden"]
    assert [o.name for o in tail.get_outputs()] == ["probabilities", "label"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.HEAD_FILE, graph.TAIL_FILE]


def test_a_file_that_is_no_model_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match=r"model\.onnx: not an ONNX model"):
        graph.load(bad)


def _check_every_cut_on_fp16_wire(path: Path, feed: dict[str, np.ndarray], atol: float) -> None:
    """Every cut with a head, its tensor sent as FP16: the head makes it FP16 under the same
    name, the tail takes it so, and the answers stay within ``atol`` of the whole model's."""
    whole = graph.load(path)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    for cut in graph.candidate_cuts(whole)[1:]:
        parts = graph.split(whole, cut.tensor, "FP16")
        assert parts.head is not None
        head, tail = _session(parts.head), _session(parts.tail)
        assert [(o.name, o.type) for o in head.get_outputs()] == [(cut.tensor, "tensor(float16)")]
        assert [(i.name, i.type) for i in tail.get_inputs()] == [(cut.tensor, "tensor(float16)")]
        (middle,) = head.run(None, feed)
        assert middle.dtype == np.float16
        got = tail.run(None, {cut.tensor: middle})
        for want, have in zip(expected, got, strict=True):
            assert have.dtype == want.dtype, cut  # the tail computes in FP32 as before
            np.testing.assert_allclose(have, want, rtol=0, atol=atol, err_msg=str(cut))


def test_every_cut_of_the_digits_mlp_sent_as_fp16_answers_close_to_the_whole() -> None:
    x = np.random.default_rng(4).random((3, 64), dtype=np.float32) * 16
    whole = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    labels = whole.run(["label"], {"input": x})[0]
    _check_every_cut_on_fp16_wire(DIGITS, {"input": x}, atol=0.05)
    parts = graph.split(graph.load(DIGITS), "hidden", "FP16")
    assert parts.head is not None
    (hidden,) = _session(parts.head).run(None, {"input": x})
    got = _session(parts.tail).run(["label"], {"hidden": hidden})[0]
    np.testing.assert_array_equal(got, labels)


@pytest.mark.slow
def test_every_cut_of_a_real_cnn_sent_as_fp16_answers_close_to_the_whole() -> None:
    x = np.random.default_rng(5).random((2, 3, 48, 192), dtype=np.float32)
    _check_every_cut_on_fp16_wire(corpus.fetch(OCR_CLS), {"x": x}, atol=0.02)


def _int_cut_model() -> object:
    """x (FP32) -> Cast to INT64 ("n") -> Cast to FP32 -> Relu -> y: "n" is an INT64 cut."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["x"], ["n"], to=TensorProto.INT64),
        helper.make_node("Cast", ["n"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "int_cut",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize(
    ("tensor", "wire", "message"),
    [
        (graph.INPUTS_CUT, "FP16", "sends the request's inputs as they are"),
        ("hidden", "INT8", "wire datatype 'INT8': expected one of FP16"),
    ],
)
def test_a_wire_datatype_that_does_not_apply_is_refused(
    tensor: str, wire: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        graph.split(graph.load(DIGITS), tensor, wire)


def test_fp16_on_the_wire_applies_to_float_cuts_only() -> None:
    model = _int_cut_model()
    assert "n" in {c.tensor for c in graph.candidate_cuts(model)}  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cut 'n' is INT64: wire datatype FP16 applies to FLOAT"):
        graph.split(model, "n", "FP16")  # type: ignore[arg-type]
    parts = graph.split(model, "f", "FP16")  # type: ignore[arg-type]
    assert parts.head is not None
    x = np.array([[-1.7, 0.2, 2.9, 3.0]], np.float32)
    (f,) = _session(parts.head).run(None, {"x": x})
    (y,) = _session(parts.tail).run(None, {"f": f})
    np.testing.assert_array_equal(y, [[0.0, 0.0, 2.0, 3.0]])
