"""edged.learn.features: a trainable model's backbone runs through the HAL (the registry's
executor kinds, the executor contract, its thread options), and its features are those of an
ONNX Runtime run of the backbone graph."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from edged.core.errors import (
    ExecutorError,
    InvalidInputError,
    ModelLoadError,
    UnavailableError,
)
from edged.core.types import Array
from edged.learn.features import (
    BACKBONE_OPTIONS,
    WORKER_KINDS,
    Backbones,
    check_features,
    open_backbone,
)
from hal import registry
from hal.cpu_onnx import OnnxCpuExecutor
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from tests.flaky_sim import KIND as FLAKY
from tests.flaky_sim import set_fault

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = ROOT / "models" / "digits_learn" / "1" / "backbone.onnx"
NEW = ROOT / "models" / "digits_learn" / "test_new.npz"


class RecordingSim(Executor):
    """A simulated NPU kind (``sim-npu``): the real cpu-onnx code path, recording the options
    each load was given."""

    kind: ClassVar[str] = "sim-npu"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    loads: ClassVar[list[ExecutorOptions]] = []

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        RecordingSim.loads.append(options)
        loaded = OnnxCpuExecutor().load(artifact, options)
        loaded.kind = self.kind
        return loaded


@pytest.fixture
def sim_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in kinds plus two simulated ones: ``sim-npu`` and the flaky accelerator."""
    found = dict(registry._entry_points())
    group = registry.ENTRY_POINT_GROUP
    found["sim-npu"] = EntryPoint("sim-npu", f"{__name__}:RecordingSim", group)
    found[FLAKY] = EntryPoint(FLAKY, "tests.flaky_sim:FlakySimExecutor", group)
    monkeypatch.setattr(registry, "_entry_points", lambda: found)
    RecordingSim.loads.clear()


def _inputs(n: int = 16) -> dict[str, Array]:
    return {"input": np.load(NEW)["x"][:n].astype(np.float32)}


def _ort_features(path: Path, inputs: Mapping[str, Array]) -> Array:
    """The reference: the backbone graph run by ONNX Runtime in this process."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], dict(inputs))
    return np.asarray(features)


def test_features_equal_an_onnx_runtime_run_of_the_backbone() -> None:
    backbones = Backbones()
    inputs = _inputs()
    try:
        features = backbones.features("digits_learn", BACKBONE, "features", WORKER_KINDS, inputs)
    finally:
        backbones.close()
    assert features.dtype == np.float32
    assert features.shape == (16, 64)
    np.testing.assert_allclose(features, _ort_features(BACKBONE, inputs), rtol=1e-5, atol=1e-6)
    assert np.ptp(features) > 0  # not a constant that would match anything


@pytest.mark.usefixtures("sim_kinds")
def test_the_backbone_loads_on_the_served_kind_with_one_thread() -> None:
    backbones = Backbones()
    inputs = _inputs(4)
    try:
        features = backbones.features(
            "digits_learn", BACKBONE, "features", ("sim-npu", "cpu-onnx"), inputs
        )
        again = backbones.features("digits_learn", BACKBONE, "features", ("sim-npu",), inputs)
    finally:
        backbones.close()
    assert RecordingSim.loads == [BACKBONE_OPTIONS]  # loaded once, kept for the next request
    assert BACKBONE_OPTIONS.intra_op_threads == BACKBONE_OPTIONS.inter_op_threads == 1
    np.testing.assert_allclose(features, _ort_features(BACKBONE, inputs), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(features, again)


@pytest.mark.usefixtures("sim_kinds")
def test_features_come_from_the_executor_that_runs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the simulated accelerator, told to compute wrong, shifts every float output by 1: the
    # features are what that executor answered, not a side session's
    fault = tmp_path / "fault"
    monkeypatch.setenv("FLAKY_SIM_FAULT_FILE", str(fault))
    inputs = _inputs(4)
    backbone = open_backbone(BACKBONE, "features", (FLAKY,))
    try:
        assert backbone.kind == FLAKY
        np.testing.assert_allclose(
            backbone.features(inputs), _ort_features(BACKBONE, inputs), rtol=1e-5, atol=1e-6
        )
        set_fault(fault, "corrupt")
        np.testing.assert_allclose(
            backbone.features(inputs), _ort_features(BACKBONE, inputs) + 1, rtol=1e-5, atol=1e-5
        )
        set_fault(fault, "raise")
        with pytest.raises(ExecutorError, match="simulated device fault"):
            backbone.features(inputs)
    finally:
        backbone.close()


@pytest.mark.usefixtures("sim_kinds")
def test_a_kind_that_refuses_gives_way_to_the_next() -> None:
    backbone = open_backbone(BACKBONE, "features", ("no-such-npu", "cpu-litert", "sim-npu"))
    try:
        assert backbone.kind == "sim-npu"
    finally:
        backbone.close()
    with pytest.raises(ModelLoadError) as info:
        open_backbone(BACKBONE, "features", ("no-such-npu", "cpu-litert"))
    message = str(info.value)
    assert "no executor 'no-such-npu' is installed" in message
    assert "cpu-litert cannot run format 'onnx'" in message


def test_a_backbone_without_the_features_output_is_refused_naming_the_key() -> None:
    with pytest.raises(ModelLoadError, match=r"no output 'embedding' \(model.toml's \[learn\]"):
        open_backbone(BACKBONE, "embedding", WORKER_KINDS)


def test_a_missing_input_is_refused_by_the_executor_contract() -> None:
    backbone = open_backbone(BACKBONE, "features", WORKER_KINDS)
    try:
        with pytest.raises(InvalidInputError, match="missing input tensor"):
            backbone.features({"pixels": np.zeros((1, 64), np.float32)})
    finally:
        backbone.close()


def test_a_new_version_replaces_and_closes_the_old_backbone(tmp_path: Path) -> None:
    second = tmp_path / "2" / "backbone.onnx"
    second.parent.mkdir()
    shutil.copyfile(BACKBONE, second)
    backbones = Backbones()
    inputs = _inputs(2)
    try:
        backbones.features("m", BACKBONE, "features", WORKER_KINDS, inputs)
        first = backbones._loaded["m"]
        backbones.features("m", second, "features", WORKER_KINDS, inputs)
        assert backbones._loaded["m"].path == second
        assert first.features(inputs) is None  # closed
    finally:
        backbones.close()
    assert backbones._loaded == {}
    with pytest.raises(UnavailableError, match="shutting down"):  # none is opened after stop
        backbones.features("m", second, "features", WORKER_KINDS, inputs)
    assert backbones._loaded == {}


def test_concurrent_calls_share_one_backbone() -> None:
    backbones = Backbones()
    inputs = _inputs(8)
    expected = _ort_features(BACKBONE, inputs)
    results: list[Array] = []

    def call() -> None:
        results.append(backbones.features("m", BACKBONE, "features", WORKER_KINDS, inputs))

    threads = [threading.Thread(target=call) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(backbones._loaded) == 1
    finally:
        backbones.close()
    assert len(results) == 4
    for features in results:
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (np.zeros((3,), np.float32), r"shape \[3\]; expected \[3, D\]"),
        (np.zeros((2, 4), np.float32), r"shape \[2, 4\]; expected \[3, D\]"),
        (np.full((3, 4), np.nan, np.float32), "non-finite"),
    ],
)
def test_features_unfit_to_store_are_refused(features: Array, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        check_features(features, 3, "features")
    check_features(np.zeros((3, 4), np.float32), 3, "features")
