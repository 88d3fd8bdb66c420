"""The trainable head of a model: standardise features, dense layers, softmax. Pure NumPy.

A model that learns on the device is a frozen backbone (served as ONNX) followed by a small
:class:`Head`. The head standardises the backbone's features with a fixed ``mean`` and
``scale``, applies dense layers with ReLU between them, and ends in a softmax::

    z = (features - mean) / scale
    h = relu(z @ W_0 + b_0) ... relu(. @ W_{L-2} + b_{L-2})
    logits = h @ W_{L-1} + b_{L-1}

Everything is float32, the dtype the ONNX graph computes in (see :mod:`edged.learn.graph`).
Heads are stored as ``.npz`` files written by :func:`write_npz`: no pickle, and byte-identical
output for identical arrays, so a rebuilt model can be compared with the one on disk.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

DEFAULT_VARIANCE_FLOOR = 1e-2
"""Smallest variance a feature is standardised with (its scale is at least the square root)."""

_FLOAT32 = np.dtype(np.float32)
_LAYER_KEY = re.compile(r"(weight|bias)\.(\d+)")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest timestamp a zip entry can carry

PathOrFile = str | os.PathLike[str] | BinaryIO


@dataclass
class Head:
    """Trainable head: standardise features, dense layers with ReLU between, softmax at the end.

    ``weights[i]`` has shape ``(in_i, out_i)`` and ``biases[i]`` shape ``(out_i,)``; layer
    ``i + 1`` takes layer ``i``'s output. Build one with :func:`init_head` or
    :meth:`from_arrays`, which check the shapes; the constructor itself does not.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    mean: np.ndarray
    scale: np.ndarray

    @property
    def in_dim(self) -> int:
        """Number of features the head takes."""
        return int(self.mean.shape[0])

    @property
    def classes(self) -> int:
        """Number of classes (outputs of the last layer)."""
        return int(self.biases[-1].shape[0])

    @property
    def layers(self) -> int:
        """Number of dense layers."""
        return len(self.weights)

    def standardise(self, features: np.ndarray) -> np.ndarray:
        """``(features - mean) / scale`` as float32; raises ValueError on a wrong shape."""
        x = _features(features, self.in_dim)
        z: np.ndarray = (x - self.mean) / self.scale
        return z

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Pre-softmax outputs, float32 of shape ``(N, classes)``.

        Raises:
            ValueError: ``features`` is not a 2-D array with ``in_dim`` columns.
        """
        h = self.standardise(features)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                np.maximum(h, 0, out=h)
        return h

    def proba(self, features: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Class probabilities ``softmax(logits / temperature)``, float32 ``(N, classes)``."""
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        return softmax(self.logits(features) / np.float32(temperature))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class per row, int64 ``(N,)`` (the argmax of the logits)."""
        labels: np.ndarray = np.argmax(self.logits(features), axis=1).astype(np.int64)
        return labels

    def copy(self) -> Head:
        """A deep copy: no array is shared with this head."""
        return Head(
            weights=[w.copy() for w in self.weights],
            biases=[b.copy() for b in self.biases],
            mean=self.mean.copy(),
            scale=self.scale.copy(),
        )

    def params(self) -> list[np.ndarray]:
        """The trainable arrays in a fixed order: ``[W_0, b_0, W_1, b_1, ...]`` (not copies)."""
        out: list[np.ndarray] = []
        for w, b in zip(self.weights, self.biases, strict=True):
            out += [w, b]
        return out

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The head as named arrays (``mean``, ``scale``, ``weight.<i>``, ``bias.<i>``, each
        name preceded by ``prefix``), for :func:`write_npz`; :meth:`from_arrays` inverts it
        exactly."""
        arrays = {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"{prefix}weight.{i}"] = w
            arrays[f"{prefix}bias.{i}"] = b
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = "") -> Head:
        """Rebuild a head from :meth:`to_arrays`'s output, checking every shape.

        Names that do not start with ``prefix`` are ignored, so a head can share a file with
        other arrays.

        Raises:
            ValueError: an array is missing, not a finite floating-point array, has the wrong
                number of dimensions, or does not chain with its neighbours; the message names
                the array.
        """
        mean = _float_array(arrays, f"{prefix}mean", ndim=1)
        scale = _float_array(arrays, f"{prefix}scale", ndim=1)
        if mean.shape[0] == 0:
            raise ValueError(f"{prefix}mean is empty: a head takes at least one feature")
        if scale.shape != mean.shape:
            raise ValueError(
                f"{prefix}scale has shape {scale.shape}, {prefix}mean has {mean.shape}"
            )
        if not np.all(scale > 0):
            raise ValueError(f"{prefix}scale has entries <= 0 (at index {_first(scale <= 0)})")
        indices = set()
        for name in arrays:
            if name.startswith(prefix):
                match = _LAYER_KEY.fullmatch(name[len(prefix) :])
                if match:
                    indices.add(int(match.group(2)))
        if not indices:
            raise ValueError(f"no layers: {prefix}weight.0 is missing")
        if indices != set(range(len(indices))):
            missing = min(set(range(max(indices) + 1)) - indices)
            raise ValueError(f"layers are not numbered 0..{max(indices)}: layer {missing} missing")
        weights: list[np.ndarray] = []
        biases: list[np.ndarray] = []
        width = mean.shape[0]
        for i in range(len(indices)):
            w = _float_array(arrays, f"{prefix}weight.{i}", ndim=2)
            b = _float_array(arrays, f"{prefix}bias.{i}", ndim=1)
            if w.shape[0] != width:
                what = f"{prefix}mean's length" if i == 0 else f"{prefix}weight.{i - 1}'s columns"
                raise ValueError(f"{prefix}weight.{i} has {w.shape[0]} rows, but {what} is {width}")
            if b.shape[0] != w.shape[1]:
                raise ValueError(
                    f"{prefix}bias.{i} has length {b.shape[0]}, "
                    f"{prefix}weight.{i} has {w.shape[1]} columns"
                )
            if w.shape[1] == 0:
                raise ValueError(f"{prefix}weight.{i} has no columns")
            weights.append(w)
            biases.append(b)
            width = w.shape[1]
        return cls(weights=weights, biases=biases, mean=mean, scale=scale)

    def nbytes(self) -> int:
        """Bytes held by the head's arrays."""
        return sum(int(a.nbytes) for a in self.to_arrays().values())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for any finite input (the row maximum is subtracted)."""
    z: np.ndarray = logits - np.max(logits, axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= np.sum(z, axis=1, keepdims=True)
    return z


def standardiser(
    features: np.ndarray, floor: float = DEFAULT_VARIANCE_FLOOR
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature ``mean`` and ``scale = sqrt(max(variance, floor))``, both float32.

    The floor keeps a feature that is (nearly) constant in the training data from being
    divided by (nearly) zero when it moves in the field.

    Raises:
        ValueError: ``features`` is not a non-empty, finite 2-D array, or ``floor`` <= 0.
    """
    if not (floor > 0 and math.isfinite(floor)):
        raise ValueError(f"variance floor must be a positive number, got {floor!r}")
    x = _features(features, None)
    if x.shape[0] == 0:
        raise ValueError("no samples to standardise")
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    var = x64.var(axis=0)
    return mean.astype(np.float32), np.sqrt(np.maximum(var, floor)).astype(np.float32)


def init_head(
    sizes: Sequence[int], rng: np.random.Generator, mean: np.ndarray, scale: np.ndarray
) -> Head:
    """A fresh head with layer widths ``sizes`` (e.g. ``(64, 64, 10)``: 64 features, one
    hidden layer of 64, 10 classes).

    Hidden layers get He initialisation (normal, variance ``2 / fan_in``, right before a ReLU),
    the output layer LeCun's (variance ``1 / fan_in``); biases start at zero.

    Raises:
        ValueError: fewer than two sizes, a size < 1, or ``mean``/``scale`` not of length
            ``sizes[0]`` with positive finite scales.
    """
    dims = [int(s) for s in sizes]
    if len(dims) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {dims}")
    if min(dims) < 1:
        raise ValueError(f"every size must be >= 1, got {dims}")
    arrays: dict[str, np.ndarray] = {
        "mean": np.asarray(mean, dtype=np.float32).copy(),
        "scale": np.asarray(scale, dtype=np.float32).copy(),
    }
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        gain = 2.0 if i < len(dims) - 2 else 1.0
        std = math.sqrt(gain / fan_in)
        arrays[f"weight.{i}"] = (rng.standard_normal((fan_in, fan_out)) * std).astype(np.float32)
        arrays[f"bias.{i}"] = np.zeros(fan_out, dtype=np.float32)
    head = Head.from_arrays(arrays)
    if head.in_dim != dims[0]:  # from_arrays checked mean against weight.0
        raise ValueError(f"mean has length {head.in_dim}, sizes[0] is {dims[0]}")
    return head


def accuracy(head: Head, features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose predicted class equals the label, in [0, 1].

    With zero samples the accuracy is undefined and the result is ``nan``; otherwise it is
    never nan (the head's logits are finite for finite features).

    Raises:
        ValueError: ``labels`` is not a 1-D array as long as ``features``.
    """
    y = np.asarray(labels)
    x = _features(features, head.in_dim)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels have shape {y.shape}, features {x.shape}")
    if y.shape[0] == 0:
        return math.nan
    return float(np.mean(head.predict(x) == y))


def save_head(path: PathOrFile, head: Head) -> None:
    """Write ``head`` as an ``.npz`` file (see :func:`write_npz`; the name is used as given)."""
    write_npz(path, head.to_arrays())


def load_head(path: PathOrFile) -> Head:
    """Read a head written by :func:`save_head`.

    Raises:
        ValueError: the file is not an npz archive of a valid head (message says why).
        OSError: the file cannot be read.
    """
    return Head.from_arrays(read_npz(path))


def write_npz(path: PathOrFile, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` in NumPy's ``.npz`` format, deterministically.

    Unlike ``np.savez`` every zip entry carries a fixed timestamp, so the same arrays always
    give the same bytes, and the file name is used as given (no ``.npz`` appended). Entries
    are deflated and in the mapping's order. No object arrays: ``np.load(...,
    allow_pickle=False)`` reads the result. This writes in place; callers that need the file
    to survive a crash write to a temporary name, fsync and rename.

    Raises:
        ValueError: an array has dtype object.
    """
    entries: list[tuple[zipfile.ZipInfo, bytes]] = []
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype object; npz files here hold no pickles")
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        entries.append((info, buffer.getvalue()))
    if isinstance(path, str | os.PathLike):
        with open(path, "wb") as file:
            _write_zip(file, entries)
    else:
        _write_zip(path, entries)


def read_npz(path: PathOrFile) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, loaded eagerly, without allowing pickles.

    Raises:
        ValueError: the file is not an npz archive, or holds an object array.
        OSError: the file cannot be read.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an npz archive (a single .npy array)")
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"not a valid npz archive: {e}") from e


def _write_zip(file: BinaryIO, entries: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    with zipfile.ZipFile(file, mode="w") as archive:
        for info, data in entries:
            archive.writestr(info, data, compresslevel=6)


def _features(features: np.ndarray, dim: int | None) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (samples, features), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"features have {x.shape[1]} columns, the head takes {dim}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"features must be real numbers, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def _float_array(arrays: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"{name} is missing")
    array = np.asarray(arrays[name])
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        where = _first(~np.isfinite(array))
        raise ValueError(f"{name} has non-finite entries (at flat index {where})")
    return np.array(array, dtype=_FLOAT32, copy=True)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])
