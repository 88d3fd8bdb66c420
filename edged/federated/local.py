"""What a device does with a round's global head, in NumPy (no I/O, no Flower): train it on
the device's stored features with the model's continual-learning strategy
(``edged.learn.strategies.fine_tune``, one home), and absorb a merged head into the learning
state when it is promoted. The Flower client (``edged.federated.client``) and
``benchmarks/federated.py`` both call these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edged.learn.head import Head
from edged.learn.strategies import LearnState, StreamingLDA, fine_tune, tuned_hyper

#: the strategy a federated fit uses for a model whose own is streaming-lda (an LDA head is
#: refit from statistics, not trained from the global weights)
LDA_FALLBACK = "replay"


@dataclass(frozen=True)
class RoundConfig:
    """A round as the server configures it: local epochs and FedProx's mu (0: none)."""

    epochs: int
    proximal_mu: float = 0.0


def local_fit(
    global_head: Head,
    state: LearnState,
    features: np.ndarray,
    labels: np.ndarray,
    strategy: str,
    config: RoundConfig,
    seed: int,
) -> Head:
    """One client's update: ``global_head`` trained on ``features``/``labels`` with
    ``strategy`` (its tuned hyperparameters, ``config.epochs`` passes, the standardisation
    kept fixed so that every client trains in the global head's coordinates) and FedProx's
    proximal term when ``config.proximal_mu`` > 0.

    Raises:
        ValueError: see ``fine_tune`` (empty input, shapes, labels out of range).
    """
    if strategy == "streaming-lda":
        strategy = LDA_FALLBACK
    hyper = tuned_hyper(strategy, epochs=config.epochs, standardisation="fixed")
    proximal = (config.proximal_mu, global_head) if config.proximal_mu > 0 else None
    candidate, _ = fine_tune(
        global_head, state, features, labels, strategy, hyper, seed, proximal=proximal
    )
    return candidate


# -- streaming LDA: statistics, which add exactly ---------------------------------------------


def lda_statistics(lda: StreamingLDA, features: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """A device's update for a streaming-lda model: the per-sample averages of its samples'
    additive statistics in ``lda``'s standardisation (float64): class shares ``(C,)``, class
    sums ``(C, D)`` and the second moment ``(D, D)``. Flower's FedAvg weighs each device's
    averages by its sample count, so the aggregate times the round's total sample count is
    exactly the sum over all devices (:func:`lda_from_statistics`). No sample leaves: these are
    sums over all of them.

    Raises:
        ValueError: empty input, or features or labels that do not match ``lda``.
    """
    z = (np.asarray(features, np.float64) - lda.mean) / lda.scale
    y = np.asarray(labels, np.int64)
    if z.ndim != 2 or z.shape[1] != lda.dim or y.shape != (z.shape[0],) or not len(y):
        raise ValueError(f"LDA of dim {lda.dim} given features {z.shape}, labels {y.shape}")
    if y.min() < 0 or y.max() >= lda.classes:
        raise ValueError(f"labels must be in 0..{lda.classes - 1}")
    n = float(len(y))
    sums = np.zeros((lda.classes, lda.dim), np.float64)
    np.add.at(sums, y, z)
    counts = np.bincount(y, minlength=lda.classes).astype(np.float64)
    return [counts / n, sums / n, (z.T @ z) / n]


def is_lda_statistics(arrays: list[np.ndarray], lda: StreamingLDA) -> bool:
    """Whether ``arrays`` are :func:`lda_statistics`' (or their aggregate) for ``lda``."""
    shapes = [tuple(np.shape(a)) for a in arrays]
    return shapes == [(lda.classes,), (lda.classes, lda.dim), (lda.dim, lda.dim)]


def lda_merge(base: StreamingLDA, averages: list[np.ndarray], total: int) -> StreamingLDA:
    """``base`` (the device's own statistics: what its model learned before) merged with the
    federation's: ``averages`` (FedAvg of :func:`lda_statistics`) times ``total`` samples.
    The result equals the statistics of one fit on all the data, up to rounding."""
    counts = np.rint(np.asarray(averages[0], np.float64) * total).astype(np.int64)
    sums = np.asarray(averages[1], np.float64) * total
    second = np.asarray(averages[2], np.float64) * total
    means = sums / np.maximum(counts, 1)[:, None]
    scatter = second - sums.T @ means  # sum_c sum_i z z^T - n_c mu_c mu_c^T
    merged = base.copy()
    n_a = merged.counts.astype(np.float64)
    n_b = counts.astype(np.float64)
    n = np.maximum(n_a + n_b, 1)
    delta = means - merged.means
    weight = n_a * n_b / n
    merged.scatter = merged.scatter + scatter + (delta * weight[:, None]).T @ delta
    merged.means = merged.means + delta * (n_b / n)[:, None]
    merged.counts = merged.counts + counts
    return merged
