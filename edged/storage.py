"""State that must survive a crash, the one home of both sequences for edged:

* files: write a temp file in the same folder, fsync it, rename it into place, fsync the folder;
* SQLite databases in WAL mode with ``synchronous=FULL`` (a committed transaction is on disk
  when it returns), with a schema version checked on open.

Blocking: call from worker threads, never on the event loop.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class StoreError(Exception):
    """A state database cannot be opened or written, or a write lost a race."""


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Replace ``path`` with what ``write(file)`` writes, atomically and durably; on any
    failure the old file stays and the temp file is removed."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def open_database(path: Path, schema: str, schema_version: int, what: str) -> sqlite3.Connection:
    """Open (creating it and its folder if need be) the SQLite database at ``path``: WAL,
    ``synchronous=FULL``, foreign keys on, ``schema`` (idempotent DDL) applied. Rows come back
    as ``sqlite3.Row``; the connection may be used from any thread (callers hold a lock).

    Raises:
        StoreError: the folder cannot be created, the file is not a usable database, or its
            schema is newer than ``schema_version``; ``what`` names it in the message.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"cannot open the {what} database {path}: {e}") from e
    db.row_factory = sqlite3.Row
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, schema_version):
            raise StoreError(
                f"{path}: schema version {version} is newer than this edged understands "
                f"({schema_version})"
            )
        db.executescript(f"BEGIN IMMEDIATE; {schema} PRAGMA user_version={schema_version}; COMMIT;")
    except sqlite3.Error as e:
        db.close()
        raise StoreError(f"{path} is not a usable {what} database: {e}") from e
    except StoreError:
        db.close()
        raise
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); committed means fsynced."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
