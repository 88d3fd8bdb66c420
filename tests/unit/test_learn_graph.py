"""edged.learn.graph: the MLP backbone and the served backbone + head graph, through onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edged.learn.graph import IR_VERSION, OPSET, compose, mlp_backbone
from edged.learn.head import Head, accuracy, init_head, load_head, read_npz, standardiser
from edged.learn.strategies import load_state

ort = pytest.importorskip("onnxruntime")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(
        model.SerializeToString(deterministic=True), providers=["CPUExecutionProvider"]
    )


def _backbone(seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(size=(64, 32)).astype(np.float32) / 8,
        rng.normal(size=(32, 24)).astype(np.float32) / 6,
    ]
    biases = [
        rng.normal(size=32).astype(np.float32) * 0.1,
        rng.normal(size=24).astype(np.float32) * 0.1,
    ]
    return mlp_backbone(weights, biases, doc="test backbone"), weights, biases


def _numpy_backbone(
    x: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray]
) -> np.ndarray:
    for w, b in zip(weights, biases, strict=True):
        x = np.maximum(x @ w + b, 0)
    return x


def _head(sizes: tuple[int, ...], features: np.ndarray, seed: int = 1) -> Head:
    rng = np.random.default_rng(seed)
    mean, scale = standardiser(features)
    head = init_head(sizes, rng, mean, scale)
    for b in head.biases:
        b[:] = rng.normal(size=b.shape)
    return head


def test_mlp_backbone_matches_numpy() -> None:
    model, weights, biases = _backbone()
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    x = np.random.default_rng(2).uniform(0, 16, size=(9, 64)).astype(np.float32)
    (features,) = _session(model).run(["features"], {"input": x})
    np.testing.assert_allclose(features, _numpy_backbone(x, weights, biases), rtol=1e-5, atol=1e-5)
    # The batch axis is dynamic.
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == 64


@pytest.mark.parametrize(
    "sizes", [(24, 10), (24, 16, 10), (24, 16, 12, 10)], ids=["1-layer", "2-layer", "3-layer"]
)
def test_composed_graph_equals_the_numpy_head(sizes: tuple[int, ...]) -> None:
    backbone, weights, biases = _backbone()
    x = np.random.default_rng(3).uniform(0, 16, size=(33, 64)).astype(np.float32)
    features = _numpy_backbone(x, weights, biases)
    head = _head(sizes, features)
    served = compose(backbone, head, doc="served")
    probabilities, label = _session(served).run(["probabilities", "label"], {"input": x})
    np.testing.assert_allclose(probabilities, head.proba(features), atol=1e-5)
    np.testing.assert_array_equal(label, head.predict(features))
    assert probabilities.dtype == np.float32
    assert label.dtype == np.int64
    assert label.shape == (33,)
    outputs = {o.name: o.type.tensor_type for o in served.graph.output}
    assert list(outputs) == ["probabilities", "label"]
    assert outputs["probabilities"].elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in outputs["probabilities"].shape.dim] == ["batch", 10]
    assert outputs["label"].elem_type == TensorProto.INT64
    assert served.doc_string == "served"
    # Deterministic bytes for the same inputs.
    again = compose(backbone, head.copy(), doc="served")
    assert again.SerializeToString(deterministic=True) == served.SerializeToString(
        deterministic=True
    )


def _backbone_with_extras() -> onnx.ModelProto:
    """A backbone with a second output, a dead branch, and a value named like our prefix."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    dead = rng.normal(size=(8, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["pixels", "w"], ["head_raw"], name="head_matmul"),
        helper.make_node("Relu", ["head_raw"], ["emb"], name="relu"),
        helper.make_node("MatMul", ["pixels", "dead_w"], ["aux"], name="aux"),
    ]
    graph = helper.make_graph(
        nodes,
        "extras",
        inputs=[helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 8])],
        outputs=[
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["n", 6]),
            helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["n", 3]),
        ],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(dead, "dead_w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_compose_drops_other_outputs_and_avoids_name_clashes() -> None:
    backbone = _backbone_with_extras()
    x = np.random.default_rng(5).normal(size=(5, 8)).astype(np.float32)
    (emb,) = _session(backbone).run(["emb"], {"pixels": x})
    head = _head((6, 4, 3), emb)
    served = compose(backbone, head, features="emb")
    assert [o.name for o in served.graph.output] == ["probabilities", "label"]
    assert "aux" not in {n.name for n in served.graph.node}  # pruned
    assert "dead_w" not in {t.name for t in served.graph.initializer}
    # "head_" is taken by the backbone, so the head's names use another prefix.
    added = {t.name for t in served.graph.initializer} - {"w"}
    assert added
    assert all(name.startswith("head1_") for name in added)
    probabilities, label = _session(served).run(None, {"pixels": x})
    np.testing.assert_allclose(probabilities, head.proba(emb), atol=1e-5)
    np.testing.assert_array_equal(label, head.predict(emb))


def test_compose_refuses_what_does_not_fit() -> None:
    backbone, _, _ = _backbone()
    features = np.random.default_rng(6).normal(size=(20, 24)).astype(np.float32)
    with pytest.raises(ValueError, match="no value named 'embedding'"):
        compose(backbone, _head((24, 10), features), features="embedding")
    wide = np.random.default_rng(6).normal(size=(20, 30)).astype(np.float32)
    with pytest.raises(ValueError, match="has 24 columns, the head takes 30"):
        compose(backbone, _head((30, 10), wide))
    old = onnx.ModelProto()
    old.CopyFrom(backbone)
    old.opset_import[0].version = 11
    with pytest.raises(ValueError, match="opset 11"):
        compose(old, _head((24, 10), features))


def test_mlp_backbone_refuses_shapes_that_do_not_chain() -> None:
    with pytest.raises(ValueError, match="layer 1 takes 5 inputs"):
        mlp_backbone([np.zeros((4, 3)), np.zeros((5, 2))], [np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match="at least one"):
        mlp_backbone([], [])


def test_the_example_trainable_model_is_backbone_plus_head() -> None:
    """models/digits_learn: model.onnx is exactly compose(backbone.onnx, head.npz), and the
    files the daemon and its tests read are what they should be (no retraining here: the
    byte-for-byte rebuild is models/build_trainable.py --check)."""
    root = Path(__file__).resolve().parents[2] / "models" / "digits_learn"
    version = root / "1"
    backbone = onnx.load(str(version / "backbone.onnx"))
    served = onnx.load(str(version / "model.onnx"))
    head = load_head(version / "head.npz")
    rebuilt = compose(backbone, head, doc=served.doc_string)
    assert rebuilt.SerializeToString(deterministic=True) == (version / "model.onnx").read_bytes()
    state = load_state(version / "learn_state.npz")
    assert state.replay is not None
    assert (len(state.replay), len(state.holdout), state.tasks) == (200, 100, 0)
    assert set(state.holdout.labels.tolist()) == {0, 1, 2, 3, 4}
    new, old = read_npz(root / "test_new.npz"), read_npz(root / "test_old.npz")
    for data, classes in ((new, {5, 6, 7, 8, 9}), (old, {0, 1, 2, 3, 4})):
        assert data["x"].dtype == np.float32
        assert data["x"].shape == (100, 64)
        assert data["y"].dtype == np.int64
        assert set(data["y"].tolist()) == classes
    (features,) = _session(backbone).run(["features"], {"input": old["x"]})
    assert accuracy(head, features, old["y"]) > 0.95
    assert (
        accuracy(head, _session(backbone).run(["features"], {"input": new["x"]})[0], new["y"]) == 0
    )


# -- without the learn extra ------------------------------------------------------------------

# Runs the worker as the daemon does (python -m edged.learn.worker JOB_DIR) in an interpreter
# where importing onnx fails, as in a base install without edged[learn] / edged-learn.
_WITHOUT_ONNX = """
import runpy, sys
sys.modules["onnx"] = None  # import onnx -> ImportError; importlib.util.find_spec -> None
sys.argv = ["edged.learn.worker", sys.argv[1]]
runpy.run_module("edged.learn.worker", run_name="__main__")
"""


def test_without_onnx_learning_is_refused_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edged.learn import task, worker

    assert worker.learn_support_missing() is None  # the test extras include edged[learn]
    monkeypatch.setitem(sys.modules, "onnx", None)
    missing = worker.learn_support_missing()
    assert missing is not None
    assert "edged[learn]" in missing
    assert "edged-learn" in missing

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ONNX, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 1
    assert "edged[learn]" in result.stderr
    assert "apt install edged-learn" in result.stderr
    assert not (tmp_path / task.RESULT_FILE).exists()
