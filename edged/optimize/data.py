"""What ``edged optimize`` reads: the model to compress and the samples to calibrate and
judge it with. Reading only; nothing here writes.

A model is an ``.onnx`` file, an edged model folder (``model.toml`` and version folders; the
version ACTIVE names, else the highest), one version folder, or an edged bundle
(``.tar.gz``, unpacked with the OTA archive rules into a temporary folder).

Samples are a folder of ``.npy`` files named after the model's inputs (``input.npy``) and/or
``.npz`` archives keyed by input name; every array has the samples on axis 0, and files of
one input are concatenated in name order. A ``labels`` (or ``label``) array, integers of
shape ``(N,)``, makes quality the task accuracy rather than agreement with the original.
A ``boxes.json`` file (:func:`load_boxes`) makes it a text detector's task instead: each
sample's known boxes, scored by detection F1 at IoU 0.5 (edged.optimize.detection).

Or a device's learning store (``learn.sqlite3`` and its feature files, edged.learn.store),
read without writing (``load_store``): it keeps the backbone's *features* of each sample of
a ``[learn]`` model and its label, never the raw inputs (docs/learning.md), so those
samples calibrate what the features feed (the head) and carry no model inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.core.errors import EdgedError
from edged.learn.store import FILE_NAME as STORE_FILE
from edged.learn.store import SAMPLES_DIR
from edged.optimize.detection import Box
from edged.optimize.errors import OptimizeError
from edged.ota.archive import extract
from edged.serving.repository import MODEL_TOML
from edged.serving.versions import parse_version, read_active

LABEL_KEYS = ("labels", "label")
"""Array names read as task labels rather than model inputs."""

BOXES_FILE = "boxes.json"
"""The file of a sample folder holding each sample's known boxes (:func:`load_boxes`)."""


@dataclass(frozen=True)
class ModelSource:
    """The model to optimise: its ONNX file and, when it came from a model folder, that
    folder's model.toml text (copied beside every variant written)."""

    path: Path
    name: str
    model_toml: str = ""

    def sha256(self) -> str:
        """Hex SHA-256 of the ONNX file (the parent in a variant's lineage)."""
        return file_sha256(self.path)


@dataclass(frozen=True)
class Samples:
    """Model inputs keyed by input name, all with the same number of rows, and the labels
    when the data has them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    features: np.ndarray | None = None
    """The backbone's features of each row, when the samples came from a learning store
    (``inputs`` is then empty: the store keeps no model inputs)."""
    boxes: tuple[tuple[Box, ...], ...] | None = None
    """Each row's known boxes (a detector's task labels, from ``boxes.json``)."""

    def __len__(self) -> int:
        if not self.inputs and self.features is not None:
            return int(self.features.shape[0])
        return int(next(iter(self.inputs.values())).shape[0])

    def rows(self, index: slice | np.ndarray) -> Samples:
        """The samples ``index`` selects (a slice or integer indices)."""
        labels = None if self.labels is None else self.labels[index]
        features = None if self.features is None else self.features[index]
        boxes = None
        if self.boxes is not None:
            picked = range(len(self))[index] if isinstance(index, slice) else index
            boxes = tuple(self.boxes[int(i)] for i in picked)
        return Samples({k: v[index] for k, v in self.inputs.items()}, labels, features, boxes)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """The inputs in consecutive batches of at most ``size`` rows."""
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def sha256(self) -> str:
        """Hex SHA-256 over names, dtypes, shapes and bytes (the calibration set's identity
        in a variant's lineage)."""
        digest = hashlib.sha256()
        arrays = dict(self.inputs)
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.features is not None:
            arrays["features"] = self.features
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            digest.update(a.tobytes())
        if self.boxes is not None:
            digest.update(b"boxes:" + json.dumps(self.boxes).encode())
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def open_model(path: Path) -> Iterator[ModelSource]:
    """The ONNX model at ``path`` (see the module docstring for what ``path`` may be); a
    bundle is unpacked into a temporary folder that lives as long as the context.

    Raises:
        OptimizeError: nothing ONNX to optimise there, or an unreadable bundle (named).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory(prefix="edged-optimize-") as tmp:
            try:
                root = extract(path, Path(tmp))
            except (EdgedError, OSError) as e:
                raise OptimizeError(f"{path}: not a usable edged bundle: {e}") from e
            source = _from_folder(root, path)
            yield ModelSource(source.path, _bundle_name(root, path), source.model_toml)
        return
    yield _locate(path)


def _bundle_name(root: Path, bundle: Path) -> str:
    try:
        data = tomllib.loads((root / "bundle.toml").read_text(encoding="utf-8"))
        return str(data.get("name") or bundle.name.split(".")[0])
    except (OSError, tomllib.TOMLDecodeError):
        return bundle.name.split(".")[0]


def _locate(path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix != ".onnx":
            raise OptimizeError(
                f"{path}: not an ONNX model (.onnx), model folder or bundle (.tar.gz); "
                "LiteRT (.tflite) models are not optimised here: docs/optimize.md"
            )
        return ModelSource(path, path.stem)
    if not path.is_dir():
        raise OptimizeError(f"{path}: no such file or folder")
    return _from_folder(path, path)


def _from_folder(folder: Path, named: Path) -> ModelSource:
    toml_path = folder / MODEL_TOML
    model_toml = toml_path.read_text(encoding="utf-8") if toml_path.is_file() else ""
    name = folder.resolve().name
    if model_toml:
        try:
            name = str(tomllib.loads(model_toml).get("name") or name)
        except tomllib.TOMLDecodeError as e:
            raise OptimizeError(f"{toml_path}: {e}") from e
    if (folder / "model.onnx").is_file():  # a version folder, or an unpacked bundle
        parent = folder.parent / MODEL_TOML
        if not model_toml and parent.is_file() and parse_version(folder.name):
            model_toml = parent.read_text(encoding="utf-8")
            name = folder.parent.resolve().name
        return ModelSource(folder / "model.onnx", name, model_toml)
    try:
        active = read_active(folder)
    except EdgedError as e:
        raise OptimizeError(f"{folder}: {e}") from e
    versions = sorted(v for p in folder.iterdir() if (v := parse_version(p.name)) is not None)
    chosen = max(active) if active else (versions[-1] if versions else None)
    if chosen is None or not (folder / str(chosen) / "model.onnx").is_file():
        raise OptimizeError(
            f"{named}: no model.onnx in it or in its version folder "
            f"({', '.join(map(str, versions)) or 'none'})"
        )
    return ModelSource(folder / str(chosen) / "model.onnx", name, model_toml)


def load_samples(folder: Path, inputs: Sequence[str], what: str = "--calibration") -> Samples:
    """The samples in ``folder`` for a model whose inputs are ``inputs``.

    Raises:
        OptimizeError: not a folder, an unreadable file, an input with no data, a name that
            is no input, rows that differ between inputs, labels that are not integers of
            shape (N,), a bad ``boxes.json``, or both labels and boxes; the message names
            the file, input or field and ``what`` (the option).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OptimizeError(f"{what} {folder}: not a folder of .npy/.npz files")
    parts: dict[str, list[np.ndarray]] = {}
    for file in sorted(folder.iterdir()):
        if file.suffix == ".npy":
            parts.setdefault(file.stem, []).append(_load_npy(file, what))
        elif file.suffix == ".npz":
            for key, array in _load_npz(file, what).items():
                parts.setdefault(key, []).append(array)
    labels_parts = [a for k in LABEL_KEYS for a in parts.pop(k, [])]
    unknown = sorted(set(parts) - set(inputs))
    if unknown:
        raise OptimizeError(
            f"{what} {folder}: {', '.join(unknown)} is not an input of the model "
            f"(inputs: {', '.join(inputs)}; labels go in 'labels')"
        )
    missing = [name for name in inputs if name not in parts]
    if missing:
        raise OptimizeError(
            f"{what} {folder}: no data for input {', '.join(missing)} "
            f"(a {missing[0]}.npy file, or an .npz array named {missing[0]!r})"
        )
    arrays = {name: _concat(parts[name], f"{what} input {name!r}") for name in inputs}
    counts = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise OptimizeError(f"{what} {folder}: inputs have different sample counts {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise OptimizeError(f"{what} {folder}: no samples")
    labels = None
    if labels_parts:
        labels = _concat(labels_parts, f"{what} labels")
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise OptimizeError(
                f"{what} {folder}: labels must be integers of shape ({n},), "
                f"got {labels.dtype} {labels.shape}"
            )
    return Samples(arrays, labels, boxes=_boxes_of(folder, n, labels is not None, what))


def _boxes_of(
    folder: Path, rows: int, labelled: bool, what: str
) -> tuple[tuple[Box, ...], ...] | None:
    if not (folder / BOXES_FILE).is_file():
        return None
    if labelled:
        raise OptimizeError(
            f"{what} {folder}: both labels and {BOXES_FILE}: give one task (labels for a "
            "classifier, boxes for a text detector)"
        )
    return load_boxes(folder / BOXES_FILE, rows, what)


def load_boxes(path: Path, rows: int, what: str = "--holdout") -> tuple[tuple[Box, ...], ...]:
    """The known boxes in ``path``, a JSON object ``{"boxes": [[[x0, y0, x1, y1], ...],
    ...]}``: one list per sample row, in row order (the rows of the folder's arrays), each
    box four finite numbers in the pixels of the model's probability map, ``x0 < x1`` and
    ``y0 < y1`` (x1, y1 exclusive). A row may have no box.

    Raises:
        OptimizeError: unreadable JSON, or a field or row that breaks the format (named,
            e.g. ``boxes[3][1]: x1``).
    """
    where = f"{what} {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OptimizeError(f"{where}: not readable JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("boxes"), list):
        raise OptimizeError(
            f'{where}: boxes: missing; the file is {{"boxes": [[[x0, y0, x1, y1], ...], ...]}}, '
            "one list of boxes per sample row"
        )
    unknown = sorted(set(data) - {"boxes"})
    if unknown:
        raise OptimizeError(f"{where}: {', '.join(unknown)}: unknown field (only 'boxes')")
    pages = data["boxes"]
    if len(pages) != rows:
        raise OptimizeError(
            f"{where}: boxes: {len(pages)} rows of boxes, the samples have {rows} rows"
        )
    out: list[tuple[Box, ...]] = []
    for i, page in enumerate(pages):
        if not isinstance(page, list):
            raise OptimizeError(f"{where}: boxes[{i}]: a list of boxes, got {page!r:.40}")
        boxes: list[Box] = []
        for j, box in enumerate(page):
            at = f"boxes[{i}][{j}]"
            if not isinstance(box, list) or len(box) != 4:
                raise OptimizeError(f"{where}: {at}: [x0, y0, x1, y1], got {box!r:.40}")
            for name, value in zip(("x0", "y0", "x1", "y1"), box, strict=True):
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not (math.isfinite(value))
                ):
                    raise OptimizeError(f"{where}: {at}: {name}: a finite number, got {value!r}")
            x0, y0, x1, y1 = (float(v) for v in box)
            if x1 <= x0 or y1 <= y0:
                bad = "x1" if x1 <= x0 else "y1"
                low = x0 if bad == "x1" else y0
                raise OptimizeError(
                    f"{where}: {at}: {bad} ({box[2] if bad == 'x1' else box[3]}) must be "
                    f"greater than {bad[0]}0 ({low:g})"
                )
            boxes.append((x0, y0, x1, y1))
        out.append(tuple(boxes))
    return tuple(out)


@dataclass(frozen=True)
class StoreRows:
    """Which rows of a learning store became calibration samples."""

    path: Path
    model: str
    ids: tuple[int, ...]
    """The ``samples.id`` of every row used, in order."""
    by_status: dict[str, int]
    """Rows used per status (pending, learned, rejected)."""
    held_out: int
    """The model's rows the device holds out (judging its fine-tunes), never used here."""

    def describe(self) -> str:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(self.by_status.items()))
        return (
            f"learning store {self.path}: model {self.model}: {len(self.ids)} rows used "
            f"(ids {id_ranges(self.ids)}; {statuses or 'none'}), {self.held_out} held-out "
            "rows excluded"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "model": self.model,
            "rows": len(self.ids),
            "ids": id_ranges(self.ids),
            "by_status": dict(self.by_status),
            "held_out_excluded": self.held_out,
        }


def id_ranges(ids: Sequence[int]) -> str:
    """``1-3,7,9-10`` for ids 1, 2, 3, 7, 9, 10 (sorted)."""
    parts: list[str] = []
    ordered = sorted(ids)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def load_store(path: Path, model: str) -> tuple[Samples, StoreRows]:
    """The samples of ``model`` in the learning store at ``path`` (``learn.sqlite3``, or the
    state folder holding it), opened read-only: every row the device does not hold out
    (pending, learned or rejected), in id order, as ``Samples`` with ``features`` and
    ``labels`` and no inputs.

    Raises:
        OptimizeError: no store there, one that cannot be read, a missing feature file, or
            no usable row of ``model`` (named, with the models the store has).
    """
    path = Path(path)
    db_path = path / STORE_FILE if path.is_dir() else path
    what = f"--calibration-store {db_path}"
    if not db_path.is_file():
        raise OptimizeError(f"{what}: no such file (a device's learn.sqlite3 or its folder)")
    try:
        rows, models = _store_rows(db_path, model, "mode=ro")
    except sqlite3.OperationalError:
        # a WAL database in a folder this user may not write, with no -shm index yet: read
        # it as it is on disk (what a device that is not running leaves)
        try:
            rows, models = _store_rows(db_path, model, "immutable=1")
        except sqlite3.Error as e:
            raise OptimizeError(f"{what}: not a readable learning store: {e}") from e
    except sqlite3.Error as e:
        raise OptimizeError(f"{what}: not a readable learning store: {e}") from e
    used = [r for r in rows if not r[3]]
    if not used:
        raise OptimizeError(
            f"{what}: no sample of model {model!r} that is not held out "
            f"({len(rows)} rows; models in the store: {', '.join(models) or 'none'}; "
            "--store-model names another)"
        )
    folder = db_path.parent / SAMPLES_DIR / model
    files: dict[str, np.ndarray] = {}
    features = []
    for _, row, _, _, _, file in used:
        if file not in files:
            try:
                files[file] = np.load(folder / file, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise OptimizeError(f"{what}: feature file {folder / file}: {e}") from e
        features.append(files[file][row])
    by_status: dict[str, int] = {}
    for r in used:
        by_status[r[4]] = by_status.get(r[4], 0) + 1
    samples = Samples(
        {},
        labels=np.array([r[2] for r in used], dtype=np.int64),
        features=np.stack(features).astype(np.float32),
    )
    described = StoreRows(
        db_path, model, tuple(int(r[0]) for r in used), by_status, len(rows) - len(used)
    )
    return samples, described


def _store_rows(db_path: Path, model: str, mode: str) -> tuple[list[Any], list[str]]:
    """``model``'s sample rows (id, row, label, holdout, status, file) and every model in
    the store, through a read-only connection (``mode``: SQLite URI parameters)."""
    db = sqlite3.connect(f"{db_path.resolve().as_uri()}?{mode}", uri=True)
    try:
        rows = db.execute(
            "SELECT s.id, s.row, s.label, s.holdout, s.status, b.file FROM samples s "
            "JOIN batches b ON b.id = s.batch_id WHERE s.model = ? ORDER BY s.id",
            (model,),
        ).fetchall()
        models = [r[0] for r in db.execute("SELECT DISTINCT model FROM samples ORDER BY model")]
    finally:
        db.close()
    return rows, models


def split(samples: Samples, holdout_share: float, seed: int = 0) -> tuple[Samples, Samples]:
    """(calibration, held-out): a seeded random ``holdout_share`` of the rows (at least one)
    is held out; the two never share a row.

    Raises:
        OptimizeError: fewer than two samples, or a share outside (0, 1).
    """
    if not 0 < holdout_share < 1:
        raise OptimizeError(f"--holdout-share must be between 0 and 1, got {holdout_share}")
    n = len(samples)
    if n < 2:
        raise OptimizeError(
            "need at least two samples: one to calibrate with and one held out to judge the "
            "variants (or give the held-out set apart with --holdout)"
        )
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, round(n * holdout_share))
    return samples.rows(np.sort(order[held:])), samples.rows(np.sort(order[:held]))


def _load_npy(file: Path, what: str) -> np.ndarray:
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OptimizeError(f"{what} {file}: not a readable .npy array: {e}") from e
    return _checked(array, f"{what} {file}")


def _load_npz(file: Path, what: str) -> Mapping[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {k: _checked(archive[k], f"{what} {file}[{k}]") for k in archive.files}
    except (OSError, ValueError) as e:
        raise OptimizeError(f"{what} {file}: not a readable .npz archive: {e}") from e


def _checked(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 0:
        raise OptimizeError(f"{where}: a scalar; samples go on axis 0")
    if array.dtype.kind not in "biuf":
        raise OptimizeError(f"{where}: dtype {array.dtype} is not numeric")
    return array


def _concat(arrays: list[np.ndarray], where: str) -> np.ndarray:
    try:
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    except ValueError as e:
        raise OptimizeError(f"{where}: files do not concatenate on axis 0: {e}") from e
