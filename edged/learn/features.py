"""A trainable model's frozen backbone, run through the HAL: what turns inputs into the
features the head is trained on.

The served graph is the backbone and the head composed into one ONNX model
(``edged.learn.graph.compose``); the features are not one of its outputs. So the version's
``backbone.onnx`` is loaded as a model of its own, by an executor the HAL registry finds
(``hal.registry.get_executor``) through the contract of ``hal.executor`` (``load`` checks the
format and wraps failures, ``infer`` checks the inputs and wraps failures): the same executor
kinds, thread options and simulated executors as serving, and no runtime session that edged
does not see.

- The daemon (``Backbones``, for AddSamples) loads it on the kinds the served version is
  placed on, the one it runs on first, with one runtime thread (intake must not take cores
  from serving), once per trainable model that receives samples, and replaces it when
  another version is served.
- The fine-tune worker (``open_backbone`` on ``WORKER_KINDS``) loads it on the CPU for the
  self-test it writes: the worker runs under an address-space limit and must not open a
  device the daemon holds.

Why not the served model's own sessions: the features would have to become an output of the
served graph, which every client would then see in its metadata and get in every response
that names no outputs, and intake would pass through the model's batcher, statistics and OTA
health window. Why not featurise in the worker: the store would hold raw inputs (for an image
model a hundred times the bytes of its features, under the same ``learn.max_store_bytes``),
intake could no longer refuse inputs whose features are not finite, and each job would rerun
the backbone over every sample it trains on. docs/learning.md ("Features") weighs the memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import structlog

from edged.core.errors import InvalidInputError, ModelLoadError, UnavailableError
from edged.core.types import Array
from hal.executor import ExecutorOptions, LoadedModel, ModelArtifact
from hal.registry import get_executor

log = structlog.get_logger("edged.learn")

#: a backbone's runtime threads: one, in the daemon (beside serving) and in the worker
BACKBONE_OPTIONS = ExecutorOptions(intra_op_threads=1, inter_op_threads=1)

#: the kinds the fine-tune worker loads a backbone on
WORKER_KINDS = ("cpu-onnx",)


class Backbone:
    """One backbone loaded by a HAL executor. ``features`` may be called from several
    threads: the contract runs one inference at a time per loaded model, so calls queue."""

    def __init__(self, loaded: LoadedModel, path: Path, output: str) -> None:
        self.loaded = loaded
        self.path = path
        self.output = output
        self._lock = threading.Lock()
        self._closed = False

    @property
    def kind(self) -> str:
        """The executor kind it was loaded on."""
        return self.loaded.kind

    def features(self, inputs: Mapping[str, Array]) -> Array | None:
        """The backbone's ``output`` for ``inputs`` (already checked against the model's
        signature), as float32; None once closed. Blocking: call from a worker thread.

        Raises:
            InvalidInputError: an input the backbone needs is missing.
            ExecutorError: the executor failed (the cause is chained).
        """
        with self._lock:
            if self._closed:
                return None
            outputs = self.loaded.infer(inputs)
        return np.asarray(outputs[self.output], dtype=np.float32)

    def close(self) -> None:
        """Close it once a call running on it has finished; idempotent."""
        with self._lock:
            self._closed = True
        self.loaded.close()


def open_backbone(
    path: Path,
    output: str,
    kinds: Sequence[str],
    options: ExecutorOptions = BACKBONE_OPTIONS,
) -> Backbone:
    """Load the ONNX backbone at ``path`` on the first of ``kinds`` that loads it.
    Blocking: call from a worker thread.

    Raises:
        ModelLoadError: no kind could load it (each kind's reason), or it has no output
            ``output`` (model.toml's ``[learn] features``).
    """
    artifact = ModelArtifact(path, "onnx")
    refused: list[str] = []
    for kind in dict.fromkeys(kinds):
        try:
            loaded = get_executor(kind).load(artifact, options)
        except ModelLoadError as e:
            refused.append(str(e) if str(e).startswith(f"{kind}") else f"{kind}: {e}")
            continue
        if loaded.signature.output(output) is None:
            loaded.close()
            raise ModelLoadError(
                f"backbone {path.name} has no output '{output}' (model.toml's [learn] "
                f"features; it has: {', '.join(t.name for t in loaded.signature.outputs)})"
            )
        return Backbone(loaded, path, output)
    raise ModelLoadError(
        f"no executor could load backbone {path}: {'; '.join(refused) or 'no candidate'}"
    )


class Backbones:
    """The daemon's backbones: one per trainable model that received samples, of its served
    version (a newly served version's replaces the old one's, which is closed)."""

    def __init__(self, options: ExecutorOptions = BACKBONE_OPTIONS) -> None:
        self._options = options
        self._loaded: dict[str, Backbone] = {}
        self._lock = threading.Lock()
        self._closed = False

    def features(
        self, model: str, path: Path, output: str, kinds: Sequence[str], inputs: Mapping[str, Array]
    ) -> Array:
        """``model``'s backbone at ``path`` (loaded on the first of ``kinds`` that takes it,
        unless loaded already) run on ``inputs``. Blocking: call from a worker thread.

        Raises:
            UnavailableError: closed (edged is stopping).
            ModelLoadError: as ``open_backbone``.
            InvalidInputError, ExecutorError: as ``Backbone.features``.
        """
        while True:  # a backbone replaced (and closed) meanwhile answers None: take the new one
            features = self._backbone(model, path, output, kinds).features(inputs)
            if features is not None:
                return features

    def _backbone(self, model: str, path: Path, output: str, kinds: Sequence[str]) -> Backbone:
        with self._lock:
            if self._closed:
                raise UnavailableError("edged is shutting down")
            backbone = self._loaded.get(model)
            if backbone is not None and backbone.path == path and backbone.output == output:
                return backbone
            fresh = open_backbone(path, output, kinds, self._options)
            self._loaded[model] = fresh
        log.info("learn_backbone_loaded", model=model, path=str(path), executor=fresh.kind)
        if backbone is not None:
            backbone.close()
        return fresh

    def close(self) -> None:
        """Close every backbone (the daemon stops); later calls are refused."""
        with self._lock:
            self._closed = True
            loaded, self._loaded = self._loaded, {}
        for backbone in loaded.values():
            backbone.close()


def check_features(features: Array, count: int, output: str) -> None:
    """Features fit to store: float [count, D] and finite.

    Raises:
        InvalidInputError: naming the backbone output and what is wrong with it.
    """
    if features.ndim != 2 or features.shape[0] != count:
        raise InvalidInputError(
            f"the backbone's '{output}' output has shape {list(features.shape)}; "
            f"expected [{count}, D]"
        )
    if not np.isfinite(features).all():
        raise InvalidInputError("the inputs give non-finite backbone features")
