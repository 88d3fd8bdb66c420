"""model.toml's [remote] table (edged.serving.repository) and the remote executor's refusals
at load (hal.remote): every bad value named, a server that cannot be reached refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edged.core.errors import ModelLoadError
from edged.serving.repository import parse_model_toml
from hal.executor import ExecutorOptions, ModelArtifact
from hal.remote import RemoteExecutor
from hal.remote_target import RemoteTarget

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models/digits/1/model.onnx"


def _remote(table: dict[str, Any]) -> RemoteTarget | None:
    spec = parse_model_toml(Path("/repo/split"), {"name": "split", "remote": table})
    return spec.remote


def test_defaults_are_secure_and_bounded() -> None:
    target = _remote({"address": "server:8001"})
    assert target == RemoteTarget(address="server:8001", model="split")
    assert not target.insecure  # TLS unless asked otherwise
    assert (target.timeout_s, target.retries) == (2.0, 1)


def test_files_are_read_from_the_model_folder_unless_absolute() -> None:
    target = _remote(
        {
            "address": "10.0.0.2:8001",
            "model": "tail",
            "version": "3",
            "head": "head.onnx",
            "ca_file": "ca.pem",
            "token_file": "/etc/edged/remote.token",
            "timeout_ms": 250,
            "retries": 0,
        }
    )
    assert target is not None
    assert target.ca_file == "/repo/split/ca.pem"
    assert target.token_file == "/etc/edged/remote.token"
    assert (target.model, target.version, target.head) == ("tail", "3", "head.onnx")
    assert (target.timeout_s, target.retries) == (0.25, 0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "'remote.address' must be HOST:PORT"),
        ({"address": "server"}, "'remote.address' must be HOST:PORT"),
        ({"address": "s:1", "port": 1}, "unknown key 'remote.port'"),
        ({"address": "s:1", "timeout_s": 1}, "unknown key 'remote.timeout_s'"),
        ({"address": "s:1", "model": ""}, "'remote.model' must be a non-empty string"),
        ({"address": "s:1", "version": "01"}, "'remote.version' must be a version number"),
        ({"address": "s:1", "head": "../head.onnx"}, "'remote.head' must be a file name"),
        ({"address": "s:1", "timeout_ms": 0}, "'remote.timeout_ms' must be an integer from 1"),
        ({"address": "s:1", "retries": 9}, "'remote.retries' must be an integer from 0 to 5"),
        ({"address": "s:1", "insecure": "yes"}, "'remote.insecure' must be true or false"),
        ({"address": "s:1", "cert_file": "c.pem"}, "'remote.cert_file' and 'remote.key_file'"),
        ({"address": "s:1", "token_file": 7}, "'remote.token_file' must be a string"),
    ],
)
def test_bad_values_are_named(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        _remote(table)


def test_a_model_without_a_remote_table_is_refused_by_the_executor() -> None:
    with pytest.raises(ModelLoadError, match=r"no \[remote\] table"):
        RemoteExecutor().load(ModelArtifact(DIGITS, "onnx"), ExecutorOptions())


def test_a_server_nobody_answers_on_is_refused_at_load() -> None:
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    target = RemoteTarget(address="127.0.0.1:9", model="digits", insecure=True, timeout_s=2.0)
    with pytest.raises(ModelLoadError, match=r"remote 127\.0\.0\.1:9 model 'digits': UNAVAILABLE"):
        RemoteExecutor().load(ModelArtifact(DIGITS, "onnx"), ExecutorOptions(remote=target))
