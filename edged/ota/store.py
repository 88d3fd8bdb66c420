"""OTA progress that survives a crash: SQLite in WAL mode with ``synchronous=FULL``, so every
committed transaction is on disk (fsynced) when ``save`` returns.

One row per update (its latest state), one row per transition (the history ListUpdates shows),
and per model the committed version: the version a restart serves. The rules live in
``edged.ota.state``; this module checks nothing but that a write follows the state it read.

Blocking (SQLite fsyncs): call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from edged.ota.state import (
    Event,
    Kind,
    State,
    Transition,
    UpdateRecord,
    committed_after,
    next_state,
)
from edged.storage import StoreError, open_database, transaction

__all__ = ["FILE_NAME", "StoreError", "UpdateStore"]

FILE_NAME = "ota.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    committed_version INTEGER
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    requested TEXT NOT NULL,
    from_version INTEGER,
    to_version INTEGER,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    error TEXT NOT NULL DEFAULT '',
    installed INTEGER NOT NULL DEFAULT 0,
    target_path TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS updates_by_model ON updates (model, id);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id INTEGER NOT NULL REFERENCES updates (id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS transitions_by_update ON transitions (update_id, id);
"""


def _record(row: sqlite3.Row) -> UpdateRecord:
    return UpdateRecord(
        id=row["id"],
        model=row["model"],
        kind=Kind(row["kind"]),
        state=State(row["state"]),
        requested=row["requested"],
        from_version=row["from_version"],
        to_version=row["to_version"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        installed=bool(row["installed"]),
        target_path=row["target_path"],
    )


class UpdateStore:
    """The OTA state database in ``state_dir``."""

    def __init__(self, state_dir: Path, *, history_limit: int = 100) -> None:
        """Open (creating if need be) ``state_dir``/ota.sqlite3.

        Raises:
            StoreError: the folder cannot be created or the file is not a usable database.
        """
        self.path = state_dir / FILE_NAME
        self.history_limit = history_limit
        self._lock = threading.Lock()
        self._db = open_database(self.path, _SCHEMA, SCHEMA_VERSION, "OTA state")

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    # -- reads -----------------------------------------------------------------------------

    def latest(self, model: str) -> UpdateRecord | None:
        """The model's newest update, or None when it never had one."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM updates WHERE model = ? ORDER BY id DESC LIMIT 1",
                (model,),
            ).fetchone()
        return None if row is None else _record(row)

    def latest_all(self) -> list[UpdateRecord]:
        """Every model's newest update, by model name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM updates WHERE id IN "
                "(SELECT MAX(id) FROM updates GROUP BY model) ORDER BY model"
            ).fetchall()
        return [_record(r) for r in rows]

    def get(self, update_id: int) -> UpdateRecord | None:
        """One update by id."""
        with self._lock:
            row = self._db.execute("SELECT * FROM updates WHERE id = ?", (update_id,)).fetchone()
        return None if row is None else _record(row)

    def history(self, model: str = "", limit: int = 100) -> list[UpdateRecord]:
        """Updates newest first, of ``model`` or of every model."""
        with self._lock:
            if model:
                rows = self._db.execute(
                    "SELECT * FROM updates WHERE model = ? ORDER BY id DESC LIMIT ?",
                    (model, limit),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM updates ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
        return [_record(r) for r in rows]

    def transitions(self, update_id: int) -> list[Transition]:
        """Every state ``update_id`` passed, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, at, reason FROM transitions WHERE update_id = ? ORDER BY id",
                (update_id,),
            ).fetchall()
        return [Transition(State(r["state"]), r["at"], r["reason"]) for r in rows]

    def committed(self, model: str) -> int | None:
        """The model's committed version, or None when OTA never recorded one."""
        with self._lock:
            row = self._db.execute(
                "SELECT committed_version FROM models WHERE model = ?", (model,)
            ).fetchone()
        return None if row is None else row[0]

    def committed_all(self) -> dict[str, int | None]:
        """{model: committed version} for every model OTA knows."""
        with self._lock:
            rows = self._db.execute("SELECT model, committed_version FROM models").fetchall()
        return {r[0]: r[1] for r in rows}

    # -- writes ----------------------------------------------------------------------------

    def adopt(self, model: str, version: int | None) -> None:
        """Record ``version`` as the committed version of a model OTA has not seen before
        (what it served when its first update started); no change when one is recorded."""
        with self._lock, self._transaction() as db:
            db.execute(
                "INSERT INTO models (model, committed_version) VALUES (?, ?) "
                "ON CONFLICT (model) DO NOTHING",
                (model, version),
            )

    def begin(
        self,
        model: str,
        kind: Kind,
        *,
        requested: str,
        from_version: int | None,
        to_version: int | None,
        at: float,
        reason: str = "",
    ) -> UpdateRecord:
        """Record a new update or fine-tune (START) or rollback (ROLLBACK) of ``model``.

        Raises:
            TransitionError: the model's latest update is still in progress.
        """
        event = Event.ROLLBACK if kind is Kind.ROLLBACK else Event.START
        with self._lock, self._transaction() as db:
            row = db.execute(
                "SELECT state FROM updates WHERE model = ? ORDER BY id DESC LIMIT 1", (model,)
            ).fetchone()
            state = next_state(State(row[0]) if row else State.IDLE, event)
            db.execute(
                "INSERT INTO models (model, committed_version) VALUES (?, ?) "
                "ON CONFLICT (model) DO NOTHING",
                (model, from_version),
            )
            cursor = db.execute(
                "INSERT INTO updates (model, kind, state, requested, from_version, to_version, "
                "started_at, updated_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, kind.value, state.value, requested, from_version, to_version, at, at, ""),
            )
            update_id = cursor.lastrowid
            assert update_id is not None
            db.execute(
                "INSERT INTO transitions (update_id, state, at, reason) VALUES (?, ?, ?, ?)",
                (update_id, state.value, at, reason),
            )
            self._prune(db, model)
            row = db.execute("SELECT * FROM updates WHERE id = ?", (update_id,)).fetchone()
        return _record(row)

    def save(self, before: UpdateRecord, after: UpdateRecord, reason: str = "") -> None:
        """Persist ``after`` (what ``state.advance`` made of ``before``) and its transition,
        and the committed version it implies, in one fsynced transaction.

        Raises:
            StoreError: the stored record is no longer ``before`` (another writer moved it).
        """
        with self._lock, self._transaction() as db:
            cursor = db.execute(
                "UPDATE updates SET state = ?, to_version = ?, updated_at = ?, finished_at = ?, "
                "error = ?, installed = ?, target_path = ? WHERE id = ? AND state = ?",
                (
                    after.state.value,
                    after.to_version,
                    after.updated_at,
                    after.finished_at,
                    after.error,
                    int(after.installed),
                    after.target_path,
                    before.id,
                    before.state.value,
                ),
            )
            if cursor.rowcount != 1:
                raise StoreError(
                    f"update {before.id} of '{before.model}' is no longer in state {before.state}"
                )
            if after.state is not before.state:
                db.execute(
                    "INSERT INTO transitions (update_id, state, at, reason) VALUES (?, ?, ?, ?)",
                    (after.id, after.state.value, after.updated_at, reason),
                )
            if after.state in (State.COMMITTED, State.ROLLED_BACK):
                db.execute(
                    "INSERT INTO models (model, committed_version) VALUES (?, ?) "
                    "ON CONFLICT (model) DO UPDATE "
                    "SET committed_version = excluded.committed_version",
                    (after.model, committed_after(after)),
                )

    def _prune(self, db: sqlite3.Connection, model: str) -> None:
        db.execute(
            "DELETE FROM updates WHERE model = ? AND id NOT IN "
            "(SELECT id FROM updates WHERE model = ? ORDER BY id DESC LIMIT ?)",
            (model, model, max(self.history_limit, 1)),
        )
