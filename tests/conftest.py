"""Shared fixtures: one real daemon serving the example and edge-case models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import modelgen
from tests.daemon_process import DaemonProcess, copy_example_models


def write_model(repo: Path, name: str, build, toml: str = "", version: int = 1) -> Path:
    """Write a modelgen model as <repo>/<name>/<version>/model.onnx with a model.toml."""
    build(repo / name / str(version))
    (repo / name / "model.toml").write_text(f'name = "{name}"\nformat = "onnx"\n{toml}')
    return repo / name


@pytest.fixture(scope="session")
def onnx_executor() -> str:
    """Where placement puts an ONNX model on this host: cuda when the probe finds a usable
    GPU, else cpu-onnx (the format's defaults, in order)."""
    import hal

    return "cuda" if any(r.kind == "cuda" and r.present for r in hal.probe()) else "cpu-onnx"


@pytest.fixture(scope="session")
def served_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example models plus one model per signature edge case."""
    repo = copy_example_models(tmp_path_factory.mktemp("served") / "models")
    write_model(repo, "dynamic", modelgen.dynamic_axes_model)
    write_model(repo, "scalar", modelgen.scalar_input_model)
    write_model(repo, "slashes", modelgen.slash_names_model)
    write_model(repo, "batch_axis1", modelgen.batch_not_axis0_model)
    write_model(repo, "all_dtypes", modelgen.all_dtypes_identity_model)
    return repo


@pytest.fixture(scope="session")
def daemon(served_repo: Path) -> Iterator[DaemonProcess]:
    """A real `edged serve` on a free loopback port, every model loaded."""
    proc = DaemonProcess(
        ["--models", str(served_repo), "--grpc-address", "127.0.0.1:0"],
        env={"EDGED_SERVER_MAX_REQUEST_BYTES": str(4 * 1024 * 1024)},
    )
    try:
        proc.wait_live()
        proc.wait_for("server_ready", timeout=60)
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.stderr


@pytest.fixture
def address(daemon: DaemonProcess) -> str:
    """HOST:PORT of the shared daemon."""
    return daemon.address


@pytest.fixture
def zmq_address(daemon: DaemonProcess) -> str:
    """The shared daemon's ZeroMQ endpoint (tcp://127.0.0.1:PORT)."""
    return daemon.zmq_endpoints[0]
