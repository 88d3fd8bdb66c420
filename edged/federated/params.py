"""A head as the flat list of arrays Flower carries (pure NumPy, no I/O).

Order: ``mean, scale, W_0, b_0, W_1, b_1, ...``. The standardisation travels with the weights
so that every client trains in the same coordinates (federated fits keep it fixed); only
these arrays leave a device, never samples or features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edged.learn.head import Head


def head_to_arrays(head: Head) -> list[np.ndarray]:
    """The head's arrays in wire order (float32 copies)."""
    out = [np.asarray(head.mean, np.float32), np.asarray(head.scale, np.float32)]
    for w, b in zip(head.weights, head.biases, strict=True):
        out += [np.asarray(w, np.float32), np.asarray(b, np.float32)]
    return [a.copy() for a in out]


def head_from_arrays(arrays: Sequence[np.ndarray]) -> Head:
    """Inverse of :func:`head_to_arrays`, checking every shape.

    Raises:
        ValueError: an odd number of layer arrays, or shapes that do not chain (named).
    """
    if len(arrays) < 4 or len(arrays) % 2:
        raise ValueError(
            f"a head travels as mean, scale and (weight, bias) pairs; got {len(arrays)} arrays"
        )
    named = {"mean": arrays[0], "scale": arrays[1]}
    for i in range((len(arrays) - 2) // 2):
        named[f"weight.{i}"] = arrays[2 + 2 * i]
        named[f"bias.{i}"] = arrays[3 + 2 * i]
    return Head.from_arrays({k: np.asarray(v, np.float32) for k, v in named.items()})


def payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of array data a client sends per round (Flower adds a small envelope)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))
