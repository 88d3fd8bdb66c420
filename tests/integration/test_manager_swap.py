"""The one swap path, in process on a real repository: a gate (self-test) decides whether a
new version takes traffic, and a refused version leaves the old one serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import ModelLoadError
from edged.core.types import InferRequest
from edged.serving.manager import ModelManager
from edged.serving.model import ModelVersion
from tests.daemon_process import EXAMPLE_MODELS


def _request() -> InferRequest:
    return InferRequest(
        "simple_static", {"INPUT0": np.ones((2, 3), np.int32), "INPUT1": np.ones((2, 3), np.int32)}
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLE_MODELS / "simple_static", tmp_path / "simple_static")
    (tmp_path / "simple_static" / "ACTIVE").write_text("1\n")
    return tmp_path


async def test_gate_refusal_keeps_the_old_version(repo: Path) -> None:
    manager = ModelManager(repo)
    await manager.load("simple_static")
    assert (await manager.infer(_request())).model_version == "1"
    seen: list[int] = []

    async def refuse(mv: ModelVersion) -> None:
        seen.append(mv.version)
        out = await mv.infer(_request())  # a loaded, warmed version that is not serving yet
        assert out.outputs["OUTPUT1"].tolist() == [[1, 1, 1], [1, 1, 1]]
        raise ModelLoadError("self-test failed")

    (repo / "simple_static" / "ACTIVE").write_text("2\n")
    with pytest.raises(ModelLoadError, match="self-test failed"):
        await manager.load("simple_static", gate=refuse)
    assert seen == [2]
    assert (await manager.infer(_request())).model_version == "1"

    async def accept(mv: ModelVersion) -> None:
        await mv.infer(_request())

    await manager.load("simple_static", gate=accept)
    assert (await manager.infer(_request())).model_version == "2"
    await manager.unload_all()
