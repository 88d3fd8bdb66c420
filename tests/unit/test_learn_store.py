"""edged.learn.store: durable samples, held-out assignment, caps and eviction, jobs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import OverloadedError
from edged.learn.store import SAMPLES_DIR, JobState, LearnStore, SampleStatus
from edged.storage import StoreError


def _features(n: int, dim: int = 8, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * dim, dtype=np.float32).reshape(n, dim) + start).astype(np.float32)


def test_samples_survive_reopen_in_order(tmp_path: Path) -> None:
    store = LearnStore(tmp_path)
    store.add("m", _features(3), np.array([0, 1, 2]))
    store.add("m", _features(2, start=100), np.array([3, 4]))
    store.close()
    again = LearnStore(tmp_path)
    pending = again.pending("m")
    assert pending.labels.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(pending.features[:3], _features(3))
    np.testing.assert_array_equal(pending.features[3:], _features(2, start=100))
    assert again.counts("m").stored == 5
    assert again.counts("m").stored_bytes > 5 * 8 * 4


def test_every_fifth_sample_is_held_out_across_batches(tmp_path: Path) -> None:
    store = LearnStore(tmp_path, holdout_share=0.2)
    for _ in range(4):
        store.add("m", _features(3), np.zeros(3, np.int64))
    held = store.pending("m").holdout
    assert held.tolist() == [(i % 5) == 4 for i in range(12)]


def test_models_are_kept_apart(tmp_path: Path) -> None:
    store = LearnStore(tmp_path)
    store.add("a", _features(2), np.array([1, 1]))
    store.add("b", _features(3), np.array([2, 2, 2]))
    assert len(store.pending("a")) == 2
    assert store.pending("b").labels.tolist() == [2, 2, 2]
    assert [c.model for c in store.counts_all()] == ["a", "b"]
    assert len(store.pending("nobody")) == 0


def test_learned_batches_make_room_pending_ones_never_do(tmp_path: Path) -> None:
    store = LearnStore(tmp_path, max_samples=10)
    store.add("m", _features(6), np.zeros(6, np.int64))
    with pytest.raises(OverloadedError, match=r"learn\.max_samples"):
        store.add("m", _features(6), np.zeros(6, np.int64))
    assert store.counts("m").stored == 6  # the refused batch stored nothing
    first = store.pending("m")
    store.mark(first.ids, SampleStatus.LEARNED, job_id=1)
    counts = store.add("m", _features(6, start=7), np.ones(6, np.int64))
    assert counts.stored == 6  # the learned batch went
    assert counts.pending == 6
    assert store.pending("m").labels.tolist() == [1] * 6
    files = list((tmp_path / SAMPLES_DIR / "m").iterdir())
    assert len(files) == 1


def test_byte_cap_is_shared_between_models(tmp_path: Path) -> None:
    one_batch = len(_npy_bytes(_features(4)))
    store = LearnStore(tmp_path, max_bytes=one_batch * 2)
    store.add("a", _features(4), np.zeros(4, np.int64))
    store.add("b", _features(4), np.zeros(4, np.int64))
    with pytest.raises(OverloadedError, match=r"learn\.max_store_bytes"):
        store.add("a", _features(4), np.zeros(4, np.int64))
    store.mark(store.pending("b").ids, SampleStatus.REJECTED, job_id=3)
    store.add("a", _features(4), np.zeros(4, np.int64))
    assert store.counts("b").stored == 0
    assert store.counts("a").stored == 8


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_open_removes_orphan_files_and_rows_without_files(tmp_path: Path) -> None:
    store = LearnStore(tmp_path)
    store.add("m", _features(2), np.array([0, 1]))
    store.add("m", _features(2), np.array([2, 3]))
    store.close()
    folder = tmp_path / SAMPLES_DIR / "m"
    first, second = sorted(folder.iterdir())
    second.unlink()  # its rows lose their file
    (folder / "999.npy").write_bytes(b"half a write")  # a crash before the rows committed
    again = LearnStore(tmp_path)
    assert again.repaired == 2
    assert again.pending("m").labels.tolist() == [0, 1]
    assert sorted(folder.iterdir()) == [first]


def test_jobs_and_marking(tmp_path: Path) -> None:
    store = LearnStore(tmp_path, history_limit=2)
    store.add("m", _features(4), np.arange(4))
    job = store.begin_job("m", "replay+lwf", "requested", parent_version=1)
    assert job.state is JobState.RUNNING
    assert store.unfinished_jobs() == [job]
    ids = store.pending("m").ids
    store.mark(ids, SampleStatus.PENDING, job.id)  # tagged while publishing
    store.mark_job(job.id, SampleStatus.LEARNED)
    done = store.update_job(
        job.id, state=JobState.PROMOTED, metrics={"new_accuracy_after": 0.9}, new_version=2
    )
    assert done.finished_at is not None
    assert done.metrics == {"new_accuracy_after": 0.9}
    assert store.counts("m").pending == 0
    assert store.unfinished_jobs() == []
    for _ in range(3):
        store.begin_job("m", "naive", "trigger", parent_version=2)
    assert len(store.jobs("m")) == 2  # history_limit
    assert store.job(job.id) is None


def test_unusable_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "learn.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="learning state"):
        LearnStore(tmp_path)
