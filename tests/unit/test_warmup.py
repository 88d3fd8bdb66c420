"""Warm-up samples from model.toml's [[warmup]] and the warmup/ folder, checked against a
signature (edged.serving.model.warmup_samples): shapes, batching, data, and errors that name
the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.core.errors import ModelLoadError
from edged.core.types import DataType, Signature, TensorSpec
from edged.serving.model import Sample, warmup_samples
from edged.serving.repository import parse_model_toml

BATCHED = Signature(
    inputs=(
        TensorSpec("image", DataType.FP32, (-1, 3, -1, -1)),
        TensorSpec("ids", DataType.INT64, (-1, 4)),
    ),
    outputs=(TensorSpec("y", DataType.FP32, (-1, 2)),),
    max_batch_size=8,
)
UNBATCHED = Signature(
    inputs=(TensorSpec("text", DataType.BYTES, (2,)), TensorSpec("sr", DataType.INT64, ())),
    outputs=(TensorSpec("y", DataType.FP32, (1,)),),
    max_batch_size=0,
)


def _samples(
    tmp_path: Path, signature: Signature, *tables: dict[str, Any]
) -> list[tuple[Sample, int]]:
    spec = parse_model_toml(tmp_path, {"warmup": list(tables)})
    return warmup_samples(spec, signature)


def test_batched_table(tmp_path: Path) -> None:
    ((sample, count),) = _samples(
        tmp_path,
        BATCHED,
        {
            "name": "w",
            "batch_size": 3,
            "count": 2,
            "inputs": {
                "image": {"dims": [3, 32, 48], "random_data": True},
                "ids": {"dims": [4], "zero_data": True},
            },
        },
    )
    assert count == 2
    assert sample.source == "[[warmup]] 'w'"
    image, ids = sample.inputs["image"], sample.inputs["ids"]
    assert (image.shape, image.dtype) == ((3, 3, 32, 48), np.float32)
    assert (ids.shape, ids.dtype) == ((3, 4), np.int64)
    assert not ids.any()
    assert np.array_equal(image[0], image[2])  # one sample, batch_size times
    again = _samples(
        tmp_path,
        BATCHED,
        {
            "name": "w",
            "inputs": {
                "image": {"dims": [3, 32, 48], "random_data": True},
                "ids": {"dims": [4], "zero_data": True},
            },
        },
    )
    assert np.array_equal(again[0][0].inputs["image"][0], image[0])  # seeded


def test_unbatched_table_with_a_file_and_bytes(tmp_path: Path) -> None:
    np.save(tmp_path / "sr.npy", np.array(16000, np.int64))
    ((sample, _),) = _samples(
        tmp_path,
        UNBATCHED,
        {
            "name": "w",
            "inputs": {
                "text": {"dims": [2], "zero_data": True},
                "sr": {"input_data_file": "sr.npy"},
            },
        },
    )
    assert sample.inputs["sr"].shape == ()
    assert int(sample.inputs["sr"]) == 16000
    assert sample.inputs["text"].tolist() == [b"", b""]


def test_folder_samples_come_first(tmp_path: Path) -> None:
    folder = tmp_path / "warmup"
    folder.mkdir()
    np.savez(folder / "b.npz", text=np.array([b"x", b"y"]), sr=np.array(8000, np.int64))
    np.savez(folder / "a.npz", text=np.array([b"a", b"b"]), sr=np.array(16000, np.int64))
    table = {
        "name": "t",
        "inputs": {"text": {"dims": [2], "zero_data": True}, "sr": {"dims": [], "zero_data": True}},
    }
    samples = _samples(tmp_path, UNBATCHED, table)
    assert [s.source for s, _ in samples] == ["warmup/a.npz", "warmup/b.npz", "[[warmup]] 't'"]
    assert samples[0][0].inputs["text"].tolist() == [b"a", b"b"]  # 'S' back to bytes objects


def _table(**inputs: Any) -> dict[str, Any]:
    return {"name": "w", "inputs": inputs}


IMAGE = {"dims": [3, 8, 8], "zero_data": True}
IDS = {"dims": [4], "zero_data": True}

REFUSED = [
    pytest.param(
        BATCHED,
        {**_table(image=IMAGE, ids=IDS), "batch_size": 9},
        "'warmup[0].batch_size' 9 is above max_batch_size 8",
        id="batch-size-above-max",
    ),
    pytest.param(
        UNBATCHED,
        {**_table(text={"dims": [2], "zero_data": True}), "batch_size": 2},
        "'warmup[0].batch_size' is 2 but the model does not batch",
        id="batch-size-unbatched",
    ),
    pytest.param(
        BATCHED, _table(image=IMAGE), "'warmup[0].inputs' lacks the input 'ids'", id="missing"
    ),
    pytest.param(
        BATCHED,
        _table(image=IMAGE, ids=IDS, mask=IDS),
        "'warmup[0].inputs.mask': the model has no input 'mask'",
        id="unknown",
    ),
    pytest.param(
        BATCHED,
        _table(image={"dims": [1, 8, 8], "zero_data": True}, ids=IDS),
        "'warmup[0].inputs.image.dims' [1, 8, 8] do not fit input 'image' [3, -1, -1]",
        id="static-dim",
    ),
    pytest.param(
        BATCHED,
        _table(image={"dims": [3, 8], "zero_data": True}, ids=IDS),
        "'warmup[0].inputs.image.dims'",
        id="rank",
    ),
    pytest.param(
        BATCHED,
        _table(image=IMAGE, ids={"input_data_file": "ids.npy"}),
        "'warmup[0].inputs.ids.input_data_file' holds int32, the input is INT64",
        id="file-dtype",
    ),
    pytest.param(
        BATCHED,
        _table(image=IMAGE, ids={"input_data_file": "ids64.npy", "dims": [5]}),
        "'warmup[0].inputs.ids.dims' is [5] but 'warmup[0].inputs.ids.input_data_file' holds",
        id="file-dims",
    ),
    pytest.param(
        BATCHED,
        _table(image=IMAGE, ids={"input_data_file": "absent.npy"}),
        "'warmup[0].inputs.ids.input_data_file'",
        id="file-missing",
    ),
]


@pytest.mark.parametrize(("signature", "table", "named"), REFUSED)
def test_refused_naming_the_key(
    tmp_path: Path, signature: Signature, table: dict[str, Any], named: str
) -> None:
    np.save(tmp_path / "ids.npy", np.zeros(4, np.int32))
    np.save(tmp_path / "ids64.npy", np.zeros(4, np.int64))
    with pytest.raises(ModelLoadError) as err:
        _samples(tmp_path, signature, table)
    assert named in str(err.value)
    assert str(tmp_path / "model.toml") in str(err.value)


def test_folder_sample_refused(tmp_path: Path) -> None:
    folder = tmp_path / "warmup"
    folder.mkdir()
    np.savez(folder / "a.npz", text=np.array([b"x", b"y"]))
    with pytest.raises(ModelLoadError, match=r"a\.npz: holds \['text'\]"):
        _samples(tmp_path, UNBATCHED)
    sr = np.array(1, np.int64)
    np.savez(folder / "a.npz", text=np.array([object(), object()]), sr=sr)  # pickled
    with pytest.raises(ModelLoadError, match=r"not a readable \.npz without pickles"):
        _samples(tmp_path, UNBATCHED)
    with (folder / "a.npz").open("wb") as f:
        np.save(f, np.zeros(2))
    with pytest.raises(ModelLoadError, match=r"a single \.npy array"):
        _samples(tmp_path, UNBATCHED)
