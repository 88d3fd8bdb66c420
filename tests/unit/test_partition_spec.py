"""model.toml's ``[partition]`` (edged.serving.partition_spec through the repository's
parser): the cost table it builds from the profiles, the target of the cut [remote] serves,
and every bad key or value refused with its name."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from edged.core.errors import ModelLoadError
from edged.partition.graph import INPUTS_CUT
from edged.partition.planner import ALL_LOCAL
from edged.serving.replan import target_for
from edged.serving.repository import ModelSpec, parse_model_toml
from tests.split_models import DEVICE_PROFILE, HEAD, SERVER_PROFILE

BASE = f"""
executors = ["remote", "cpu-onnx"]

[remote]
address = "server:8001"
model = "digits_hidden"
head = "{HEAD}"

[partition]
profile = "device.json"
server_profile = "server.json"
replan = true

[partition.cuts]
"<inputs>" = {{ model = "digits" }}
"hidden" = {{ head = "{HEAD}", model = "digits_hidden" }}
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "device.json").write_text(json.dumps(DEVICE_PROFILE))
    (folder / "server.json").write_text(json.dumps(SERVER_PROFILE))
    return folder


def _parse(model_dir: Path, text: str) -> ModelSpec:
    return parse_model_toml(model_dir, tomllib.loads(text))


def test_the_cost_table_joins_device_heads_and_server_tails(model_dir: Path) -> None:
    spec = _parse(model_dir, BASE)
    partition = spec.partition
    assert partition is not None
    assert partition.served_at_load == "hidden"
    assert [c.cut for c in partition.costs] == [INPUTS_CUT, "hidden", ALL_LOCAL]
    hidden = partition.costs[1]
    assert (hidden.head_s, hidden.tail_s, hidden.sent_bytes) == (0.002, 0.0002, 256)
    assert partition.costs[2].head_s == DEVICE_PROFILE["whole_s"]
    # defaults
    assert (partition.objective, partition.threshold, partition.min_interval_s) == (
        "latency",
        0.25,
        2.0,
    )
    assert spec.remote is not None
    moved = target_for(partition, spec.remote, INPUTS_CUT)
    assert (moved.head, moved.model, moved.server_s) == ("", "digits", 0.0005)
    assert moved.address == spec.remote.address


def test_without_a_server_profile_the_devices_stands_in(model_dir: Path) -> None:
    spec = _parse(model_dir, BASE.replace('server_profile = "server.json"\n', ""))
    assert spec.partition is not None
    assert spec.partition.costs[1].tail_s == 0.018  # the device's own tail


def test_the_cpu_objective_and_its_byte_cost(model_dir: Path) -> None:
    text = BASE.replace("replan = true", 'objective = "device_cpu"\nbyte_cost_ns = 50')
    partition = _parse(model_dir, text).partition
    assert partition is not None
    assert partition.objective == "device_cpu"
    assert partition.byte_cost_s == pytest.approx(50e-9)
    assert partition.replan is False


def test_calibration_is_asked_for(model_dir: Path) -> None:
    partition = _parse(model_dir, BASE).partition
    assert partition is not None
    assert partition.calibrate is False  # profiles may be simulated: off unless asked
    partition = _parse(
        model_dir, BASE.replace("replan = true", "replan = true\ncalibrate = true")
    ).partition
    assert partition is not None
    assert partition.calibrate is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("replan = true", "replan = true\nspeed = 1"), "unknown key 'partition.speed'"),
        (("replan = true", 'replan = "yes"'), "'partition.replan' must be true or false"),
        (("replan = true", "calibrate = 1"), "'partition.calibrate' must be true or false"),
        (("replan = true", 'objective = "energy"'), "'partition.objective' must be one of"),
        (("replan = true", "threshold = 0"), "'partition.threshold' must be a number"),
        (("replan = true", "min_interval_ms = -1"), "'partition.min_interval_ms'"),
        (("replan = true", "probe_interval_ms = 1"), "'partition.probe_interval_ms'"),
        (("replan = true", "probe_bytes = 10"), "'partition.probe_bytes'"),
        (("replan = true", "probe_bytes = 4096.5"), "'partition.probe_bytes' must be an integer"),
        (("replan = true", "byte_cost_ns = true"), "'partition.byte_cost_ns'"),
        (('profile = "device.json"', 'profile = "nowhere.json"'), "'partition.profile'"),
        (('profile = "device.json"\n', ""), "'partition.profile' is missing"),
        (('server_profile = "server.json"', 'server_profile = "model.toml"'), "server_profile"),
        (('"hidden" = {', '"nocut" = {'), "'partition.cuts.nocut': not a cut both profiles"),
        (('"hidden" = {', '"<local>" = {'), "all local is always a choice"),
        (
            ('"<inputs>" = { model = "digits" }', '"<inputs>" = { model = "" }'),
            "cuts.<inputs>.model",
        ),
        (
            ('"<inputs>" = { model = "digits" }', '"<inputs>" = { model = "d", head = "h.onnx" }'),
            "'partition.cuts.<inputs>.head' must be empty",
        ),
        (
            ('head = "head_hidden.onnx", model', "model"),
            "'partition.cuts.hidden.head' must be given",
        ),
        (('head = "head_hidden.onnx", model', 'head = "../h.onnx", model'), "cuts.hidden.head"),
        (('model = "digits_hidden" }', 'model = "digits_hidden", port = 1 }'), "cuts.hidden.port"),
        (('model = "digits_hidden"\nhead', 'model = "other"\nhead'), "\\[remote\\].*none of"),
    ],
)
def test_bad_values_are_refused_by_name(
    model_dir: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in BASE
    with pytest.raises(ModelLoadError, match=message):
        _parse(model_dir, BASE.replace(old, new, 1))


def test_partition_needs_remote(model_dir: Path) -> None:
    text = BASE.split("[remote]", maxsplit=1)[0] + "[partition]" + BASE.split("[partition]")[1]
    with pytest.raises(ModelLoadError, match="'partition' needs a \\[remote\\] table"):
        _parse(model_dir, text)
