"""Continual-learning strategies for a :class:`~edged.learn.head.Head`. Pure NumPy, no I/O.

A head was trained on the original ("cloud") data; :func:`initial_state` then records what
the strategies need to remember of that data in a :class:`LearnState`. Each
:func:`fine_tune` learns a batch of new labelled samples (backbone features) with one of
:data:`STRATEGIES` and returns a candidate head plus the state to keep if the candidate is
promoted; it changes neither of its inputs, so a rejected candidate costs nothing.

Strategies (the loss on a mini-batch; ``CE`` is softmax cross-entropy):

``naive``
    ``CE`` on the new samples only. Forgets: the reference point.
``ewc``
    Elastic weight consolidation: ``CE + lambda/2 * sum_i F_i (theta_i - theta*_i)^2`` with
    the diagonal Fisher information ``F`` at the anchor ``theta*`` (the head before the
    fine-tune). Fisher terms of successive fine-tunes are summed ("online" EWC, gamma = 1).
``lwf``
    Learning without forgetting: ``CE + alpha * T^2 * KL(softmax(old/T) || softmax(new/T))``,
    the old head's temperature-softened outputs as targets on the new inputs. The KL runs
    over the classes the old head has been trained on (``LearnState.known``); in a
    class-incremental step the new classes' outputs are left to the cross-entropy, as in
    LwF's multi-class form.
``replay``
    Experience replay: every mini-batch of new samples is joined by as many samples drawn
    from a bounded reservoir (Algorithm R) of everything seen before; ``CE`` over both.
``streaming-lda``
    Buffer-free: running class means and a shared within-class covariance (exact streaming
    updates), turned into a one-layer linear head by linear discriminant analysis.
``replay+lwf``, ``replay+ewc``
    Replay, plus LwF distillation or the EWC penalty. With replay, LwF distils on the
    replayed inputs only, all classes of the old head's output (as in dark experience
    replay): that is where the old head is right. On the new inputs of a
    domain-incremental step its outputs are mostly wrong, and distilling them fights the
    labels (on the digits benchmark's validation split it cost 29 and 54 points of accuracy
    on the new domain; see docs/learning.md).

Robustness: the head standardises features with a variance floor (see
:func:`~edged.learn.head.standardiser`); the gradient's global norm is clipped to
``Hyper.clip_norm``; inputs with NaN or infinity are refused. New features can lie far from
the ones the head was standardised for (inverted images put some features 100 standard
deviations out, and a head fine-tuned on them in the old coordinates learns nothing), so by
default a fine-tune first pools the standardisation statistics with the new samples'
(``LearnState.samples`` weighs the old ones) and starts from the old weights on the
re-standardised inputs; ``Hyper.standardisation = "fold"`` instead folds the change into
the first layer so that the head's function, EWC's anchor and its Fisher information carry
over exactly (it measured worse: docs/learning.md).

Determinism: every random choice comes from ``numpy.random.default_rng`` seeded with the
``seed`` argument, and all arithmetic is float32 (float64 for the LDA statistics). The same
inputs and seed give bit-identical results on the same machine with the same BLAS thread
count; the daemon pins BLAS to one thread (``OMP_NUM_THREADS=1``, ``OPENBLAS_NUM_THREADS=1``)
so that training neither competes with inference for cores nor varies with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from edged.core.types import LEARN_STRATEGIES
from edged.learn.head import (
    DEFAULT_VARIANCE_FLOOR,
    Head,
    PathOrFile,
    read_npz,
    softmax,
    write_npz,
)

STRATEGIES: tuple[str, ...] = LEARN_STRATEGIES
"""The strategies this module implements: ``edged.core.types.LEARN_STRATEGIES``, the one list."""

_PARTS: dict[str, frozenset[str]] = {
    "naive": frozenset(),
    "ewc": frozenset({"ewc"}),
    "lwf": frozenset({"lwf"}),
    "replay": frozenset({"replay"}),
    "streaming-lda": frozenset({"lda"}),
    "replay+lwf": frozenset({"replay", "lwf"}),
    "replay+ewc": frozenset({"replay", "ewc"}),
}

STANDARDISATIONS: tuple[str, ...] = ("refit", "fold", "fixed")

_F32 = np.float32
_UNSEEN_LOGIT = -1.0e4  # LDA bias of a class with no samples yet: never predicted, softmax ~0
_CHUNK = 256  # rows per chunk where whole data sets pass through the head (bounds memory)


def strategy_parts(strategy: str) -> frozenset[str]:
    """The ingredients of a strategy: a subset of ``{"replay", "ewc", "lwf", "lda"}``.

    Raises:
        ValueError: unknown strategy.
    """
    try:
        return _PARTS[strategy]
    except KeyError:
        raise ValueError(
            f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of the strategies, bounded. The defaults are what
    ``benchmarks/continual.py --tune`` chose on its validation split for the replay
    strategies (and EWC's own lambda); :func:`tuned_hyper` gives each strategy's choice."""

    epochs: int = 30
    """Passes over the new samples per fine-tune (1..1000)."""
    batch_size: int = 32
    """New samples per mini-batch (1..4096); replay adds as many from the buffer."""
    lr: float = 0.03
    """SGD learning rate (0 < lr <= 10)."""
    momentum: float = 0.9
    """SGD momentum (0 <= momentum < 1)."""
    weight_decay: float = 1e-4
    """L2 penalty on the weights, not the biases (0 <= weight_decay < 1)."""
    clip_norm: float = 5.0
    """The gradient's global L2 norm is clipped to this (> 0)."""
    ewc_lambda: float = 1000.0
    """EWC: weight of the Fisher-weighted quadratic penalty (0 <= ewc_lambda <= 1e9)."""
    lwf_alpha: float = 1.0
    """LwF: weight of the distillation term (0 <= lwf_alpha <= 1e6)."""
    temperature: float = 2.0
    """LwF: softmax temperature of the old and new outputs (0 < temperature <= 100)."""
    replay_capacity: int = 200
    """Replay: samples kept in the reservoir of old data (1..1_000_000)."""
    holdout_capacity: int = 100
    """Samples of old data kept aside for the job's gate, never trained on (0..1_000_000)."""
    lda_shrinkage: float = 1e-4
    """Streaming LDA: covariance shrinkage towards a scaled identity (0 <= shrinkage <= 1)."""
    variance_floor: float = DEFAULT_VARIANCE_FLOOR
    """Smallest feature variance used when a head's standardisation is computed (> 0)."""
    standardisation: str = "refit"
    """How a fine-tune treats the head's feature standardisation (``mean``, ``scale``):
    ``"refit"`` pools its statistics with the new samples' and keeps the weights as they are
    (a warm start on well-scaled inputs); ``"fold"`` pools them and folds the change into the
    first layer, so that the head computes the same function and EWC's anchor and Fisher
    carry over; ``"fixed"`` keeps it. Streaming LDA keeps its own standardisation."""

    def __post_init__(self) -> None:
        bounds: dict[str, tuple[float, float, bool]] = {
            # name: (low, high, low is exclusive)
            "epochs": (1, 1000, False),
            "batch_size": (1, 4096, False),
            "lr": (0.0, 10.0, True),
            "momentum": (0.0, 0.999999, False),
            "weight_decay": (0.0, 0.999999, False),
            "clip_norm": (0.0, 1e6, True),
            "ewc_lambda": (0.0, 1e9, False),
            "lwf_alpha": (0.0, 1e6, False),
            "temperature": (0.0, 100.0, True),
            "replay_capacity": (1, 1_000_000, False),
            "holdout_capacity": (0, 1_000_000, False),
            "lda_shrinkage": (0.0, 1.0, False),
            "variance_floor": (0.0, 1e6, True),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "str":
                if value not in STANDARDISATIONS:
                    raise ValueError(
                        f"Hyper.{f.name} must be one of {', '.join(STANDARDISATIONS)}, "
                        f"got {value!r}"
                    )
                continue
            low, high, open_low = bounds[f.name]
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"Hyper.{f.name} must be an integer, got {value!r}")
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"Hyper.{f.name} must be a finite number, got {value!r}")
            if value > high or value < low or (open_low and value == low):
                lower = f"> {low}" if open_low else f">= {low}"
                raise ValueError(f"Hyper.{f.name} must be {lower} and <= {high}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Reservoir buffer
# --------------------------------------------------------------------------------------------


# What benchmarks/continual.py --tune chose on its validation split (docs/learning.md): the
# settings that differ from Hyper's defaults, per strategy, and for training a head from
# scratch (the initial head, and joint training).
TUNED: dict[str, dict[str, float | str]] = {
    "training": {"lr": 0.03, "epochs": 120},
    "naive": {"lr": 0.01, "standardisation": "refit"},
    "ewc": {"lr": 0.01, "standardisation": "refit", "ewc_lambda": 1000.0},
    "lwf": {"lr": 0.01, "standardisation": "fold", "lwf_alpha": 0.3},
    "replay": {"lr": 0.03, "standardisation": "refit"},
    "streaming-lda": {"lda_shrinkage": 1e-4},
    "replay+lwf": {"lr": 0.03, "standardisation": "refit", "lwf_alpha": 1.0},
    "replay+ewc": {"lr": 0.03, "standardisation": "refit", "ewc_lambda": 10.0},
}


def tuned_hyper(strategy: str, **overrides: float | str) -> Hyper:
    """Hyperparameters chosen for ``strategy`` on the benchmark's validation split
    (:data:`TUNED`; ``"training"`` for training a head from scratch), with ``overrides``.

    Raises:
        ValueError: unknown strategy, or an override out of bounds.
    """
    if strategy != "training":
        strategy_parts(strategy)
    try:
        return replace(Hyper(), **{**TUNED[strategy], **overrides})  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"bad hyperparameter override: {e}") from None


class ReservoirBuffer:
    """A bounded uniform sample of a stream of ``(feature, label)`` pairs: Vitter's
    Algorithm R. After ``seen`` samples each of them is kept with probability
    ``capacity / seen``; which ones depends only on the generator passed to :meth:`add`."""

    def __init__(self, capacity: int, dim: int) -> None:
        if capacity < 0 or dim < 1:
            raise ValueError(f"need capacity >= 0 and dim >= 1, got {capacity}, {dim}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.seen = 0
        self._x = np.zeros((0, self.dim), dtype=_F32)
        self._y = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._y.shape[0])

    @property
    def features(self) -> np.ndarray:
        """The kept features, float32 ``(len, dim)`` (read-only view)."""
        view = self._x.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray:
        """The kept labels, int64 ``(len,)`` (read-only view)."""
        view = self._y.view()
        view.flags.writeable = False
        return view

    def add(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
        """Offer samples to the reservoir in row order.

        Raises:
            ValueError: shapes do not match ``(N, dim)`` and ``(N,)``.
        """
        xs = np.asarray(x, dtype=_F32)
        ys = np.asarray(y, dtype=np.int64)
        if xs.ndim != 2 or xs.shape[1] != self.dim or ys.shape != (xs.shape[0],):
            raise ValueError(
                f"reservoir of dim {self.dim} offered features {xs.shape}, labels {ys.shape}"
            )
        n = xs.shape[0]
        if n == 0 or self.capacity == 0:
            self.seen += n
            return
        fill = min(self.capacity - len(self), n)
        if fill:
            self._x = np.concatenate([self._x, xs[:fill]])
            self._y = np.concatenate([self._y, ys[:fill]])
        rest = n - fill
        if rest:
            # Sample i of the stream (1-based) replaces slot j ~ U{0..i-1} when j < capacity.
            positions = np.arange(self.seen + fill + 1, self.seen + n + 1, dtype=np.int64)
            slots = rng.integers(0, positions)
            accepted = np.flatnonzero(slots < self.capacity)
            if accepted.size:
                self._x = self._x.copy()
                self._y = self._y.copy()
                for k in accepted:  # in stream order: a later sample overwrites an earlier one
                    self._x[slots[k]] = xs[fill + k]
                    self._y[slots[k]] = ys[fill + k]
        self.seen += n

    def copy(self) -> ReservoirBuffer:
        """An independent copy."""
        other = ReservoirBuffer(self.capacity, self.dim)
        other.seen = self.seen
        other._x = self._x.copy()
        other._y = self._y.copy()
        return other

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``<prefix>x``, ``<prefix>y`` (the kept samples) and ``<prefix>meta`` (capacity,
        dim, seen)."""
        meta = np.array([self.capacity, self.dim, self.seen], dtype=np.int64)
        return {f"{prefix}x": self._x, f"{prefix}y": self._y, f"{prefix}meta": meta}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> ReservoirBuffer:
        """Inverse of :meth:`to_arrays`.

        Raises:
            ValueError: an array is missing or inconsistent (message names it).
        """
        meta = _get(arrays, f"{prefix}meta")
        if meta.shape != (3,) or not np.issubdtype(meta.dtype, np.integer):
            raise ValueError(f"{prefix}meta must be 3 integers, got {meta.dtype} {meta.shape}")
        capacity, dim, seen = (int(v) for v in meta)
        if capacity < 0 or dim < 1 or seen < 0:
            raise ValueError(f"{prefix}meta is invalid: capacity {capacity}, dim {dim}")
        x = _get(arrays, f"{prefix}x")
        y = _get(arrays, f"{prefix}y")
        if not np.issubdtype(x.dtype, np.floating) or x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"{prefix}x must be float (N, {dim}), got {x.dtype} {x.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
            raise ValueError(f"{prefix}y must be integers ({x.shape[0]},), got {y.dtype} {y.shape}")
        if x.shape[0] > min(capacity, seen):
            raise ValueError(f"{prefix}x holds {x.shape[0]} samples, more than it can have")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{prefix}x has non-finite entries")
        buffer = cls(capacity, dim)
        buffer.seen = seen
        buffer._x = x.astype(_F32)
        buffer._y = y.astype(np.int64)
        return buffer

    def nbytes(self) -> int:
        """Bytes of the kept samples and their labels."""
        return int(self._x.nbytes + self._y.nbytes)


# --------------------------------------------------------------------------------------------
# Streaming LDA
# --------------------------------------------------------------------------------------------


class StreamingLDA:
    """Buffer-free linear discriminant analysis over a stream of features.

    Keeps per-class counts and means and the pooled within-class scatter matrix
    ``S = sum_c sum_{i in c} (z_i - mu_c)(z_i - mu_c)^T``, updated exactly batch by batch
    (Chan et al.'s pairwise merge), in float64. ``z`` are the features standardised with
    the fixed ``mean``/``scale`` given at construction (the head's own), so that shrinkage
    towards the identity treats every feature alike. After any sequence of :meth:`fit` calls
    the statistics equal those of one batch fit on all the data, up to rounding.

    :meth:`to_head` returns a one-layer linear :class:`Head` with that same standardisation:
    ``logits_c = z . Sigma^-1 mu_c - mu_c . Sigma^-1 mu_c / 2 + log(n_c / n)`` with the
    (biased, as scikit-learn's ``LinearDiscriminantAnalysis``) shared covariance
    ``Sigma = S / n``, shrunk. A class with no samples yet gets a bias of -1e4.
    """

    def __init__(
        self,
        dim: int,
        classes: int,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ) -> None:
        if dim < 1 or classes < 1:
            raise ValueError(f"need dim >= 1 and classes >= 1, got {dim}, {classes}")
        self.dim = int(dim)
        self.classes = int(classes)
        self.mean = np.zeros(dim, _F32) if mean is None else np.array(mean, dtype=_F32)
        self.scale = np.ones(dim, _F32) if scale is None else np.array(scale, dtype=_F32)
        if self.mean.shape != (dim,) or self.scale.shape != (dim,):
            raise ValueError(f"mean and scale must have shape ({dim},)")
        if not (np.all(self.scale > 0) and np.all(np.isfinite(self.scale))):
            raise ValueError("scale must be positive and finite")
        self.counts = np.zeros(classes, dtype=np.int64)
        self.means = np.zeros((classes, dim), dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)

    @property
    def total(self) -> int:
        """Samples seen so far."""
        return int(self.counts.sum())

    @property
    def covariance(self) -> np.ndarray:
        """The shared within-class covariance ``S / n`` of the standardised features."""
        return self.scatter / max(self.total, 1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add a batch of samples to the statistics (streaming: call as often as needed).

        Raises:
            ValueError: shapes or labels out of range.
        """
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        labels = np.asarray(y)
        if z.ndim != 2 or z.shape[1] != self.dim or labels.shape != (z.shape[0],):
            raise ValueError(
                f"LDA of dim {self.dim} given features {z.shape}, labels {labels.shape}"
            )
        _check_labels(labels, self.classes)
        for c in np.unique(labels):
            zc = z[labels == c]
            n_b = zc.shape[0]
            mean_b = zc.mean(axis=0)
            centred = zc - mean_b
            n_a = int(self.counts[c])
            delta = mean_b - self.means[c]
            n = n_a + n_b
            self.scatter += centred.T @ centred + np.outer(delta, delta) * (n_a * n_b / n)
            self.means[c] += delta * (n_b / n)
            self.counts[c] = n

    def to_head(self, shrinkage: float) -> Head:
        """The LDA classifier as a one-layer head (see the class docstring).

        Raises:
            ValueError: no samples seen yet, or shrinkage outside [0, 1].
        """
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
        seen = np.flatnonzero(self.counts > 0)
        if seen.size == 0:
            raise ValueError("streaming LDA has seen no samples")
        cov = self.covariance
        average_variance = float(np.trace(cov)) / self.dim
        target = average_variance if average_variance > 0 else 1.0
        shrunk = (1.0 - shrinkage) * cov + shrinkage * target * np.eye(self.dim)
        means = self.means[seen]
        coef = np.linalg.lstsq(shrunk, means.T, rcond=None)[0]  # (dim, seen)
        priors = self.counts[seen] / self.total
        bias = -0.5 * np.sum(means * coef.T, axis=1) + np.log(priors)
        weight = np.zeros((self.dim, self.classes), dtype=_F32)
        offset = np.full(self.classes, _UNSEEN_LOGIT, dtype=_F32)
        weight[:, seen] = coef
        offset[seen] = bias
        return Head(
            weights=[weight], biases=[offset], mean=self.mean.copy(), scale=self.scale.copy()
        )

    def copy(self) -> StreamingLDA:
        """An independent copy."""
        other = StreamingLDA(self.dim, self.classes, self.mean, self.scale)
        other.counts = self.counts.copy()
        other.means = self.means.copy()
        other.scatter = self.scatter.copy()
        return other

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The statistics as named arrays (``counts``, ``means``, ``scatter``, ``mean``,
        ``scale``, each after ``prefix``)."""
        return {
            f"{prefix}counts": self.counts,
            f"{prefix}means": self.means,
            f"{prefix}scatter": self.scatter,
            f"{prefix}mean": self.mean,
            f"{prefix}scale": self.scale,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> StreamingLDA:
        """Inverse of :meth:`to_arrays`.

        Raises:
            ValueError: an array is missing or inconsistent (message names it).
        """
        means = _get(arrays, f"{prefix}means")
        if means.ndim != 2 or not np.issubdtype(means.dtype, np.floating):
            raise ValueError(f"{prefix}means must be a float (classes, dim) array")
        classes, dim = means.shape
        lda = cls(dim, classes, _get(arrays, f"{prefix}mean"), _get(arrays, f"{prefix}scale"))
        counts = _get(arrays, f"{prefix}counts")
        scatter = _get(arrays, f"{prefix}scatter")
        if counts.shape != (classes,) or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"{prefix}counts must be {classes} integers")
        if np.any(counts < 0):
            raise ValueError(f"{prefix}counts has negative entries")
        if scatter.shape != (dim, dim) or not np.issubdtype(scatter.dtype, np.floating):
            raise ValueError(f"{prefix}scatter must be a float ({dim}, {dim}) array")
        for name, a in (("means", means), ("scatter", scatter)):
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{prefix}{name} has non-finite entries")
        lda.counts = counts.astype(np.int64)
        lda.means = means.astype(np.float64)
        lda.scatter = scatter.astype(np.float64)
        return lda

    def nbytes(self) -> int:
        """Bytes of the statistics."""
        return sum(int(a.nbytes) for a in self.to_arrays().values())


# --------------------------------------------------------------------------------------------
# State carried between fine-tunes
# --------------------------------------------------------------------------------------------


@dataclass
class LearnState:
    """Everything carried between fine-tunes of one model; persisted as one .npz."""

    replay: ReservoirBuffer | None
    """Training memory of old data (replay strategies); None for the others."""
    holdout: ReservoirBuffer
    """Held-out old data for the job's gate ("the buffer's validation share"): never
    trained on."""
    fisher: list[np.ndarray] | None
    """EWC: diagonal Fisher information per array of :meth:`Head.params` (``W_0, b_0, ...``),
    summed over the fine-tunes so far; None unless the state was built for EWC."""
    anchor: Head | None
    """EWC: the head the Fisher information was last computed at (the parameters the penalty
    pulls towards)."""
    lda: StreamingLDA | None
    """Streaming LDA statistics; None unless the state was built for streaming-lda."""
    tasks: int
    """How many fine-tunes went into this state."""
    known: np.ndarray | None = None
    """bool ``(classes,)``: the classes some training so far had samples of (LwF distils
    these). None means every class."""
    samples: int = 0
    """How many samples the head's standardisation statistics summarise (weighs them when
    they are pooled with new samples); 0 when unknown, and then old and new weigh alike."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays, for :func:`save_state`; :meth:`from_arrays` inverts it."""
        arrays: dict[str, np.ndarray] = {
            "tasks": np.array(self.tasks, dtype=np.int64),
            "samples": np.array(self.samples, dtype=np.int64),
        }
        if self.known is not None:
            arrays["known"] = self.known.astype(np.bool_)
        arrays.update(self.holdout.to_arrays("holdout."))
        if self.replay is not None:
            arrays.update(self.replay.to_arrays("replay."))
        if self.fisher is not None:
            for i, f in enumerate(self.fisher):
                arrays[f"fisher.{i}"] = f
        if self.anchor is not None:
            arrays.update(self.anchor.to_arrays("anchor."))
        if self.lda is not None:
            arrays.update(self.lda.to_arrays("lda."))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LearnState:
        """Inverse of :meth:`to_arrays`.

        Raises:
            ValueError: an array is missing or inconsistent (message names it).
        """
        tasks = _get(arrays, "tasks")
        if tasks.shape != () or not np.issubdtype(tasks.dtype, np.integer) or int(tasks) < 0:
            raise ValueError("tasks must be a non-negative integer scalar")
        samples = np.asarray(arrays.get("samples", np.array(0, np.int64)))
        if samples.shape != () or not np.issubdtype(samples.dtype, np.integer) or samples < 0:
            raise ValueError("samples must be a non-negative integer scalar")
        known = None
        if "known" in arrays:
            known = np.asarray(arrays["known"])
            if known.dtype != np.bool_ or known.ndim != 1:
                raise ValueError(f"known must be a 1-D bool array, got {known.dtype} {known.shape}")
        holdout = ReservoirBuffer.from_arrays(arrays, "holdout.")
        replay = ReservoirBuffer.from_arrays(arrays, "replay.") if "replay.meta" in arrays else None
        anchor = Head.from_arrays(arrays, "anchor.") if "anchor.mean" in arrays else None
        fisher: list[np.ndarray] | None = None
        if "fisher.0" in arrays:
            if anchor is None:
                raise ValueError("fisher.* present without anchor.*")
            fisher = []
            for i, p in enumerate(anchor.params()):
                f = _get(arrays, f"fisher.{i}")
                if f.shape != p.shape or not np.issubdtype(f.dtype, np.floating):
                    raise ValueError(f"fisher.{i} has shape {f.shape}, its parameter {p.shape}")
                if not (np.all(np.isfinite(f)) and np.all(f >= 0)):
                    raise ValueError(f"fisher.{i} must be finite and >= 0")
                fisher.append(f.astype(_F32))
        lda = StreamingLDA.from_arrays(arrays, "lda.") if "lda.means" in arrays else None
        state = cls(
            replay=replay,
            holdout=holdout,
            fisher=fisher,
            anchor=anchor,
            lda=lda,
            tasks=int(tasks),
            known=known,
            samples=int(samples),
        )
        dims = {b.dim for b in (holdout, replay) if b is not None}
        dims |= {h.in_dim for h in (anchor,) if h is not None}
        dims |= {lda.dim} if lda is not None else set()
        if len(dims) > 1:
            raise ValueError(f"state parts disagree on the feature dimension: {sorted(dims)}")
        return state

    def copy(self) -> LearnState:
        """A deep copy."""
        return LearnState(
            replay=None if self.replay is None else self.replay.copy(),
            holdout=self.holdout.copy(),
            fisher=None if self.fisher is None else [f.copy() for f in self.fisher],
            anchor=None if self.anchor is None else self.anchor.copy(),
            lda=None if self.lda is None else self.lda.copy(),
            tasks=self.tasks,
            known=None if self.known is None else self.known.copy(),
            samples=self.samples,
        )

    def nbytes(self) -> int:
        """Bytes of every array the state holds (about what its uncompressed .npz takes)."""
        return sum(int(a.nbytes) for a in self.to_arrays().values())


def save_state(path: PathOrFile, state: LearnState) -> None:
    """Write ``state`` as a deterministic ``.npz`` (see :func:`edged.learn.head.write_npz`)."""
    write_npz(path, state.to_arrays())


def load_state(path: PathOrFile) -> LearnState:
    """Read a state written by :func:`save_state`.

    Raises:
        ValueError: not an npz archive of a valid state (the message says why).
        OSError: the file cannot be read.
    """
    return LearnState.from_arrays(read_npz(path))


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the rows, and its gradient w.r.t. ``logits``."""
    n = logits.shape[0]
    p = softmax(logits.astype(_F32, copy=True))
    rows = np.arange(n)
    loss = -float(np.mean(np.log(np.maximum(p[rows, labels], np.finfo(_F32).tiny))))
    p[rows, labels] -= 1.0
    p /= _F32(n)
    return loss, p


def lwf_loss(
    new_logits: np.ndarray,
    old_logits: np.ndarray,
    temperature: float,
    alpha: float = 1.0,
    known: np.ndarray | None = None,
) -> tuple[float, np.ndarray]:
    """LwF's distillation term ``alpha * T^2 * mean_rows KL(softmax(old/T) || softmax(new/T))``
    and its gradient w.r.t. ``new_logits``.

    With ``known`` (bool per class) the softmaxes run over those classes only and the other
    columns get no gradient. The loss and gradient are zero exactly when the new outputs
    equal the old ones up to a constant per row.
    """
    t = _F32(temperature)
    cols = slice(None) if known is None else np.flatnonzero(known)
    new = new_logits[:, cols].astype(_F32) / t
    old = old_logits[:, cols].astype(_F32) / t
    log_p = _log_softmax(new)
    log_q = _log_softmax(old)
    q = np.exp(log_q)
    n = new_logits.shape[0]
    scale = _F32(alpha) * t * t
    loss = float(scale * np.sum(q * (log_q - log_p)) / n)
    grad = np.zeros_like(new_logits, dtype=_F32)
    grad[:, cols] = (np.exp(log_p) - q) * (scale / t / _F32(n))
    return loss, grad


def ewc_penalty(
    params: Sequence[np.ndarray],
    anchor: Sequence[np.ndarray],
    fisher: Sequence[np.ndarray],
    lam: float,
) -> tuple[float, list[np.ndarray]]:
    """EWC's penalty ``lam/2 * sum_i F_i (theta_i - anchor_i)^2`` and its gradient per array.

    ``params``, ``anchor`` and ``fisher`` are parallel lists (e.g. :meth:`Head.params`).
    Zero at the anchor; grows quadratically with the Fisher-weighted distance from it.
    """
    total = 0.0
    grads: list[np.ndarray] = []
    for p, a, f in zip(params, anchor, fisher, strict=True):
        diff = p - a
        weighted = f * diff
        total += float(np.sum(weighted * diff, dtype=np.float64))
        grads.append((_F32(lam) * weighted).astype(_F32, copy=False))
    return 0.5 * lam * total, grads


def fisher_diagonal(head: Head, features: np.ndarray) -> list[np.ndarray]:
    """The diagonal of the Fisher information of ``head`` on ``features``, per array of
    :meth:`Head.params`: ``mean_x sum_c p(c|x) (d log p(c|x) / d theta)^2``, the expectation
    taken under the head's own predictions (the "true" Fisher, not the empirical one)."""
    params = head.params()
    fisher = [np.zeros_like(p, dtype=np.float64) for p in params]
    x = np.asarray(features, dtype=_F32)
    n = x.shape[0]
    ws = head.weights
    for start in range(0, n, _CHUNK):
        acts, logits = _forward(head, head.standardise(x[start : start + _CHUNK]))
        p = softmax(logits)
        squared = [a * a for a in acts]
        for c in range(head.classes):
            # d log p_c / d logits = onehot(c) - p; weight each sample's squared grads by p_c
            delta = -p
            delta[:, c] += 1.0
            weight = p[:, c : c + 1]
            for i in reversed(range(len(ws))):
                d2 = delta * delta * weight
                fisher[2 * i] += squared[i].T @ d2
                fisher[2 * i + 1] += d2.sum(axis=0)
                if i:
                    delta = (delta @ ws[i].T) * (acts[i] > 0)
    return [(f / max(n, 1)).astype(_F32) for f in fisher]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_head(
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    hyper: Hyper,
    seed: int,
    progress: Callable[[float], None] | None = None,
    *,
    fake_quant: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Head:
    """Plain supervised training (softmax cross-entropy, SGD with momentum) starting from
    ``head``, which is not changed; returns the trained copy.

    ``fake_quant``: quantisation-aware training. Every forward pass runs with
    ``fake_quant(W)`` in place of each weight matrix ``W`` (quantise, then dequantise), and
    the gradient taken there updates the float ``W`` (the straight-through estimator).

    Raises:
        ValueError: empty input, shapes that do not match the head, labels out of range,
            non-finite features.
    """
    x, y = _check_samples(head, features, labels)
    rng = np.random.default_rng([seed, 0])
    return _train(head, x, y, hyper, rng, progress=progress, fake_quant=fake_quant)


def distil_head(
    student: Head,
    teacher: Head,
    features: np.ndarray,
    labels: np.ndarray,
    hyper: Hyper,
    seed: int,
) -> Head:
    """Knowledge distillation (Hinton et al., 2015): train ``student`` (not changed; the
    trained copy is returned) on ``CE(labels) + hyper.lwf_alpha * T^2 * KL(softmax(teacher/T)
    || softmax(student/T))`` with ``T = hyper.temperature``, the teacher's soft targets
    computed once on ``features``. The student may have other hidden widths than the
    teacher; both take the same features and give the same classes.

    Raises:
        ValueError: the two heads do not take the same features or give the same classes,
            or the samples do not fit (as :func:`train_head`).
    """
    if (student.in_dim, student.classes) != (teacher.in_dim, teacher.classes):
        raise ValueError(
            f"student takes {student.in_dim} features to {student.classes} classes, "
            f"teacher {teacher.in_dim} to {teacher.classes}"
        )
    x, y = _check_samples(student, features, labels)
    rng = np.random.default_rng([seed, 0])
    every_class = np.ones(teacher.classes, dtype=bool)
    return _train(student, x, y, hyper, rng, lwf=(teacher, every_class))


def initial_state(
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    strategy: str,
    hyper: Hyper,
    seed: int,
    *,
    holdout: tuple[np.ndarray, np.ndarray] | None = None,
) -> LearnState:
    """The state after ``head`` was trained on ``features``/``labels`` (the original data).

    Fills what ``strategy`` needs: the replay reservoir (replay strategies), the Fisher
    information at ``head`` and the anchor (EWC), the LDA statistics (streaming-lda); always
    the holdout reservoir for the gate and the set of known classes.

    ``holdout``: old samples the head was *not* trained on, for the gate. Without it,
    ``min(hyper.holdout_capacity, N // 5)`` random samples of ``features`` become the
    holdout and are left out of the other parts (but the head has seen them).

    Raises:
        ValueError: unknown strategy, empty input, shapes that do not match the head, labels
            out of range, non-finite features.
    """
    parts = strategy_parts(strategy)
    x, y = _check_samples(head, features, labels)
    rng = np.random.default_rng([seed, 1])
    if holdout is None:
        order = rng.permutation(x.shape[0])
        n_hold = min(hyper.holdout_capacity, x.shape[0] // 5)
        hold_x, hold_y = x[order[:n_hold]], y[order[:n_hold]]
        keep = np.sort(order[n_hold:])
        x, y = x[keep], y[keep]
    else:
        hold_x, hold_y = _check_samples(head, holdout[0], holdout[1], allow_empty=True)
    held = ReservoirBuffer(hyper.holdout_capacity, head.in_dim)
    held.add(hold_x, hold_y, rng)
    replay = None
    if "replay" in parts:
        replay = ReservoirBuffer(hyper.replay_capacity, head.in_dim)
        replay.add(x, y, rng)
    fisher = anchor = None
    if "ewc" in parts:
        fisher = fisher_diagonal(head, x)
        anchor = head.copy()
    lda = None
    if "lda" in parts:
        lda = StreamingLDA(head.in_dim, head.classes, head.mean, head.scale)
        lda.fit(x, y)
    known = np.zeros(head.classes, dtype=np.bool_)
    known[np.unique(y)] = True
    return LearnState(
        replay=replay,
        holdout=held,
        fisher=fisher,
        anchor=anchor,
        lda=lda,
        tasks=0,
        known=known,
        samples=int(np.asarray(features).shape[0]),
    )


def fine_tune(
    head: Head,
    state: LearnState,
    features: np.ndarray,
    labels: np.ndarray,
    strategy: str,
    hyper: Hyper,
    seed: int,
    progress: Callable[[float], None] | None = None,
    *,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    proximal: tuple[float, Head] | None = None,
) -> tuple[Head, LearnState]:
    """Learn new samples with ``strategy``; returns ``(candidate head, state to keep if the
    candidate is promoted)``. Neither ``head`` nor ``state`` is changed.

    The returned state has every part ``state`` has brought up to date, whatever the
    strategy: the new samples offered to the replay reservoir, the Fisher information at the
    candidate on the new samples added to the old and the candidate as the new anchor, the
    new samples added to the LDA statistics; ``known`` gains the new labels, ``tasks`` + 1.
    ``validation``: new samples the caller held out of training for the gate; they are
    offered to the holdout reservoir, so that later jobs guard them as old data.

    ``progress(fraction)`` is called after every epoch (once for streaming-lda); an
    exception it raises aborts the fine-tune and propagates (a way to cancel a job).
    ``proximal = (mu, anchor)`` adds FedProx's term ``mu/2 * ||theta - theta_anchor||^2``
    (federated rounds: the anchor is the round's global head; edged.federated).

    Raises:
        ValueError: unknown strategy; a state without the part the strategy needs (a replay
            buffer, Fisher information, LDA statistics: build it with
            ``initial_state(..., strategy=...)``); empty input; features that do not match
            the head or are not finite; labels out of range.
    """
    parts = strategy_parts(strategy)
    x, y = _check_samples(head, features, labels)
    _check_state_for(head, state, strategy, parts)
    val_x = val_y = None
    if validation is not None:
        val_x, val_y = _check_samples(head, validation[0], validation[1], allow_empty=True)

    train_rng = np.random.default_rng([seed, 2])
    buffer_rng = np.random.default_rng([seed, 3])
    known = np.ones(head.classes, np.bool_) if state.known is None else state.known.copy()
    new_state = state.copy()

    if "lda" in parts and new_state.lda is not None:
        new_state.lda.fit(x, y)
        candidate = new_state.lda.to_head(hyper.lda_shrinkage)
        if progress is not None:
            progress(1.0)
    else:
        start = _standardised_start(head, new_state, x, hyper)
        replay = None
        if "replay" in parts and state.replay is not None and len(state.replay):
            replay = (state.replay.features, state.replay.labels)
        lwf = (head, known) if "lwf" in parts and known.any() else None
        ewc = None
        if "ewc" in parts and new_state.fisher is not None and new_state.anchor is not None:
            ewc = (new_state.fisher, new_state.anchor.params())
        prox = None if proximal is None else (proximal[0], proximal[1].params())
        candidate = _train(
            start,
            x,
            y,
            hyper,
            train_rng,
            replay=replay,
            lwf=lwf,
            ewc=ewc,
            prox=prox,
            progress=progress,
        )
        if new_state.lda is not None:
            new_state.lda.fit(x, y)
    return candidate, absorb(state, new_state, candidate, x, y, (val_x, val_y), buffer_rng)


def absorb(
    state: LearnState,
    new_state: LearnState,
    candidate: Head,
    x: np.ndarray,
    y: np.ndarray,
    validation: tuple[np.ndarray | None, np.ndarray | None],
    buffer_rng: np.random.Generator,
) -> LearnState:
    """Bring ``new_state`` (a copy of ``state``, changed in place and returned) up to date
    with a candidate head learned from ``x``, ``y``: the samples offered to the replay
    reservoir, the Fisher information at the candidate added and the candidate as EWC's
    anchor, ``validation`` offered to the holdout reservoir, ``known`` gains the labels,
    ``tasks`` + 1. :func:`fine_tune` ends with it; a head merged by a federation
    (edged.federated) is absorbed the same way."""
    val_x, val_y = validation
    known = np.ones(candidate.classes, np.bool_) if state.known is None else state.known.copy()
    if new_state.replay is not None:
        new_state.replay.add(x, y, buffer_rng)
    if new_state.fisher is not None:
        fresh = fisher_diagonal(candidate, x)
        old = new_state.fisher
        if [f.shape for f in old] == [f.shape for f in fresh]:
            new_state.fisher = [a + b for a, b in zip(old, fresh, strict=True)]
        else:  # the head changed shape (e.g. an LDA head): start the sum afresh
            new_state.fisher = fresh
        new_state.anchor = candidate.copy()
    if val_x is not None and val_y is not None:
        new_state.holdout.add(val_x, val_y, buffer_rng)
        known[np.unique(val_y)] = True
    known[np.unique(y)] = True
    new_state.known = known
    new_state.tasks = state.tasks + 1
    new_state.samples = (state.samples or x.shape[0]) + x.shape[0]
    return new_state


def adopt(
    merged: Head,
    state: LearnState,
    features: np.ndarray,
    labels: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray],
    seed: int,
) -> LearnState:
    """The learning state to publish with a head learned elsewhere (a federation's merged
    head, edged.federated): the device's training and held-out samples absorbed as a local
    fine-tune would (:func:`absorb`), and every class counted as known (the federation taught
    the classes other devices saw)."""
    new_state = state.copy()
    if new_state.lda is not None:
        new_state.lda.fit(features, labels)
    rng = np.random.default_rng([seed, 3])
    new_state = absorb(state, new_state, merged, features, labels, validation, rng)
    new_state.known = np.ones(merged.classes, np.bool_)
    return new_state


def pooled_standardiser(
    mean: np.ndarray, scale: np.ndarray, count: int, features: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Standardisation statistics of the old data (``mean``, ``scale``, over ``count``
    samples; ``scale**2`` taken as their variance) pooled with ``features``' (Chan's
    merge); ``count`` 0 weighs the old statistics as much as the new samples."""
    x = np.asarray(features, dtype=_F32)
    n_new = x.shape[0]
    n_old = count if count > 0 else n_new
    n = n_old + n_new
    # float64 sums without a float64 copy of x (a fine-tune's memory stays small)
    new_mean = np.sum(x, axis=0, dtype=np.float64) / n_new
    new_var = np.maximum(np.einsum("ij,ij->j", x, x, dtype=np.float64) / n_new - new_mean**2, 0)
    delta = new_mean - mean
    pooled_mean = mean + delta * (n_new / n)
    m2 = n_old * scale.astype(np.float64) ** 2 + n_new * new_var
    pooled_var = (m2 + delta**2 * (n_old * n_new / n)) / n
    return (
        pooled_mean.astype(_F32),
        np.sqrt(np.maximum(pooled_var, floor)).astype(_F32),
    )


def restandardise(head: Head, mean: np.ndarray, scale: np.ndarray) -> Head:
    """A copy of ``head`` that standardises with ``mean``/``scale`` and computes the same
    function: the change is folded into the first layer,
    ``W_0' = diag(scale / old_scale) W_0`` and ``b_0' = b_0 + ((mean - old_mean) / old_scale) W_0``.
    """
    out = head.copy()
    ratio = (np.asarray(scale, _F32) / head.scale)[:, None]
    offset = (np.asarray(mean, _F32) - head.mean) / head.scale
    out.weights[0] = (head.weights[0] * ratio).astype(_F32)
    out.biases[0] = (head.biases[0] + offset @ head.weights[0]).astype(_F32)
    out.mean = np.array(mean, dtype=_F32)
    out.scale = np.array(scale, dtype=_F32)
    return out


def _fold_fisher(
    fisher: list[np.ndarray], old_scale: np.ndarray, new_scale: np.ndarray
) -> list[np.ndarray]:
    """Fisher information in the coordinates of :func:`restandardise`: the first layer's
    weights scale by ``new/old``, so their Fisher terms by ``(old/new)^2`` (the penalty on
    them is unchanged; the bias's coupling to them is ignored, the diagonal cannot hold it)."""
    ratio = (old_scale.astype(np.float64) / new_scale)[:, None] ** 2
    return [(fisher[0] * ratio).astype(_F32), *fisher[1:]]


def split_validation(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, validation)`` that hold out about ``share`` of every class (at
    least one sample of a class with two or more), sorted; deterministic for ``seed``."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share must be in [0, 1), got {share!r}")
    y = np.asarray(labels)
    rng = np.random.default_rng([seed, 4])
    held: list[np.ndarray] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = round(share * members.size)
        if share > 0 and members.size >= 2:
            k = min(max(k, 1), members.size - 1)
        held.append(rng.permutation(members)[:k])
    validation = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(y.shape[0]), validation)
    return train.astype(np.int64), validation.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _standardised_start(head: Head, state: LearnState, x: np.ndarray, hyper: Hyper) -> Head:
    """The head training starts from, per ``hyper.standardisation``; with "fold", ``state``'s
    EWC anchor and Fisher information are moved to the new coordinates in place."""
    mode = hyper.standardisation
    if mode == "fixed":
        return head
    mean, scale = pooled_standardiser(head.mean, head.scale, state.samples, x, hyper.variance_floor)
    if mode == "refit":
        start = head.copy()
        start.mean, start.scale = mean, scale
        return start
    if state.anchor is not None and state.fisher is not None:
        state.fisher = _fold_fisher(state.fisher, state.anchor.scale, scale)
        state.anchor = restandardise(state.anchor, mean, scale)
    return restandardise(head, mean, scale)


def _train(
    head: Head,
    x: np.ndarray,
    y: np.ndarray,
    hyper: Hyper,
    rng: np.random.Generator,
    *,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    lwf: tuple[Head, np.ndarray] | None = None,
    ewc: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    prox: tuple[float, Sequence[np.ndarray]] | None = None,
    progress: Callable[[float], None] | None = None,
    fake_quant: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Head:
    """Mini-batch SGD with momentum on a copy of ``head``; see the module docstring for the
    losses (and :func:`train_head` for ``fake_quant``). Returns the trained copy."""
    out = head.copy()
    params = out.params()
    velocity = [np.zeros_like(p) for p in params]
    n = x.shape[0]
    # The old head's outputs, computed once: the LwF targets of every new and replayed sample.
    # LwF distils on the replayed inputs when there are any, else on the new ones.
    old_new = old_replay = None
    if lwf is not None:
        if replay is not None:
            old_replay = _chunked_logits(lwf[0], replay[0])
        else:
            old_new = _chunked_logits(lwf[0], x)
    for epoch in range(hyper.epochs):
        order = rng.permutation(n)
        for start in range(0, n, hyper.batch_size):
            idx = order[start : start + hyper.batch_size]
            bx, by = x[idx], y[idx]
            distil = slice(0, idx.shape[0])  # the rows LwF distils
            classes: np.ndarray | None = None if lwf is None else lwf[1]
            old = None if old_new is None else old_new[idx]
            if replay is not None:
                ridx = rng.integers(0, replay[1].shape[0], size=idx.shape[0])
                bx = np.concatenate([bx, replay[0][ridx]])
                by = np.concatenate([by, replay[1][ridx]])
                distil = slice(idx.shape[0], 2 * idx.shape[0])
                old = None if old_replay is None else old_replay[ridx]
                classes = None  # old samples: the old head's whole output is the target
            model = _at_quantised_weights(out, fake_quant)
            acts, logits = _forward(model, out.standardise(bx))
            _, dlogits = cross_entropy(logits, by)
            if lwf is not None and old is not None:
                _, g = lwf_loss(logits[distil], old, hyper.temperature, hyper.lwf_alpha, classes)
                dlogits[distil] += g
            grads = _backward(model, acts, dlogits)
            _add_penalties(grads, params, hyper, ewc, prox)
            sgd_step(grads, params, velocity, hyper)
        if progress is not None:
            progress((epoch + 1) / hyper.epochs)
    return out


def sgd_step(
    grads: list[np.ndarray], params: list[np.ndarray], velocity: list[np.ndarray], hyper: Hyper
) -> None:
    """One step of SGD with momentum, in place: weight decay on the weights (every other
    array; not the biases), the gradients clipped to ``hyper.clip_norm`` together."""
    lr, mu, wd = _F32(hyper.lr), _F32(hyper.momentum), _F32(hyper.weight_decay)
    for i in range(0, len(grads), 2):  # weights only, not biases
        grads[i] += wd * params[i]
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    factor = _F32(hyper.clip_norm / norm) if norm > hyper.clip_norm else _F32(1.0)
    for i, g in enumerate(grads):
        velocity[i] *= mu
        velocity[i] += factor * g
        params[i] -= lr * velocity[i]


def _add_penalties(
    grads: list[np.ndarray],
    params: list[np.ndarray],
    hyper: Hyper,
    ewc: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None,
    prox: tuple[float, Sequence[np.ndarray]] | None,
) -> None:
    """Add the EWC penalty's gradient and FedProx's ``mu * (theta - theta_global)``."""
    if ewc is not None:
        _, extra = ewc_penalty(params, ewc[1], ewc[0], hyper.ewc_lambda)
        for i, e in enumerate(extra):
            grads[i] += e
    if prox is not None:
        for i, anchor in enumerate(prox[1]):
            grads[i] += _F32(prox[0]) * (params[i] - anchor)


def _at_quantised_weights(
    head: Head, fake_quant: Callable[[np.ndarray], np.ndarray] | None
) -> Head:
    """``head`` with ``fake_quant(W)`` for each weight matrix (sharing the other arrays);
    ``head`` itself without ``fake_quant``."""
    if fake_quant is None:
        return head
    return Head([fake_quant(w) for w in head.weights], head.biases, head.mean, head.scale)


def _forward(head: Head, z: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Activations entering each layer (``acts[0]`` is the standardised input) and logits."""
    acts = [z]
    h = z
    last = head.layers - 1
    for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
        h = h @ w + b
        if i < last:
            np.maximum(h, 0, out=h)
            acts.append(h)
    return acts, h


def _backward(head: Head, acts: list[np.ndarray], dlogits: np.ndarray) -> list[np.ndarray]:
    """Gradients in :meth:`Head.params` order."""
    grads: list[np.ndarray] = [np.empty(0)] * (2 * head.layers)
    delta = dlogits
    for i in reversed(range(head.layers)):
        grads[2 * i] = acts[i].T @ delta
        grads[2 * i + 1] = delta.sum(axis=0)
        if i:
            delta = (delta @ head.weights[i].T) * (acts[i] > 0)
    return grads


def _chunked_logits(head: Head, x: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], head.classes), dtype=_F32)
    for start in range(0, x.shape[0], _CHUNK):
        out[start : start + _CHUNK] = head.logits(x[start : start + _CHUNK])
    return out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - np.max(z, axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return out


def _check_labels(labels: np.ndarray, classes: int) -> None:
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise ValueError(f"label {int(bad)} out of range: the head has classes 0..{classes - 1}")


def _check_samples(
    head: Head, features: np.ndarray, labels: np.ndarray, *, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[1] != head.in_dim:
        raise ValueError(f"features must have shape (N, {head.in_dim}), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"features must be real numbers, got dtype {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError("no samples")
    _check_labels(y, head.classes)
    xf = x.astype(_F32, copy=False)
    if not np.all(np.isfinite(xf)):
        raise ValueError("features contain NaN or infinity (or values beyond float32)")
    return xf, y.astype(np.int64, copy=False)


def _check_state_for(head: Head, state: LearnState, strategy: str, parts: frozenset[str]) -> None:
    for name, buffer in (("holdout", state.holdout), ("replay", state.replay)):
        if buffer is not None and buffer.dim != head.in_dim:
            raise ValueError(
                f"the state's {name} buffer holds {buffer.dim}-dim features, "
                f"the head takes {head.in_dim}"
            )
    if state.lda is not None and (
        state.lda.dim != head.in_dim or state.lda.classes != head.classes
    ):
        raise ValueError("the state's LDA statistics do not match the head's shape")
    if state.known is not None and state.known.shape != (head.classes,):
        raise ValueError(
            f"the state knows {state.known.shape[0]} classes, the head has {head.classes}"
        )
    if state.anchor is not None and state.anchor.in_dim != head.in_dim:
        raise ValueError("the state's EWC anchor takes features of another dimension")
    missing = [
        what
        for part, what, present in (
            ("replay", "a replay buffer", state.replay is not None),
            ("ewc", "Fisher information", state.fisher is not None and state.anchor is not None),
            ("lda", "LDA statistics", state.lda is not None),
        )
        if part in parts and not present
    ]
    if missing:
        raise ValueError(
            f"strategy {strategy!r} needs {missing[0]}, which this learning state lacks; "
            f"build the state with initial_state(..., strategy={strategy!r})"
        )
    fisher_shapes = None if state.fisher is None else [f.shape for f in state.fisher]
    if "ewc" in parts and fisher_shapes != [p.shape for p in head.params()]:
        raise ValueError(
            "the state's Fisher information is for a head of another shape; "
            f"strategy {strategy!r} cannot use it"
        )


def _get(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"{name} is missing")
    return np.asarray(arrays[name])
