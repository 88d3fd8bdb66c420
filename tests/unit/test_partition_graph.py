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
