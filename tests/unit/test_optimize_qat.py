"""Quantisation-aware training of a head (edged.optimize.qat): the simulated INT8 head is the
graph ONNX Runtime's quantiser makes and runs, and the ``qat`` method wins back what PTQ
loses on a head over an INT8 backbone (docs/optimize-qat.md)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp
from sklearn.datasets import load_digits

from edged.learn.graph import compose
from edged.learn.head import Head, init_head, load_head, save_head, standardiser
from edged.learn.strategies import Hyper, train_head, tuned_hyper
from edged.optimize.data import Samples, open_model
from edged.optimize.head import METHODS as HEAD_METHODS
from edged.optimize.methods import METHODS, Options
from edged.optimize.qat import ActRange, Int8Head, quantise_weights, train_qat
from tests.daemon_process import EXAMPLE_MODELS

DIGITS_LEARN = EXAMPLE_MODELS / "digits_learn"


def _head_only(head: Head) -> onnx.ModelProto:
    """The served graph of ``head`` alone: an identity backbone whose input is the features."""
    value = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", head.in_dim])
    graph = helper.make_graph([], "identity", [value], [value])
    backbone = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return compose(backbone, head)


def _features(seed: int, rows: int = 400, width: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.1, 10, width)  # features on different scales
    return (rng.standard_normal((rows, width)) * spread + rng.normal(0, 3, width)).astype(
        np.float32
    )


@pytest.mark.parametrize(
    ("low", "high"),
    [(-3.5, 7.25), (0.0, 26.2), (0.2, 4.0), (-9.0, -1.0), (0.0, 0.0), (-1e-3, 1e-3)],
)
def test_an_activation_range_has_onnx_runtimes_scale_and_zero_point(
    low: float, high: float
) -> None:
    zero, scale = compute_scale_zp(
        np.array(low, np.float32), np.array(high, np.float32), np.uint8(0), np.uint8(255)
    )
    r = ActRange(low, high)
    assert r.scale == scale
    assert r.zero_point == int(zero)


@pytest.mark.parametrize("sizes", [[16, 32, 5], [16, 24, 24, 10]])
def test_the_int8_head_computes_what_onnx_runtime_runs_within_a_step(
    tmp_path: Path, sizes: list[int]
) -> None:
    x = _features(1)
    rng = np.random.default_rng(2)
    head = init_head(sizes, rng, *standardiser(x))
    head.biases = [rng.normal(0, 0.3, b.shape).astype(np.float32) for b in head.biases]
    onnx.save(_head_only(head), str(tmp_path / "float.onnx"))
    calibration = 64
    METHODS["int8-static-minmax"](
        tmp_path / "float.onnx", tmp_path / "int8.onnx", Samples({"features": x}),
        Options(calibration_samples=calibration),
    )  # fmt: skip
    graph = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    sim = Int8Head.calibrate(head, x[:calibration])

    # the same quantisers: activation scales and zero points, int8 weights and their scales
    names = ["standardised"] + [f"relu{i}" for i in range(head.layers - 1)] + ["logits"]
    for name, r in zip(names, sim.ranges, strict=True):
        assert inits[f"head_{name}_scale"] == r.scale, name
        assert int(inits[f"head_{name}_zero_point"]) == r.zero_point, name
    for i, w in enumerate(head.weights):
        q, scale = quantise_weights(w)
        np.testing.assert_array_equal(inits[f"head_fc{i}_weight_quantized"], q)
        np.testing.assert_array_equal(inits[f"head_fc{i}_weight_scale"], scale)

    # the same outputs: probabilities within one step, labels where the logits do not tie
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    probabilities, label = session.run(["probabilities", "label"], {"features": x})
    step = 1 / 255
    assert np.max(np.abs(probabilities - sim.probabilities(x))) <= step * 1.001
    logits = sim.logits(x)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.5 * sim.ranges[-1].step
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(label[clear], np.argmax(logits, axis=1)[clear])
    # and the float head is not that: quantisation moved the outputs
    assert np.max(np.abs(head.proba(x) - probabilities)) > step


def test_the_gradient_passes_where_no_quantiser_clamps_and_moves_the_float_weights() -> None:
    x = _features(3, rows=200)
    y = (x[:, 0] > np.median(x[:, 0])).astype(np.int64)
    head = init_head([16, 8, 2], np.random.default_rng(4), *standardiser(x))
    # calibrated on a few rows: the others go past the ranges and are clamped
    sim = Int8Head.calibrate(head, x[:16])
    _, _, _, masks = sim.forward(x)
    z = head.standardise(x)
    r = sim.ranges[0]
    clamped = ~masks[0]
    assert clamped.any()
    assert np.all((z[clamped] < r.low + r.step) | (z[clamped] > r.high - r.step))
    assert np.all(masks[0][(z > r.low + r.step) & (z < r.high - r.step)])
    tuned = train_qat(head, x, y, x[:16], Hyper(epochs=3, lr=0.01), seed=0)
    assert not np.array_equal(tuned.weights[0], head.weights[0])
    q, scale = quantise_weights(tuned.weights[0])
    assert not np.array_equal(tuned.weights[0], q * scale)  # the float weights, not the grid


@pytest.fixture(scope="module")
def ten_digits() -> tuple[np.ndarray, np.ndarray]:
    """Every digit (models/digits_learn's backbone was taught only 0-4), shuffled."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return x[order].astype(np.float32), y[order].astype(np.int64)


def test_qat_wins_back_what_int8_loses_on_a_head_over_an_int8_backbone(
    tmp_path: Path, ten_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """digits_learn's backbone with a head for all ten digits: its INT8 graph loses points
    (docs/optimize-qat.md), the qat variant's INT8 graph much fewer."""
    x, y = ten_digits
    backbone = onnx.load(str(DIGITS_LEARN / "1/backbone.onnx"))
    session = ort.InferenceSession(backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["features"], {"input": x[:1000]})[0]
    head = init_head([64, 64, 10], np.random.default_rng(0), *standardiser(features))
    head = train_head(head, features, y[:1000], tuned_hyper("training", epochs=60), seed=0)
    folder = tmp_path / "ten"
    (folder / "1").mkdir(parents=True)
    onnx.save(backbone, str(folder / "1/backbone.onnx"))
    save_head(folder / "1/head.npz", head)
    onnx.save(compose(backbone, head), str(folder / "1/model.onnx"))
    (folder / "model.toml").write_text(
        'name = "ten"\nformat = "onnx"\n[learn]\nbackbone = "backbone.onnx"\n'
        'features = "features"\nhead = "head.npz"\nstate = "learn_state.npz"\nstrategy = "replay"\n'
    )
    calib = Samples({"input": x[:1000]}, labels=y[:1000])

    def accuracy(path: Path) -> float:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean(np.argmax(s.run(["probabilities"], {"input": x[1000:]})[0], 1)
                             == y[1000:]) * 100)  # fmt: skip

    METHODS["int8-static-minmax"](folder / "1/model.onnx", tmp_path / "ptq.onnx", calib, Options())
    with open_model(folder) as source:
        produced = HEAD_METHODS["qat"](source, tmp_path / "qat.onnx", calib, Options())
    base = accuracy(folder / "1/model.onnx")
    ptq, qat = accuracy(tmp_path / "ptq.onnx"), accuracy(produced.path)
    assert base - ptq > 1.5  # post-training quantisation loses
    assert base - qat < 1.0  # the quantisation-aware head does not
    # the variant carries the float head its int8 weights were quantised from
    tuned = load_head(io.BytesIO(produced.files["head.npz"]))  # type: ignore[arg-type]
    inits = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(str(produced.path)).graph.initializer
    }
    for i, w in enumerate(tuned.weights):
        np.testing.assert_array_equal(inits[f"head_fc{i}_weight_quantized"], quantise_weights(w)[0])
