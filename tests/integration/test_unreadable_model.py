"""One model folder the daemon cannot read fails only that model, with a logged reason.

The defect (issue #12): listing the repository stat()ed every folder's model.toml, so a
folder without read permission raised PermissionError out of the start-up load; the daemon
never became ready, RepositoryIndex answered INTERNAL, and the only trace was "Task
exception was never retrieved".

Tests run as root, whom permissions do not stop. Two real conditions stand in:

- the real one, permissions: a ModelManager runs in a child process, dropped to the
  unprivileged uid 65534 with util-linux's ``setpriv`` when the tests run as root, on a
  repository where one model folder has mode 000;
- a model.toml that is a folder (EISDIR), which stops root as it stops anyone: a real
  daemon serves the other model, logs the reason, and RepositoryIndex lists it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.daemon_process import EXAMPLE_MODELS, REPO_ROOT, DaemonProcess

NOBODY = 65534

PROBE = """
import asyncio, json, sys
from pathlib import Path
from edged.serving.manager import ModelManager

async def main():
    manager = ModelManager(Path(sys.argv[1]))
    failed = await manager.load_all()
    index = [(e.name, e.version, e.state.value, e.reason) for e in manager.index()]
    ready = manager.is_ready("digits")
    await manager.unload_all()
    print(json.dumps({"failed": failed, "index": index, "digits_ready": ready}))

asyncio.run(main())
"""


@pytest.fixture
def world_readable_repo() -> Iterator[Path]:
    """A repository an unprivileged user can reach (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="edged-perm-", dir="/tmp"))
    try:
        root.chmod(0o755)
        repo = root / "models"
        shutil.copytree(EXAMPLE_MODELS / "digits", repo / "digits")
        shutil.copytree(EXAMPLE_MODELS / "digits", repo / "locked")
        for path in [repo, *repo.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (repo / "locked").chmod(0o000)
        yield repo
    finally:
        (root / "models" / "locked").chmod(0o755)
        shutil.rmtree(root)


def test_a_folder_without_permission_fails_only_its_model(world_readable_repo: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-c", PROBE, str(world_readable_repo)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("as root without util-linux's setpriv: cannot drop to nobody")
        unprivileged = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        command = [setpriv, *unprivileged, *command]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd="/", timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["digits_ready"] is True
    assert list(answer["failed"]) == ["locked"]
    assert "Permission denied" in answer["failed"]["locked"]
    index = {row[0]: row for row in answer["index"]}
    assert index["locked"][2] == "UNAVAILABLE"
    assert "Permission denied" in index["locked"][3]
    assert str(world_readable_repo / "locked") in index["locked"][3]
    assert index["digits"][2] == "READY"


def test_daemon_serves_the_rest_and_says_why(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(EXAMPLE_MODELS / "digits", repo / "digits")
    shutil.copytree(EXAMPLE_MODELS / "digits", repo / "odd")
    (repo / "odd" / "model.toml").unlink()
    (repo / "odd" / "model.toml").mkdir()  # unreadable as a file, for root too
    daemon = DaemonProcess(
        ["--models", str(repo), "--grpc-address", "127.0.0.1:0"],
        env={"EDGED_MODELS_STRICT_READINESS": "false"},
    )
    try:
        address = daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        failed = daemon.wait_for("model_load_failed", model="odd")
        assert "model.toml: cannot read it: Is a directory" in failed["error"]
        assert failed["level"] == "error"
        with grpcclient.InferenceServerClient(address) as client:
            assert client.is_server_ready()
            assert client.is_model_ready("digits")
            assert not client.is_model_ready("odd")
            models = client.get_model_repository_index(as_json=True)["models"]
            index = {m["name"]: m for m in models}
            assert index["odd"]["state"] == "UNAVAILABLE"
            assert "Is a directory" in index["odd"]["reason"]
            x = np.load(EXAMPLE_MODELS / "digits" / "sample.npy").astype(np.float32)
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            assert client.infer("digits", [tensor]).as_numpy("label").tolist() == [0, 1]
    finally:
        assert daemon.stop() == 0, daemon.stderr
    assert "Task exception was never retrieved" not in daemon.stderr
