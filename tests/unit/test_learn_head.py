"""edged.learn.head: the trainable head, its standardisation, and its npz round-trip."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from edged.learn.head import (
    Head,
    accuracy,
    init_head,
    load_head,
    read_npz,
    save_head,
    softmax,
    standardiser,
    write_npz,
)


def _head(sizes: tuple[int, ...] = (8, 6, 4), seed: int = 0) -> Head:
    rng = np.random.default_rng(seed)
    features = rng.normal(2.0, 3.0, size=(50, sizes[0])).astype(np.float32)
    mean, scale = standardiser(features)
    head = init_head(sizes, rng, mean, scale)
    for b in head.biases:
        b[:] = rng.normal(size=b.shape)
    return head


def _same(a: Head, b: Head) -> bool:
    left, right = a.to_arrays(), b.to_arrays()
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and np.array_equal(left[k], right[k]) for k in left
    )


def test_init_head_shapes_and_he_scale() -> None:
    rng = np.random.default_rng(1)
    head = init_head((64, 256, 10), rng, np.zeros(64, np.float32), np.ones(64, np.float32))
    assert [w.shape for w in head.weights] == [(64, 256), (256, 10)]
    assert [b.shape for b in head.biases] == [(256,), (10,)]
    assert (head.in_dim, head.classes, head.layers) == (64, 10, 2)
    assert all(a.dtype == np.float32 for a in head.to_arrays().values())
    assert head.weights[0].std() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert head.weights[1].std() == pytest.approx(math.sqrt(1 / 256), rel=0.1)
    assert not any(b.any() for b in head.biases)


@pytest.mark.parametrize(
    ("sizes", "mean_len", "message"),
    [
        ((64,), 64, "at least an input and an output"),
        ((64, 0, 10), 64, ">= 1"),
        ((64, 10), 32, "rows"),
    ],
)
def test_init_head_refuses_bad_sizes(sizes: tuple[int, ...], mean_len: int, message: str) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=message):
        init_head(sizes, rng, np.zeros(mean_len, np.float32), np.ones(mean_len, np.float32))


def test_forward_matches_a_plain_numpy_reference() -> None:
    head = _head()
    x = np.random.default_rng(2).normal(size=(7, 8)).astype(np.float32)
    z = (x - head.mean) / head.scale
    hidden = np.maximum(z @ head.weights[0] + head.biases[0], 0)
    logits = hidden @ head.weights[1] + head.biases[1]
    np.testing.assert_allclose(head.logits(x), logits, rtol=1e-6, atol=1e-6)
    proba = head.proba(x)
    assert proba.dtype == np.float32
    assert proba.shape == (7, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(head.predict(x), np.argmax(logits, axis=1))
    assert head.predict(x).dtype == np.int64
    # A higher temperature flattens the distribution (higher entropy), the order stays.
    hot = head.proba(x, temperature=5.0)
    entropy = lambda p: -(p * np.log(p)).sum(axis=1)  # noqa: E731
    assert np.all(entropy(hot) > entropy(proba))
    np.testing.assert_array_equal(np.argmax(hot, axis=1), np.argmax(proba, axis=1))


def test_no_nan_for_extreme_but_finite_features() -> None:
    head = _head()
    for x in (np.full((3, 8), 1e30, np.float32), np.full((3, 8), -1e30, np.float32)):
        proba = head.proba(x)
        assert np.all(np.isfinite(proba))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((3, 7)), np.zeros(8), np.zeros((2, 8), dtype=object)])
def test_logits_refuse_wrong_shapes(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="features"):
        _head().logits(bad)


def test_standardiser_uses_the_variance_floor() -> None:
    x = np.zeros((20, 3), np.float32)
    x[:, 0] = np.arange(20)  # variance 33.25
    x[:, 1] = 5.0  # constant
    x[:, 2] = np.tile([0.0, 0.02], 10)  # variance 1e-4, under the floor
    mean, scale = standardiser(x, floor=1e-2)
    np.testing.assert_allclose(mean, [9.5, 5.0, 0.01], rtol=1e-6)
    np.testing.assert_allclose(scale, [math.sqrt(33.25), 0.1, 0.1], rtol=1e-6)
    assert mean.dtype == scale.dtype == np.float32
    with pytest.raises(ValueError, match="no samples"):
        standardiser(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="floor"):
        standardiser(x, floor=0.0)


def test_accuracy() -> None:
    head = _head()
    x = np.random.default_rng(3).normal(size=(30, 8)).astype(np.float32)
    y = head.predict(x)
    assert accuracy(head, x, y) == 1.0
    assert accuracy(head, x, (y + 1) % head.classes) == 0.0
    assert math.isnan(accuracy(head, x[:0], y[:0]))
    with pytest.raises(ValueError, match="labels"):
        accuracy(head, x, y[:-1])


def test_copy_shares_no_array() -> None:
    head = _head()
    twin = head.copy()
    assert _same(head, twin)
    twin.weights[0][0, 0] += 1
    twin.mean[0] += 1
    assert not _same(head, twin)


@pytest.mark.parametrize("sizes", [(8, 4), (8, 6, 4), (8, 6, 5, 4)])
def test_arrays_and_npz_round_trip_exactly(sizes: tuple[int, ...], tmp_path: Path) -> None:
    head = _head(sizes)
    assert _same(Head.from_arrays(head.to_arrays()), head)
    assert _same(Head.from_arrays(head.to_arrays("anchor."), "anchor."), head)
    path = tmp_path / "head.npz"
    save_head(path, head)
    assert _same(load_head(path), head)
    assert head.nbytes() == sum(a.nbytes for a in head.to_arrays().values())
    # Deterministic bytes, whether written to a path or a file object, and no pickles needed.
    buffer = io.BytesIO()
    save_head(buffer, head)
    assert buffer.getvalue() == path.read_bytes()
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(head.to_arrays())


def test_write_npz_keeps_the_name_and_refuses_objects(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    write_npz(path, {"a": np.arange(3)})
    assert path.exists()
    assert not (tmp_path / "state.bin.npz").exists()
    np.testing.assert_array_equal(read_npz(path)["a"], np.arange(3))
    with pytest.raises(ValueError, match="object"):
        write_npz(tmp_path / "x.npz", {"a": np.array([{}], dtype=object)})
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="npz"):
        read_npz(tmp_path / "junk.npz")


def _broken(change: str) -> dict[str, np.ndarray]:
    arrays = {k: v.copy() for k, v in _head().to_arrays().items()}
    if change == "no mean":
        del arrays["mean"]
    elif change == "zero scale":
        arrays["scale"][2] = 0
    elif change == "short scale":
        arrays["scale"] = arrays["scale"][:-1]
    elif change == "gap":
        arrays["weight.2"] = arrays.pop("weight.1")
        arrays["bias.2"] = arrays.pop("bias.1")
    elif change == "chain":
        arrays["weight.1"] = arrays["weight.1"][:-1]
    elif change == "bias":
        arrays["bias.0"] = arrays["bias.0"][:-1]
    elif change == "int":
        arrays["weight.0"] = arrays["weight.0"].astype(np.int32)
    elif change == "nan":
        arrays["bias.1"][0] = np.nan
    elif change == "rank":
        arrays["weight.0"] = arrays["weight.0"].ravel()
    return arrays


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no mean", "mean is missing"),
        ("zero scale", "scale has entries <= 0"),
        ("short scale", "scale has shape"),
        ("gap", "layer 1 missing"),
        ("chain", "weight.1 has 5 rows, but weight.0's columns is 6"),
        ("bias", "bias.0 has length 5"),
        ("int", "weight.0 must be a floating-point array"),
        ("nan", "bias.1 has non-finite entries"),
        ("rank", "weight.0 must have 2 dimension"),
    ],
)
def test_from_arrays_names_what_is_wrong(change: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Head.from_arrays(_broken(change))


def test_softmax_is_stable() -> None:
    p = softmax(np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], np.float32))
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-7)
