"""The model bundle: build -> scan -> extract -> manifest -> self-test against the real model
on cpu-onnx; a wrong expected output fails naming it; the archive is byte-for-byte
deterministic; bundle.toml rules (table)."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hal
from edged.fleet import build
from edged.ota import archive, bundle
from edged.ota.errors import BundleError, SelfTestError
from tests.tuf_fixtures import DIGITS, DIGITS_SAMPLE, EXAMPLE_MODELS, build_digits_bundle

SAMPLE = np.load(DIGITS_SAMPLE)


def run_on_cpu(folder: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = hal.get_executor("cpu-onnx").load(
        hal.ModelArtifact(folder / "model.onnx", "onnx"), hal.ExecutorOptions()
    )
    try:
        return model.infer(inputs)
    finally:
        model.close()


def test_round_trip_passes_its_self_test_on_cpu_onnx(tmp_path: Path) -> None:
    path = build_digits_bundle(tmp_path, 2)

    listing = archive.scan(path)
    staging = tmp_path / "staging"
    staging.mkdir()
    folder = archive.extract(path, staging)
    manifest = bundle.read_manifest(folder)
    inputs, expected = bundle.load_selftest(folder / manifest.selftest_file)

    assert sorted(m.name for m in listing) == list(manifest.files)
    assert manifest.files == ("bundle.toml", "model.onnx", "model.toml", "selftest.npz")
    assert (manifest.name, manifest.version, manifest.format) == ("digits", 2, "onnx")
    assert manifest.artifacts == ("model.onnx",)
    assert [(s.name, s.datatype.value, s.shape) for s in manifest.inputs] == [
        ("input", "FP32", (-1, 64))
    ]
    assert [(s.name, s.datatype.value, s.shape) for s in manifest.outputs] == [
        ("probabilities", "FP32", (-1, 10)),
        ("label", "INT64", (-1,)),
    ]
    assert (folder / "model.onnx").read_bytes() == (DIGITS / "1" / "model.onnx").read_bytes()
    assert (folder / "model.toml").read_text() == (DIGITS / "model.toml").read_text()
    np.testing.assert_array_equal(inputs["input"], SAMPLE)
    assert sorted(expected) == ["label", "probabilities"]
    assert bundle.read_manifest(path) == manifest  # from the archive, in memory

    bundle.check_selftest(expected, run_on_cpu(folder, inputs), manifest.rtol, manifest.atol)


def test_a_wrong_expected_output_fails_naming_it(tmp_path: Path) -> None:
    good = run_on_cpu(DIGITS / "1", {"input": SAMPLE})
    wrong = {**good, "probabilities": good["probabilities"] + np.float32(0.25)}
    path = build_digits_bundle(tmp_path, 2, expected=wrong)
    folder = archive.extract(path, tmp_path)
    manifest = bundle.read_manifest(folder)
    inputs, expected = bundle.load_selftest(folder / "selftest.npz")

    with pytest.raises(SelfTestError, match=r"output 'probabilities' differs") as info:
        bundle.check_selftest(expected, run_on_cpu(folder, inputs), manifest.rtol, manifest.atol)
    assert "at 20 of 20 elements: max abs error 0.25" in str(info.value)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        pytest.param({"y": np.zeros(3)}, r"returned no output 'label' \(y\)", id="missing"),
        pytest.param(
            {"label": np.zeros(4)}, r"'label' has shape \[4\], expected \[3\]", id="shape"
        ),
        pytest.param(
            {"label": np.array([1, 2, 4])},
            r"'label' differs .* at 1 of 3 elements: max abs error 1 at index \[2\]",
            id="value",
        ),
        pytest.param(
            {"label": np.array([1.0, 2.0, np.nan])}, r"max abs error inf at index \[2\]", id="nan"
        ),
        pytest.param(
            {"label": np.array([b"a", b"b", b"c"], dtype=object)}, r"'label' differs", id="bytes"
        ),
    ],
)
def test_check_selftest_names_what_differs(outputs: dict[str, Any], message: str) -> None:
    with pytest.raises(SelfTestError, match=message):
        bundle.check_selftest({"label": np.array([1, 2, 3])}, outputs, 1e-3, 1e-5)


def test_check_selftest_tolerances_and_bytes() -> None:
    expected = {"p": np.array([1.0, np.nan], np.float32), "t": np.array([b"a"], dtype=object)}
    outputs = {
        "p": np.array([1.0005, np.nan], np.float32),
        "t": np.array([b"a"], dtype=object),
        "extra": np.zeros(1),
    }
    bundle.check_selftest(expected, outputs, rtol=1e-3, atol=0.0)
    with pytest.raises(SelfTestError, match="'p'"):
        bundle.check_selftest(expected, outputs, rtol=1e-4, atol=0.0)


def test_building_twice_gives_identical_bytes(tmp_path: Path) -> None:
    first = build_digits_bundle(tmp_path / "a", 2)
    second = build_digits_bundle(tmp_path / "b", 2)
    assert first.read_bytes() == second.read_bytes()
    assert (
        hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    )
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }
    assert first.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime


def test_bytes_tensors_round_trip_as_fixed_width(tmp_path: Path) -> None:
    # multi_io takes and returns every datatype, BYTES included; its default self-test inputs
    # are seeded, and its outputs computed on cpu-onnx
    path = build.build_bundle(EXAMPLE_MODELS / "multi_io", 1, tmp_path / "m.tar.gz")
    folder = archive.extract(path, tmp_path)
    inputs, expected = bundle.load_selftest(folder / "selftest.npz")
    assert inputs["text"].dtype == object
    assert expected["text_out"].tolist() == [[b"edged"]]
    with np.load(folder / "selftest.npz", allow_pickle=False) as raw:
        assert raw["in:text"].dtype.kind == "S"
    manifest = bundle.read_manifest(folder)
    bundle.check_selftest(expected, run_on_cpu(folder, inputs), manifest.rtol, manifest.atol)


def test_a_tflite_model_runs_on_cpu_litert(tmp_path: Path) -> None:
    pytest.importorskip("ai_edge_litert")
    path = build.build_bundle(
        EXAMPLE_MODELS / "digits_tflite", 1, tmp_path / "t.tar.gz", {"input": SAMPLE}
    )
    info = bundle.inspect_bundle(path)
    assert info.manifest.artifacts == ("model.tflite",)
    assert info.selftest_outputs == ("label", "probabilities")


def test_formats_without_a_cpu_executor_need_their_outputs(tmp_path: Path) -> None:
    model = tmp_path / "tpu"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model_edgetpu.tflite").write_bytes(b"TFL3")
    (model / "model.toml").write_text(
        'name = "tpu"\nformat = "edgetpu-tflite"\nmax_batch_size = 0\n'
        '[[inputs]]\nname = "x"\ndatatype = "UINT8"\ndims = [4]\n'
        '[[outputs]]\nname = "y"\ndatatype = "UINT8"\ndims = [2]\n'
    )
    with pytest.raises(BundleError, match="do not run on this machine's CPU executors"):
        build.build_bundle(model, 1, tmp_path / "t.tar.gz")

    x = np.arange(4, dtype=np.uint8)
    path = build.build_bundle(
        model, 1, tmp_path / "t.tar.gz", {"x": x}, expected={"y": np.array([1, 2], np.uint8)}
    )
    manifest = bundle.inspect_bundle(path).manifest
    assert [(s.name, s.shape) for s in manifest.inputs] == [("x", (4,))]


def test_build_refusals(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"digits/7 does not exist .*--source"):
        build.build_bundle(DIGITS, 7, tmp_path / "x.tar.gz")

    model = tmp_path / "digits"
    shutil.copytree(DIGITS, model)
    (model / "1" / "extra").mkdir()
    with pytest.raises(BundleError, match="regular files only"):
        build.build_bundle(model, 1, tmp_path / "x.tar.gz")
    (model / "1" / "extra").rmdir()

    (model / "model.toml").write_text(
        'name = "digits"\nformat = "onnx"\n[[inputs]]\nname = "nope"\n'
    )
    with pytest.raises(BundleError, match="declares input 'nope'"):
        build.build_bundle(model, 1, tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()


GOOD: dict[str, Any] = {
    "edged_bundle": 1,
    "name": "digits",
    "version": 2,
    "format": "onnx",
    "artifacts": ["model.onnx"],
    "selftest": {"file": "selftest.npz", "rtol": 0.001, "atol": 1e-05},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"extra": 1}, "unknown key 'extra'", id="unknown"),
        pytest.param({"edged_bundle": 2}, "'edged_bundle' is 2", id="schema"),
        pytest.param({"name": "../x"}, "'name' '../x' is not a model name", id="name"),
        pytest.param({"version": 0}, "'version' must be an integer >= 1", id="version-0"),
        pytest.param({"version": True}, "'version' must be an integer >= 1", id="version-bool"),
        pytest.param({"version": "2"}, "'version' must be an integer >= 1", id="version-str"),
        pytest.param({"format": "pt"}, "'format' 'pt' is not one of", id="format"),
        pytest.param({"artifacts": []}, "non-empty list", id="no-artifacts"),
        pytest.param({"artifacts": ["a/model.onnx"]}, "not a plain file name", id="artifact-path"),
        pytest.param({"artifacts": ["model.tflite"]}, "must hold model.onnx", id="wrong-artifact"),
        pytest.param(
            {"artifacts": ["model.onnx", "bundle.toml"]}, "name of a bundle file", id="reserved"
        ),
        pytest.param({"selftest": {"rtol": -1}}, "'selftest.rtol' must be finite", id="rtol"),
        pytest.param(
            {"selftest": {"atol": float("nan")}}, "'selftest.atol' must be finite", id="atol-nan"
        ),
        pytest.param({"selftest": {"file": "../t.npz"}}, "plain .npz", id="selftest-path"),
        pytest.param(
            {"signature": {"inputs": [{"name": "x", "datatype": "F32", "shape": [1]}]}},
            "not a KServe datatype",
            id="datatype",
        ),
    ],
)
def test_bad_bundle_toml_is_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError, match=message) as info:
        bundle.parse_manifest({**GOOD, **change}, "x/bundle.toml")
    assert str(info.value).startswith("x/bundle.toml: ")


def test_manifest_toml_round_trips(tmp_path: Path) -> None:
    manifest = bundle.read_manifest(build_digits_bundle(tmp_path, 2))
    assert bundle.parse_manifest(tomllib.loads(build.manifest_toml(manifest))) == manifest
    assert bundle.parse_manifest(GOOD).inputs == ()


def test_selftest_npz_refuses_pickles_and_strays(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, **{"in:x": np.zeros(2), "stray": np.zeros(1), "out:y": np.zeros(1)})
    with pytest.raises(BundleError, match=r"'stray\.npy' is not in:<tensor>\.npy"):
        bundle.load_selftest(path)
    np.savez(path, **{"in:x": np.array([{"a": 1}], dtype=object), "out:y": np.zeros(1)})
    with pytest.raises(BundleError, match="without pickles"):
        bundle.load_selftest(path)
    np.savez(path, **{"in:x": np.zeros(1000)})
    with pytest.raises(BundleError, match="above the limit of 100"):
        bundle.load_selftest(path, max_bytes=100)


# -- bundles without test vectors (the device tests with its reference sample) --------------


def _zero_config_digits(tmp_path: Path) -> Path:
    """digits as a user drops it: <model>/1/model.onnx, no model.toml."""
    model_dir = tmp_path / "digits"
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(DIGITS / "1" / "model.onnx", model_dir / "1" / "model.onnx")
    return model_dir


def test_bundle_without_test_vectors(tmp_path: Path) -> None:
    path = build.build_bundle(
        _zero_config_digits(tmp_path), 1, tmp_path / "digits-1.tar.gz", selftest=False
    )
    info = bundle.inspect_bundle(path)
    assert info.manifest.selftest_file == ""
    assert info.manifest.format == "onnx"  # read from the artifact: no model.toml
    assert info.manifest.files == ("bundle.toml", "model.onnx", "model.toml")
    assert (info.selftest_inputs, info.selftest_outputs) == ((), ())
    assert [s.name for s in info.manifest.inputs] == ["input"]
    with tarfile.open(path) as tar:
        assert tar.extractfile("model.toml").read() == b""  # type: ignore[union-attr]
        text = tar.extractfile("bundle.toml").read().decode()  # type: ignore[union-attr]
    assert tomllib.loads(text)["selftest"]["file"] == ""


def test_zero_config_bundle_computes_its_self_test(tmp_path: Path) -> None:
    path = build.build_bundle(_zero_config_digits(tmp_path), 1, tmp_path / "d.tar.gz")
    info = bundle.inspect_bundle(path)
    assert info.manifest.selftest_file == "selftest.npz"
    assert info.selftest_inputs == ("input",)


def test_a_model_refusing_the_default_inputs_names_the_way_out(tmp_path: Path) -> None:
    """A model whose inputs need more than seeded values of size 1 (here: a graph that
    refuses them) is not bundled silently without a test: the error says what to give."""
    from tests import modelgen

    model_dir = tmp_path / "strict"
    modelgen.needs_two_rows_model(model_dir / "1")
    with pytest.raises(BundleError, match="--no-selftest"):
        build.build_bundle(model_dir, 1, tmp_path / "s.tar.gz")
    path = build.build_bundle(model_dir, 1, tmp_path / "s.tar.gz", selftest=False)
    assert bundle.inspect_bundle(path).manifest.selftest_file == ""


REFERENCE = {"y": np.zeros((1, 2), np.float32), "n": np.zeros((1,), np.int64)}


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ({"y": np.ones((1, 2), np.float32)}, r"returned \['y'\], the serving version"),
        (
            {"y": np.ones((1, 3), np.float32), "n": np.zeros((1,), np.int64)},
            r"output 'y' is float32\[1, 3\], the serving version's float32\[1, 2\]",
        ),
        (
            {"y": np.ones((1, 2), np.float64), "n": np.zeros((1,), np.int64)},
            "output 'y' is float64",
        ),
        (
            {"y": np.array([[1, np.nan]], np.float32), "n": np.zeros((1,), np.int64)},
            "output 'y' has 1 of 2 values that are not finite",
        ),
    ],
    ids=["missing-output", "shape", "dtype", "nan"],
)
def test_check_like_reference_refuses(outputs: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(SelfTestError, match=match):
        bundle.check_like_reference(REFERENCE, outputs)


def test_check_like_reference_accepts_new_values() -> None:
    bundle.check_like_reference(
        REFERENCE, {"y": np.full((1, 2), 7, np.float32), "n": np.ones((1,), np.int64)}
    )


def test_edged_fleet_bundle_no_selftest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edged import fleet
    from tests import modelgen

    model_dir = tmp_path / "strict"  # no model.toml: the artifact decides the format
    modelgen.needs_two_rows_model(model_dir / "1")
    out = tmp_path / "strict-1.tar.gz"
    args = ["bundle", str(model_dir), "--version", "1", "--out", str(out)]
    assert fleet.main(args) == 1
    assert "--no-selftest" in capsys.readouterr().err
    assert fleet.main([*args, "--no-selftest"]) == 0
    assert "strict version 1 (onnx; model.onnx;" in capsys.readouterr().out
    assert bundle.inspect_bundle(out).manifest.selftest_file == ""


# -- an optimised variant's evidence: bundle.toml [optimize], optimize.npz, check_optimized --

EVIDENCE = {
    "file": "optimize.npz",
    "lineage": "optimize.json",
    "method": "int8-static-minmax",
    "parent": "digits",
    "parent_sha256": "ab" * 32,
    "calibration_sha256": "cd" * 32,
    "output": "probabilities",
    "samples": 4,
    "agreement": 1.0,
    "rel_l2_error": 0.01,
}
OPTIMIZED = {**GOOD, "artifacts": ["model.onnx", "optimize.json"], "optimize": EVIDENCE}


def test_optimize_evidence_parses_and_round_trips_through_the_writer() -> None:
    manifest = bundle.parse_manifest(OPTIMIZED)
    assert manifest.optimize == bundle.OptimizeEvidence(**EVIDENCE)  # type: ignore[arg-type]
    assert "optimize.npz" in manifest.files
    assert bundle.parse_manifest(tomllib.loads(build.manifest_toml(manifest))) == manifest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"extra": 1}, "unknown key 'optimize.extra'", id="unknown"),
        pytest.param({"method": ""}, "'optimize.method' must be a non-empty string", id="method"),
        pytest.param({"samples": 0}, "'optimize.samples' must be an integer >= 1", id="samples"),
        pytest.param({"agreement": 1.5}, "'optimize.agreement' must be within", id="agreement"),
        pytest.param({"rel_l2_error": -1}, "'optimize.rel_l2_error' must be finite", id="error"),
        pytest.param({"file": "selftest.npz"}, "'optimize.file'", id="file-taken"),
        pytest.param({"lineage": "x.json"}, "'optimize.lineage' 'x.json'", id="lineage"),
    ],
)
def test_bad_optimize_evidence_is_refused_naming_the_key(
    change: dict[str, Any], message: str
) -> None:
    data = {**OPTIMIZED, "optimize": {**EVIDENCE, **change}}
    with pytest.raises(BundleError, match=message):
        bundle.parse_manifest(data, "x/bundle.toml")
    missing = {k: v for k, v in EVIDENCE.items() if k != "output"}
    with pytest.raises(BundleError, match=r"'optimize\.output' is missing"):
        bundle.parse_manifest({**OPTIMIZED, "optimize": missing})
    no_selftest = {**OPTIMIZED, "selftest": {"file": ""}}
    with pytest.raises(BundleError, match="needs its self-test"):
        bundle.parse_manifest(no_selftest)


def _scores(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 10)).astype(np.float32)


def test_check_optimized_passes_within_the_recorded_figures_and_slack() -> None:
    evidence = bundle.OptimizeEvidence(**{**EVIDENCE, "agreement": 0.75, "samples": 4})  # type: ignore[arg-type]
    parent = _scores(4)
    variant = parent.copy()
    variant[0] = np.roll(variant[0], 1)  # one of four rows decides differently: 0.75
    variant *= 1.001
    drift = bundle.check_optimized(
        evidence, {"probabilities": parent}, {"probabilities": variant}, 0.0, 1.0
    )
    assert drift.agreement == 0.75
    assert 0 < drift.rel_l2_error < 1
    # a second differing row: 0.5 < 0.75 - 0.2 refused, within 0.25 of slack accepted
    variant[1] = np.roll(variant[1], 3)
    with pytest.raises(
        SelfTestError, match=r"agreement .* is 0\.5000 on 4 held-out samples, below the 0\.7500"
    ):
        bundle.check_optimized(
            evidence, {"probabilities": parent}, {"probabilities": variant}, 0.2, 1.0
        )
    bundle.check_optimized(
        evidence, {"probabilities": parent}, {"probabilities": variant}, 0.25, 1.0
    )


def test_check_optimized_refuses_an_output_error_beyond_the_recorded_one() -> None:
    evidence = bundle.OptimizeEvidence(**{**EVIDENCE, "rel_l2_error": 0.01})  # type: ignore[arg-type]
    parent = _scores(4)
    scaled = parent * 1.2  # same decisions, 20 % output error
    with pytest.raises(SelfTestError, match=r"ota\.optimize_error_slack 0\.05"):
        bundle.check_optimized(
            evidence, {"probabilities": parent}, {"probabilities": scaled}, 0.0, 0.05
        )
    drift = bundle.check_optimized(
        evidence, {"probabilities": parent}, {"probabilities": scaled}, 0.0, 0.2
    )
    assert drift.agreement == 1.0
    assert drift.rel_l2_error == pytest.approx(0.2, rel=1e-5)
    with pytest.raises(SelfTestError, match="returned no output 'probabilities'"):
        bundle.check_optimized(evidence, {"probabilities": parent}, {"label": parent}, 0.0, 1.0)
    with pytest.raises(SelfTestError, match="has shape"):
        bundle.check_optimized(
            evidence, {"probabilities": parent}, {"probabilities": parent[:2]}, 0.0, 1.0
        )
    nan = parent.copy()
    nan[0, 0] = np.nan
    with pytest.raises(SelfTestError, match="relative output error"):
        bundle.check_optimized(
            evidence, {"probabilities": parent}, {"probabilities": nan}, 1.0, 1.0
        )


def test_decisions_are_top1_labels_or_sides() -> None:
    assert bundle.decisions(np.array([[0.1, 0.9], [0.8, 0.2]])).tolist() == [1, 0]
    assert bundle.decisions(np.array([3, 4])).tolist() == [3, 4]
    assert bundle.decisions(np.array([[0.2], [0.7]])).ravel().tolist() == [False, True]
    assert bundle.decisions(np.array([-1.0, 2.0])).tolist() == [False, True]
