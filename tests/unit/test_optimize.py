"""edged optimize: each method's defining property, the gate, and the command on the example
digits model (real ONNX Runtime quantisation, real files)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from sklearn.datasets import load_digits

from edged.learn.head import init_head, load_head
from edged.learn.strategies import Hyper, train_head
from edged.optimize import gate, measure
from edged.optimize.data import Samples, load_samples, open_model, split
from edged.optimize.errors import OptimizeError
from edged.optimize.head import METHODS as HEAD_METHODS
from edged.optimize.head import HeadModel, distillation_loss, params
from edged.optimize.methods import (
    LITERT_REASON,
    METHODS,
    Options,
    Refused,
    magnitude_prune,
    prune_units,
)
from edged.optimize.qat import fake_quant_weights
from edged.optimize.report import VariantReport, pareto
from edged.optimize.run import LINEAGE_FILE, Settings, optimize
from tests.daemon_process import EXAMPLE_MODELS

DIGITS = EXAMPLE_MODELS / "digits"
DIGITS_ONNX = DIGITS / "1" / "model.onnx"


@pytest.fixture(scope="module")
def digits_samples() -> Samples:
    data = load_digits()
    return Samples({"input": data.data.astype(np.float32)}, data.target.astype(np.int64))


@pytest.fixture
def calibration(tmp_path: Path, digits_samples: Samples) -> Path:
    folder = tmp_path / "calibration"
    folder.mkdir()
    assert digits_samples.labels is not None
    np.savez(
        folder / "digits.npz",
        input=digits_samples.inputs["input"][:600],
        labels=digits_samples.labels[:600],
    )
    return folder


# -- methods ------------------------------------------------------------------------------


def _dequantized_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{float weight name: (dequantised weight, scale broadcast to its shape)} of a QDQ
    model's int8 weights."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        if q.dtype != np.int8:
            continue
        scale = inits[node.input[1]].astype(np.float64)
        zero = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
            zero = np.reshape(zero, shape) if np.ndim(zero) else zero
        name = node.input[0].removesuffix("_quantized")
        found[name] = ((q.astype(np.float64) - zero) * scale, np.broadcast_to(scale, q.shape))
    return found


@pytest.mark.parametrize("method", ["int8-static-minmax", "int8-static-percentile"])
def test_static_int8_weights_lie_within_half_a_scale_step(
    tmp_path: Path, digits_samples: Samples, method: str
) -> None:
    out = tmp_path / "q.onnx"
    METHODS[method](DIGITS_ONNX, out, digits_samples.rows(slice(0, 200)), Options())
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(DIGITS_ONNX).graph.initializer}
    weights = _dequantized_weights(onnx.load(out))
    assert {"fc1_weight", "fc2_weight"} <= set(weights)
    for name in ("fc1_weight", "fc2_weight"):
        dequantized, scale = weights[name]
        error = np.abs(dequantized - original[name])
        assert np.all(error <= scale / 2 + 1e-7), name
        assert len(np.unique(scale)) > 1  # per channel, not one scale for the tensor


def test_magnitude_pruning_zeroes_exactly_the_smallest_share() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((37, 11)).astype(np.float32)
    for sparsity in (0.0, 0.25, 0.5, 0.9):
        pruned = magnitude_prune(weights, sparsity)
        zeros = pruned == 0
        assert int(zeros.sum()) == round(sparsity * weights.size)
        if zeros.any():
            assert np.abs(weights[zeros]).max() <= np.abs(weights[~zeros]).min()
        assert np.array_equal(pruned[~zeros], weights[~zeros])
    with pytest.raises(OptimizeError, match="sparsity"):
        magnitude_prune(weights, 1.0)


def test_magnitude_pruning_of_a_model_reaches_the_sparsity_asked(
    tmp_path: Path, digits_samples: Samples
) -> None:
    out = tmp_path / "p.onnx"
    METHODS["prune-magnitude"](DIGITS_ONNX, out, digits_samples, Options(sparsity=0.7))
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    for name in ("fc1_weight", "fc2_weight"):
        assert np.mean(inits[name] == 0) == pytest.approx(0.7, abs=0.5 / inits[name].size)
    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(DIGITS_ONNX).graph.initializer}
    assert np.array_equal(inits["scaler_mean"], before["scaler_mean"])  # not a weight


def test_structured_pruning_drops_the_weakest_units_and_keeps_the_function_of_dead_ones() -> None:
    rng = np.random.default_rng(1)
    w_in = rng.standard_normal((8, 6)).astype(np.float32)
    b_in = rng.standard_normal(6).astype(np.float32)
    w_in[:, [1, 4]] = 0
    b_in[[1, 4]] = 0  # two dead units
    w_out = rng.standard_normal((6, 3)).astype(np.float32)
    w1, b1, w2, keep = prune_units(w_in, b_in, w_out, 2 / 6)
    assert keep.tolist() == [0, 2, 3, 5]
    x = rng.standard_normal((5, 8)).astype(np.float32)
    before = np.maximum(x @ w_in + b_in, 0) @ w_out
    after = np.maximum(x @ w1 + b1, 0) @ w2
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_structured_pruning_shrinks_the_dense_layers(
    tmp_path: Path, digits_samples: Samples
) -> None:
    out = tmp_path / "s.onnx"
    produced = METHODS["prune-structured"](DIGITS_ONNX, out, digits_samples, Options(sparsity=0.5))
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    assert inits["fc1_weight"].shape == (64, 32)
    assert inits["fc2_weight"].shape == (32, 10)
    assert produced.notes["hidden_units_kept"] == {"fc1": 32}


def test_litert_is_refused_with_the_reason(tmp_path: Path, digits_samples: Samples) -> None:
    with pytest.raises(Refused, match="onnx2tf"):
        METHODS["litert-int8"](DIGITS_ONNX, tmp_path / "x", digits_samples, Options())
    assert not (tmp_path / "x").exists()


# -- the gate -----------------------------------------------------------------------------


def test_the_gate_refuses_a_variant_over_budget() -> None:
    agree = gate.Budget(min_agreement=0.99)
    assert gate.judge(agree, 0.995, None, None)[0]
    ok, reason = gate.judge(agree, 0.985, None, None)
    assert not ok
    assert "0.9850 < 0.99" in reason
    drop = gate.Budget(max_accuracy_drop=1.0)
    assert gate.judge(drop, 0.5, 0.95, 0.955)[0]  # labels: accuracy decides, not agreement
    ok, reason = gate.judge(drop, 1.0, 0.94, 0.955)
    assert not ok
    assert "accuracy drop 1.50 points > 1" in reason
    ok, reason = gate.judge(drop, 0.98, None, None)  # no labels: disagreement in points
    assert not ok
    assert "no labels" in reason


@pytest.mark.parametrize(
    ("drop", "agreement", "match"),
    [
        (1.0, 0.99, "one budget"),
        (-1.0, None, "max-accuracy-drop"),
        (None, 1.5, "min-agreement"),
    ],
)
def test_a_bad_budget_is_named(drop: float | None, agreement: float | None, match: str) -> None:
    with pytest.raises(OptimizeError, match=match):
        gate.Budget(drop, agreement)
    assert gate.Budget.of(None, None).min_agreement == gate.DEFAULT_MIN_AGREEMENT


def test_the_default_budget_follows_the_task_and_a_chosen_one_never_changes() -> None:
    detector = gate.Budget.of(None, None).for_task(detection=True)
    assert detector.max_accuracy_drop == gate.DEFAULT_MAX_F1_DROP
    assert detector.min_agreement is None
    assert gate.Budget.of(None, None).for_task(detection=False).min_agreement == 0.99
    assert gate.Budget.of(None, 0.9).for_task(detection=True) == gate.Budget(min_agreement=0.9)
    assert gate.Budget.of(2.0, None).for_task(detection=True).max_accuracy_drop == 2.0


# -- data -----------------------------------------------------------------------------------


def test_a_probability_map_that_rounds_past_one_is_still_decided_at_one_half() -> None:
    parent = np.array([[[[0.0, 0.2, 0.7, 1.0000001]]]], np.float32)
    variant = np.array([[[[1e-7, 0.2, 0.7, 1.0]]]], np.float32)
    want = np.array([[[[False, False, True, True]]]])
    np.testing.assert_array_equal(measure.decisions(parent), want)
    np.testing.assert_array_equal(measure.decisions(variant), want)
    # a score that is not a probability is still decided at 0
    np.testing.assert_array_equal(measure.decisions(np.array([-2.0, 0.2, 3.0])), [0, 1, 1])


def test_calibration_and_holdout_never_share_a_row(digits_samples: Samples) -> None:
    calib, held = split(digits_samples, 0.25, seed=3)
    assert len(calib) + len(held) == len(digits_samples)
    rows = {r.tobytes() for r in calib.inputs["input"]}
    assert not any(r.tobytes() in rows for r in held.inputs["input"]) or len(rows) < len(calib)
    assert len(held) == round(len(digits_samples) * 0.25)


def test_samples_name_what_is_wrong(tmp_path: Path) -> None:
    np.save(tmp_path / "image.npy", np.zeros((3, 64), np.float32))
    with pytest.raises(OptimizeError, match="image is not an input"):
        load_samples(tmp_path, ["input"])
    (tmp_path / "image.npy").unlink()
    with pytest.raises(OptimizeError, match="no data for input input"):
        load_samples(tmp_path, ["input"])
    np.save(tmp_path / "input.npy", np.zeros((3, 64), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(2, np.int64))
    with pytest.raises(OptimizeError, match=r"labels must be integers of shape \(3,\)"):
        load_samples(tmp_path, ["input"])


# -- the whole run ----------------------------------------------------------------------------


def test_only_variants_within_budget_are_written(tmp_path: Path, calibration: Path) -> None:
    out = tmp_path / "out"
    settings = Settings(
        methods=("int8-static-minmax", "prune-structured", "litert-int8"),
        budget=gate.Budget(max_accuracy_drop=1.0),
        runs=3,
    )
    settings.options = Options(sparsity=0.9)  # 90% of the hidden units: far over budget
    result = optimize(DIGITS, calibration, out, settings)
    by = {r.method: r for r in result.reports}
    assert list(by) == ["original", "int8-static-minmax", "prune-structured", "litert-int8"]
    assert by["int8-static-minmax"].accepted
    assert by["int8-static-minmax"].accuracy_drop is not None
    assert by["int8-static-minmax"].accuracy_drop <= 1.0
    written = out / "int8-static-minmax" / "digits"
    assert (written / "1" / "model.onnx").is_file()
    assert not by["prune-structured"].accepted
    assert by["prune-structured"].accuracy_drop is not None
    assert by["prune-structured"].accuracy_drop > 1.0
    assert not (out / "prune-structured").exists()  # never written as a version
    assert by["prune-structured"].path is None
    assert not by["litert-int8"].accepted
    assert by["litert-int8"].reason == LITERT_REASON
    lineage = json.loads((written / "1" / LINEAGE_FILE).read_text())
    assert lineage["method"] == "int8-static-minmax"
    assert lineage["parent"]["name"] == "digits"
    assert len(lineage["calibration"]["sha256"]) == 64
    assert lineage["calibration"]["sha256"] != lineage["holdout"]["sha256"]
    assert lineage["figures"]["accepted"] is True
    assert (written / "model.toml").read_text() == (DIGITS / "model.toml").read_text()
    assert by["int8-static-minmax"].size_bytes is not None
    assert by["original"].size_bytes is not None
    assert by["int8-static-minmax"].size_bytes < by["original"].size_bytes
    assert "cpu-onnx" in by["int8-static-minmax"].latency_ms
    assert result.plot_path is not None
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(result.report_path.read_text())
    assert [r["method"] for r in saved] == list(by)


def test_the_command_prints_one_json_object_per_variant(tmp_path: Path, calibration: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "edged.cli", "optimize", str(DIGITS), "--calibration",
         str(calibration), "--out", str(out), "--methods", "int8-dynamic,litert-int8",
         "--min-agreement", "0.95", "--runs", "3", "--no-plot", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["method"] for r in lines] == ["original", "int8-dynamic", "litert-int8"]
    for key in ("path", "size_bytes", "latency_ms", "agreement", "accuracy", "accepted", "reason"):
        assert all(key in r for r in lines), key
    assert lines[1]["accepted"]
    assert lines[1]["path"] == str(out / "int8-dynamic" / "digits" / "1" / "model.onnx")
    assert not lines[2]["accepted"]
    assert "onnx2tf" in lines[2]["reason"]
    assert not (out / "pareto.png").exists()


def test_the_command_names_a_bad_calibration_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "pixels.npy", np.zeros((4, 64), np.float32))
    run = subprocess.run(
        [sys.executable, "-m", "edged.cli", "optimize", str(DIGITS), "--calibration",
         str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "pixels is not an input of the model" in run.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "edged.cli", "optimize", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for flag in ("--calibration", "--out", "--methods", "--max-accuracy-drop", "--min-agreement"):
        assert flag in help_text


# -- head methods (a [learn] model: models/digits_learn) -------------------------------------

DIGITS_LEARN = EXAMPLE_MODELS / "digits_learn"


def test_the_soft_target_loss_is_hintons_and_its_gradient_checks_numerically() -> None:
    rng = np.random.default_rng(4)
    student = rng.standard_normal((6, 5))
    teacher = rng.standard_normal((6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    t, alpha = 3.0, 0.7

    def reference(s: np.ndarray) -> float:  # written out from the formula, in float64
        def log_softmax(z: np.ndarray) -> np.ndarray:
            z = z - z.max(axis=1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

        p_teacher = np.exp(log_softmax(teacher.astype(np.float64) / t))
        kl = np.sum(p_teacher * (np.log(p_teacher) - log_softmax(s / t)), axis=1).mean()
        ce = -log_softmax(s)[np.arange(6), labels].mean()
        return float(t * t * kl + alpha * ce)

    loss, grad = distillation_loss(student.astype(np.float32), teacher, labels, t, alpha)
    assert loss == pytest.approx(reference(student), rel=1e-5)
    eps = 1e-4
    numeric = np.zeros_like(student)
    for i in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[i] += eps
        down[i] -= eps
        numeric[i] = (reference(up) - reference(down)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_fake_quantised_weights_lie_on_the_int8_grid_within_half_a_step() -> None:
    w = np.random.default_rng(5).standard_normal((32, 8)).astype(np.float32)
    q = fake_quant_weights(w)
    scale = np.abs(w).max(axis=0) / 127  # ONNX Runtime's symmetric int8: [-127, 127]
    assert np.all(np.abs(q - w) <= scale * 0.5001)  # float32 rounding at the clipped max
    steps = q / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(np.round(steps)).max() == 127


def test_a_distilled_student_has_at_most_a_quarter_of_the_teacher_params(
    tmp_path: Path, digits_samples: Samples
) -> None:
    assert digits_samples.labels is not None
    known = digits_samples.labels < 5  # digits_learn was trained on 0-4
    samples = digits_samples.rows(np.flatnonzero(known)[:400])
    with open_model(DIGITS_LEARN) as source:
        produced = HEAD_METHODS["distil"](source, tmp_path / "d.onnx", samples, Options())
        teacher = HeadModel.of(source).head
    student = load_head(io.BytesIO(produced.files["head.npz"]))
    assert params(student) <= params(teacher) / 4
    assert student.layers == 2
    x = samples.inputs["input"]
    with open_model(DIGITS_LEARN) as source:
        features = HeadModel.of(source).features(samples)
    assert np.mean(student.predict(features) == samples.labels) > 0.9  # it learnt the task
    sess = ort.InferenceSession(str(produced.path))
    served = sess.run(["probabilities"], {"input": x})[0]
    np.testing.assert_allclose(served, student.proba(features), rtol=1e-4, atol=1e-5)


def test_qat_trains_at_the_quantised_weights() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    head = init_head([8, 4, 2], rng, np.zeros(8, np.float32), np.ones(8, np.float32))
    seen: list[np.ndarray] = []

    def spy(w: np.ndarray) -> np.ndarray:
        seen.append(w)
        return fake_quant_weights(w)

    tuned = train_head(head, x, y, Hyper(epochs=2), seed=0, fake_quant=spy)
    assert seen  # every forward went through the fake quantiser
    assert not np.array_equal(tuned.weights[0], head.weights[0])  # float weights moved
    assert not np.array_equal(tuned.weights[0], fake_quant_weights(tuned.weights[0]))


def test_head_methods_refuse_a_model_without_a_head(
    tmp_path: Path, digits_samples: Samples
) -> None:
    with open_model(DIGITS) as source, pytest.raises(Refused, match=r"\[learn\] table"):
        HEAD_METHODS["distil"](source, tmp_path / "x.onnx", digits_samples, Options())


def test_entropy_calibration_narrows_activation_ranges_but_not_the_outputs(
    tmp_path: Path, digits_samples: Samples
) -> None:
    scales = {}
    for method in ("int8-static-minmax", "int8-static-entropy"):
        out = tmp_path / f"{method}.onnx"
        METHODS[method](DIGITS_ONNX, out, digits_samples.rows(slice(0, 300)), Options())
        scales[method] = {
            i.name: float(numpy_helper.to_array(i).ravel()[0])
            for i in onnx.load(out).graph.initializer
            if i.name in {"standardized_scale", "hidden_scale", "probabilities_scale"}
        }
    minmax, entropy = scales["int8-static-minmax"], scales["int8-static-entropy"]
    assert entropy["hidden_scale"] < minmax["hidden_scale"]  # the KL search clipped it
    assert entropy["standardized_scale"] <= minmax["standardized_scale"]
    assert entropy["probabilities_scale"] == minmax["probabilities_scale"]  # an output


def test_the_exclusion_sweep_keeps_the_noisiest_tensor_float(
    tmp_path: Path, digits_samples: Samples
) -> None:
    out = tmp_path / "x.onnx"
    produced = METHODS["int8-static-excluded"](
        DIGITS_ONNX, out, digits_samples.rows(slice(0, 300)), Options()
    )
    (tensor, db), *_ = produced.notes["sqnr_db"].items()
    assert db < Options().sqnr_floor_db
    graph = onnx.load(out).graph
    producer = next(n for n in graph.node if tensor in n.output)
    assert producer.name in produced.notes["excluded_nodes"]
    quantised = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert tensor not in quantised  # neither its producer nor a consumer quantises it
    minmax = tmp_path / "m.onnx"
    METHODS["int8-static-minmax"](
        DIGITS_ONNX, minmax, digits_samples.rows(slice(0, 300)), Options()
    )
    assert tensor in {
        n.input[0] for n in onnx.load(minmax).graph.node if n.op_type == "QuantizeLinear"
    }


def test_the_pareto_front_keeps_only_what_nothing_beats() -> None:
    def variant(method: str, size: int, ms: float, agreement: float) -> VariantReport:
        r = VariantReport(method, None, True, "", size_bytes=size, agreement=agreement)
        r.latency_ms["cpu-onnx"] = ms
        return r

    reports = [
        variant("original", 100, 1.0, 1.0),
        variant("small", 30, 1.2, 0.99),
        variant("worse", 40, 1.3, 0.98),  # bigger, slower and worse than "small"
        variant("fast", 60, 0.5, 0.995),
    ]
    assert pareto(reports) == ["original", "small", "fast"]


def test_a_bundle_or_a_version_folder_is_a_model_too(tmp_path: Path) -> None:
    from edged.fleet.build import build_bundle

    bundle = build_bundle(DIGITS, 1, tmp_path / "digits-1.tar.gz")
    with open_model(bundle) as source:
        assert source.name == "digits"
        assert source.path.read_bytes() == DIGITS_ONNX.read_bytes()
        assert source.model_toml == (DIGITS / "model.toml").read_text()
    with open_model(DIGITS / "1") as source:
        assert (source.name, source.path) == ("digits", DIGITS / "1" / "model.onnx")
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(OptimizeError, match="not an ONNX model"), open_model(tmp_path / "m.tflite"):
        pass


def test_an_unknown_output_is_named(tmp_path: Path, calibration: Path) -> None:
    settings = Settings(methods=("int8-dynamic",), output="logits", runs=1, plot=False)
    with pytest.raises(OptimizeError, match="--output 'logits' is not an output"):
        optimize(DIGITS, calibration, tmp_path / "out", settings)
