"""edged.learn.strategies: each strategy's defining property, determinism, robustness, state."""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edged.core.types import LEARN_STRATEGIES
from edged.learn.head import Head, accuracy, init_head, softmax, standardiser
from edged.learn.strategies import (
    STRATEGIES,
    TUNED,
    Hyper,
    LearnState,
    ReservoirBuffer,
    StreamingLDA,
    cross_entropy,
    ewc_penalty,
    fine_tune,
    fisher_diagonal,
    initial_state,
    load_state,
    lwf_loss,
    pooled_standardiser,
    restandardise,
    save_state,
    split_validation,
    strategy_parts,
    train_head,
    tuned_hyper,
)

DIM, CLASSES = 16, 6
FAST = Hyper(epochs=8)


def _blobs(
    classes: list[int], n: int, seed: int, shift: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: class c centred at 3 * e_c (+ shift) in DIM dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=n).astype(np.int64)
    x = rng.normal(size=(n, DIM)) + 3.0 * np.eye(CLASSES, DIM)[y] + shift
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def task_a() -> tuple[Head, np.ndarray, np.ndarray]:
    x, y = _blobs([0, 1, 2], 300, seed=1)
    mean, scale = standardiser(x)
    head = init_head((DIM, 12, CLASSES), np.random.default_rng(0), mean, scale)
    return train_head(head, x, y, FAST, seed=0), x, y


def _arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


# --- Hyper ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 2.5),
        ("batch_size", 10_000),
        ("lr", 0.0),
        ("lr", math.nan),
        ("momentum", 1.0),
        ("clip_norm", -1.0),
        ("ewc_lambda", -1.0),
        ("temperature", 0.0),
        ("replay_capacity", 0),
        ("lda_shrinkage", 1.5),
        ("variance_floor", 0.0),
    ],
)
def test_hyper_refuses_out_of_bounds_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Hyper.{field}"):
        Hyper(**{field: value})


def test_hyper_defaults_are_the_documented_ones() -> None:
    hyper = Hyper()
    assert (hyper.epochs, hyper.batch_size, hyper.clip_norm, hyper.temperature) == (
        30,
        32,
        5.0,
        2.0,
    )
    assert (hyper.replay_capacity, hyper.holdout_capacity, hyper.variance_floor) == (200, 100, 1e-2)


# --- Reservoir (Algorithm R) -------------------------------------------------------------------


def test_reservoir_fills_then_stays_bounded() -> None:
    buffer = ReservoirBuffer(5, 2)
    rng = np.random.default_rng(0)
    x = np.arange(24, dtype=np.float32).reshape(12, 2)
    buffer.add(x[:3], np.arange(3), rng)
    assert len(buffer) == 3
    np.testing.assert_array_equal(buffer.labels, [0, 1, 2])
    buffer.add(x[3:], np.arange(3, 12), rng)
    assert (len(buffer), buffer.seen) == (5, 12)
    # Every kept sample is one of the stream's, with its own label.
    for feature, label in zip(buffer.features, buffer.labels, strict=True):
        np.testing.assert_array_equal(feature, x[label])
    with pytest.raises(ValueError, match="dim 2"):
        buffer.add(np.zeros((2, 3)), np.zeros(2), rng)


@pytest.mark.parametrize("chunks", [1, 4])
def test_reservoir_keeps_a_uniform_sample(chunks: int) -> None:
    """Chi-square over stream positions: after N items each is kept with probability k/N,
    whether the stream arrives at once or in pieces."""
    n, k, trials = 40, 8, 3000
    rng = np.random.default_rng(1234)
    counts = np.zeros(n)
    stream = np.arange(n, dtype=np.float32)[:, None]
    labels = np.arange(n)
    for _ in range(trials):
        buffer = ReservoirBuffer(k, 1)
        for part in np.array_split(np.arange(n), chunks):
            buffer.add(stream[part], labels[part], rng)
        counts[buffer.labels] += 1
    expected = trials * k / n
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # 39 degrees of freedom: the 0.1% critical value is 72.1 (the sum of counts is fixed,
    # which only makes the statistic smaller).
    assert chi2 < 72.1, (chi2, counts)
    # The test has power: keeping the first k items, or favouring late ones, fails it.
    biased = np.zeros(n)
    biased[:k] = trials
    assert float(np.sum((biased - expected) ** 2 / expected)) > 72.1


def test_reservoir_round_trip_and_copy() -> None:
    buffer = ReservoirBuffer(4, 3)
    buffer.add(np.ones((6, 3)), np.arange(6), np.random.default_rng(0))
    again = ReservoirBuffer.from_arrays(buffer.to_arrays("replay."), "replay.")
    assert (again.capacity, again.dim, again.seen) == (4, 3, 6)
    assert _arrays_equal(again.to_arrays(), buffer.to_arrays())
    twin = buffer.copy()
    twin.add(np.zeros((50, 3)), np.zeros(50), np.random.default_rng(1))
    assert buffer.seen == 6
    assert np.all(buffer.features == 1)
    assert buffer.nbytes() == 4 * 3 * 4 + 4 * 8
    with pytest.raises(ValueError, match="read-only"):
        buffer.features[0, 0] = 5


# --- Streaming LDA ----------------------------------------------------------------------------


def _batch_lda_stats(x: np.ndarray, y: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    means = np.zeros((classes, x.shape[1]))
    scatter = np.zeros((x.shape[1], x.shape[1]))
    for c in range(classes):
        xc = x[y == c].astype(np.float64)
        if len(xc):
            means[c] = xc.mean(axis=0)
            scatter += (xc - means[c]).T @ (xc - means[c])
    return means, scatter / len(x)


def test_streaming_lda_matches_batch_lda_statistics() -> None:
    x, y = _blobs([0, 1, 2, 3, 4], 400, seed=5)
    mean, scale = standardiser(x)
    lda = StreamingLDA(DIM, CLASSES, mean, scale)
    for part in np.array_split(np.arange(400), [1, 7, 100, 250]):  # uneven pieces, one of 1
        lda.fit(x[part], y[part])
    z = (x.astype(np.float64) - mean) / scale
    means, covariance = _batch_lda_stats(z, y, CLASSES)
    np.testing.assert_allclose(lda.means, means, atol=1e-10)
    np.testing.assert_allclose(lda.covariance, covariance, atol=1e-10)
    np.testing.assert_array_equal(lda.counts, np.bincount(y, minlength=CLASSES))


def test_streaming_lda_predicts_like_scikit_learn() -> None:
    lda_mod = pytest.importorskip("sklearn.discriminant_analysis")
    x, y = _blobs([0, 1, 2, 3, 4], 400, seed=6)
    test_x, _ = _blobs([0, 1, 2, 3, 4], 200, seed=7)
    mean, scale = standardiser(x)
    lda = StreamingLDA(DIM, CLASSES, mean, scale)
    for part in np.array_split(np.arange(400), 3):
        lda.fit(x[part], y[part])
    head = lda.to_head(shrinkage=0.0)
    assert head.layers == 1
    reference = lda_mod.LinearDiscriminantAnalysis(solver="lsqr", store_covariance=True)
    reference.fit(x.astype(np.float64), y)
    # Same covariance (back in raw units) and, class for class, the same posteriors.
    np.testing.assert_allclose(
        lda.covariance * np.outer(scale, scale), reference.covariance_, rtol=1e-6, atol=1e-8
    )
    seen = [0, 1, 2, 3, 4]
    np.testing.assert_allclose(
        head.proba(test_x)[:, seen], reference.predict_proba(test_x), atol=1e-4
    )
    np.testing.assert_array_equal(head.predict(test_x), reference.predict(test_x))
    assert np.all(head.proba(test_x)[:, 5] < 1e-30)  # a class with no samples is never chosen


def test_streaming_lda_round_trip_and_errors() -> None:
    x, y = _blobs([0, 1], 50, seed=8)
    lda = StreamingLDA(DIM, CLASSES)
    with pytest.raises(ValueError, match="no samples"):
        lda.to_head(0.1)
    lda.fit(x, y)
    again = StreamingLDA.from_arrays(lda.to_arrays("lda."), "lda.")
    assert _arrays_equal(again.to_arrays(), lda.to_arrays())
    with pytest.raises(ValueError, match="label 6 out of range"):
        lda.fit(x[:1], np.array([6]))
    with pytest.raises(ValueError, match="shrinkage"):
        lda.to_head(2.0)


# --- EWC and LwF --------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_fisher_weighted_change(
    task_a: tuple[Head, np.ndarray, np.ndarray],
) -> None:
    head, x, _ = task_a
    anchor = head.params()
    fisher = fisher_diagonal(head, x)
    value, grads = ewc_penalty(anchor, anchor, fisher, lam=10.0)
    assert value == 0.0
    assert all(not g.any() for g in grads)

    rng = np.random.default_rng(0)
    direction = [rng.normal(size=p.shape).astype(np.float32) for p in anchor]

    def moved(t: float) -> list[np.ndarray]:
        return [p + np.float32(t) * d for p, d in zip(anchor, direction, strict=True)]

    one = ewc_penalty(moved(0.01), anchor, fisher, 10.0)[0]
    two = ewc_penalty(moved(0.02), anchor, fisher, 10.0)[0]
    assert one > 0
    assert two == pytest.approx(4 * one, rel=1e-3)  # quadratic in the change
    assert ewc_penalty(moved(0.01), anchor, fisher, 20.0)[0] == pytest.approx(2 * one)
    heavier = [2 * f for f in fisher]
    assert ewc_penalty(moved(0.01), anchor, heavier, 10.0)[0] == pytest.approx(2 * one, rel=1e-5)
    # The same change on parameters with no Fisher information costs nothing.
    only_free = [np.where(f == 0, d, 0) for f, d in zip(fisher, direction, strict=True)]
    assert ewc_penalty(
        [p + o for p, o in zip(anchor, only_free, strict=True)], anchor, fisher, 10.0
    )[0] == pytest.approx(0.0, abs=1e-12)
    # Gradient: lam * F * (theta - anchor).
    _, grads = ewc_penalty(moved(0.01), anchor, fisher, 10.0)
    for g, f, d in zip(grads, fisher, direction, strict=True):
        np.testing.assert_allclose(g, 10.0 * f * 0.01 * d, rtol=1e-4, atol=1e-9)


def test_fisher_diagonal_of_a_linear_head_matches_the_closed_form() -> None:
    x, _ = _blobs([0, 1, 2], 40, seed=9)
    mean, scale = standardiser(x)
    head = init_head((DIM, CLASSES), np.random.default_rng(3), mean, scale)
    z = head.standardise(x).astype(np.float64)
    p = softmax(head.logits(x)).astype(np.float64)
    want_w = np.zeros((DIM, CLASSES))
    want_b = np.zeros(CLASSES)
    for c in range(CLASSES):
        g = -p.copy()
        g[:, c] += 1  # d log p_c / d logits
        want_w += (z * z).T @ (g * g * p[:, c : c + 1])
        want_b += (g * g * p[:, c : c + 1]).sum(axis=0)
    fisher = fisher_diagonal(head, x)
    np.testing.assert_allclose(fisher[0], want_w / 40, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fisher[1], want_b / 40, rtol=1e-4, atol=1e-7)
    assert all(np.all(f >= 0) for f in fisher)


def test_lwf_loss_is_zero_when_the_new_head_equals_the_old() -> None:
    rng = np.random.default_rng(0)
    old = rng.normal(size=(10, CLASSES)).astype(np.float32) * 3
    loss, grad = lwf_loss(old, old, temperature=2.0, alpha=1.0)
    assert loss == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)
    # A constant per row does not change a softmax: still zero.
    loss, _ = lwf_loss(old + rng.normal(size=(10, 1)).astype(np.float32), old, 2.0)
    assert loss == pytest.approx(0.0, abs=1e-5)
    # Any other change costs something, scaled by alpha.
    new = old + rng.normal(size=old.shape).astype(np.float32)
    loss1, _ = lwf_loss(new, old, 2.0, alpha=1.0)
    loss3, _ = lwf_loss(new, old, 2.0, alpha=3.0)
    assert loss1 > 0
    assert loss3 == pytest.approx(3 * loss1, rel=1e-5)


def test_lwf_gradient_matches_finite_differences_and_respects_known_classes() -> None:
    rng = np.random.default_rng(1)
    old = rng.normal(size=(4, CLASSES)).astype(np.float64)
    new = rng.normal(size=(4, CLASSES)).astype(np.float64)
    known = np.array([True, True, False, True, False, False])
    _, grad = lwf_loss(new.astype(np.float32), old.astype(np.float32), 2.0, 0.7, known)
    eps = 1e-2
    for i, j in [(0, 0), (1, 3), (3, 1)]:
        bump = np.zeros_like(new)
        bump[i, j] = eps
        up = lwf_loss((new + bump).astype(np.float32), old.astype(np.float32), 2.0, 0.7, known)[0]
        down = lwf_loss((new - bump).astype(np.float32), old.astype(np.float32), 2.0, 0.7, known)[0]
        assert grad[i, j] == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=1e-5)
    assert not grad[:, ~known].any()  # classes the old head never learnt are left alone
    # Changing only unknown classes' logits costs nothing.
    moved = new.copy()
    moved[:, ~known] += 5
    assert lwf_loss(moved.astype(np.float32), new.astype(np.float32), 2.0, 1.0, known)[0] == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_cross_entropy_gradient() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    loss, grad = cross_entropy(logits, np.array([0, 2]))
    p = softmax(logits.copy())
    assert loss == pytest.approx(-(np.log(p[0, 0]) + np.log(p[1, 2])) / 2, rel=1e-6)
    want = p.copy()
    want[0, 0] -= 1
    want[1, 2] -= 1
    np.testing.assert_allclose(grad, want / 2, rtol=1e-6)


# --- Fine-tuning ------------------------------------------------------------------------------


def _state_arrays(state: LearnState) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.to_arrays().items()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fine_tune_changes_neither_input_and_is_deterministic(
    strategy: str, task_a: tuple[Head, np.ndarray, np.ndarray]
) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, strategy, FAST, seed=1)
    head_before = {k: v.copy() for k, v in head.to_arrays().items()}
    state_before = _state_arrays(state)
    new_x, new_y = _blobs([3, 4, 5], 120, seed=2)
    fractions: list[float] = []
    candidate, after = fine_tune(
        head, state, new_x, new_y, strategy, FAST, seed=7, progress=fractions.append
    )
    assert _arrays_equal(head.to_arrays(), head_before)
    assert _arrays_equal(state.to_arrays(), state_before)
    again, after_again = fine_tune(head, state, new_x, new_y, strategy, FAST, seed=7)
    assert _arrays_equal(again.to_arrays(), candidate.to_arrays())
    assert _arrays_equal(after_again.to_arrays(), after.to_arrays())
    other, _ = fine_tune(head, state, new_x, new_y, strategy, FAST, seed=8)
    if strategy != "streaming-lda":  # LDA has no randomness in its head
        assert not _arrays_equal(other.to_arrays(), candidate.to_arrays())
        assert fractions == [(e + 1) / FAST.epochs for e in range(FAST.epochs)]
    else:
        assert fractions == [1.0]
    # The state moved on: one more task, the new classes are known, buffers saw the samples.
    assert after.tasks == state.tasks + 1 == 1
    assert after.known is not None
    assert after.known.tolist() == [True] * 6
    if after.replay is not None:
        assert after.replay.seen == state.replay.seen + 120  # type: ignore[union-attr]
    if after.fisher is not None:
        # Summed: everything but the first layer's weights (rescaled when the standardisation
        # is folded into them) only grows.
        pairs = zip(after.fisher[1:], state.fisher[1:], strict=True)  # type: ignore[index]
        assert all(np.all(n >= o) for n, o in pairs)
        assert after.anchor is not None
        assert _arrays_equal(after.anchor.to_arrays(), candidate.to_arrays())
    if after.lda is not None:
        assert after.lda.total == state.lda.total + 120  # type: ignore[union-attr]
    tuned, _ = fine_tune(head, state, new_x, new_y, strategy, tuned_hyper(strategy), 7)
    # It learnt something of the new classes (the head knew none of them).
    assert accuracy(tuned, new_x, new_y) > accuracy(head, new_x, new_y) + 0.25


def test_strategies_remember_more_than_naive(task_a: tuple[Head, np.ndarray, np.ndarray]) -> None:
    """Class-incremental toy problem: naive forgets the old classes, the others keep some."""
    head, x, y = task_a
    new_x, new_y = _blobs([3, 4, 5], 300, seed=3)
    test_x, test_y = _blobs([0, 1, 2], 300, seed=4)
    old_acc = {}
    for strategy in ("naive", "replay", "replay+lwf", "replay+ewc", "streaming-lda"):
        state = initial_state(head, x, y, strategy, FAST, seed=1)
        candidate, _ = fine_tune(head, state, new_x, new_y, strategy, FAST, seed=2)
        old_acc[strategy] = accuracy(candidate, test_x, test_y)
    assert old_acc["naive"] < 0.2
    for strategy in ("replay", "replay+lwf", "replay+ewc", "streaming-lda"):
        assert old_acc[strategy] > 0.8, old_acc


def test_ewc_keeps_the_head_closer_to_its_anchor_than_naive(
    task_a: tuple[Head, np.ndarray, np.ndarray],
) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, "ewc", FAST, seed=1)
    assert state.fisher is not None
    new_x, new_y = _blobs([0, 1, 2], 200, seed=5, shift=1.5)  # same classes, shifted domain

    def distance(candidate: Head) -> float:
        return ewc_penalty(candidate.params(), head.params(), state.fisher or [], 1.0)[0]

    fixed = dataclasses.replace(FAST, standardisation="fixed")  # parameters stay comparable
    naive, _ = fine_tune(head, state, new_x, new_y, "naive", fixed, seed=2)
    strong = dataclasses.replace(fixed, ewc_lambda=1e3)
    ewc, _ = fine_tune(head, state, new_x, new_y, "ewc", strong, seed=2)
    assert distance(ewc) < 0.5 * distance(naive)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "transform",
    [lambda x: -x, lambda x: x * 1e3 + 1e4, np.zeros_like, lambda x: x - 1e6],
    ids=["inverted", "scaled-shifted", "constant", "far-shifted"],
)
def test_no_nan_under_domain_shift(
    strategy: str,
    transform: Callable[[np.ndarray], np.ndarray],
    task_a: tuple[Head, np.ndarray, np.ndarray],
) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, strategy, FAST, seed=1)
    new_x, new_y = _blobs([0, 1, 2, 3], 64, seed=6)
    shifted = transform(new_x).astype(np.float32)
    candidate, after = fine_tune(head, state, shifted, new_y, strategy, FAST, seed=3)
    assert all(np.all(np.isfinite(a)) for a in candidate.to_arrays().values())
    assert all(np.all(np.isfinite(a)) for a in after.to_arrays().values() if a.dtype.kind == "f")
    for probe in (shifted, x):
        proba = candidate.proba(probe)
        assert np.all(np.isfinite(proba))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("strategy", "unknown strategy 'sgd'"),
        ("label", "label 6 out of range"),
        ("negative", "label -1 out of range"),
        ("dims", r"shape \(N, 16\)"),
        ("empty", "no samples"),
        ("nan", "NaN"),
        ("labels", r"labels must have shape \(10,\)"),
        ("float labels", "labels must be integers"),
    ],
)
def test_fine_tune_names_what_is_wrong(
    change: str, message: str, task_a: tuple[Head, np.ndarray, np.ndarray]
) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, "replay", FAST, seed=1)
    new_x, new_y = x[:10].copy(), y[:10].copy()
    strategy = "replay"
    if change == "strategy":
        strategy = "sgd"
    elif change == "label":
        new_y[3] = 6
    elif change == "negative":
        new_y[3] = -1
    elif change == "dims":
        new_x = new_x[:, :-1]
    elif change == "empty":
        new_x, new_y = new_x[:0], new_y[:0]
    elif change == "nan":
        new_x[2, 2] = np.nan
    elif change == "labels":
        new_y = new_y[:-1]
    elif change == "float labels":
        new_y = new_y.astype(np.float64)
    with pytest.raises(ValueError, match=message):
        fine_tune(head, state, new_x, new_y, strategy, FAST, seed=0)


@pytest.mark.parametrize(
    ("built_for", "strategy", "message"),
    [
        ("lwf", "replay", "needs a replay buffer"),
        ("replay", "ewc", "needs Fisher information"),
        ("naive", "streaming-lda", "needs LDA statistics"),
    ],
)
def test_fine_tune_refuses_a_state_without_the_part_a_strategy_needs(
    built_for: str, strategy: str, message: str, task_a: tuple[Head, np.ndarray, np.ndarray]
) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, built_for, FAST, seed=1)
    with pytest.raises(ValueError, match=message):
        fine_tune(head, state, x[:10], y[:10], strategy, FAST, seed=0)


def test_progress_can_cancel(task_a: tuple[Head, np.ndarray, np.ndarray]) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, "naive", FAST, seed=1)

    def cancel(fraction: float) -> None:
        if fraction >= 0.5:
            raise InterruptedError("job cancelled")

    with pytest.raises(InterruptedError):
        fine_tune(head, state, x, y, "naive", FAST, seed=0, progress=cancel)


# --- State ------------------------------------------------------------------------------------


def test_initial_state_parts_and_disjoint_holdout(
    task_a: tuple[Head, np.ndarray, np.ndarray],
) -> None:
    head, x, y = task_a
    tagged = x.copy()
    tagged[:, 0] = np.arange(len(x))  # make every sample identifiable
    hyper = dataclasses.replace(FAST, replay_capacity=50, holdout_capacity=20)
    state = initial_state(head, tagged, y, "replay+ewc", hyper, seed=1)
    assert state.replay is not None
    assert state.fisher is not None
    assert state.anchor is not None
    assert state.lda is None
    assert (len(state.replay), len(state.holdout), state.tasks) == (50, 20, 0)
    assert not set(state.replay.features[:, 0]) & set(state.holdout.features[:, 0])
    assert state.known is not None
    assert state.known.tolist() == [True, True, True, False, False, False]
    explicit = initial_state(head, x, y, "naive", hyper, seed=1, holdout=(x[:5], y[:5]))
    assert len(explicit.holdout) == 5
    assert explicit.replay is None
    assert explicit.fisher is None


def test_validation_share_goes_to_the_holdout(task_a: tuple[Head, np.ndarray, np.ndarray]) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, "replay", FAST, seed=1)
    new_x, new_y = _blobs([3, 4], 100, seed=7)
    train, val = split_validation(new_y, 0.2, seed=0)
    assert len(val) == 20
    assert not set(train) & set(val)
    assert set(np.unique(new_y[val])) == {3, 4}
    _, after = fine_tune(
        head, state, new_x[train], new_y[train], "replay", FAST, seed=0,
        validation=(new_x[val], new_y[val]),
    )  # fmt: skip
    assert after.holdout.seen == state.holdout.seen + 20
    assert after.replay is not None
    assert after.replay.seen == state.replay.seen + 80  # type: ignore[union-attr]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_round_trips_through_npz(
    strategy: str, task_a: tuple[Head, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, strategy, FAST, seed=1)
    _, state = fine_tune(head, state, *_blobs([3, 4], 50, seed=2), strategy, FAST, seed=3)
    path = tmp_path / "learn_state.npz"
    save_state(path, state)
    loaded = load_state(path)
    assert _arrays_equal(loaded.to_arrays(), state.to_arrays())
    assert loaded.nbytes() == state.nbytes() > 0
    buffer = io.BytesIO()
    save_state(buffer, loaded)
    assert buffer.getvalue() == path.read_bytes()  # deterministic bytes


def test_state_from_arrays_names_what_is_wrong(task_a: tuple[Head, np.ndarray, np.ndarray]) -> None:
    head, x, y = task_a
    arrays = initial_state(head, x, y, "replay+ewc", FAST, seed=1).to_arrays()
    for key, value, message in [
        ("replay.x", np.zeros((3, 5), np.float32), "replay.x must be float"),
        ("fisher.1", np.zeros(3, np.float32), "fisher.1 has shape"),
        ("tasks", np.array(-1), "tasks"),
        ("holdout.meta", None, "holdout.meta is missing"),
    ]:
        broken = dict(arrays)
        if value is None:
            del broken[key]
        else:
            broken[key] = value
        with pytest.raises(ValueError, match=message):
            LearnState.from_arrays(broken)


def test_train_head_learns_and_leaves_its_input(
    task_a: tuple[Head, np.ndarray, np.ndarray],
) -> None:
    _, x, y = task_a
    mean, scale = standardiser(x)
    fresh = init_head((DIM, 12, CLASSES), np.random.default_rng(0), mean, scale)
    before = {k: v.copy() for k, v in fresh.to_arrays().items()}
    trained = train_head(fresh, x, y, FAST, seed=0)
    assert _arrays_equal(fresh.to_arrays(), before)
    assert accuracy(trained, x, y) > 0.95


# --- Standardisation under domain shift ---------------------------------------------------------


def test_pooled_standardiser_equals_the_statistics_of_all_the_data() -> None:
    old, _ = _blobs([0, 1], 300, seed=10)
    new, _ = _blobs([2, 3], 100, seed=11, shift=5.0)
    mean, scale = standardiser(old, floor=1e-6)
    pooled_mean, pooled_scale = pooled_standardiser(mean, scale, 300, new, 1e-6)
    want_mean, want_scale = standardiser(np.concatenate([old, new]), floor=1e-6)
    np.testing.assert_allclose(pooled_mean, want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled_scale, want_scale, rtol=1e-5)


def test_restandardise_folds_the_change_into_the_first_layer(
    task_a: tuple[Head, np.ndarray, np.ndarray],
) -> None:
    head, x, _ = task_a
    mean = head.mean + 3.0
    scale = head.scale * 7.0
    folded = restandardise(head, mean, scale)
    np.testing.assert_array_equal(folded.mean, mean.astype(np.float32))
    np.testing.assert_allclose(folded.logits(x), head.logits(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(folded.weights[1], head.weights[1])


@pytest.mark.parametrize("mode", ["refit", "fold", "fixed"])
def test_standardisation_modes(mode: str, task_a: tuple[Head, np.ndarray, np.ndarray]) -> None:
    head, x, y = task_a
    state = initial_state(head, x, y, "replay+ewc", FAST, seed=1)
    new_x, new_y = _blobs([0, 1, 2], 100, seed=12, shift=20.0)  # far from the old features
    hyper = dataclasses.replace(FAST, standardisation=mode, epochs=1, lr=1e-9)  # ~no training
    candidate, after = fine_tune(head, state, new_x, new_y, "replay+ewc", hyper, seed=0)
    moved = not np.array_equal(candidate.mean, head.mean)
    assert moved == (mode != "fixed")
    assert after.samples == state.samples + 100 == 400
    if mode == "fold":  # the same function, and the anchor moved to the same coordinates
        np.testing.assert_allclose(candidate.logits(x), head.logits(x), rtol=1e-3, atol=1e-3)
        assert after.anchor is not None
        np.testing.assert_array_equal(after.anchor.mean, candidate.mean)


def test_tuned_hyper() -> None:
    for strategy in (*STRATEGIES, "training"):
        assert isinstance(tuned_hyper(strategy), Hyper)
    assert tuned_hyper("replay+lwf") == Hyper()  # the defaults are replay+lwf's choice
    assert tuned_hyper("ewc", ewc_lambda=5.0).ewc_lambda == 5.0
    with pytest.raises(ValueError, match="unknown strategy"):
        tuned_hyper("sgd")
    with pytest.raises(ValueError, match=r"Hyper\.lr"):
        tuned_hyper("naive", lr=-1.0)
    with pytest.raises(ValueError, match="standardisation"):
        Hyper(standardisation="sometimes")


def test_one_list_of_strategy_names() -> None:
    # edged.core.types.LEARN_STRATEGIES is the one list: model.toml's [learn] strategy, the
    # management API, the CLI and the worker all take these names, and each is implemented
    assert STRATEGIES is LEARN_STRATEGIES
    assert set(TUNED) == {*LEARN_STRATEGIES, "training"}
    for strategy in LEARN_STRATEGIES:
        assert isinstance(strategy_parts(strategy), frozenset)
    root = Path(__file__).resolve().parents[2]
    proto = (root / "protos" / "edged" / "v1" / "management.proto").read_text(encoding="utf-8")
    said = re.search(r"// One of (.*?); empty: the model's", proto)
    assert said is not None
    assert tuple(said.group(1).split(", ")) == LEARN_STRATEGIES
    docs = (root / "docs" / "learning.md").read_text(encoding="utf-8")
    rows = tuple(re.findall(r"^\| `([a-z+-]+)` \| ", docs, flags=re.MULTILINE))
    assert rows == LEARN_STRATEGIES
