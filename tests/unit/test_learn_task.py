"""edged.learn.task: the task and metrics the daemon and a fine-tune worker exchange survive
their JSON form unchanged, and a malformed one is refused naming the field."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.learn.task import InputSpec, JobMetrics, Task, VersionFiles

_text = st.text(max_size=20)
_int = st.integers(min_value=-(2**53), max_value=2**53)
_fraction = st.none() | st.floats(min_value=0.0, max_value=1.0)
_size = st.integers(min_value=0, max_value=2**40)

tasks = st.builds(
    Task,
    job_id=_int,
    strategy=_text,
    epochs=_int,
    seed=_int,
    parent_version=_int,
    head=_text,
    state=_text,
    backbone=_text,
    features=_text,
    inputs=st.lists(
        st.builds(
            InputSpec,
            name=_text,
            datatype=st.sampled_from(["FP16", "FP32", "FP64", "INT8"]),
            shape=st.lists(st.integers(min_value=-1, max_value=4096), max_size=5).map(tuple),
        ),
        max_size=4,
    ).map(tuple),
    files=st.builds(VersionFiles, model=_text, backbone=_text, head=_text, state=_text),
)

metrics = st.builds(
    JobMetrics,
    old_accuracy_before=_fraction,
    old_accuracy_after=_fraction,
    new_accuracy_before=_fraction,
    new_accuracy_after=_fraction,
    old_holdout=_size,
    new_holdout=_size,
    trained_samples=_size,
    train_seconds=st.floats(min_value=0.0, max_value=1e6),
    state_bytes=st.none() | _size,
    worker_max_rss_bytes=st.none() | _size,
)


@given(tasks)
def test_a_task_survives_its_json_form(task: Task) -> None:
    assert Task.from_json(task.to_json()) == task


@given(metrics)
def test_metrics_survive_their_json_form(m: JobMetrics) -> None:
    assert JobMetrics.from_json(m.to_json()) == m


def test_task_and_metrics_go_through_the_job_folder(tmp_path: Path) -> None:
    task = Task(
        job_id=7,
        strategy="replay",
        epochs=3,
        seed=49,
        parent_version=2,
        head="/m/2/head.npz",
        state="/m/2/learn_state.npz",
        backbone="/m/2/backbone.onnx",
        features="features",
        inputs=(InputSpec("x", "FP32", (-1, 16)),),
        files=VersionFiles("model.onnx", "backbone.onnx", "head.npz", "learn_state.npz"),
    )
    task.write(tmp_path)
    assert Task.read(tmp_path) == task
    m = JobMetrics(0.9, 0.89, 0.1, 0.8, 100, 20, 80, 0.5, state_bytes=1024)
    m.write(tmp_path)
    assert JobMetrics.read(tmp_path) == m


def test_the_cost_fields_are_left_out_until_known() -> None:
    m = JobMetrics(None, None, 0.5, 0.6, 0, 10, 40, 1.25)
    assert set(m.to_dict()) == {
        "old_accuracy_before",
        "old_accuracy_after",
        "new_accuracy_before",
        "new_accuracy_after",
        "old_holdout",
        "new_holdout",
        "trained_samples",
        "train_seconds",
    }
    known = replace(m, state_bytes=5, worker_max_rss_bytes=6).to_dict()
    assert (known["state_bytes"], known["worker_max_rss_bytes"]) == (5, 6)


def _metrics_json(**changes: object) -> str:
    data = JobMetrics(0.9, 0.9, 0.1, 0.8, 10, 10, 40, 1.0).to_dict()
    return json.dumps({**data, **changes})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[]", "must be a JSON object"),
        (_metrics_json(trained_samples="40"), "'trained_samples' must be an integer"),
        (_metrics_json(new_holdout=True), "'new_holdout' must be an integer"),
        (_metrics_json(new_accuracy_after="0.8"), "'new_accuracy_after' must be a number"),
        (json.dumps({"train_seconds": 1.0}), "'old_holdout' is missing"),
    ],
)
def test_malformed_metrics_are_refused_naming_the_field(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        JobMetrics.from_json(text)


def test_a_malformed_task_is_refused_naming_the_field() -> None:
    good = json.loads(
        Task(1, "s", 1, 1, 1, "h", "st", "b", "f", (), VersionFiles("m", "b", "h", "s")).to_json()
    )
    with pytest.raises(ValueError, match="'epochs' must be an integer"):
        Task.from_json(json.dumps({**good, "epochs": 1.5}))
    with pytest.raises(ValueError, match="'files' must be an object"):
        Task.from_json(json.dumps({**good, "files": []}))
    with pytest.raises(ValueError, match="'shape' must be a list of integers"):
        Task.from_json(
            json.dumps({**good, "inputs": [{"name": "x", "datatype": "FP32", "shape": ["4"]}]})
        )
