"""The control plane in process: updates and learning answered in edged.core.control values,
over the real UpdateManager and LearnManager (real model files, real SQLite, the example
trainable model served by the real ModelManager); either side off answers UNAVAILABLE naming
its config key."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edged.config import LearnConfig, OtaConfig
from edged.controlplane import (
    LEARNING_OFF,
    OTA_OFF,
    ControlPlane,
    fine_tune_job,
    update_status,
)
from edged.core.control import (
    FineTuneJob,
    JobList,
    SampleCounts,
    UpdateInfo,
    UpdateStatus,
    UpdateStep,
)
from edged.core.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from edged.core.types import InferRequest
from edged.learn.jobs import LearnManager
from edged.learn.store import JobRecord, JobState, LearnStore
from edged.ota.state import Kind, State, Transition, UpdateRecord
from edged.ota.store import UpdateStore
from edged.ota.types import ModelStatus
from edged.ota.updater import UpdateManager
from edged.serving.manager import ModelManager
from edged.serving.validate import validate_request
from tests.daemon_process import EXAMPLE_MODELS

MODEL = "digits_learn"
NEW = np.load(EXAMPLE_MODELS / MODEL / "test_new.npz")  # classes 5-9, raw 64-pixel inputs


# -- either side off ---------------------------------------------------------------------------

OFF_CALLS: list[tuple[str, Callable[[ControlPlane], Awaitable[object]], str]] = [
    ("start_update", lambda c: c.start_update("digits"), OTA_OFF),
    ("update_status", lambda c: c.update_status(), OTA_OFF),
    ("rollback", lambda c: c.rollback("digits"), OTA_OFF),
    ("update_history", lambda c: c.update_history(), OTA_OFF),
    (
        "add_samples",
        lambda c: c.add_samples(MODEL, {"input": NEW["x"][:1]}, np.zeros(1, np.int64)),
        LEARNING_OFF,
    ),
    ("start_fine_tune", lambda c: c.start_fine_tune(MODEL), LEARNING_OFF),
    ("job", lambda c: c.job(1), LEARNING_OFF),
    ("jobs", lambda c: c.jobs(), LEARNING_OFF),
]


@pytest.mark.parametrize(
    ("call", "message"), [(c, m) for _, c, m in OFF_CALLS], ids=[n for n, *_ in OFF_CALLS]
)
async def test_a_side_that_is_off_answers_unavailable_naming_its_key(
    call: Callable[[ControlPlane], Awaitable[object]], message: str
) -> None:
    with pytest.raises(UnavailableError) as info:
        await call(ControlPlane())
    assert str(info.value) == message
    assert ("ota.repository_url" in message) != ("learn.enabled" in message)


def test_require_learning_says_which_key_turns_it_on() -> None:
    with pytest.raises(UnavailableError, match=re.escape("learn.enabled")):
        ControlPlane().require_learning()


# -- the views ---------------------------------------------------------------------------------


def test_an_update_becomes_plain_values() -> None:
    record = UpdateRecord(
        id=7,
        model="digits",
        kind=Kind.ROLLBACK,
        state=State.ROLLED_BACK,
        requested="1",
        from_version=2,
        to_version=1,
        started_at=10.0,
        updated_at=12.5,
        finished_at=13.0,
        error="asked for",
        installed=True,
        target_path="models/digits/1.tar.gz",
    )
    steps = [Transition(State.ROLLING_BACK, 11.0, "asked for"), Transition(State.ROLLED_BACK, 13.0)]
    assert update_status(ModelStatus("digits", State.ROLLED_BACK, 1, record), steps) == (
        UpdateStatus(
            model="digits",
            state="ROLLED_BACK",
            committed=1,
            update=UpdateInfo(7, "rollback", 2, 1, "1", "asked for", 10.0, 12.5, 13.0),
            steps=(UpdateStep("ROLLING_BACK", 11.0, "asked for"), UpdateStep("ROLLED_BACK", 13.0)),
        )
    )
    assert update_status(ModelStatus("digits", State.IDLE, None)) == UpdateStatus(
        "digits", "IDLE", None
    )


def test_a_job_becomes_plain_values_with_its_live_progress() -> None:
    record = JobRecord(
        id=3,
        model=MODEL,
        strategy="replay",
        trigger="requested",
        state=JobState.RUNNING,
        progress=0.0,
        parent_version=1,
        new_version=None,
        metrics={"old_holdout": 20, "new_accuracy_after": None},
        verdict="",
        error="",
        update_id=0,
        created_at=1.0,
        updated_at=2.0,
    )
    job = fine_tune_job(record, 0.4)
    assert job == FineTuneJob(
        id=3,
        model=MODEL,
        strategy="replay",
        trigger="requested",
        state="RUNNING",
        progress=0.4,
        parent_version=1,
        new_version=None,
        verdict="",
        error="",
        update_id=0,
        created_at=1.0,
        updated_at=2.0,
        metrics={"old_holdout": 20, "new_accuracy_after": None},
    )
    assert fine_tune_job(record).progress == 0.0  # not running: the stored progress


# -- both sides on, in process -------------------------------------------------------------


@dataclass
class Rig:
    control: ControlPlane
    manager: ModelManager
    learn: LearnManager
    samples: LearnStore


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    repo = tmp_path / "models"
    shutil.copytree(
        EXAMPLE_MODELS / MODEL, repo / MODEL, ignore=shutil.ignore_patterns("test_*.npz")
    )
    state = tmp_path / "state"
    config = OtaConfig(state_dir=str(state), health_window_s=0.3, min_free_bytes=1024 * 1024)
    store = UpdateStore(state)
    samples = LearnStore(state)
    manager = ModelManager(repo, default_instances=1)
    updates = UpdateManager(manager, config, store)
    learn = LearnManager(manager, updates, LearnConfig(enabled=True), samples, state)
    await asyncio.to_thread(updates.recover)
    await asyncio.to_thread(learn.recover)
    await manager.load_all()
    await updates.start()
    await learn.start()
    yield Rig(ControlPlane(updates, learn), manager, learn, samples)
    await learn.stop()
    await updates.stop()
    await manager.unload_all()
    samples.close()
    store.close()


def _backbone_features(x: np.ndarray) -> np.ndarray:
    """The reference: the served version's backbone graph run by ONNX Runtime here."""
    path = EXAMPLE_MODELS / MODEL / "1" / "backbone.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"input": x})
    return np.asarray(features)


async def test_added_samples_are_stored_as_the_backbones_features(rig: Rig) -> None:
    x = NEW["x"][:10].astype(np.float32)
    y = NEW["y"][:10].astype(np.int64)
    added = await rig.control.add_samples(MODEL, {"input": x}, y)

    assert added.accepted == 10
    assert added.counts.model == MODEL
    assert added.counts.pending == 10
    assert added.counts.stored_bytes > 0
    assert added.triggered is None
    stored = await asyncio.to_thread(rig.samples.pending, MODEL)
    order = np.argsort(stored.ids)
    np.testing.assert_allclose(stored.features[order], _backbone_features(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored.labels[order], y)
    # loaded through the HAL on the kind the version is served on
    served = rig.manager.get(MODEL)
    assert rig.learn._backbones._loaded[MODEL].kind == served.kind


@pytest.mark.parametrize(
    ("inputs", "labels", "match"),
    [
        ({"input": NEW["x"][:2].astype(np.float64)}, [5, 6], "datatype FP64"),
        ({"input": NEW["x"][:2, :32].astype(np.float32)}, [5, 6], "shape [2, 32]"),
        ({"pixels": NEW["x"][:2].astype(np.float32)}, [5, 6], "unknown input tensor 'pixels'"),
    ],
    ids=["datatype", "shape", "name"],
)
async def test_bad_inputs_are_refused_as_an_inference_request_is(
    rig: Rig, inputs: dict[str, np.ndarray], labels: list[int], match: str
) -> None:
    signature = rig.manager.get(MODEL).signature
    with pytest.raises(InvalidInputError) as as_request:
        validate_request(InferRequest(MODEL, inputs), signature)
    with pytest.raises(InvalidInputError, match=re.escape(match)) as as_samples:
        await rig.control.add_samples(MODEL, inputs, np.array(labels, np.int64))
    assert str(as_samples.value) == str(as_request.value)
    assert (await rig.control.jobs(MODEL)).counts == (SampleCounts(MODEL),)  # nothing stored


async def test_bad_labels_are_refused_naming_the_field(rig: Rig) -> None:
    x = NEW["x"][:2].astype(np.float32)
    with pytest.raises(InvalidInputError, match="'labels' has 1 entries for 2 samples"):
        await rig.control.add_samples(MODEL, {"input": x}, np.array([5], np.int64))
    with pytest.raises(InvalidInputError, match=r"labels\[1\] = 10 is not a class"):
        await rig.control.add_samples(MODEL, {"input": x}, np.array([5, 10], np.int64))


async def test_learning_and_update_status_as_plain_values(rig: Rig) -> None:
    assert await rig.control.jobs() == JobList((), (SampleCounts(MODEL),))
    with pytest.raises(ModelNotFoundError, match="no fine-tune job 9"):
        await rig.control.job(9)
    with pytest.raises(InvalidInputError, match="new samples"):
        await rig.control.start_fine_tune(MODEL)  # none waiting
    (status,) = await rig.control.update_status(MODEL)
    assert (status.model, status.state, status.update) == (MODEL, "IDLE", None)
    assert await rig.control.update_history(MODEL) == []
    with pytest.raises(UnavailableError):
        await rig.control.start_update(MODEL)  # no TUF repository configured
