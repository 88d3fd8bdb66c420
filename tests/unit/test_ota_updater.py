"""The OTA orchestration in process: UpdateManager over the real ModelManager (real files, real
SQLite, real ONNX Runtime on models/digits), fed by a simulated TUF repository and timed by a
fake clock.

python-tuf tests its ngclient against a ``RepositorySimulator``; here the ngclient itself is the
seam: ``SimulatedTufRepository`` implements ``edged.ota.tuf_client.BundleSource`` over bundles
built with the fleet's own builder, so every stage after the download — unpack, checks, version
folder, self-test gate, switch, health window, commit or roll back, crash recovery — runs as in
the daemon, without HTTP or a daemon process. tests/e2e/test_ota.py is the spec these follow.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tuf.api.exceptions import LengthOrHashMismatchError

from edged.config import OtaConfig
from edged.core.errors import EdgedError
from edged.core.types import InferRequest
from edged.ota.state import State, UpdateRecord
from edged.ota.store import UpdateStore
from edged.ota.targets import check_target, target_path
from edged.ota.tuf_client import BundleSource
from edged.ota.updater import UpdateManager
from edged.serving.manager import ModelManager
from edged.serving.versions import STAGING_DIR, read_active
from edged.storage import StoreError
from tests.daemon_process import EXAMPLE_MODELS
from tests.digits_variants import (
    DIGITS_V1,
    SAMPLE,
    poisoned,
    poisoned_digits_model,
    run_onnx,
    write_digits_bundle,
)

# -- the simulated repository and the fake clock ----------------------------------------------


@dataclass
class SimulatedTufRepository:
    """A fleet repository simulated in memory: the bundles it signs (model, version -> built
    .tar.gz), and the refusals a real client would raise (a tampered target, say). ``fetch``
    hands out a copy, as ngclient does from its targets folder, for the updater to delete."""

    downloads: Path
    bundles: dict[tuple[str, int], Path] = field(default_factory=dict)
    refuse: dict[tuple[str, int], Exception] = field(default_factory=dict)
    max_bundle_bytes: int = OtaConfig.max_bundle_bytes

    def versions(self) -> dict[str, dict[int, Mapping[str, Any]]]:
        found: dict[str, dict[int, Mapping[str, Any]]] = {}
        for model, version in self.bundles:
            found.setdefault(model, {})[version] = {}
        return found

    def fetch(self, model: str, version: int, fmt: str, free_space_floor: int) -> Path:
        path = target_path(model, version)
        if (model, version) not in self.bundles:
            raise EdgedError(f"target {path} is not in the repository")
        if (model, version) in self.refuse:
            raise self.refuse[(model, version)]
        source = self.bundles[(model, version)]
        check_target(
            path,
            {},
            model=model,
            version=version,
            fmt=fmt,
            length=source.stat().st_size,
            max_bytes=self.max_bundle_bytes,
        )
        self.downloads.mkdir(parents=True, exist_ok=True)
        local = self.downloads / f"{model}-{version}.tar.gz"
        shutil.copyfile(source, local)
        return local

    def publish_digits(
        self,
        version: int,
        onnx_bytes: bytes = DIGITS_V1,
        *,
        expected: dict[str, np.ndarray] | None = None,
        as_version: int | None = None,
    ) -> None:
        """Build digits ``version`` with the fleet's builder and sign it (``as_version``: sign
        it under another version number, a bundle that is not what it claims)."""
        built = write_digits_bundle(
            self.downloads.parent / "bundles" / f"digits-{version}.tar.gz",
            version,
            onnx_bytes,
            expected=expected,
        )
        self.bundles[("digits", as_version or version)] = built


class FakeClock:
    """Time that moves only when the test says: the health window closes on ``advance``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Rig:
    repo: Path
    config: OtaConfig
    store: UpdateStore
    manager: ModelManager
    updates: UpdateManager
    tuf: SimulatedTufRepository
    clock: FakeClock


def _check_protocol(source: SimulatedTufRepository) -> BundleSource:
    return source  # mypy: the simulation is a BundleSource


def _config(tmp_path: Path, **keys: Any) -> OtaConfig:
    return OtaConfig(
        state_dir=str(tmp_path / "state"),
        health_window_s=1.0,
        health_min_requests=5,
        min_free_bytes=1024 * 1024,
        **keys,
    )


async def _open(tmp_path: Path, tuf: SimulatedTufRepository, config: OtaConfig) -> Rig:
    """A daemon's OTA start-up order: recover, load the repository, take requests."""
    repo = tmp_path / "models"
    store = UpdateStore(Path(config.state_dir))
    manager = ModelManager(repo)
    clock = FakeClock()
    updates = UpdateManager(manager, config, store, tuf=_check_protocol(tuf), monotonic=clock)
    await asyncio.to_thread(updates.recover)
    await manager.load_all()
    await updates.start()
    return Rig(repo, config, store, manager, updates, tuf, clock)


async def _close(rig: Rig) -> None:
    await rig.updates.stop()
    await rig.manager.unload_all()
    rig.store.close()


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    shutil.copytree(
        EXAMPLE_MODELS / "digits",
        tmp_path / "models" / "digits",
        ignore=shutil.ignore_patterns("*.npy"),
    )
    keys = getattr(request, "param", {})
    tuf = SimulatedTufRepository(tmp_path / "tuf-targets")
    rig = await _open(tmp_path, tuf, _config(tmp_path, **keys))
    yield rig
    await _close(rig)


async def _served(rig: Rig, x: np.ndarray = SAMPLE[:1]) -> str:
    return (await rig.manager.infer(InferRequest("digits", {"input": x}))).model_version


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the update never got there")


def _state(rig: Rig) -> State | None:
    record = rig.updates.latest.get("digits")
    return record.state if record else None


async def _states_passed(rig: Rig, record: UpdateRecord) -> list[State]:
    return [t.state for t in await asyncio.to_thread(rig.store.transitions, record.id)]


# -- (a) the happy path ---------------------------------------------------------------------


async def test_update_commits_once_the_window_closes(rig: Rig) -> None:
    rig.tuf.publish_digits(2)
    start = asyncio.create_task(rig.updates.start_update("digits", "latest", wait=True))
    await _until(lambda: _state(rig) is State.ACTIVE_TRIAL)
    assert {await _served(rig) for _ in range(3)} == {"2"}
    assert _state(rig) is State.ACTIVE_TRIAL  # the fake clock has not moved: window open
    rig.clock.advance(rig.config.health_window_s)
    result = await start

    assert result.started
    assert result.status.state is State.COMMITTED, result.status
    assert result.status.committed == 2
    record = result.status.record
    assert record is not None
    assert record.error == ""
    assert await _states_passed(rig, record) == [
        State.DOWNLOADING,
        State.VERIFIED,
        State.STAGED,
        State.WARMING,
        State.ACTIVE_TRIAL,
        State.COMMITTED,
    ]
    assert await _served(rig) == "2"
    assert read_active(rig.repo / "digits") == [2]
    assert rig.store.committed("digits") == 2
    assert not (rig.repo / "digits" / STAGING_DIR).exists()
    assert not list(rig.tuf.downloads.iterdir())  # the archive went once unpacked
    # nothing newer: "latest" does not start another
    again = await rig.updates.start_update("digits", "latest")
    assert not again.started
    assert "version 2 is committed" in again.reason


# -- (b) the self-test gate -----------------------------------------------------------------


async def test_failed_self_test_keeps_the_served_version(rig: Rig) -> None:
    wrong = {k: v + 1 for k, v in run_onnx(DIGITS_V1, SAMPLE).items()}
    rig.tuf.publish_digits(2, expected=wrong)
    result = await rig.updates.start_update("digits", "2", wait=True)

    status = (await rig.updates.status("digits"))[0]
    assert status.state is State.FAILED
    assert status.record is not None
    assert status.record.error.startswith("self-test failed"), status.record.error
    assert status.committed == 1
    assert State.ACTIVE_TRIAL not in await _states_passed(rig, status.record)
    assert result.started
    assert await _served(rig) == "1"
    assert read_active(rig.repo / "digits") == [1]
    assert not (rig.repo / "digits" / "2").exists()  # the refused version was removed


async def test_a_switch_whose_record_was_lost_is_undone_through_serving(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # serving switched to version 2 and wrote ACTIVE, but persisting ACTIVE_TRIAL failed:
    # the update fails from WARMING, and serving is asked to serve version 1 again
    save = rig.store.save

    def failing_save(before: UpdateRecord, after: UpdateRecord, reason: str = "") -> None:
        if after.state is State.ACTIVE_TRIAL:
            raise StoreError("disk full (simulated)")
        save(before, after, reason)

    monkeypatch.setattr(rig.store, "save", failing_save)
    rig.tuf.publish_digits(2)
    await rig.updates.start_update("digits", "2", wait=True)

    status = (await rig.updates.status("digits"))[0]
    assert status.state is State.FAILED
    assert status.record is not None
    assert "disk full" in status.record.error
    assert await _served(rig) == "1"
    assert read_active(rig.repo / "digits") == [1]
    assert not (rig.repo / "digits" / "2").exists()


# -- (c) the health window ------------------------------------------------------------------


@pytest.mark.parametrize("rig", [{"max_error_rate": 0.2}], indirect=True)
async def test_failing_requests_in_the_window_roll_back(rig: Rig) -> None:
    rig.tuf.publish_digits(2, poisoned_digits_model())
    start = asyncio.create_task(rig.updates.start_update("digits", "2", wait=True))
    await _until(lambda: _state(rig) is State.ACTIVE_TRIAL)
    failed = 0
    for i in range(rig.config.health_min_requests):
        try:
            await _served(rig, poisoned(i))
        except EdgedError:
            failed += 1
    assert failed, "version 2 failed requests during its window"
    result = await start  # judged without the clock moving: no need to wait out the window

    status = result.status
    assert status.state is State.ROLLED_BACK
    assert status.record is not None
    assert status.record.error.startswith("health window: error rate"), status.record.error
    assert status.committed == 1
    assert await _served(rig) == "1"
    assert read_active(rig.repo / "digits") == [1]
    assert not (rig.repo / "digits" / "2").exists()


async def test_rollback_during_the_window(rig: Rig) -> None:
    rig.tuf.publish_digits(2)
    start = asyncio.create_task(rig.updates.start_update("digits", "2", wait=True))
    await _until(lambda: _state(rig) is State.ACTIVE_TRIAL)
    status = await rig.updates.rollback("digits", wait=True)
    await start

    assert status.state is State.ROLLED_BACK
    assert status.record is not None
    assert status.record.error == "rollback requested"
    assert await _served(rig) == "1"
    assert not (rig.repo / "digits" / "2").exists()


# -- (d) download and verification failures end the update and free the model --------------


async def test_refused_target_fails_and_frees_the_model(rig: Rig) -> None:
    rig.tuf.publish_digits(2)
    rig.tuf.refuse[("digits", 2)] = LengthOrHashMismatchError("simulated: hash mismatch")
    await rig.updates.start_update("digits", "2", wait=True)

    status = (await rig.updates.status("digits"))[0]
    assert status.state is State.FAILED
    assert status.record is not None
    assert status.record.error.startswith("LengthOrHashMismatchError: "), status.record.error
    assert status.committed == 1
    assert await _served(rig) == "1"
    assert not (rig.repo / "digits" / "2").exists()

    rig.tuf.publish_digits(3)  # the model is free: the next update runs to the end
    start = asyncio.create_task(rig.updates.start_update("digits", "latest", wait=True))
    await _until(lambda: _state(rig) is State.ACTIVE_TRIAL)
    rig.clock.advance(rig.config.health_window_s)
    result = await start
    assert result.status.state is State.COMMITTED, result.status
    assert await _served(rig) == "3"


async def test_bundle_not_what_was_signed_fails(rig: Rig) -> None:
    rig.tuf.publish_digits(3, as_version=2)
    await rig.updates.start_update("digits", "2", wait=True)

    status = (await rig.updates.status("digits"))[0]
    assert status.state is State.FAILED
    assert status.record is not None
    assert "bundle.toml says version 3, not 2" in status.record.error
    assert await _served(rig) == "1"
    assert not (rig.repo / "digits" / "2").exists()
    assert not (rig.repo / "digits" / "3").exists()
    assert not (rig.repo / "digits" / STAGING_DIR).exists()


async def test_start_update_refusals(rig: Rig) -> None:
    with pytest.raises(EdgedError, match="no bundle of model 'digits'"):
        await rig.updates.start_update("digits", "latest")
    with pytest.raises(EdgedError, match="not in the model repository"):
        await rig.updates.start_update("nope", "2")
    with pytest.raises(EdgedError, match="neither a version number"):
        await rig.updates.start_update("digits", "two")


# -- (e) a crash in each persisted state, then a restart ------------------------------------

#: state the update is stopped in -> (state after the restart's recovery, version served then)
STOPPED_IN = {
    "DOWNLOADING": (State.FAILED, "1"),
    "VERIFIED": (State.FAILED, "1"),
    "STAGED": (State.FAILED, "1"),
    "WARMING": (State.FAILED, "1"),
    "ACTIVE_TRIAL": (State.ROLLED_BACK, "1"),
    "ROLLING_BACK": (State.ROLLED_BACK, "1"),
}


@pytest.mark.parametrize("stopped_in", list(STOPPED_IN))
async def test_restart_recovers_from_each_state(tmp_path: Path, stopped_in: str) -> None:
    shutil.copytree(
        EXAMPLE_MODELS / "digits",
        tmp_path / "models" / "digits",
        ignore=shutil.ignore_patterns("*.npy"),
    )
    tuf = SimulatedTufRepository(tmp_path / "tuf-targets")
    tuf.publish_digits(2)
    config = _config(tmp_path, pause_after_state=stopped_in, pause_s=600.0)
    rig = await _open(tmp_path, tuf, config)
    try:
        await rig.updates.start_update("digits", "2")
        if stopped_in == "ROLLING_BACK":
            await _until(lambda: _state(rig) is State.ACTIVE_TRIAL)
            await rig.updates.rollback("digits")
        await _until(lambda: _state(rig) is State(stopped_in))
    finally:
        await _close(rig)  # the update is cancelled where it paused: its state stays persisted

    rig = await _open(tmp_path, tuf, _config(tmp_path))
    try:
        want_state, want_served = STOPPED_IN[stopped_in]
        status = (await rig.updates.status("digits"))[0]
        assert status.state is want_state, status
        assert status.committed == 1
        assert await _served(rig) == want_served
        # pinned to 1 once the update staged a folder; absent (highest folder) before
        assert read_active(rig.repo / "digits") in (None, [1])
        assert not (rig.repo / "digits" / "2").exists()
        assert not (rig.repo / "digits" / STAGING_DIR).exists()
    finally:
        await _close(rig)


# -- (b2) the check of an optimised variant (bundle.toml [optimize]) ------------------------


def _publish_optimized(rig: Rig, version: int, disagree: int) -> None:
    """Sign digits ``version`` as an optimised variant whose check set holds 40 held-out
    samples (more than max_batch_size 32: two requests) and "parent" outputs that decide
    ``disagree`` rows differently from what the variant answers; recorded agreement 1.0."""
    from sklearn.datasets import load_digits

    from edged.fleet.build import build_bundle, selftest_npz
    from edged.ota.bundle import OptimizeEvidence

    x = load_digits().data[1000:1040].astype(np.float32)
    parent = run_onnx(DIGITS_V1, x)["probabilities"].copy()
    parent[:disagree] = np.roll(parent[:disagree], 1, axis=1)  # other top-1 on those rows
    model_dir = rig.tuf.downloads.parent / "variant" / "digits"
    source = model_dir / "src"
    source.mkdir(parents=True)
    shutil.copyfile(EXAMPLE_MODELS / "digits" / "model.toml", model_dir / "model.toml")
    (source / "model.onnx").write_bytes(DIGITS_V1)
    (source / "optimize.json").write_text("{}\n")
    evidence = OptimizeEvidence(
        file="optimize.npz",
        lineage="optimize.json",
        method="int8-static-minmax",
        parent="digits",
        parent_sha256="0" * 64,
        calibration_sha256="1" * 64,
        output="probabilities",
        samples=40,
        agreement=1.0,
        rel_l2_error=0.5,
    )
    check = selftest_npz({"input": x}, {"probabilities": parent})
    out = rig.tuf.downloads.parent / "bundles" / f"digits-{version}-optimized.tar.gz"
    built = build_bundle(
        model_dir, version, out, {"input": SAMPLE}, source=source, optimize=(evidence, check)
    )
    rig.tuf.bundles[("digits", version)] = built


async def test_an_optimised_variant_drifting_from_its_evidence_is_refused(rig: Rig) -> None:
    _publish_optimized(rig, 2, disagree=4)
    await rig.updates.start_update("digits", "2", wait=True)

    status = (await rig.updates.status("digits"))[0]
    assert status.state is State.FAILED
    assert status.record is not None
    error = status.record.error
    assert error.startswith("self-test failed: SelfTestError: optimize check"), error
    assert "is 0.9000 on 40 held-out samples, below the 1.0000 recorded" in error
    assert "ota.optimize_agreement_slack 0.01" in error
    assert State.ACTIVE_TRIAL not in await _states_passed(rig, status.record)
    assert await _served(rig) == "1"
    assert not (rig.repo / "digits" / "2").exists()


@pytest.mark.parametrize("rig", [{"optimize_agreement_slack": 0.15}], indirect=True)
async def test_the_agreement_slack_lets_a_small_drift_through(rig: Rig) -> None:
    _publish_optimized(rig, 2, disagree=4)  # 0.90 >= 1.0 - 0.15
    start = asyncio.create_task(rig.updates.start_update("digits", "2", wait=True))
    await _until(lambda: _state(rig) is State.ACTIVE_TRIAL)
    rig.clock.advance(rig.config.health_window_s)
    result = await start
    assert result.status.state is State.COMMITTED, result.status
    assert await _served(rig) == "2"
    assert (rig.repo / "digits" / "2" / "optimize.json").is_file()  # the evidence installed
