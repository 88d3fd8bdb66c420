"""What the daemon and a Flower client process exchange: ``Session`` (session.json, written
by the daemon) and the merged head the client writes back (merged.npz + merged.json: the last
global head the server sent, with the round, strategy and participant count). Standard
library only: both environments read it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

SESSION_FILE = "session.json"
SAMPLES_FILE = "samples.npz"  # as edged.learn.worker.SAMPLES_FILE: x_train, y_train, x/y_holdout
MERGED_FILE = "merged.npz"
MERGED_INFO = "merged.json"

#: Flower reports usage to its maintainers unless told not to; edged reaches no network but
#: its fleet's (docs/adr/0012)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0"}


def default_python() -> str:
    """The federated environment's interpreter beside this one's: ``<prefix>-federated``
    (a repository's .venv -> .venv-federated; /opt/edged/venv -> /opt/edged/venv-federated)."""
    prefix = Path(sys.prefix)
    return str(prefix.with_name(prefix.name + "-federated") / "bin" / "python")


def _get(data: Mapping[str, object], name: str, kind: type) -> object:
    if name not in data:
        raise ValueError(f"'{name}' is missing")
    value = data[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"'{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Session:
    """A Flower client's session for one model: where the server is and how to trust it,
    who this device is, what it trains with."""

    model: str
    server: str
    root_certificates: str  # PEM file; "" only with insecure
    insecure: bool
    device_id: str
    token_file: str  # the device's enrolment token; "" without enrolment
    strategy: str
    seed: int
    head: str
    state: str
    max_wait_s: float

    @classmethod
    def from_json(cls, text: str) -> Session:
        """Raises: ValueError: not a JSON object, or a field missing or of the wrong type."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the session must be a JSON object")
        kinds = {k: v for k, v in cls.__annotations__.items()}
        values = {
            name: _get(data, name, {"str": str, "int": int, "float": float, "bool": bool}[kind])
            for name, kind in kinds.items()
        }
        return cls(**values)  # type: ignore[arg-type]

    def write(self, folder: Path) -> None:
        (folder / SESSION_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, folder: Path) -> Session:
        return cls.from_json((folder / SESSION_FILE).read_text())


@dataclass(frozen=True)
class MergedInfo:
    """The round a merged head comes from, as the server said it."""

    round: int
    rounds: int
    strategy: str
    participants: int

    def write(self, folder: Path) -> None:
        tmp = folder / (MERGED_INFO + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, folder / MERGED_INFO)

    @classmethod
    def read(cls, folder: Path) -> MergedInfo:
        """Raises: ValueError: malformed; OSError: absent."""
        data = json.loads((folder / MERGED_INFO).read_text())
        if not isinstance(data, dict):
            raise ValueError("merged.json must be a JSON object")
        return cls(
            round=int(_get(data, "round", int)),  # type: ignore[call-overload]
            rounds=int(_get(data, "rounds", int)),  # type: ignore[call-overload]
            strategy=str(_get(data, "strategy", str)),
            participants=int(_get(data, "participants", int)),  # type: ignore[call-overload]
        )
