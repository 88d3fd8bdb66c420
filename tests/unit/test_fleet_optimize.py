"""``edged-fleet bundle --optimize``: which accepted variant is chosen, the bounded check
set, the refusal (exit 2, each method's reason, nothing written) when no variant is within
the budget, and ``edged-fleet inspect`` reading back a bundle's evidence. Real digits model,
real onnxruntime.quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from edged.fleet import optimized
from edged.fleet.cli import main
from edged.optimize.data import Samples
from edged.optimize.report import VariantReport
from edged.ota import bundle
from tests.tuf_fixtures import DIGITS, build_digits_bundle


def _report(method: str, size: int, ms: float, agreement: float, **more: object) -> VariantReport:
    r = VariantReport(method, None, True, "ok", size_bytes=size, agreement=agreement)
    r.latency_ms = {"cpu-onnx": ms}
    for key, value in more.items():
        setattr(r, key, value)
    return r


def test_choose_prefers_by_pick_among_the_accepted_only() -> None:
    original = _report("original", 100, 1.0, 1.0)
    small = _report("int8-dynamic", 30, 0.9, 0.990, rel_l2_error=0.02)
    fast = _report("fp16", 50, 0.5, 0.995, rel_l2_error=0.001)
    best = _report("int8-static-minmax", 40, 0.8, 1.000, rel_l2_error=0.01)
    tiny_but_over = _report("prune-magnitude", 10, 0.1, 0.2)
    tiny_but_over.accepted = False
    reports = [original, small, fast, best, tiny_but_over]
    assert optimized.choose(reports, "smallest").method == "int8-dynamic"
    assert optimized.choose(reports, "fastest").method == "fp16"
    assert optimized.choose(reports, "best-quality").method == "int8-static-minmax"
    # accuracy, where labels exist, outranks agreement
    best.accuracy, fast.accuracy, small.accuracy = 0.95, 0.97, 0.96
    assert optimized.choose(reports, "best-quality").method == "fp16"
    assert optimized.choose([original, tiny_but_over], "smallest") is None
    with pytest.raises(ValueError, match="--pick 'largest'"):
        optimized.choose(reports, "largest")


def test_the_check_set_is_bounded_in_rows_and_bytes() -> None:
    held = Samples({"input": np.zeros((100, 64), np.float32)})
    reference = {"probabilities": np.zeros((100, 10), np.float32)}
    assert optimized.check_rows(held, reference, "probabilities", 32) == 32
    assert optimized.check_rows(held, reference, "probabilities", 500) == 100
    big = Samples({"input": np.zeros((50, 3, 512, 512), np.float32)})  # 3 MiB a row
    assert optimized.check_rows(big, {"y": np.zeros((50, 2), np.float32)}, "y", 32) == 1


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    data = load_digits()
    np.savez(
        folder / "digits.npz",
        input=data.data[:300].astype(np.float32),
        labels=data.target[:300].astype(np.int64),
    )
    return folder


def test_no_variant_within_the_budget_exits_2_naming_each_reason_and_writes_nothing(
    tmp_path: Path, calibration: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "digits-2.tar.gz"
    code = main(
        [
            "bundle", str(DIGITS), "--version", "2", "--out", str(out),
            "--optimize", "prune-magnitude,litert-int8", "--sparsity", "0.95",
            "--calibration", str(calibration), "--min-agreement", "0.999", "--runs", "2",
            "--json",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert not out.exists()
    refused = json.loads(captured.out)["refused"]
    assert set(refused) == {"prune-magnitude", "litert-int8"}
    assert "< 0.999" in refused["prune-magnitude"]
    assert "no variant is within the budget (top-1 agreement >= 0.999)" in captured.err
    assert "litert-int8: " in captured.err


def test_optimize_options_are_checked(
    tmp_path: Path, calibration: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["bundle", str(DIGITS), "--version", "2", "--out", str(tmp_path / "b.tar.gz")]
    with pytest.raises(SystemExit) as info:
        main([*base, "--calibration", str(calibration)])
    assert info.value.code == 2
    assert "--calibration-store go only with --optimize" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--optimize", "fp16"])
    assert "needs one of --calibration DIR and --calibration-store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--optimize", "fp16", "--calibration", str(calibration), "--no-selftest"])
    assert "do not go with --optimize" in capsys.readouterr().err
    code = main([*base, "--optimize", "nope", "--calibration", str(calibration)])
    assert code == 2
    assert "unknown method nope" in capsys.readouterr().err


def test_bundle_optimize_writes_the_evidence_and_inspect_reads_it_back(
    tmp_path: Path, calibration: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "digits-2.tar.gz"
    keep = tmp_path / "variants"
    code = main(
        [
            "bundle", str(DIGITS), "--version", "2", "--out", str(out),
            "--optimize", "int8-static-minmax,fp16", "--calibration", str(calibration),
            "--max-accuracy-drop", "1.0", "--check-samples", "8", "--runs", "2",
            "--optimize-out", str(keep),
        ]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "optimised: " in text
    assert (keep / "report.json").is_file()
    info = bundle.inspect_bundle(out)  # what publish and a device check
    evidence = info.manifest.optimize
    assert evidence is not None
    assert evidence.samples == 8
    assert evidence.parent == "digits"
    assert info.manifest.files == (
        "bundle.toml", "model.onnx", "model.toml", "optimize.json", "optimize.npz",
        "selftest.npz",
    )  # fmt: skip
    assert main(["inspect", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["optimize"]
    lineage = shown["lineage"]
    assert shown["evidence"]["method"] == evidence.method == lineage["method"]
    assert lineage["calibration"]["sha256"] == evidence.calibration_sha256
    assert lineage["check"]["samples"] == 8
    assert [v["method"] for v in lineage["variants"]] == ["original", "int8-static-minmax", "fp16"]
    # a plain bundle has no evidence
    plain = build_digits_bundle(tmp_path, 3)
    assert main(["inspect", str(plain)]) == 0
    assert "optimised" not in capsys.readouterr().out
