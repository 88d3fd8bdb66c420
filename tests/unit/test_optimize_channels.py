"""Structured convolution channel pruning (edged.optimize.channels, the ``prune-channels-*``
methods): small convolutional nets built with onnx.helper and run by ONNX Runtime, and the
real PP-OCR direction classifier from the test corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edged.optimize import channels
from edged.optimize.data import Samples
from edged.optimize.errors import OptimizeError
from edged.optimize.methods import METHODS, Options, channel_moments, load_model

RNG = np.random.default_rng(3)


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(
    nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], out: int = 4
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def chain(zero: tuple[int, ...] = (), width: int = 8) -> onnx.ModelProto:
    """x -> Conv A (``width``, 3x3) -> BN -> Relu -> depthwise Conv -> Relu -> Conv B (4, 1x1).
    Channels ``zero`` of A have zero filters, bias and BN shift (they are exactly 0 after it)."""
    a, bias = _w(width, 3, 3, 3), _w(width)
    beta, mean = _w(width), _w(width)
    for c in zero:
        a[c], bias[c], beta[c], mean[c] = 0, 0, 0, 0
    weights = {
        "a": a, "a_b": bias,
        "g": np.abs(_w(width)) + 0.5, "beta": beta, "mean": mean,
        "var": np.abs(_w(width)) + 0.5,
        "dw": _w(width, 1, 3, 3), "dw_b": _w(width) * 0.1,
        "b": _w(4, width, 1, 1),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "a", "a_b"], ["t1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["t1", "g", "beta", "mean", "var"], ["t2"]),
        helper.make_node("Relu", ["t2"], ["t3"]),
        helper.make_node("Conv", ["t3", "dw"], ["t4"], group=width, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t4"], ["t5"]),
        helper.make_node("Conv", ["t5", "b"], ["y"]),
    ]
    if zero:  # the depthwise bias would turn a zero channel into a constant one
        weights["dw_b"][list(zero)] = 0
    nodes[3].input.append("dw_b")
    return _model(nodes, weights)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    out: np.ndarray = session.run(None, {"x": x})[0]
    return out


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by the name they had before pruning renamed them."""
    return {i.name.split("__pruned_")[0]: numpy_helper.to_array(i) for i in model.graph.initializer}


def strictly_checked(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


X = RNG.standard_normal((5, 3, 8, 8)).astype(np.float32)


def test_pruning_nothing_equals_the_original_exactly() -> None:
    model = chain()
    want = run(model, X)
    result = channels.prune_channels(model, 0.0)
    assert result.pruned == {}
    assert np.array_equal(run(model, X), want)


def test_pruned_chain_shrinks_every_tensor_of_the_set_and_onnx_runtime_runs_it() -> None:
    model = chain()
    result = channels.prune_channels(model, 0.5)
    assert result.pruned == {"t1": (8, 4)}
    strictly_checked(model)
    w = inits(model)
    assert w["a"].shape == (4, 3, 3, 3)
    assert w["a_b"].shape == w["g"].shape == w["beta"].shape == w["var"].shape == (4,)
    assert w["dw"].shape == (4, 1, 3, 3)
    assert w["b"].shape == (4, 4, 1, 1)
    dw = next(n for n in model.graph.node if n.output[0] == "t4")
    assert helper.get_attribute_value(dw.attribute[0]) == 4  # group shrinks with the channels
    assert run(model, X).shape == (5, 4, 8, 8)
    assert result.params_after < result.params_before


@pytest.mark.parametrize("refit", [False, True])
def test_pruning_channels_that_are_zero_leaves_the_outputs_unchanged(refit: bool) -> None:
    model = chain(zero=(1, 5))
    original = inits(model)
    want = run(model, X)
    moments = None
    if refit:
        names = channels.reader_inputs(model)
        moments = channel_moments(model, names, Samples({"x": X}), 5)
    result = channels.prune_channels(model, 0.25, moments=moments)
    assert result.pruned == {"t1": (8, 6)}
    kept = [0, 2, 3, 4, 6, 7]  # the zero channels rank lowest and go
    assert np.array_equal(inits(model)["a"], original["a"][kept])
    # equal up to the kernels' summation order, which changes with the channel count
    np.testing.assert_allclose(run(model, X), want, rtol=1e-5, atol=1e-5)


def test_the_refit_replaces_a_removed_channel_that_is_affine_in_the_kept_ones() -> None:
    a, bias = _w(4, 3, 1, 1), _w(4)
    a[3], bias[3] = 2 * a[0], 2 * bias[0] + 1  # channel 3 = 2 * channel 0 + 1, everywhere
    weights = {"a": a, "a_b": bias, "b": _w(4, 4, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "a", "a_b"], ["t1"]),
        helper.make_node("Conv", ["t1", "b"], ["y"]),
    ]
    want = run(_model(nodes, weights), X)
    sliced, refitted = _model(nodes, weights), _model(nodes, weights)
    channels.prune_channels(sliced, 0.25)
    moments = channel_moments(refitted, channels.reader_inputs(refitted), Samples({"x": X}), 5)
    result = channels.prune_channels(refitted, 0.25, moments=moments)
    assert result.pruned == {"t1": (4, 3)}
    assert inits(refitted)["a"].shape == (3, 3, 1, 1)
    assert not np.allclose(run(sliced, X), want, atol=1e-2)
    np.testing.assert_allclose(run(refitted, X), want, rtol=1e-3, atol=1e-3)


def squeeze_excite(zero: tuple[int, ...] = ()) -> onnx.ModelProto:
    """A (8) -> Relu -> r; gate = HardSigmoid(S2(Relu(S1(GAP(r))))); Mul(r, gate) + residual
    Conv R (8, 1x1) of x, plus a per-channel constant -> Conv C (4)."""
    a, s2, res, k = _w(8, 3, 3, 3), _w(8, 2, 1, 1), _w(8, 3, 1, 1), _w(1, 8, 1, 1)
    for c in zero:
        a[c], s2[c], res[c], k[0, c] = 0, 0, 0, 0
    weights = {"a": a, "s1": _w(2, 8, 1, 1), "s2": s2, "res": res, "k": k, "c": _w(4, 8, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "a"], ["t1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Conv", ["p", "s1"], ["q1"]),
        helper.make_node("Relu", ["q1"], ["q2"]),
        helper.make_node("Conv", ["q2", "s2"], ["q3"]),
        helper.make_node("HardSigmoid", ["q3"], ["gate"]),
        helper.make_node("Mul", ["r", "gate"], ["m"]),
        helper.make_node("Conv", ["x", "res"], ["skip"]),
        helper.make_node("Add", ["m", "skip"], ["sum"]),
        helper.make_node("Add", ["sum", "k"], ["biased"]),
        helper.make_node("Conv", ["biased", "c"], ["y"]),
    ]
    return _model(nodes, weights)


def test_coupled_sets_squeeze_excite_and_residual_are_pruned_together() -> None:
    model = squeeze_excite()
    original = inits(model)
    result = channels.prune_channels(model, 0.5)
    # A, S2 (the gate) and R (the residual) produce one set of 8; S1's 2 stay (under 4)
    assert list(result.pruned.values()) == [(8, 4)]
    strictly_checked(model)
    w = inits(model)
    keep = [c for c in range(8) if any(np.array_equal(row, original["a"][c]) for row in w["a"])]
    assert len(keep) == 4
    assert np.array_equal(w["s2"], original["s2"][keep])  # the same channels from every producer
    assert np.array_equal(w["res"], original["res"][keep])
    assert np.array_equal(w["k"], original["k"][:, keep])  # the per-channel constant too
    assert np.array_equal(w["s1"], original["s1"][:, keep])
    assert np.array_equal(w["c"], original["c"][:, keep])
    assert run(model, X).shape == (5, 4, 8, 8)


def test_zero_channels_of_a_coupled_set_prune_without_changing_the_outputs() -> None:
    model = squeeze_excite(zero=(2, 6))
    want = run(model, X)
    channels.prune_channels(model, 0.25)
    assert inits(model)["a"].shape[0] == 6
    np.testing.assert_allclose(run(model, X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("reader", "why"),
    [
        (helper.make_node("Concat", ["t1", "t1"], ["cat"], axis=1), "Concat"),
        (helper.make_node("Conv", ["t1", "g"], ["cat"], group=2), "with group 2"),
    ],
)
def test_sets_a_concat_or_grouped_conv_reads_are_skipped_and_named(
    reader: onnx.NodeProto, why: str
) -> None:
    weights = {"a": _w(8, 3, 1, 1), "g": _w(16, 4, 1, 1), "b": _w(4, 16, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "a"], ["t1"]),
        reader,
        helper.make_node("Conv", ["cat", "b"], ["y"]),
    ]
    model = _model(nodes, weights)
    want = run(model, X)
    result = channels.prune_channels(model, 0.5)
    assert "t1" not in result.pruned
    assert why in result.skipped["t1"]
    assert np.array_equal(run(model, X), want)


def test_a_graph_output_is_never_pruned() -> None:
    nodes = [helper.make_node("Conv", ["x", "a"], ["y"])]
    model = _model(nodes, {"a": _w(8, 3, 1, 1)}, out=8)
    result = channels.prune_channels(model, 0.5)
    assert result.pruned == {}
    assert "graph output y" in result.skipped["y"]


@pytest.mark.parametrize(
    ("width", "ratio", "align", "kept"),
    [(88, 0.25, 1, 66), (88, 0.25, 8, 64), (32, 0.25, 8, 24), (8, 0.5, 8, 8), (12, 0.5, 8, 6),
     (10, 0.99, 1, 1)],
)  # fmt: skip
def test_kept_channels_aligns_to_the_kernel_block(
    width: int, ratio: float, align: int, kept: int
) -> None:
    assert channels.kept_channels(width, ratio, align) == kept


def test_a_ratio_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(OptimizeError, match="prune ratio"):
        channels.prune_channels(chain(), 1.0)


def test_prune_channels_on_the_real_ocr_direction_classifier(tmp_path: Path) -> None:
    from tests.corpus import CORPUS, fetch

    source = fetch(next(m for m in CORPUS if m.name == "ocr_cls"))
    x = np.random.default_rng(0).uniform(-1, 1, (8, 3, 48, 192)).astype(np.float32)
    out = tmp_path / "pruned.onnx"
    produced = METHODS["prune-channels-50"](source, out, Samples({"x": x}), Options())
    assert produced.notes["channel_sets_pruned"] >= 3
    assert produced.notes["refit_readers"] >= 3
    assert any("Reshape" in why for why in produced.notes["skipped"].values())
    assert out.stat().st_size < 0.8 * source.stat().st_size
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    original = load_model(source)
    assert run(pruned, x).shape == run(original, x).shape == (8, 2)


def test_optimize_writes_a_pruned_variant_the_gate_accepts_and_refuses_one_over_budget(
    tmp_path: Path,
) -> None:
    from edged.optimize import gate
    from edged.optimize.run import Settings, optimize

    source = tmp_path / "net.onnx"
    # half the channels are zero: pruning them is free (16 wide: 8 stay, aligned to 8)
    model = chain(zero=tuple(range(0, 16, 2)), width=16)
    onnx.save(model, str(source))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.save(calibration / "x.npy", RNG.standard_normal((24, 3, 8, 8)).astype(np.float32))
    settings = Settings(
        methods=("prune-channels-50",),
        budget=gate.Budget(min_agreement=0.99),
        options=Options(prune_min_channels=4),
        runs=5,
        executors=("cpu-onnx",),
        plot=False,
    )
    result = optimize(source, calibration, tmp_path / "out", settings)
    variant = result.reports[1]
    assert variant.accepted, variant.reason
    assert variant.agreement == 1.0
    written = onnx.load(str(variant.path))
    assert inits(written)["a"].shape == (8, 3, 3, 3)
    assert variant.size_bytes is not None
    assert result.reports[0].size_bytes is not None
    assert variant.size_bytes < result.reports[0].size_bytes

    onnx.save(chain(width=16), str(source))  # no free channels: half of them cost agreement
    settings.budget = gate.Budget(min_agreement=0.999)
    refused = optimize(source, calibration, tmp_path / "out2", settings).reports[1]
    assert not refused.accepted
    assert refused.path is None
    assert not (tmp_path / "out2" / "prune-channels-50").exists()


def test_the_variant_does_not_depend_on_the_order_the_sets_are_visited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # B reads A's set and produces its own: cutting B's filters first used to change A's ranking
    weights = {"a": _w(16, 3, 3, 3), "b": _w(16, 16, 1, 1), "c": _w(4, 16, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "a"], ["t1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t1"], ["t2"]),
        helper.make_node("Conv", ["t2", "b"], ["t3"]),
        helper.make_node("Relu", ["t3"], ["t4"]),
        helper.make_node("Conv", ["t4", "c"], ["y"]),
    ]
    results = []
    visit = channels.channel_sets
    for reverse in (False, True):
        model = _model(nodes, weights)
        moments = channel_moments(model, channels.reader_inputs(model), Samples({"x": X}), 5)
        if reverse:
            monkeypatch.setattr(channels, "channel_sets", lambda m: visit(m)[::-1])
        result = channels.prune_channels(model, 0.5, moments=moments)
        assert set(result.pruned) == {"t1", "t3"}
        results.append(inits(model))
    assert results[0].keys() == results[1].keys()
    for name, array in results[0].items():
        assert np.array_equal(array, results[1][name]), name


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged.cli", "optimize", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_prune_min_channels_on_the_command_line(tmp_path: Path) -> None:
    from edged.optimize.cli import DEFAULT_PRUNE_MIN_CHANNELS

    assert Options().prune_min_channels == DEFAULT_PRUNE_MIN_CHANNELS
    source = tmp_path / "net.onnx"
    onnx.save(chain(zero=tuple(range(0, 16, 2)), width=16), str(source))  # 16 wide
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.save(calibration / "x.npy", RNG.standard_normal((24, 3, 8, 8)).astype(np.float32))
    common = (str(source), "--calibration", str(calibration), "--methods", "prune-channels-50",
              "--min-agreement", "0.99", "--runs", "2", "--no-plot", "--json")  # fmt: skip
    by_default = _command(*common, "--out", str(tmp_path / "a"))
    assert by_default.returncode == 1, by_default.stderr
    refused = json.loads(by_default.stdout.splitlines()[1])
    assert not refused["accepted"]
    assert "narrower than 64 channels" in refused["reason"]
    lowered = _command(*common, "--out", str(tmp_path / "b"), "--prune-min-channels", "16")
    assert lowered.returncode == 0, lowered.stderr
    variant = json.loads(lowered.stdout.splitlines()[1])
    assert variant["accepted"], variant["reason"]
    assert variant["notes"]["min_channels"] == 16
    assert variant["notes"]["channels"] == [16, 8]
    for bad in ("12", "0", "-8"):
        run = _command(*common, "--out", str(tmp_path / "c"), "--prune-min-channels", bad)
        assert run.returncode == 2
        assert f"--prune-min-channels must be a multiple of 8, at least 8, got {bad}" in run.stderr
    assert not (tmp_path / "c" / "prune-channels-50").exists()
    help_text = _command("--help").stdout
    assert "--prune-min-channels" in help_text


def test_pruning_then_int8_quantises_the_pruned_model_and_is_gated_as_one(tmp_path: Path) -> None:
    from edged.optimize import gate
    from edged.optimize.run import Settings, optimize

    source = tmp_path / "net.onnx"
    onnx.save(chain(zero=tuple(range(0, 16, 2)), width=16), str(source))  # half free to prune
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    np.save(calibration / "x.npy", RNG.standard_normal((24, 3, 8, 8)).astype(np.float32))
    method = "prune-channels-50+int8-static-minmax"
    settings = Settings(
        methods=("prune-channels-50", method),
        budget=gate.Budget(min_agreement=0.95),
        options=Options(prune_min_channels=16),
        runs=3,
        executors=("cpu-onnx",),
        plot=False,
    )
    result = optimize(source, calibration, tmp_path / "out", settings)
    _, pruned, both = result.reports
    assert both.accepted, both.reason
    assert both.notes["first"]["channels"] == [16, 8]
    assert both.notes["second"]["calibration"] == "MinMax"
    written = onnx.load(str(both.path))
    assert both.path == str(tmp_path / "out" / method / "net" / "1" / "model.onnx")
    ops = {n.op_type for n in written.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [numpy_helper.to_array(i) for i in written.graph.initializer
            if i.data_type == TensorProto.INT8 and i.dims[:1] == [8]]  # fmt: skip
    assert any(w.shape == (8, 3, 3, 3) for w in int8)  # A: pruned to 8 filters, then int8
    assert pruned.accepted  # (on a net this small, QDQ's scales outweigh the int8 saving)
    assert not list((tmp_path / "out").rglob("first-*"))

    onnx.save(chain(width=16), str(source))  # no free channels: half of them cost agreement
    settings.budget = gate.Budget(min_agreement=0.999)
    refused = optimize(source, calibration, tmp_path / "out2", settings).reports[2]
    assert not refused.accepted
    assert not (tmp_path / "out2" / method).exists()
