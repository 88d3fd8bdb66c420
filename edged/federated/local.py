"""What a device does with a round's global head, in NumPy (no I/O, no Flower): train it on
the device's stored features with the model's continual-learning strategy
(``edged.learn.strategies.fine_tune``, one home), and absorb a merged head into the learning
state when it is promoted. The Flower client (``edged.federated.client``) and
``benchmarks/federated.py`` both call these."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edged.learn.head import Head
from edged.learn.strategies import LearnState, absorb, fine_tune, tuned_hyper

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


def adopt(
    merged: Head,
    state: LearnState,
    features: np.ndarray,
    labels: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    seed: int,
) -> LearnState:
    """The learning state to publish with a merged head: the device's training samples and
    held-out samples absorbed as a local fine-tune would (``strategies.absorb``), and every
    class counted as known (the federation taught the classes other devices saw)."""
    new_state = state.copy()
    if new_state.lda is not None:
        new_state.lda.fit(features, labels)
    rng = np.random.default_rng([seed, 3])
    new_state = absorb(state, new_state, merged, features, labels, validation, rng)
    new_state.known = np.ones(merged.classes, np.bool_)
    return new_state
