"""UpdateManager in process on a real repository, without a TUF repository: the recovery rule
applied to the files before the repository loads (every state), and an explicit Rollback through
the one swap path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edged.config import OtaConfig
from edged.core.errors import InvalidInputError, ModelNotFoundError
from edged.core.types import InferRequest
from edged.ota.state import AT_REST, Event, Kind, Recovery, State, UpdateRecord, advance
from edged.ota.store import UpdateStore
from edged.ota.updater import UpdateManager
from edged.serving.manager import ModelManager
from edged.serving.versions import STAGING_DIR, read_active, write_active
from tests.daemon_process import EXAMPLE_MODELS

#: the events that bring a new update (1 -> 2) to each state
PATHS: dict[State, list[Event]] = {
    State.DOWNLOADING: [],
    State.VERIFIED: [Event.FETCHED],
    State.STAGED: [Event.FETCHED, Event.UNPACKED],
    State.WARMING: [Event.FETCHED, Event.UNPACKED, Event.ACTIVATE],
    State.ACTIVE_TRIAL: [Event.FETCHED, Event.UNPACKED, Event.ACTIVATE, Event.SWITCHED],
    State.ROLLING_BACK: [
        Event.FETCHED,
        Event.UNPACKED,
        Event.ACTIVATE,
        Event.SWITCHED,
        Event.ROLLBACK,
    ],
    State.COMMITTED: [
        Event.FETCHED,
        Event.UNPACKED,
        Event.ACTIVATE,
        Event.SWITCHED,
        Event.HEALTHY,
    ],
    State.FAILED: [Event.FAIL],
}

#: what ACTIVE said when the daemon died in each state
ACTIVE_AT_CRASH = {
    State.WARMING: 2,
    State.ACTIVE_TRIAL: 2,
    State.ROLLING_BACK: 2,
    State.COMMITTED: 2,
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    shutil.copytree(
        EXAMPLE_MODELS / "digits", repo / "digits", ignore=shutil.ignore_patterns("*.npy")
    )
    return repo


def _config(tmp_path: Path) -> OtaConfig:
    return OtaConfig(state_dir=str(tmp_path / "state"), health_window_s=0.2)


def _add_version_2(repo: Path) -> None:
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")


def _drive(store: UpdateStore, events: list[Event]) -> UpdateRecord:
    record = store.begin("digits", Kind.UPDATE, requested="2", from_version=1, to_version=2, at=1.0)
    for i, event in enumerate(events):
        extra = {"installed": True} if event is Event.UNPACKED else {}
        after = advance(
            record,
            event,
            2.0 + i,
            reason="x" if event in (Event.FAIL, Event.ROLLBACK) else "",
            **extra,
        )  # type: ignore[arg-type]
        store.save(record, after)
        record = after
    return record


def _infer() -> InferRequest:
    return InferRequest("digits", {"input": np.zeros((1, 64), np.float32)})


@pytest.mark.parametrize("state", list(PATHS), ids=str)
async def test_recovery_from_every_state(tmp_path: Path, repo: Path, state: State) -> None:
    _add_version_2(repo)
    config = _config(tmp_path)
    store = UpdateStore(Path(config.state_dir))
    record = _drive(store, PATHS[state])
    assert record.state is state
    write_active(repo / "digits", [ACTIVE_AT_CRASH.get(state, 1)])
    (repo / "digits" / STAGING_DIR / "leftover").mkdir(parents=True)

    manager = ModelManager(repo)
    updates = UpdateManager(manager, config, store)
    ((after, action),) = updates.recover()
    await manager.load_all()
    try:
        served = (await manager.infer(_infer())).model_version
    finally:
        await manager.unload_all()
        store.close()

    assert after.at_rest
    assert not (repo / "digits" / STAGING_DIR).exists()
    if state is State.COMMITTED:
        assert action is Recovery.NOTHING
        assert served == "2"
        assert (repo / "digits" / "2").is_dir()
        return
    assert served == "1", f"a restart in {state} must serve the committed version"
    assert read_active(repo / "digits") == [1]
    if state in AT_REST:
        assert action is Recovery.NOTHING
        assert after == record
        return
    expected = (
        State.FAILED
        if state.value in {"DOWNLOADING", "VERIFIED", "STAGED", "WARMING"}
        else State.ROLLED_BACK
    )
    assert after.state is expected
    reopened = UpdateStore(Path(config.state_dir))
    try:
        assert reopened.latest("digits") == after
        assert reopened.committed("digits") == 1
    finally:
        reopened.close()
    if state is not State.ROLLING_BACK:
        assert after.error == f"interrupted in {state} by a daemon restart"
    # the version this update installed is gone once it was undone (not for VERIFIED/DOWNLOADING,
    # where it was not installed yet)
    assert (repo / "digits" / "2").exists() is (state in (State.DOWNLOADING, State.VERIFIED))


async def test_recovery_finishes_an_explicit_rollback(tmp_path: Path, repo: Path) -> None:
    _add_version_2(repo)
    config = _config(tmp_path)
    store = UpdateStore(Path(config.state_dir))
    _drive(store, PATHS[State.COMMITTED])
    store.begin("digits", Kind.ROLLBACK, requested="1", from_version=2, to_version=1, at=9.0)
    write_active(repo / "digits", [2])  # died before ACTIVE was rewritten
    manager = ModelManager(repo)
    ((after, action),) = UpdateManager(manager, config, store).recover()
    await manager.load_all()
    try:
        assert action is Recovery.FINISH_ROLLBACK
        assert after.state is State.ROLLED_BACK
        assert store.committed("digits") == 1
        assert (await manager.infer(_infer())).model_version == "1"
        assert (repo / "digits" / "2").is_dir()  # a rollback removes nothing
    finally:
        await manager.unload_all()
        store.close()


async def test_explicit_rollback_and_its_refusals(tmp_path: Path, repo: Path) -> None:
    _add_version_2(repo)
    config = _config(tmp_path)
    store = UpdateStore(Path(config.state_dir))
    _drive(store, PATHS[State.COMMITTED])
    write_active(repo / "digits", [2])
    manager = ModelManager(repo)
    updates = UpdateManager(manager, config, store)
    updates.recover()
    await manager.load_all()
    await updates.start()
    try:
        assert (await manager.infer(_infer())).model_version == "2"
        with pytest.raises(ModelNotFoundError):
            await updates.rollback("nope")
        with pytest.raises(ModelNotFoundError, match="no version 7"):
            await updates.rollback("digits", "7")
        with pytest.raises(InvalidInputError, match="committed version already"):
            await updates.rollback("digits", "2")
        with pytest.raises(InvalidInputError, match="not a version number"):
            await updates.rollback("digits", "one")
        status = await updates.rollback("digits", wait=True)
        assert status.state is State.ROLLED_BACK
        assert status.committed == 1
        assert status.record is not None
        assert status.record.kind is Kind.ROLLBACK
        assert (await manager.infer(_infer())).model_version == "1"
        assert read_active(repo / "digits") == [1]
        with pytest.raises(ModelNotFoundError, match="below the committed version 1"):
            await updates.rollback("digits")
        # OTA is off in this config: StartUpdate says so
        with pytest.raises(Exception, match="off"):
            await updates.start_update("digits", "3")
        history = await updates.history("digits")
        assert [h[0].state for h in history] == [State.ROLLED_BACK, State.COMMITTED]
        assert [t.state for t in history[0][1]] == [State.ROLLING_BACK, State.ROLLED_BACK]
    finally:
        await updates.stop()
        await manager.unload_all()
        store.close()
