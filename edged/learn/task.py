"""What the daemon and a fine-tune worker process exchange, typed: the ``Task`` the daemon
writes into the job folder (task.json) and the ``JobMetrics`` the worker writes back
(result.json). Both are frozen values with explicit JSON forms; reading one that is malformed
raises ``ValueError`` naming the field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

TASK_FILE = "task.json"
RESULT_FILE = "result.json"


def _field(data: Mapping[str, object], name: str) -> object:
    if name not in data:
        raise ValueError(f"'{name}' is missing")
    return data[name]


def _str(data: Mapping[str, object], name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def _int(data: Mapping[str, object], name: str) -> int:
    value = _field(data, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{name}' must be an integer, got {type(value).__name__}")
    return value


def _float(data: Mapping[str, object], name: str) -> float:
    value = _field(data, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"'{name}' must be a number, got {type(value).__name__}")
    return float(value)


def _fraction(data: Mapping[str, object], name: str) -> float | None:
    return None if data.get(name) is None else _float(data, name)


def _object(data: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = _field(data, name)
    if not isinstance(value, dict):
        raise ValueError(f"'{name}' must be an object, got {type(value).__name__}")
    return value


def _parse(text: str, what: str) -> Mapping[str, object]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object")
    return data


@dataclass(frozen=True)
class InputSpec:
    """One input of the served model, as a client sends it (dynamic dims are -1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class VersionFiles:
    """The file names of a trainable model's version folder."""

    model: str
    backbone: str
    head: str
    state: str


@dataclass(frozen=True)
class Task:
    """A fine-tune job as the worker process gets it: the served head, strategy state and
    backbone by path, the strategy and its budget, and what the candidate version is made of."""

    job_id: int
    strategy: str
    epochs: int
    seed: int
    parent_version: int
    head: str
    state: str
    backbone: str
    features: str
    inputs: tuple[InputSpec, ...]
    files: VersionFiles

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Task:
        """Raises: ValueError: not JSON, or a field missing or of the wrong type."""
        data = _parse(text, "the task")
        raw_inputs = _field(data, "inputs")
        if not isinstance(raw_inputs, list):
            raise ValueError("'inputs' must be a list")
        inputs = []
        for item in raw_inputs:
            if not isinstance(item, dict):
                raise ValueError("'inputs' must hold objects")
            shape = _field(item, "shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape
            ):
                raise ValueError("an input's 'shape' must be a list of integers")
            inputs.append(InputSpec(_str(item, "name"), _str(item, "datatype"), tuple(shape)))
        files = _object(data, "files")
        return cls(
            job_id=_int(data, "job_id"),
            strategy=_str(data, "strategy"),
            epochs=_int(data, "epochs"),
            seed=_int(data, "seed"),
            parent_version=_int(data, "parent_version"),
            head=_str(data, "head"),
            state=_str(data, "state"),
            backbone=_str(data, "backbone"),
            features=_str(data, "features"),
            inputs=tuple(inputs),
            files=VersionFiles(
                model=_str(files, "model"),
                backbone=_str(files, "backbone"),
                head=_str(files, "head"),
                state=_str(files, "state"),
            ),
        )

    def write(self, job_dir: Path) -> None:
        (job_dir / TASK_FILE).write_text(self.to_json())

    @classmethod
    def read(cls, job_dir: Path) -> Task:
        return cls.from_json((job_dir / TASK_FILE).read_text())


#: a metric's JSON value
MetricValue = float | int | None


@dataclass(frozen=True)
class JobMetrics:
    """What a fine-tune measured: the served head's and the candidate's accuracy on held-out
    old data (None without any) and on the held-out new samples (None without any), the
    sample counts, and what the worker cost. ``state_bytes`` and ``worker_max_rss_bytes`` are
    known only once the candidate is written (None before: the lineage file has neither)."""

    old_accuracy_before: float | None
    old_accuracy_after: float | None
    new_accuracy_before: float | None
    new_accuracy_after: float | None
    old_holdout: int
    new_holdout: int
    trained_samples: int
    train_seconds: float
    state_bytes: int | None = None
    worker_max_rss_bytes: int | None = None

    def to_dict(self) -> dict[str, MetricValue]:
        """The JSON form: every field, but the two cost fields only when known."""
        values: dict[str, MetricValue] = dict(asdict(self))
        for name in ("state_bytes", "worker_max_rss_bytes"):
            if values[name] is None:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> JobMetrics:
        """Raises: ValueError: a field missing or of the wrong type."""
        return cls(
            old_accuracy_before=_fraction(data, "old_accuracy_before"),
            old_accuracy_after=_fraction(data, "old_accuracy_after"),
            new_accuracy_before=_fraction(data, "new_accuracy_before"),
            new_accuracy_after=_fraction(data, "new_accuracy_after"),
            old_holdout=_int(data, "old_holdout"),
            new_holdout=_int(data, "new_holdout"),
            trained_samples=_int(data, "trained_samples"),
            train_seconds=_float(data, "train_seconds"),
            state_bytes=None if data.get("state_bytes") is None else _int(data, "state_bytes"),
            worker_max_rss_bytes=(
                None
                if data.get("worker_max_rss_bytes") is None
                else _int(data, "worker_max_rss_bytes")
            ),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobMetrics:
        return cls.from_dict(_parse(text, "the result"))

    def write(self, job_dir: Path) -> None:
        (job_dir / RESULT_FILE).write_text(self.to_json())

    @classmethod
    def read(cls, job_dir: Path) -> JobMetrics:
        return cls.from_json((job_dir / RESULT_FILE).read_text())
