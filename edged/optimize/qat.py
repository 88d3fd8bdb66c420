"""Quantisation-aware training of a head against the INT8 graph ONNX Runtime will run.

``int8-static-minmax`` (edged.optimize.methods) quantises the served graph with
``onnxruntime.quantization.quantize_static``: QDQ, activations uint8 per tensor
(asymmetric, MinMax ranges over the first ``calibration_samples`` calibration rows, each
range widened to hold 0), weights int8 per output channel (symmetric, ``[-127, 127]``,
``scale = max|w| / 127``), biases int32 at ``input scale * weight scale``. On a head
(``(features - mean) / scale``, Gemm, ReLU, ..., Gemm, Softmax) that places quantisers at

- the standardised features (``head_standardised``): one range for every feature;
- each hidden layer's ReLU output (ONNX Runtime gives the Gemm before a ReLU the ReLU's
  range, so the clamp at 0 is the ReLU);
- the logits (ArgMax reads the uint8 logits: equal ones go to the first class);
- the probabilities (Softmax's range is fixed to ``[0, 1]``).

:class:`Int8Head` computes exactly that in NumPy (float arithmetic on the dequantised
values; ONNX Runtime's QGemm accumulates in int32 and requantises once, so the two agree to
within one step of each quantiser, tests/unit/test_optimize_qat.py). :func:`train_qat`
trains through it: the forward pass runs at those quantisers, the backward pass passes
the gradient straight through each rounding and stops it where a value was clamped (the
straight-through estimator), and the float weights are what the optimiser moves. The
activation ranges are what ONNX Runtime's MinMax calibration will find for the current
weights: recomputed from the calibration rows at every step.

The earlier QAT (weights only, at ``2 max|w| / 255``, no activation quantiser, trained on
the float backbone's features) missed what costs accuracy where INT8 loses
(docs/optimize-qat.md): the head's own quantisers cost at most a few tenths of a point on
every head measured; the loss is in the features an INT8 backbone hands the head. The
``qat`` method (edged.optimize.head) therefore trains on the features the INT8 graph's
backbone gives, through this head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edged.learn.head import Head, softmax
from edged.learn.strategies import Hyper, cross_entropy, sgd_step

WEIGHT_QMAX = 127
"""ONNX Runtime's symmetric int8 weight range is ``[-127, 127]`` (``get_qmin_qmax_for_qType``
with ``symmetric=True``)."""

ACT_QMAX = 255
"""Activations are uint8, ``[0, 255]``."""

_F32 = np.float32


def weight_scale(weights: np.ndarray) -> np.ndarray:
    """Per output column of ``weights`` ``(in, out)``, ONNX Runtime's symmetric int8 scale
    ``2 max|w| / 254`` (computed in float64, stored as float32; 1.0 for an all-zero
    column, as ONNX Runtime does for a scale below float32's smallest normal)."""
    absmax = np.max(np.abs(np.asarray(weights, dtype=np.float64)), axis=0)
    scale = (2 * absmax) / (2 * WEIGHT_QMAX)
    out: np.ndarray = np.where(scale < np.finfo(_F32).tiny, 1.0, scale).astype(_F32)
    return out


def quantise_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weights`` ``(in, out)`` as ONNX Runtime's per-channel int8: the int8 values and the
    per-column scales."""
    scale = weight_scale(weights)
    q = np.clip(np.round(np.asarray(weights, dtype=_F32) / scale), -WEIGHT_QMAX, WEIGHT_QMAX)
    return q.astype(np.int8), scale


def fake_quant_weights(weights: np.ndarray) -> np.ndarray:
    """``weights`` quantised to int8 as :func:`quantise_weights` and dequantised."""
    q, scale = quantise_weights(weights)
    out: np.ndarray = q.astype(_F32) * scale
    return out


@dataclass(frozen=True)
class ActRange:
    """One uint8 activation quantiser: the calibrated range (``low`` <= ``high``) and the
    scale and zero point ONNX Runtime's ``compute_scale_zp`` derives from it."""

    low: float
    high: float

    @classmethod
    def of(cls, values: np.ndarray) -> ActRange:
        """MinMax calibration: the smallest and largest of ``values``."""
        return cls(float(np.min(values)), float(np.max(values)))

    @property
    def scale(self) -> np.float32:
        """``(rmax - rmin) / 255`` over the range widened to hold 0 (1.0 for an empty one)."""
        lo, hi = min(self.low, 0.0), max(self.high, 0.0)
        s = (np.float64(_F32(hi)) - np.float64(_F32(lo))) / ACT_QMAX
        return _F32(1.0) if s < np.finfo(_F32).tiny else _F32(s)

    @property
    def zero_point(self) -> int:
        """``round(-rmin / scale)`` in ``[0, 255]``."""
        lo, hi = min(self.low, 0.0), max(self.high, 0.0)
        s = (np.float64(_F32(hi)) - np.float64(_F32(lo))) / ACT_QMAX
        if s < np.finfo(_F32).tiny:
            return 0
        return int(np.clip(np.round(-np.float64(_F32(lo)) / s), 0, ACT_QMAX))

    def quantise(self, x: np.ndarray) -> np.ndarray:
        """``x`` as ONNX's QuantizeLinear makes it: ``saturate(round(x / scale) + zp)``,
        rounding half to even, as uint8 codes (in a float32 array)."""
        q: np.ndarray = np.clip(np.round(x / self.scale) + self.zero_point, 0, ACT_QMAX)
        return q.astype(_F32)

    def fake(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` quantised and dequantised, and where the gradient passes (not clamped)."""
        q = self.quantise(x)
        passes = (q > 0) & (q < ACT_QMAX)
        out: np.ndarray = ((q - self.zero_point) * self.scale).astype(_F32)
        return out, passes

    @property
    def step(self) -> float:
        """One quantisation step (the scale), a float."""
        return float(self.scale)


PROBABILITY_RANGE = ActRange(0.0, 1.0)
"""ONNX Runtime fixes a Softmax output's range to ``[0, 1]`` (``adjust_tensor_ranges``)."""


@dataclass(frozen=True)
class Int8Head:
    """A head as ONNX Runtime's static INT8 graph computes it: ``ranges[0]`` quantises the
    standardised features, ``ranges[1 + i]`` hidden layer ``i``'s ReLU output, ``ranges[-1]``
    the logits."""

    head: Head
    ranges: tuple[ActRange, ...]

    @classmethod
    def calibrate(cls, head: Head, features: np.ndarray) -> Int8Head:
        """The quantisers ONNX Runtime's MinMax calibration finds for ``head`` on
        ``features`` (run in float, as the calibrator runs the float graph)."""
        h = head.standardise(features)
        ranges = [ActRange.of(h)]
        last = head.layers - 1
        for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
            h = h @ w + b
            if i < last:
                np.maximum(h, 0, out=h)
            ranges.append(ActRange.of(h))
        return cls(head, tuple(ranges))

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The dequantised uint8 logits."""
        return self.forward(features)[0]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The served ``probabilities``: softmax of the quantised logits, quantised to uint8
        on ``[0, 1]`` and dequantised."""
        return PROBABILITY_RANGE.fake(softmax(self.logits(features)))[0]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The class the served graph decides from ``probabilities`` (first of equals)."""
        decided: np.ndarray = np.argmax(self.probabilities(features), axis=1).astype(np.int64)
        return decided

    def forward(
        self, features: np.ndarray, head: Head | None = None
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Logits, the (quantised) input of every layer, every layer's dequantised weights,
        and where the gradient passes each activation quantiser; ``head`` (default the
        calibrated one) gives the weights, this object's ranges the quantisers."""
        head = self.head if head is None else head
        acts: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        h, passes = self.ranges[0].fake(head.standardise(features))
        last = head.layers - 1
        for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
            acts.append(h)
            masks.append(passes)
            wq, w_scale = quantise_weights(w)
            wd = wq.astype(_F32) * w_scale
            weights.append(wd)
            bias_scale = (self.ranges[i].scale * w_scale).astype(_F32)
            bq = np.round(b / bias_scale) * bias_scale
            y = h @ wd + bq.astype(_F32)
            # before a ReLU the range starts at 0 (the clamp is the ReLU); the gradient
            # stops where the ReLU or the top of the range clamped
            h, passes = self.ranges[i + 1].fake(y)
            if i < last:
                passes &= y > 0
        masks.append(passes)
        return h, acts, weights, masks


def train_qat(
    head: Head,
    features: np.ndarray,
    labels: np.ndarray,
    calibration: np.ndarray,
    hyper: Hyper,
    seed: int,
    *,
    progress: Callable[[float], None] | None = None,
) -> Head:
    """Fine-tune ``head`` (not changed; the trained copy is returned) on ``features`` and
    ``labels`` through :class:`Int8Head`, whose ranges are what ONNX Runtime's MinMax
    calibration on ``calibration`` (the rows it will calibrate on) finds for the current
    weights, recomputed at every step. SGD with momentum, weight decay and gradient
    clipping as edged.learn's trainer (``hyper``'s ``lr``, ``momentum``, ``weight_decay``,
    ``clip_norm``, ``epochs``, ``batch_size``); softmax cross-entropy on the labels.

    Raises:
        ValueError: shapes that do not match the head, labels out of range.
    """
    x = np.asarray(features, dtype=_F32)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[1] != head.in_dim or y.shape != (x.shape[0],):
        raise ValueError(f"features {x.shape} and labels {y.shape} do not fit the head")
    if y.size and (y.min() < 0 or y.max() >= head.classes):
        raise ValueError(f"labels must be in [0, {head.classes}), got {y.min()}..{y.max()}")
    out = head.copy()
    params = out.params()
    velocity = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng([seed, 0])
    n = x.shape[0]
    for epoch in range(hyper.epochs):
        order = rng.permutation(n)
        for start in range(0, n, hyper.batch_size):
            idx = order[start : start + hyper.batch_size]
            sim = Int8Head.calibrate(out, calibration)
            logits, acts, weights, masks = sim.forward(x[idx], out)
            _, dlogits = cross_entropy(logits, y[idx])
            grads = _backward(acts, weights, masks, dlogits)
            sgd_step(grads, params, velocity, hyper)
        if progress is not None:
            progress((epoch + 1) / hyper.epochs)
    return out


def _backward(
    acts: list[np.ndarray],
    weights: list[np.ndarray],
    masks: list[np.ndarray],
    dlogits: np.ndarray,
) -> list[np.ndarray]:
    """Gradients in :meth:`Head.params` order, straight through every rounding, zero where
    a quantiser (or a ReLU) clamped."""
    layers = len(weights)
    grads: list[np.ndarray] = [np.empty(0)] * (2 * layers)
    delta = dlogits * masks[layers]
    for i in reversed(range(layers)):
        grads[2 * i] = acts[i].T @ delta
        grads[2 * i + 1] = delta.sum(axis=0)
        if i:
            delta = (delta @ weights[i].T) * masks[i]
    return grads
