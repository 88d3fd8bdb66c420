"""The pure half of dynamic batching: which requests may share a batch, how to merge their
tensors along the batch axis, how to split the outputs back, and how big a batch to take.

No I/O, no clocks, no asyncio: the scheduler (``edged.serving.scheduler``) does those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edged.core.errors import ExecutorError
from edged.core.types import Array

#: requests with equal keys can be concatenated along axis 0
BatchKey = tuple[tuple[str, str, tuple[int, ...]], ...]


def batch_key(inputs: Mapping[str, Array]) -> BatchKey:
    """What must match for two requests to share a batch: every input's name, dtype and
    non-batch dims."""
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


def merge(requests: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """One batch from requests with the same ``batch_key``: each input concatenated along
    axis 0 in request order. A single request is returned as it is (no copy)."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in requests[0]}


def split(outputs: Mapping[str, Array], sizes: Sequence[int]) -> list[dict[str, Array]]:
    """The inverse of ``merge``: each output cut along axis 0 into pieces of ``sizes``
    (views, no copy).

    Raises:
        ExecutorError: an output's axis 0 is not the sum of ``sizes`` (the model does not
            keep the batch on axis 0).
    """
    if len(sizes) == 1:
        return [dict(outputs)]
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ExecutorError(
                f"output '{name}' has shape {list(array.shape)}, but the batch has {total} "
                "items on axis 0"
            )
    parts: list[dict[str, Array]] = []
    start = 0
    for size in sizes:
        end = start + size
        parts.append({name: array[start:end] for name, array in outputs.items()})
        start = end
    return parts


@dataclass(frozen=True)
class BatchPolicy:
    """How the scheduler forms batches for one model."""

    max_batch_size: int = 0
    """Items per batch; 0 or 1: requests run one at a time."""
    max_queue_delay_ns: int = 0
    """How long the oldest request may wait for a fuller batch; 0: take what is queued."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Sizes worth dispatching at once, without waiting for the delay."""


def take(policy: BatchPolicy, sizes: Sequence[int], oldest_wait_ns: int) -> int:
    """How many of the queued compatible requests (their item counts in ``sizes``, oldest
    first) to dispatch now; 0 means wait for more.

    The prefix taken never exceeds ``max_batch_size`` items (a first request alone always
    fits: validation bounds it). Dispatch at once when the batch is full, when a preferred size
    is reached, or when the oldest request has waited ``max_queue_delay_ns``.
    """
    if not sizes:
        return 0
    limit = max(1, policy.max_batch_size)
    count = 0
    items = 0
    for size in sizes:
        if count and items + size > limit:
            return count  # the next one does not fit: this batch is full
        count += 1
        items += size
    preferred = policy.preferred_batch_sizes
    ready = (
        items >= limit
        or items in preferred
        or (bool(preferred) and items >= max(preferred))
        or oldest_wait_ns >= policy.max_queue_delay_ns
    )
    return count if ready else 0
