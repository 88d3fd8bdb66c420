"""``edged optimize --calibration-store``: calibration from a device's learning store, on a
real store written by edged.learn.store (real SQLite, real feature files from the digits_learn
backbone through onnxruntime): which rows are used (every row the device does not hold out, of
that model only), read without changing the store, and what the samples can calibrate (the
store keeps backbone features, not model inputs)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits

from edged.learn.store import LearnStore, SampleStatus
from edged.optimize.data import id_ranges, load_store
from edged.optimize.errors import OptimizeError
from tests.daemon_process import EXAMPLE_MODELS

MODEL = EXAMPLE_MODELS / "digits_learn"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    known = data.target < 5  # what digits_learn was trained on
    return data.data[known].astype(np.float32), data.target[known].astype(np.int64)


def _features(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODEL / "1" / "backbone.onnx"))
    (features,) = session.run(["features"], {"input": x})
    return np.asarray(features, dtype=np.float32)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A state folder whose learn.sqlite3 holds 300 digits_learn samples in two batches
    (every 5th held out), the first 40 marked learned, and 10 samples of another model."""
    state = tmp_path_factory.mktemp("state")
    x, y = _digits()
    features = _features(x[:300])
    learn = LearnStore(state, holdout_share=0.2)
    try:
        learn.add("digits_learn", features[:120], y[:120])
        learn.add("digits_learn", features[120:300], y[120:300])
        learn.add("other", np.zeros((10, 4), np.float32), np.zeros(10, np.int64))
        pending = learn.pending("digits_learn")
        learn.mark(pending.ids[:40], SampleStatus.LEARNED, job_id=1)
    finally:
        learn.close()
    return state, features, y[:300]


def test_load_store_uses_every_row_not_held_out_of_that_model_and_writes_nothing(
    store: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    state, features, labels = store
    before = _digest(state)
    samples, rows = load_store(state / "learn.sqlite3", "digits_learn")
    assert _digest(state) == before  # the rows and the feature files are untouched
    kept = np.array([i % 5 != 4 for i in range(300)])  # the store holds out every 5th
    assert len(samples) == 240
    assert rows.held_out == 60
    assert rows.ids == tuple(i + 1 for i in range(300) if kept[i])
    assert not samples.inputs
    assert samples.features is not None
    np.testing.assert_array_equal(samples.features, features[kept])
    np.testing.assert_array_equal(samples.labels, labels[kept])
    assert rows.by_status == {"learned": 32, "pending": 208}  # 40 learned, 8 of them held out
    assert "240 rows used (ids 1-4,6-9," in rows.describe()
    assert "60 held-out rows excluded" in rows.describe()
    # the folder works as well as the file
    again, _ = load_store(state, "digits_learn")
    assert again.sha256() == samples.sha256()


def test_load_store_names_what_is_wrong(
    tmp_path: Path, store: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    state, _, _ = store
    with pytest.raises(OptimizeError, match=r"no sample of model 'digits' .* digits_learn, other"):
        load_store(state, "digits")
    with pytest.raises(OptimizeError, match="no such file"):
        load_store(tmp_path / "missing.sqlite3", "digits_learn")
    junk = tmp_path / "learn.sqlite3"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(OptimizeError, match="not a readable learning store"):
        load_store(junk, "digits_learn")


def test_id_ranges() -> None:
    assert id_ranges([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    assert id_ranges([]) == ""


def _optimize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edged.cli", "optimize", str(MODEL), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_optimize_calibrates_the_head_from_the_store_and_refuses_what_needs_inputs(
    tmp_path: Path, store: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    state, _, _ = store
    x, y = _digits()
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    np.savez(holdout / "held.npz", input=x[300:500], labels=y[300:500])
    out = tmp_path / "out"
    run = _optimize(
        "--calibration-store", str(state / "learn.sqlite3"), "--holdout", str(holdout),
        "--out", str(out), "--methods", "distil,int8-static-minmax,int8-dynamic",
        "--max-accuracy-drop", "3", "--runs", "2", "--no-plot", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # which rows calibrate is said even with --json
    assert "model digits_learn: 240 rows used" in run.stderr
    reports = {r["method"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert reports["distil"]["accepted"], reports["distil"]["reason"]
    assert (
        reports["distil"]["notes"]["head_params"]
        <= reports["distil"]["notes"]["teacher_params"] // 4
    )
    assert not reports["int8-static-minmax"]["accepted"]
    assert "learning store keeps backbone features" in reports["int8-static-minmax"]["reason"]
    assert not (out / "int8-static-minmax").exists()
    assert reports["int8-dynamic"]["accepted"]  # needs no calibration data
    lineage = json.loads((out / "distil" / "digits_learn" / "1" / "optimize.json").read_text())
    stored = lineage["calibration"]["store"]
    assert stored["model"] == "digits_learn"
    assert stored["rows"] == lineage["calibration"]["samples"] == 240
    assert stored["held_out_excluded"] == 60
    assert stored["ids"].startswith("1-4,6-9,")


def test_the_store_needs_a_holdout_folder_and_excludes_a_calibration_folder(
    tmp_path: Path, store: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    state, _, _ = store
    run = _optimize("--calibration-store", str(state), "--out", str(tmp_path / "o"))
    assert run.returncode == 2
    assert "--calibration-store needs --holdout DIR" in run.stderr
    run = _optimize(
        "--calibration-store", str(state), "--calibration", str(tmp_path), "--out", str(tmp_path)
    )
    assert run.returncode == 2
    assert "give one of --calibration DIR and --calibration-store PATH" in run.stderr
