"""The digits model split two ways for re-planning tests: a server repository with the tails
(``digits``: the whole model, the tail of the inputs cut; ``digits_hidden``: the tail after
the ``hidden`` layer) and a device repository whose ``digits`` has the whole model, the head
of ``hidden`` and a ``[partition]`` table over both cuts.

The profiles are *simulated* cost tables (written here, not measured), chosen so that the
planner's choice moves with the link (1 ms round trip): at 100 Mbit/s the inputs cut (1.6 ms
estimated), at 0.5 Mbit/s the ``hidden`` cut (8.8 ms against 11.2 ms for the inputs), at
0.1 Mbit/s all local (the device "takes" 20 ms for the whole model; ``hidden`` 31 ms).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edged.partition import graph
from tests.daemon_process import EXAMPLE_MODELS

WHOLE = EXAMPLE_MODELS / "digits" / "1" / "model.onnx"
HEAD = "head_hidden.onnx"
ANSWER_BYTES = 2 * 10 * 4 + 2 * 8  # the digits outputs of a 2-row request

DEVICE_PROFILE = {
    "model": "model.onnx",
    "executor": "cpu-onnx",
    "threads": 1,
    "whole_s": 0.020,
    "answer_bytes": ANSWER_BYTES,
    "cuts": [
        {"cut": "<inputs>", "head_s": 0.0, "tail_s": 0.020, "sent_bytes": 512},
        {"cut": "hidden", "head_s": 0.002, "tail_s": 0.018, "sent_bytes": 256},
    ],
}
SERVER_PROFILE = {
    **DEVICE_PROFILE,
    "whole_s": 0.0005,
    "cuts": [
        {"cut": "<inputs>", "head_s": 0.0, "tail_s": 0.0005, "sent_bytes": 512},
        {"cut": "hidden", "head_s": 0.0001, "tail_s": 0.0002, "sent_bytes": 256},
    ],
}


def server_repo(root: Path) -> Path:
    """The server's repository: the whole digits model and the tail after ``hidden``."""
    parts = root / "parts"
    model = graph.load(WHOLE)
    split = graph.split(model, "hidden")
    assert split.head is not None
    parts.mkdir(parents=True, exist_ok=True)
    graph.save(split.head, parts / HEAD)
    repo = root / "server-models"
    for name, source in (("digits", WHOLE), ("digits_hidden", None)):
        (repo / name / "1").mkdir(parents=True)
        target = repo / name / "1" / "model.onnx"
        if source is None:
            graph.save(split.tail, target)
        else:
            shutil.copyfile(source, target)
        (repo / name / "model.toml").write_text(f'name = "{name}"\nmax_batch_size = 8\n')
    return repo


def device_repo(root: Path, address: str, *, extra_remote: str = "", partition: str = "") -> Path:
    """The device's repository: ``digits`` served over ``address`` at the inputs cut first,
    re-planned between the inputs cut, ``hidden`` and all local."""
    repo = root / "device-models"
    version = repo / "digits" / "1"
    version.mkdir(parents=True)
    shutil.copyfile(WHOLE, version / "model.onnx")
    shutil.copyfile(root / "parts" / HEAD, version / HEAD)
    (repo / "digits" / "device.json").write_text(json.dumps(DEVICE_PROFILE))
    (repo / "digits" / "server.json").write_text(json.dumps(SERVER_PROFILE))
    (repo / "digits" / "model.toml").write_text(
        f"""name = "digits"
max_batch_size = 8
instances = 1
executors = ["remote", "cpu-onnx"]

[remote]
address = "{address}"
model = "digits"
insecure = true
timeout_ms = 5000
{extra_remote}
[partition]
profile = "device.json"
server_profile = "server.json"
replan = true
threshold = 0.25
{partition}
[partition.cuts]
"<inputs>" = {{ model = "digits" }}
"hidden" = {{ head = "{HEAD}", model = "digits_hidden" }}
"""
    )
    return repo
