"""The sample store and the job table: what on-device learning keeps across restarts.

Samples arrive in batches (one AddSamples request). A batch's backbone features are one
``.npy`` file under ``<state_dir>/learn/samples/<model>/``, written durably (temp file, fsync,
rename) *before* its rows are committed to ``<state_dir>/learn.sqlite3`` (WAL,
``synchronous=FULL``); on open, files without rows and rows without files are removed, so a
crash between the two loses only the request that was never acknowledged.

Each sample is ``pending`` (waiting for a fine-tune), ``learned`` (in a promoted version) or
``rejected`` (its job's candidate failed the gate). Every round(1/holdout_share)-th sample of a
model is held out: a job judges the candidate on it and never trains on it. Past the caps, whole
batches with no pending sample go first, oldest first; when that is not enough the new batch is
refused (``OverloadedError``) and nothing is stored.

Blocking (SQLite, file I/O): call from worker threads, never on the event loop.
"""

from __future__ import annotations

import enum
import io
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.core.control import SampleCounts
from edged.core.errors import OverloadedError
from edged.core.types import Array
from edged.storage import fsync_dir, open_database, transaction, write_atomic

FILE_NAME = "learn.sqlite3"
SAMPLES_DIR = Path("learn") / "samples"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    model TEXT PRIMARY KEY,
    samples INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    file TEXT NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_model ON batches (model, id);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    batch_id INTEGER NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    row INTEGER NOT NULL,
    label INTEGER NOT NULL,
    holdout INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    job_id INTEGER
);
CREATE INDEX IF NOT EXISTS samples_by_model ON samples (model, status, id);
CREATE INDEX IF NOT EXISTS samples_by_batch ON samples (batch_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    strategy TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    parent_version INTEGER,
    new_version INTEGER,
    metrics TEXT NOT NULL DEFAULT '{}',
    verdict TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    update_id INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, id);
"""


class SampleStatus(enum.StrEnum):
    PENDING = "pending"
    LEARNED = "learned"
    REJECTED = "rejected"


class JobState(enum.StrEnum):
    """A fine-tune job's states (management.proto's JobState)."""

    RUNNING = "RUNNING"
    PUBLISHING = "PUBLISHING"
    PROMOTED = "PROMOTED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"


#: states a job rests in
JOB_AT_REST = frozenset({JobState.PROMOTED, JobState.REJECTED, JobState.FAILED})


@dataclass(frozen=True)
class Samples:
    """Pending samples of one model, as a job takes them."""

    ids: np.ndarray  # int64 (N,)
    features: Array  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    holdout: np.ndarray  # bool (N,)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class JobRecord:
    """One fine-tune job as stored."""

    id: int
    model: str
    strategy: str
    trigger: str
    state: JobState
    progress: float
    parent_version: int | None
    new_version: int | None
    metrics: Mapping[str, Any]
    verdict: str
    error: str
    update_id: int
    created_at: float
    updated_at: float
    finished_at: float | None = None


@dataclass
class _Caps:
    max_samples: int
    max_bytes: int
    holdout_every: int
    history_limit: int = 100


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        model=row["model"],
        strategy=row["strategy"],
        trigger=row["trigger"],
        state=JobState(row["state"]),
        progress=row["progress"],
        parent_version=row["parent_version"],
        new_version=row["new_version"],
        metrics=json.loads(row["metrics"]),
        verdict=row["verdict"],
        error=row["error"],
        update_id=row["update_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
    )


def _npy(array: Array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class LearnStore:
    """``<state_dir>``/learn.sqlite3 and the feature files beside it."""

    def __init__(
        self,
        state_dir: Path,
        *,
        max_samples: int = 20000,
        max_bytes: int = 64 * 1024 * 1024,
        holdout_share: float = 0.2,
        history_limit: int = 100,
        clock: Any = time.time,
    ) -> None:
        """Open (creating if need be) the store, and make files and rows agree.

        Raises:
            edged.storage.StoreError: the database cannot be opened.
        """
        self.path = state_dir / FILE_NAME
        self.samples_dir = state_dir / SAMPLES_DIR
        self._caps = _Caps(max_samples, max_bytes, max(1, round(1 / holdout_share)), history_limit)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = open_database(self.path, _SCHEMA, SCHEMA_VERSION, "learning state")
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.repaired = self._reconcile()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _reconcile(self) -> int:
        """Drop feature files no row names (a crash before the commit) and batches whose file
        is gone; returns how many of either."""
        with self._lock:
            rows = self._db.execute("SELECT id, model, file FROM batches").fetchall()
            known = {self.samples_dir / r["model"] / r["file"] for r in rows}
            fixed = 0
            for folder in (p for p in self.samples_dir.iterdir() if p.is_dir()):
                for path in folder.iterdir():
                    if path not in known:
                        path.unlink(missing_ok=True)
                        fixed += 1
            missing = [
                r["id"] for r in rows if not (self.samples_dir / r["model"] / r["file"]).is_file()
            ]
            if missing:
                with transaction(self._db) as db:
                    db.executemany("DELETE FROM batches WHERE id = ?", [(i,) for i in missing])
                fixed += len(missing)
        return fixed

    # -- samples ---------------------------------------------------------------------------

    def add(self, model: str, features: Array, labels: np.ndarray) -> SampleCounts:
        """Store one batch durably; returns the model's counts after it.

        Raises:
            OverloadedError: the caps cannot make room without dropping pending samples.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        count = int(labels.shape[0])
        data = _npy(features)
        with self._lock:
            self._make_room(model, count, len(data))
            folder = self.samples_dir / model
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns()}.npy"
            write_atomic(folder / name, lambda f: f.write(data))
            try:
                with transaction(self._db) as db:
                    row = db.execute(
                        "SELECT samples FROM counters WHERE model = ?", (model,)
                    ).fetchone()
                    seen = row[0] if row else 0
                    cursor = db.execute(
                        "INSERT INTO batches (model, file, count, bytes, added_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (model, name, count, len(data), self._clock()),
                    )
                    batch_id = cursor.lastrowid
                    every = self._caps.holdout_every
                    db.executemany(
                        "INSERT INTO samples (model, batch_id, row, label, holdout) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [
                            (
                                model,
                                batch_id,
                                i,
                                int(labels[i]),
                                int((seen + i) % every == every - 1),
                            )
                            for i in range(count)
                        ],
                    )
                    db.execute(
                        "INSERT INTO counters (model, samples) VALUES (?, ?) "
                        "ON CONFLICT (model) DO UPDATE SET samples = excluded.samples",
                        (model, seen + count),
                    )
            except BaseException:
                (folder / name).unlink(missing_ok=True)
                raise
            return self._counts(model)

    def _make_room(self, model: str, count: int, size: int) -> None:
        """Drop whole batches with no pending sample, oldest first, until ``count`` samples
        of ``size`` bytes fit under both caps (the lock is held)."""
        caps = self._caps
        if count > caps.max_samples or size > caps.max_bytes:
            raise OverloadedError(
                f"{count} samples ({size} bytes) exceed the store's caps "
                f"(learn.max_samples {caps.max_samples}, learn.max_store_bytes {caps.max_bytes})"
            )
        db = self._db
        stored = db.execute("SELECT COUNT(*) FROM samples WHERE model = ?", (model,)).fetchone()[0]
        total = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM batches").fetchone()[0]
        if stored + count <= caps.max_samples and total + size <= caps.max_bytes:
            return
        done = db.execute(
            "SELECT b.id, b.model, b.file, b.count, b.bytes FROM batches b WHERE NOT EXISTS "
            "(SELECT 1 FROM samples s WHERE s.batch_id = b.id AND s.status = 'pending') "
            "ORDER BY b.id"
        ).fetchall()
        drop = []
        for batch in done:
            if stored + count <= caps.max_samples and total + size <= caps.max_bytes:
                break
            if batch["model"] != model and total + size <= caps.max_bytes:
                continue  # only the byte cap is shared between models
            drop.append(batch)
            total -= batch["bytes"]
            if batch["model"] == model:
                stored -= batch["count"]
        if stored + count > caps.max_samples or total + size > caps.max_bytes:
            raise OverloadedError(
                f"the sample store is full (learn.max_samples {caps.max_samples} per model, "
                f"learn.max_store_bytes {caps.max_bytes}): samples waiting for a fine-tune are "
                "never dropped; run one (StartFineTune) or raise the caps"
            )
        with transaction(db):
            db.executemany("DELETE FROM batches WHERE id = ?", [(b["id"],) for b in drop])
        for batch in drop:
            (self.samples_dir / batch["model"] / batch["file"]).unlink(missing_ok=True)
        if drop:
            fsync_dir(self.samples_dir)

    def pending(self, model: str) -> Samples:
        """Every pending sample of ``model``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.id, s.row, s.label, s.holdout, b.file FROM samples s "
                "JOIN batches b ON b.id = s.batch_id "
                "WHERE s.model = ? AND s.status = 'pending' ORDER BY s.id",
                (model,),
            ).fetchall()
        cache: dict[str, Array] = {}
        features = []
        for r in rows:
            if r["file"] not in cache:
                cache[r["file"]] = np.load(self.samples_dir / model / r["file"], allow_pickle=False)
            features.append(cache[r["file"]][r["row"]])
        dim = next(iter(cache.values())).shape[1] if cache else 0
        return Samples(
            ids=np.array([r["id"] for r in rows], dtype=np.int64),
            features=np.stack(features).astype(np.float32)
            if features
            else np.zeros((0, dim), np.float32),
            labels=np.array([r["label"] for r in rows], dtype=np.int64),
            holdout=np.array([bool(r["holdout"]) for r in rows], dtype=bool),
        )

    def mark(self, ids: np.ndarray, status: SampleStatus, job_id: int) -> None:
        """Record what a job made of samples it took."""
        with self._lock, transaction(self._db) as db:
            db.executemany(
                "UPDATE samples SET status = ?, job_id = ? WHERE id = ?",
                [(status.value, job_id, int(i)) for i in ids],
            )

    def mark_job(self, job_id: int, status: SampleStatus) -> None:
        """Settle every sample tagged with ``job_id``."""
        with self._lock, transaction(self._db) as db:
            db.execute("UPDATE samples SET status = ? WHERE job_id = ?", (status.value, job_id))

    def _counts(self, model: str) -> SampleCounts:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'pending'), 0) FROM samples WHERE model = ?",
            (model,),
        ).fetchone()
        size = self._db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM batches WHERE model = ?", (model,)
        ).fetchone()[0]
        return SampleCounts(model, pending=row[1], stored=row[0], stored_bytes=size)

    def counts(self, model: str) -> SampleCounts:
        with self._lock:
            return self._counts(model)

    def counts_all(self) -> list[SampleCounts]:
        """Every model with stored samples, by name."""
        with self._lock:
            models = [
                r[0] for r in self._db.execute("SELECT DISTINCT model FROM batches ORDER BY model")
            ]
            return [self._counts(m) for m in models]

    # -- jobs ------------------------------------------------------------------------------

    def begin_job(
        self, model: str, strategy: str, trigger: str, parent_version: int | None
    ) -> JobRecord:
        """Record a new RUNNING job."""
        at = self._clock()
        with self._lock, transaction(self._db) as db:
            cursor = db.execute(
                "INSERT INTO jobs (model, strategy, trigger, state, parent_version, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (model, strategy, trigger, JobState.RUNNING.value, parent_version, at, at),
            )
            job_id = cursor.lastrowid
            db.execute(
                "DELETE FROM jobs WHERE model = ? AND id NOT IN "
                "(SELECT id FROM jobs WHERE model = ? ORDER BY id DESC LIMIT ?)",
                (model, model, self._caps.history_limit),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def update_job(self, job_id: int, **changes: Any) -> JobRecord:
        """Change a job's columns (``metrics`` as a mapping); a state at rest also sets
        ``finished_at``."""
        at = self._clock()
        values = dict(changes)
        if "metrics" in values:
            values["metrics"] = json.dumps(values["metrics"], sort_keys=True)
        if "state" in values:
            values["state"] = JobState(values["state"]).value
            if values["state"] in JOB_AT_REST:
                values["finished_at"] = at
        values["updated_at"] = at
        columns = ", ".join(f"{k} = ?" for k in values)
        with self._lock, transaction(self._db) as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id))  # noqa: S608 -- column names are ours
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def job(self, job_id: int) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, model: str = "", limit: int = 100) -> list[JobRecord]:
        """Jobs newest first, of ``model`` or of every model."""
        with self._lock:
            if model:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE model = ? ORDER BY id DESC LIMIT ?", (model, limit)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
        return [_job(r) for r in rows]

    def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs a restart interrupted (RUNNING or PUBLISHING)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY id",
                (JobState.RUNNING.value, JobState.PUBLISHING.value),
            ).fetchall()
        return [_job(r) for r in rows]
