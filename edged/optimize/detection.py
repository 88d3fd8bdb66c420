"""Task accuracy of a text detector with a DBNet probability map (PP-OCR's detector):
boxes from the map, matched to known boxes, precision/recall/F1 at an IoU threshold
(ICDAR-style, axis-aligned). Pure NumPy, no I/O.

Boxes from a map follow DBNet's post-processing as PP-OCR/RapidOCR run it, on axis-aligned
boxes: pixels above ``thresh`` (0.3), 4-connected regions, a region kept when its mean
probability is at least ``box_thresh`` (0.5) and its box at least ``min_size`` (3) pixels
on the short side, its box grown by ``D = area * unclip / perimeter`` on each side (the
network predicts text shrunk by that rule; ``unclip`` 1.6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]
"""x0, y0, x1, y1 (pixels; x1, y1 exclusive)."""


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected regions of the 2-D boolean ``mask``: an int array, 0 outside, each
    region one positive label (the smallest flat index in it, plus one)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        best = labels.copy()
        best[1:, :] = np.minimum(best[1:, :], labels[:-1, :])
        best[:-1, :] = np.minimum(best[:-1, :], labels[1:, :])
        best[:, 1:] = np.minimum(best[:, 1:], labels[:, :-1])
        best[:, :-1] = np.minimum(best[:, :-1], labels[:, 1:])
        best = np.where(mask, best, big)
        flat = best.reshape(-1)
        inside = flat < big
        flat[inside] = flat[flat[inside] - 1]  # jump to the label's own label
        if np.array_equal(best, labels):
            break
        labels = best
    return np.where(mask, labels, 0)


def detect_boxes(
    prob: np.ndarray,
    thresh: float = 0.3,
    box_thresh: float = 0.5,
    unclip: float = 1.6,
    min_size: int = 3,
) -> list[Box]:
    """Text boxes from one probability map ``prob`` [H, W] (module docstring)."""
    labels = components(prob > thresh)
    h, w = prob.shape
    boxes: list[Box] = []
    for label in np.unique(labels[labels > 0]):
        ys, xs = np.nonzero(labels == label)
        x0, x1 = float(xs.min()), float(xs.max() + 1)
        y0, y1 = float(ys.min()), float(ys.max() + 1)
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < min_size or float(prob[ys, xs].mean()) < box_thresh:
            continue
        grow = bw * bh * unclip / (2 * (bw + bh))
        boxes.append((
            max(0.0, x0 - grow), max(0.0, y0 - grow), min(float(w), x1 + grow),
            min(float(h), y1 + grow),
        ))  # fmt: skip
    return boxes


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Detection:
    """Boxes found against boxes known, over every page."""

    matched: int
    found: int
    known: int

    @property
    def precision(self) -> float:
        return self.matched / self.found if self.found else 1.0

    @property
    def recall(self) -> float:
        return self.matched / self.known if self.known else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def match(found: Sequence[Box], known: Sequence[Box], threshold: float = 0.5) -> int:
    """How many of ``found`` pair one-to-one with a box of ``known`` at IoU >= ``threshold``
    (greedy, best pairs first)."""
    pairs = sorted(
        ((iou(f, k), i, j) for i, f in enumerate(found) for j, k in enumerate(known)),
        reverse=True,
    )
    used_f: set[int] = set()
    used_k: set[int] = set()
    for score, i, j in pairs:
        if score < threshold:
            break
        if i not in used_f and j not in used_k:
            used_f.add(i)
            used_k.add(j)
    return len(used_f)


def evaluate(maps: np.ndarray, known: Sequence[Sequence[Box]], threshold: float = 0.5) -> Detection:
    """Detection figures of probability maps ``maps`` [N, 1, H, W] (or [N, H, W]) against
    the ``known`` boxes of each page."""
    maps = maps.reshape(maps.shape[0], *maps.shape[-2:])
    if len(known) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but boxes for {len(known)} pages")
    matched = found = total = 0
    for prob, boxes in zip(maps, known, strict=True):
        detected = detect_boxes(prob)
        matched += match(detected, boxes, threshold)
        found += len(detected)
        total += len(boxes)
    return Detection(matched, found, total)
