"""tests/shared_cache.py, raced by real processes: the shared .deb cache of concurrent test
sessions. Several suites on one machine used to rebuild (and delete) each other's packages
under a running test. No timing: a build waits until the kernel shows the other process
blocked on the cache's lock (/proc/locks), so the race is forced, not hoped for."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from tests import shared_cache

#: each case starts fresh interpreters: slow on a starved box, so more than the default 120 s
pytestmark = pytest.mark.timeout(300)

FAMILY = "bookworm-amd64"
CTX = multiprocessing.get_context("spawn")


def _blocked_on(lock: Path, pid: int) -> bool:
    """Whether process ``pid`` waits for an flock on ``lock`` (a "->" line in /proc/locks)."""
    inode = os.stat(lock).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if (
            len(fields) > 6
            and fields[1:3] == ["->", "FLOCK"]
            and int(fields[5]) == pid
            and int(fields[6].rsplit(":", 1)[1]) == inode
        ):
            return True
    return False


def _whole(folder: Path) -> bool:
    return (folder / "second").is_file()


def _build(
    cache: Path, waiter: Queue[int] | None, building: Event | None
) -> Callable[[Path], None]:
    """A build that writes one file, (optionally) waits until the process it is told of is
    blocked on the family's lock, then writes the second; each build is logged."""

    def build(staging: Path) -> None:
        with (cache.parent / "builds.log").open("a") as log:
            log.write(f"{os.getpid()}\n")
        (staging / "first").write_text("1")
        if building is not None and waiter is not None:
            building.set()
            pid = waiter.get(timeout=60)
            deadline = time.monotonic() + 60
            while not _blocked_on(cache / f".{FAMILY}.lock", pid):
                assert time.monotonic() < deadline, f"{pid} never waited for the build"
                time.sleep(0.01)
        (staging / "second").write_text("2")

    return build


def _take(
    cache: Path,
    key: str,
    results: Queue[tuple[str, bool, dict[str, str]]],
    *,
    waiter: Queue[int] | None = None,
    building: Event | None = None,
    hold: Event | None = None,
) -> None:
    """Ask the cache for ``key``; report the entry, whether this process built it, and what
    it read in it; then keep it (the process runs on) until ``hold`` is set."""
    folder, built = shared_cache.entry(
        cache, FAMILY, key, _build(cache, waiter, building), complete=_whole
    )
    seen = {f.name: f.read_text() for f in sorted(folder.iterdir())}
    results.put((str(folder), built, seen))
    if hold is not None:
        hold.wait(120)


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "debs"


def test_a_second_session_waits_for_the_build_and_reads_it_whole(cache: Path) -> None:
    results: Queue[tuple[str, bool, dict[str, str]]] = CTX.Queue()
    waiter: Queue[int] = CTX.Queue()
    building = CTX.Event()
    first = CTX.Process(
        target=_take, args=(cache, "k1", results), kwargs={"waiter": waiter, "building": building}
    )
    first.start()
    assert building.wait(60), "the first build did not start"
    second = CTX.Process(target=_take, args=(cache, "k1", results))
    second.start()
    waiter.put(second.pid)  # the first build finishes only once the second waits for it
    answers = [results.get(timeout=90) for _ in range(2)]
    first.join(30)
    second.join(30)
    assert first.exitcode == 0
    assert second.exitcode == 0
    assert sorted(built for _, built, _ in answers) == [False, True]
    assert {folder for folder, _, _ in answers} == {str(cache / f"{FAMILY}-k1")}
    assert all(seen == {"first": "1", "second": "2"} for _, _, seen in answers), answers
    assert len((cache.parent / "builds.log").read_text().split()) == 1


def test_an_entry_in_use_outlives_a_newer_build_and_goes_once_unused(cache: Path) -> None:
    results: Queue[tuple[str, bool, dict[str, str]]] = CTX.Queue()
    hold = CTX.Event()
    user = CTX.Process(target=_take, args=(cache, "old", results), kwargs={"hold": hold})
    user.start()
    try:
        assert results.get(timeout=60)[1]
        # another worktree's session: other inputs, so another key of the same family
        newer = CTX.Process(target=_take, args=(cache, "new", results))
        newer.start()
        newer.join(60)
        assert newer.exitcode == 0
        assert results.get(timeout=5)[1]
        assert _entries(cache) == {f"{FAMILY}-old", f"{FAMILY}-new"}
        assert {f.name for f in (cache / f"{FAMILY}-old").iterdir()} == {"first", "second"}
    finally:
        hold.set()
        user.join(60)
    assert user.exitcode == 0
    # both sessions are over: the next build leaves only its own entry
    last = CTX.Process(target=_take, args=(cache, "last", results))
    last.start()
    last.join(60)
    assert last.exitcode == 0
    assert _entries(cache) == {f"{FAMILY}-last"}
    assert sorted(cache.glob("*.use")) == [cache / f"{FAMILY}-last.use"]


def test_a_failed_or_killed_build_leaves_no_entry_and_the_next_one_builds(cache: Path) -> None:
    def failing(staging: Path) -> None:
        (staging / "first").write_text("1")
        raise RuntimeError("build-deb.sh failed")

    with pytest.raises(RuntimeError, match=r"build-deb\.sh failed"):
        shared_cache.entry(cache, FAMILY, "k", failing)
    assert list(cache.iterdir()) == [cache / f".{FAMILY}.lock"]
    # what a SIGKILLed build leaves: its staging folder, half written
    (cache / f".staging-{FAMILY}-killed").mkdir()
    (cache / f".staging-{FAMILY}-killed" / "first").write_text("1")
    results: Queue[tuple[str, bool, dict[str, str]]] = CTX.Queue()
    proc = CTX.Process(target=_take, args=(cache, "k", results))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    _, built, seen = results.get(timeout=5)
    assert built
    assert seen == {"first": "1", "second": "2"}
    assert not list(cache.glob(".staging-*"))


def test_an_incomplete_entry_is_built_again(cache: Path) -> None:
    """What the old cache could leave (a move across filesystems, interrupted)."""
    (cache / f"{FAMILY}-k").mkdir(parents=True)
    (cache / f"{FAMILY}-k" / "first").write_text("1")
    results: Queue[tuple[str, bool, dict[str, str]]] = CTX.Queue()
    proc = CTX.Process(target=_take, args=(cache, "k", results))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert results.get(timeout=5)[1:] == (True, {"first": "1", "second": "2"})
