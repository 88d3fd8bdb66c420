"""A folder of build results shared by test sessions that may run at the same time (several
worktrees' suites on one machine, all using /var/cache/edged-test by default).

An entry is a folder ``<cache>/<family>-<key>`` (a family is, say, ``bookworm-amd64``; a key the
digest of what the entry is built from). :func:`entry` gives a complete one, building it if
need be, under three rules:

- **One builder per family at a time, and no reader of a half entry**: the check, the build and
  the publication happen under an exclusive ``flock`` on ``<cache>/.<family>.lock``; the build
  writes into a staging folder in the cache and is renamed into place (atomic, same
  filesystem), so an entry that exists is whole. A build that fails or is interrupted leaves
  only its staging folder, which the next holder of the lock removes.
- **An entry in use is never removed**: each process that was handed an entry keeps a shared
  ``flock`` on ``<cache>/<family>-<key>.use`` until it exits. A newer key of the same family
  prunes the older entries, but only those whose ``.use`` lock it can take exclusively (no
  process holds them): a suite from another worktree, whose inputs differ, keeps its packages
  until it ends.
- **A rebuild of an entry in use waits for its users** (``rebuild=True``, which a developer
  asks for by hand) rather than pulling it from under them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

#: the ``.use`` lock of every entry this process was handed, held (shared) until it exits
_held: dict[Path, IO[str]] = {}


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _use_lock(folder: Path) -> Path:
    return folder.with_name(folder.name + ".use")


def _prune_unused(cache: Path, family: str, keep: Path) -> None:
    """Remove the family's entries other than ``keep`` that no process holds (caller holds
    the family lock), and the staging folders of builds that did not finish."""
    for stale in cache.glob(f".staging-{family}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in cache.glob(f"{family}-*"):
        if old == keep or not old.is_dir():
            continue
        use = _use_lock(old)
        with open(use, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running session was handed it
            shutil.rmtree(old, ignore_errors=True)
            use.unlink(missing_ok=True)


def entry(
    cache: Path,
    family: str,
    key: str,
    build: Callable[[Path], None],
    *,
    complete: Callable[[Path], bool] = lambda folder: True,
    rebuild: bool = False,
) -> tuple[Path, bool]:
    """The entry ``cache/family-key`` and whether this call built it: an existing whole entry
    (``complete(folder)`` true) is reused; otherwise ``build(staging)`` fills a fresh staging
    folder, which is then renamed to the entry. The entry stays (for every process) at least
    as long as this process runs; older entries of the family that no one uses are removed."""
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / f"{family}-{key}"
    use = _use_lock(folder)
    with _exclusive(cache / f".{family}.lock"):
        built = False
        if rebuild or not (folder.is_dir() and complete(folder)):
            if folder.exists():
                mine = _held.pop(use, None)
                if mine is not None:
                    mine.close()
                # the users of an entry about to be replaced: wait until they are done
                with open(use, "a") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                    shutil.rmtree(folder)
            staging = Path(tempfile.mkdtemp(prefix=f".staging-{family}-", dir=cache))
            try:
                build(staging)
                os.rename(staging, folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            built = True
        if use not in _held:
            f = open(use, "a")  # noqa: SIM115 -- held open until this process exits
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            _held[use] = f
        _prune_unused(cache, family, keep=folder)
    return folder, built
