"""edged.ota.store: WAL + synchronous=FULL, records survive reopening (and a killed process),
the committed version follows COMMITTED / ROLLED_BACK, history is bounded."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edged.ota.state import Event, Kind, State, TransitionError, advance
from edged.ota.store import FILE_NAME, StoreError, UpdateStore


@pytest.fixture
def store(tmp_path: Path):
    s = UpdateStore(tmp_path / "state")
    yield s
    s.close()


def test_wal_and_full_sync(store: UpdateStore) -> None:
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def _run_to(store: UpdateStore, *events: Event, model: str = "digits", frm: int = 1, to: int = 2):
    record = store.begin(
        model, Kind.UPDATE, requested="latest", from_version=frm, to_version=None, at=1.0
    )
    for i, event in enumerate(events):
        after = advance(
            record,
            event,
            2.0 + i,
            reason="broke" if event in (Event.FAIL, Event.ROLLBACK) else "",
            **({"to_version": to} if event is Event.FETCHED else {}),
        )
        store.save(record, after, after.error if event in (Event.FAIL, Event.ROLLBACK) else "")
        record = after
    return record


def test_begin_and_save(store: UpdateStore) -> None:
    record = _run_to(store, Event.FETCHED, Event.UNPACKED)
    assert record.state is State.STAGED
    assert store.latest("digits") == record
    assert store.get(record.id) == record
    assert [t.state for t in store.transitions(record.id)] == [
        State.DOWNLOADING,
        State.VERIFIED,
        State.STAGED,
    ]
    assert store.committed("digits") == 1  # adopted from the first update's from_version
    assert store.latest("other") is None


def test_a_transaction_survives_reopening(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path)
    record = _run_to(store, Event.FETCHED, Event.UNPACKED, Event.ACTIVATE, Event.SWITCHED)
    store.close()
    again = UpdateStore(tmp_path)
    try:
        assert again.latest("digits") == record
        assert again.latest("digits").state is State.ACTIVE_TRIAL  # type: ignore[union-attr]
    finally:
        again.close()


def test_a_saved_transition_survives_a_killed_process(tmp_path: Path) -> None:
    """No close(), no checkpoint: the process dies right after save() returns."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from edged.ota.state import Event, Kind, advance
        from edged.ota.store import UpdateStore
        store = UpdateStore(Path({str(tmp_path)!r}))
        r = store.begin("m", Kind.UPDATE, requested="3", from_version=2, to_version=3, at=1.0)
        store.save(r, advance(r, Event.FETCHED, 2.0))
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert (tmp_path / f"{FILE_NAME}-wal").exists()  # the change is in the WAL, not merged
    store = UpdateStore(tmp_path)
    try:
        assert store.latest("m").state is State.VERIFIED  # type: ignore[union-attr]
    finally:
        store.close()


def test_committed_follows_commit_and_rollback(store: UpdateStore) -> None:
    _run_to(store, Event.FETCHED, Event.UNPACKED, Event.ACTIVATE, Event.SWITCHED, Event.HEALTHY)
    assert store.committed("digits") == 2
    record = _run_to(
        store,
        Event.FETCHED,
        Event.UNPACKED,
        Event.ACTIVATE,
        Event.SWITCHED,
        Event.ROLLBACK,
        Event.ROLLED_BACK,
        frm=2,
        to=3,
    )
    assert record.state is State.ROLLED_BACK
    assert record.error == "broke"
    assert store.committed("digits") == 2  # the trial never got committed
    rollback = store.begin(
        "digits", Kind.ROLLBACK, requested="1", from_version=2, to_version=1, at=9.0
    )
    assert rollback.state is State.ROLLING_BACK
    store.save(rollback, advance(rollback, Event.ROLLED_BACK, 10.0))
    assert store.committed("digits") == 1
    assert store.committed_all() == {"digits": 1}


def test_one_update_at_a_time(store: UpdateStore) -> None:
    _run_to(store, Event.FETCHED)
    with pytest.raises(TransitionError):
        store.begin("digits", Kind.UPDATE, requested="2", from_version=1, to_version=2, at=3.0)
    # another model is independent
    store.begin("other", Kind.UPDATE, requested="2", from_version=1, to_version=2, at=3.0)


def test_save_refuses_a_stale_record(store: UpdateStore) -> None:
    record = _run_to(store)
    store.save(record, advance(record, Event.FETCHED, 2.0))
    with pytest.raises(StoreError, match="no longer in state DOWNLOADING"):
        store.save(record, advance(record, Event.FAIL, 3.0, reason="x"))


def test_history_is_bounded_and_newest_first(tmp_path: Path) -> None:
    store = UpdateStore(tmp_path, history_limit=3)
    try:
        ids = [_run_to(store, Event.FAIL).id for _ in range(5)]
        _run_to(store, Event.FAIL, model="other")
        history = store.history("digits")
        assert [r.id for r in history] == ids[:-4:-1]
        assert all(store.transitions(i) == [] for i in ids[:2])  # pruned with their updates
        assert [r.model for r in store.history(limit=2)] == ["other", "digits"]
        assert [r.model for r in store.latest_all()] == ["digits", "other"]
    finally:
        store.close()


def test_adopt(store: UpdateStore) -> None:
    store.adopt("digits", 4)
    store.adopt("digits", 5)  # the first adoption stays
    assert store.committed("digits") == 4


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable"):
        UpdateStore(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / FILE_NAME)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        UpdateStore(tmp_path)
