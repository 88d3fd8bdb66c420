"""A head as the flat list of arrays Flower carries (pure NumPy, no I/O).

Only the dense layers travel: ``W_0, b_0, W_1, b_1, ...``, with the feature standardisation
folded into the first layer (the head as a function of the raw backbone features). Devices
whose heads standardise differently (each refits its standardisation when it fine-tunes
locally) so average functions in one coordinate system, and a server-side transform (FedAdam's
step, DP noise) never touches a scale that must stay positive. A device unfolds what it
receives into its own standardisation (``like``), which computes the same function. Only these
arrays leave a device, never samples or features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edged.learn.head import Head
from edged.learn.strategies import restandardise


def head_to_arrays(head: Head) -> list[np.ndarray]:
    """The head's layers in wire order, standardisation folded in (float32 copies)."""
    dim = head.in_dim
    folded = restandardise(head, np.zeros(dim, np.float32), np.ones(dim, np.float32))
    out: list[np.ndarray] = []
    for w, b in zip(folded.weights, folded.biases, strict=True):
        out += [np.array(w, np.float32), np.array(b, np.float32)]
    return out


def head_from_arrays(arrays: Sequence[np.ndarray], like: Head | None = None) -> Head:
    """Inverse of :func:`head_to_arrays`: the same function, standardised as ``like`` is
    (identity standardisation without it).

    Raises:
        ValueError: an odd number of arrays, shapes that do not chain, or that do not fit
            ``like``'s features (named).
    """
    if len(arrays) < 2 or len(arrays) % 2:
        raise ValueError(f"a head travels as (weight, bias) pairs; got {len(arrays)} arrays")
    first = np.asarray(arrays[0])
    if first.ndim != 2:
        raise ValueError(f"weight.0 must be 2-D, got shape {first.shape}")
    dim = first.shape[0]
    named = {"mean": np.zeros(dim, np.float32), "scale": np.ones(dim, np.float32)}
    for i in range(len(arrays) // 2):
        named[f"weight.{i}"] = np.asarray(arrays[2 * i], np.float32)
        named[f"bias.{i}"] = np.asarray(arrays[2 * i + 1], np.float32)
    head = Head.from_arrays(named)
    if like is None:
        return head
    if like.in_dim != dim:
        raise ValueError(f"weight.0 has {dim} rows, the device's head takes {like.in_dim}")
    return restandardise(head, like.mean, like.scale)


def payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of array data a client sends per round (Flower adds a small envelope)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))
