"""Warm-up, in process on a real repository and real ONNX Runtime: the operator's samples
(``warmup/*.npz``, ``[[warmup]]``) must run and become the reference sample; without them a
model that refuses the synthetic input still serves, and its first successful request
becomes the reference that failover and recovery run.

The model is silero-vad's silero_vad.onnx (tests/corpus.py), which refuses the synthetic
input: reflect padding inside its STFT needs more than one sample.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import ExecutorError, ModelLoadError
from edged.core.types import InferRequest
from edged.serving.manager import ModelManager
from edged.serving.model import ModelVersion
from tests import corpus

VAD = corpus.CORPUS[0]
SR = np.array(16000, dtype=np.int64)


def vad_inputs(seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input": (rng.standard_normal((batch, 576)) * 0.1).astype(np.float32),
        "state": np.zeros((2, batch, 128), np.float32),
        "sr": SR,
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    corpus.place(tmp_path, VAD)
    return tmp_path


@pytest.fixture
async def manager(repo: Path) -> AsyncIterator[ModelManager]:
    manager = ModelManager(repo, devices=None, default_instances=2)
    yield manager
    await manager.unload_all()


def _served(manager: ModelManager) -> ModelVersion:
    return manager.get("vad")


async def test_synthetic_refused_first_request_becomes_the_reference(
    manager: ModelManager,
) -> None:
    await manager.load("vad")
    mv = _served(manager)
    assert mv.reference is None
    assert "Pad reflect requires axis length >= 2" in mv.placement.warmup_error
    # a request the model refuses is no reference
    bad = vad_inputs()
    bad["input"] = bad["input"][:, :1]
    with pytest.raises(ExecutorError, match="Pad reflect"):
        await mv.infer(InferRequest("vad", bad, id="too-short"))
    assert mv.reference is None
    first = vad_inputs(1)
    answer = await mv.infer(InferRequest("vad", first, id="first", requested_outputs=("output",)))
    assert set(answer.outputs) == {"output"}
    assert mv.reference is not None
    assert mv.reference.source == "request first"
    np.testing.assert_array_equal(mv.reference.inputs["input"], first["input"])
    assert set(mv.reference_outputs) == {"output", "stateN"}  # every output, not just asked
    np.testing.assert_array_equal(mv.reference_outputs["output"], answer.outputs["output"])
    await mv.infer(InferRequest("vad", vad_inputs(2), id="second"))
    assert mv.reference.source == "request first"  # taken once


async def test_failover_load_runs_the_reference(manager: ModelManager) -> None:
    """A failover or recovery loads the version elsewhere with the reference sample: it
    must run there, and its answers are what recovery compares."""
    await manager.load("vad")
    mv = _served(manager)
    await mv.infer(InferRequest("vad", vad_inputs(3), id="ref"))
    assert mv.reference is not None
    moved = await manager.loader(
        mv.spec, mv.version, ["cpu-onnx"], trial_runs=2, reference=mv.reference
    )
    try:
        assert moved.reference is mv.reference
        assert not moved.placement.warmup_error
        assert set(moved.placement.timings_s) == {"cpu-onnx"}  # timed on the reference
        np.testing.assert_allclose(
            moved.reference_outputs["output"], mv.reference_outputs["output"], rtol=1e-6
        )
    finally:
        await moved.close()


def _np_file(path: Path, value: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value)


async def test_warmup_tables_run_and_become_the_reference(
    manager: ModelManager, repo: Path
) -> None:
    _np_file(repo / "vad" / "warmup" / "sr.npy", SR)
    (repo / "vad" / "model.toml").write_text(
        """
[[warmup]]
name = "one chunk"
count = 2
[warmup.inputs.input]
dims = [1, 576]
random_data = true
[warmup.inputs.state]
dims = [2, 1, 128]
zero_data = true
[warmup.inputs.sr]
input_data_file = "warmup/sr.npy"
"""
    )
    await manager.load("vad")
    mv = _served(manager)
    assert mv.reference is not None
    assert mv.reference.source == "[[warmup]] 'one chunk'"
    assert mv.reference.inputs["input"].shape == (1, 576)
    assert mv.reference.inputs["sr"].dtype == np.int64
    assert not mv.placement.warmup_error
    assert mv.reference_outputs["output"].shape == (1, 1)


async def test_warmup_folder_samples(manager: ModelManager, repo: Path) -> None:
    folder = repo / "vad" / "warmup"
    folder.mkdir()
    np.savez(folder / "a.npz", **vad_inputs(5))
    np.savez(folder / "b.npz", **vad_inputs(6, batch=2))
    await manager.load("vad")
    mv = _served(manager)
    assert mv.reference is not None
    assert mv.reference.source == "warmup/a.npz"


BAD_WARMUP = [
    pytest.param(
        "[[warmup]]\nname = 'w'\n[warmup.inputs.input]\ndims = [1, 576]\nzero_data = true\n",
        "'warmup[0].inputs' lacks the input 'state'",
        id="missing-input",
    ),
    pytest.param(
        "[[warmup]]\nname = 'w'\n[warmup.inputs.audio]\ndims = [1]\nzero_data = true\n",
        "'warmup[0].inputs.audio': the model has no input 'audio'",
        id="unknown-input",
    ),
    pytest.param(
        "[[warmup]]\nname = 'w'\n[warmup.inputs.input]\ndims = [1, 576]\nzero_data = true\n"
        "[warmup.inputs.state]\ndims = [2, 128]\nzero_data = true\n"
        "[warmup.inputs.sr]\ndims = []\nzero_data = true\n",
        "'warmup[0].inputs.state.dims' [2, 128] do not fit input 'state' [2, -1, 128]",
        id="dims-do-not-fit",
    ),
    pytest.param(
        "[[warmup]]\nname = 'w'\nbatch_size = 4\n[warmup.inputs.input]\ndims = [1, 576]\n"
        "zero_data = true\n",
        "'warmup[0].batch_size' is 4 but the model does not batch",
        id="batch-size-without-batching",
    ),
    pytest.param(
        "[[warmup]]\nname = 'w'\n[warmup.inputs.input]\ndims = [1, 576]\nzero_data = true\n"
        "[warmup.inputs.state]\ndims = [2, 1, 128]\nzero_data = true\n"
        "[warmup.inputs.sr]\ninput_data_file = 'nowhere.npy'\n",
        "'warmup[0].inputs.sr.input_data_file'",
        id="file-missing",
    ),
    pytest.param(
        "[[warmup]]\nname = 'w'\n[warmup.inputs.input]\ndims = [1, 576]\nzero_data = true\n"
        "[warmup.inputs.state]\ndims = [2, 1, 128]\nzero_data = true\n"
        "[warmup.inputs.sr]\ndims = []\nzero_data = true\n",
        "warm-up [[warmup]] 'w' failed",  # sr = 0: the model refuses it, so the load fails
        id="operator-sample-refused",
    ),
]


@pytest.mark.parametrize(("toml", "named"), BAD_WARMUP)
async def test_bad_warmup_fails_the_load_naming_the_key(
    manager: ModelManager, repo: Path, toml: str, named: str
) -> None:
    (repo / "vad" / "model.toml").write_text(toml)
    with pytest.raises(ModelLoadError) as err:
        await manager.load("vad")
    assert named in str(err.value)
    assert not manager.is_ready("vad")
    (entry,) = [e for e in manager.index() if e.name == "vad"]
    assert named in entry.reason


async def test_warmup_npz_that_does_not_fit(manager: ModelManager, repo: Path) -> None:
    folder = repo / "vad" / "warmup"
    folder.mkdir()
    inputs = vad_inputs()
    del inputs["sr"]
    np.savez(folder / "a.npz", **inputs)
    with pytest.raises(ModelLoadError, match=r"warmup/a.npz: holds .* \(missing \['sr'\]\)"):
        await manager.load("vad")
    np.savez(folder / "a.npz", **vad_inputs(), extra=np.zeros(1))
    with pytest.raises(ModelLoadError, match=r"a\.npz: holds"):
        await manager.load("vad")
    bad = vad_inputs()
    bad["sr"] = bad["sr"].astype(np.int32)
    np.savez(folder / "a.npz", **bad)
    with pytest.raises(ModelLoadError, match=r"warm-up warmup/a\.npz"):
        await manager.load("vad")
