"""edged.serving.repository: version policy, model.toml, version folders, ACTIVE, signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edged.core.errors import ModelLoadError, ModelNotFoundError
from edged.core.types import DataType, Signature, TensorSpec
from edged.serving.repository import (
    ModelSpec,
    TensorDecl,
    VersionPolicy,
    WarmupInput,
    detect_format,
    parse_model_toml,
    read_model_spec,
    resolve_signature,
)
from edged.serving.versions import (
    available_versions,
    list_models,
    parse_version,
    read_active,
    versions_to_serve,
)

FP32 = DataType.FP32
INT64 = DataType.INT64


def _model_dir(tmp_path: Path, name: str = "resnet", versions: tuple[str, ...] = ()) -> Path:
    model_dir = tmp_path / name
    model_dir.mkdir()
    for version in versions:
        (model_dir / version).mkdir()
    return model_dir


# --------------------------------------------------------------------------- VersionPolicy


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        (VersionPolicy(), [3, 1, 2], [3]),
        (VersionPolicy(latest=2), [3, 1, 2], [2, 3]),
        (VersionPolicy(latest=5), [3, 1, 2], [1, 2, 3]),
        (VersionPolicy(latest=None), [4, 9], [9]),
        (VersionPolicy(latest=None, specific=(1, 3)), [1, 2, 3], [1, 3]),
        (VersionPolicy(latest=None, specific=(3, 1)), [3, 2, 1], [1, 3]),
        (VersionPolicy(latest=None, specific=(4, 7)), [1, 4], [4]),
        (VersionPolicy(latest=None, specific=(7,)), [1, 2], []),
        (VersionPolicy(latest=None, all=True), [5, 1, 3], [1, 3, 5]),
        (VersionPolicy(), [], []),
        (VersionPolicy(latest=3), [], []),
        (VersionPolicy(latest=None, specific=(1,)), [], []),
        (VersionPolicy(latest=None, all=True), [], []),
    ],
)
def test_version_policy_select(
    policy: VersionPolicy, available: list[int], expected: list[int]
) -> None:
    assert policy.select(available) == expected


# --------------------------------------------------------------------------- parse_model_toml


def test_parse_model_toml_defaults(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    spec = parse_model_toml(model_dir, {})
    assert spec == ModelSpec(name="resnet", path=model_dir)
    assert spec.max_batch_size is None
    assert spec.version_policy == VersionPolicy(latest=1)
    assert spec.artifact_name == "model.onnx"
    assert spec.executor_preference == ("cuda", "cpu-onnx")
    assert spec.placement == "first"


def test_parse_model_toml_every_key(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    spec = parse_model_toml(
        model_dir,
        {
            "name": "resnet",
            "format": "onnx",
            "max_batch_size": 4,
            "executors": ["npu", "cpu-onnx"],
            "placement": "auto",
            "instances": 2,
            "version_policy": {"latest": 2},
            "inputs": [{"name": "x", "datatype": "TYPE_FP32", "dims": [3, -1]}],
            "outputs": [{"name": "y", "datatype": "int64"}, {"name": "z", "dims": []}],
        },
    )
    assert spec.max_batch_size == 4
    assert spec.executors == ("npu", "cpu-onnx")
    assert spec.executor_preference == ("npu", "cpu-onnx")
    assert spec.placement == "auto"
    assert spec.instances == 2
    assert spec.version_policy == VersionPolicy(latest=2)
    assert spec.inputs == (TensorDecl("x", FP32, (3, -1)),)
    assert spec.outputs == (TensorDecl("y", INT64, None), TensorDecl("z", None, ()))


@pytest.mark.parametrize(
    ("raw", "policy"),
    [
        ({"latest": 3}, VersionPolicy(latest=3)),
        ({"specific": [2, 5]}, VersionPolicy(latest=None, specific=(2, 5))),
        ({"all": True}, VersionPolicy(latest=None, all=True)),
    ],
)
def test_parse_version_policy(tmp_path: Path, raw: dict[str, Any], policy: VersionPolicy) -> None:
    assert parse_model_toml(_model_dir(tmp_path), {"version_policy": raw}).version_policy == policy


@pytest.mark.parametrize("mbs", [0, 1, 64])
def test_parse_max_batch_size(tmp_path: Path, mbs: int) -> None:
    assert parse_model_toml(_model_dir(tmp_path), {"max_batch_size": mbs}).max_batch_size == mbs


INVALID_TOML = [
    pytest.param({"max_batch": 4}, "max_batch", id="unknown-key"),
    pytest.param({"name": "other"}, "'name'", id="name-mismatch"),
    pytest.param({"name": 5}, "'name'", id="name-not-string"),
    pytest.param({"format": "tensorflow_savedmodel"}, "'format'", id="unknown-format"),
    pytest.param({"format": ["onnx"]}, "'format'", id="format-not-string"),
    pytest.param({"max_batch_size": -1}, "'max_batch_size'", id="negative-max-batch-size"),
    pytest.param({"max_batch_size": "8"}, "'max_batch_size'", id="string-max-batch-size"),
    pytest.param({"max_batch_size": True}, "'max_batch_size'", id="bool-max-batch-size"),
    pytest.param({"max_batch_size": 2.0}, "'max_batch_size'", id="float-max-batch-size"),
    pytest.param({"executors": "cpu-onnx"}, "'executors'", id="executors-not-list"),
    pytest.param({"executors": [1]}, "'executors'", id="executors-not-strings"),
    pytest.param({"placement": "fastest"}, "'placement'", id="unknown-placement"),
    pytest.param({"placement": 1}, "'placement'", id="placement-not-string"),
    pytest.param({"instances": 0}, "'instances'", id="zero-instances"),
    pytest.param({"instances": 65}, "'instances'", id="too-many-instances"),
    pytest.param({"instances": True}, "'instances'", id="bool-instances"),
    pytest.param({"version_policy": "latest"}, "'version_policy'", id="policy-not-table"),
    pytest.param({"version_policy": {}}, "'version_policy'", id="policy-empty"),
    pytest.param(
        {"version_policy": {"latest": 1, "all": True}}, "'version_policy'", id="policy-two-kinds"
    ),
    pytest.param({"version_policy": {"latest": 0}}, "version_policy.latest", id="latest-zero"),
    pytest.param({"version_policy": {"latest": -2}}, "version_policy.latest", id="latest-negative"),
    pytest.param({"version_policy": {"latest": True}}, "version_policy.latest", id="latest-bool"),
    pytest.param({"version_policy": {"latest": "2"}}, "version_policy.latest", id="latest-string"),
    pytest.param(
        {"version_policy": {"specific": []}}, "version_policy.specific", id="specific-empty"
    ),
    pytest.param(
        {"version_policy": {"specific": [1, 0]}}, "version_policy.specific", id="specific-zero"
    ),
    pytest.param(
        {"version_policy": {"specific": 3}}, "version_policy.specific", id="specific-not-list"
    ),
    pytest.param(
        {"version_policy": {"specific": [True]}}, "version_policy.specific", id="specific-bool"
    ),
    pytest.param({"version_policy": {"all": False}}, "version_policy.all", id="all-false"),
    pytest.param(
        {"version_policy": {"newest": 1}}, "version_policy.newest", id="policy-unknown-kind"
    ),
    pytest.param({"inputs": {"name": "x"}}, "'inputs'", id="inputs-not-array"),
    pytest.param({"outputs": ["y"]}, "'outputs[0]'", id="output-not-table"),
    pytest.param(
        {"inputs": [{"name": "x", "shape": [1]}]}, "inputs[0].shape", id="decl-unknown-key"
    ),
    pytest.param({"inputs": [{"datatype": "FP32"}]}, "inputs[0].name", id="decl-no-name"),
    pytest.param({"inputs": [{"name": ""}]}, "inputs[0].name", id="decl-empty-name"),
    pytest.param(
        {"inputs": [{"name": "x"}, {"name": 3}]}, "inputs[1].name", id="decl-name-not-string"
    ),
    pytest.param(
        {"outputs": [{"name": "y", "datatype": "FLOAT"}]},
        "outputs[0].datatype",
        id="decl-bad-datatype",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "dims": [3, -2]}]},
        "inputs[0].dims",
        id="decl-dim-below-minus-one",
    ),
    pytest.param(
        {"inputs": [{"name": "x", "dims": "3"}]}, "inputs[0].dims", id="decl-dims-not-list"
    ),
    pytest.param(
        {"inputs": [{"name": "x", "dims": [1.5]}]}, "inputs[0].dims", id="decl-dims-float"
    ),
    pytest.param(
        {"inputs": [{"name": "x", "dims": [True]}]}, "inputs[0].dims", id="decl-dims-bool"
    ),
]


@pytest.mark.parametrize(("data", "key"), INVALID_TOML)
def test_parse_model_toml_refuses(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    model_dir = _model_dir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        parse_model_toml(model_dir, data)
    message = str(info.value)
    assert key in message
    assert str(model_dir / "model.toml") in message


def test_read_model_spec(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    (model_dir / "model.toml").write_text('name = "resnet"\nmax_batch_size = 2\n')
    assert read_model_spec(model_dir).max_batch_size == 2


def test_read_model_spec_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="'resnet'"):
        read_model_spec(tmp_path / "resnet")


def test_read_model_spec_no_toml_no_version(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no model\.toml and no version folder"):
        read_model_spec(model_dir)


@pytest.mark.parametrize("content", [b"name = \n", b'name = "\xff"\n'], ids=["toml", "utf8"])
def test_read_model_spec_not_toml(tmp_path: Path, content: bytes) -> None:
    model_dir = _model_dir(tmp_path)
    (model_dir / "model.toml").write_bytes(content)
    with pytest.raises(ModelLoadError, match="not valid TOML"):
        read_model_spec(model_dir)


def test_list_models(tmp_path: Path) -> None:
    """Every folder not starting with "." is a model, model.toml or not: one that cannot be
    served fails its own load, with the reason, instead of being skipped."""
    for name in ["b", "a", ".hidden", "no_toml", "lost+found", "__pycache__"]:
        (tmp_path / name).mkdir()
    for name in ["b", "a", ".hidden"]:
        (tmp_path / name / "model.toml").write_text("")
    (tmp_path / "file.toml").write_text("")
    assert list_models(tmp_path) == ["a", "b", "no_toml"]
    assert list_models(tmp_path / "absent") == []


# --------------------------------------------------------------------------- version folders


def test_available_versions_ignores_other_folders(tmp_path: Path) -> None:
    model_dir = _model_dir(
        tmp_path, versions=("10", "2", "1", "0", ".3", ".tmp-4", "v5", "6.tmp", "latest", "-7")
    )
    (model_dir / "8").write_text("a file, not a folder")
    (model_dir / "model.toml").write_text("")
    assert available_versions(model_dir) == [1, 2, 10]


def test_available_versions_ignores_unicode_digit_folders(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, versions=("1", "\u00b2", "\u0663"))  # superscript 2, Arabic 3
    assert available_versions(model_dir) == [1]


def test_available_versions_name_existing_folders(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, versions=("1", "01", "007", "+2", "3"))
    versions = available_versions(model_dir)
    assert versions == [1, 3]
    assert all((model_dir / str(v)).is_dir() for v in versions)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("12", 12),
        ("1000000", 1000000),
        ("0", None),
        ("01", None),
        ("+1", None),
        ("-1", None),
        (" 1", None),
        ("1.0", None),
        ("", None),
        ("\u00b2", None),
        ("\u0661", None),
        ("v1", None),
    ],
)
def test_parse_version(text: str, expected: int | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [("3\n", [3]), ("2\n1\n", [1, 2]), ("  4 2  4\n", [2, 4]), ("1", [1])],
)
def test_read_active(tmp_path: Path, content: str, expected: list[int]) -> None:
    model_dir = _model_dir(tmp_path)
    (model_dir / "ACTIVE").write_text(content)
    assert read_active(model_dir) == expected


def test_read_active_absent(tmp_path: Path) -> None:
    assert read_active(_model_dir(tmp_path)) is None


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n  \n", id="blank"),
        pytest.param(b"latest\n", id="word"),
        pytest.param(b"1\nv2\n", id="one-bad-line"),
        pytest.param(b"0\n", id="zero"),
        pytest.param(b"-1\n", id="negative"),
        pytest.param(b"1.5\n", id="fraction"),
        pytest.param(b"01\n", id="leading-zero"),
        pytest.param("\u00b2\n".encode(), id="unicode-digit"),
        pytest.param(b"\xff\xfe1\n", id="not-utf8"),
    ],
)
def test_read_active_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    model_dir = _model_dir(tmp_path)
    (model_dir / "ACTIVE").write_bytes(content)
    with pytest.raises(ModelLoadError, match="ACTIVE"):
        read_active(model_dir)


@pytest.mark.parametrize(
    ("folders", "active", "policy", "expected"),
    [
        (("1", "2", "3"), None, VersionPolicy(), [3]),
        (("1", "2", "3"), None, VersionPolicy(latest=2), [2, 3]),
        (("1", "2", "3"), "1\n", VersionPolicy(), [1]),  # ACTIVE wins over the policy
        (("1", "2", "3"), "3\n1\n", VersionPolicy(latest=None, all=True), [1, 3]),
        (("1", "2", "3"), None, VersionPolicy(latest=None, specific=(2, 9)), [2]),
    ],
)
def test_versions_to_serve(
    tmp_path: Path,
    folders: tuple[str, ...],
    active: str | None,
    policy: VersionPolicy,
    expected: list[int],
) -> None:
    model_dir = _model_dir(tmp_path, versions=folders)
    if active is not None:
        (model_dir / "ACTIVE").write_text(active)
    spec = ModelSpec(name="resnet", path=model_dir, version_policy=policy)
    assert versions_to_serve(spec) == expected


@pytest.mark.parametrize(
    ("folders", "active", "policy", "match"),
    [
        (("1", "2"), "2\n5\n", VersionPolicy(), "names version 5"),
        (("1",), "garbage\n", VersionPolicy(), "ACTIVE"),
        ((), None, VersionPolicy(), "'resnet'.*no version folder"),
        (("1", "2"), None, VersionPolicy(latest=None, specific=(3,)), "'resnet'.*no version"),
    ],
)
def test_versions_to_serve_refuses(
    tmp_path: Path, folders: tuple[str, ...], active: str | None, policy: VersionPolicy, match: str
) -> None:
    model_dir = _model_dir(tmp_path, versions=folders)
    if active is not None:
        (model_dir / "ACTIVE").write_text(active)
    spec = ModelSpec(name="resnet", path=model_dir, version_policy=policy)
    with pytest.raises(ModelLoadError, match=match):
        versions_to_serve(spec)


# --------------------------------------------------------------------------- resolve_signature


def _sig(
    inputs: list[tuple[str, DataType, tuple[int, ...]]],
    outputs: list[tuple[str, DataType, tuple[int, ...]]],
    mbs: int = 0,
) -> Signature:
    return Signature(
        tuple(TensorSpec(*t) for t in inputs), tuple(TensorSpec(*t) for t in outputs), mbs
    )


BATCHABLE = _sig([("x", FP32, (-1, 3)), ("ids", INT64, (-1,))], [("y", FP32, (-1, -1))])
FIXED_AXIS0 = _sig([("x", FP32, (1, 3))], [("y", FP32, (1, 3))])
SCALAR_INPUT = _sig([("scale", FP32, ()), ("x", FP32, (-1, 3))], [("y", FP32, (-1, 3))])
FIXED_OUTPUT = _sig([("x", FP32, (-1, 3))], [("y", FP32, (2, 3))])


def _spec(tmp_path: Path, **data: Any) -> ModelSpec:
    return parse_model_toml(_model_dir(tmp_path, "m"), data)


@pytest.mark.parametrize(
    ("artifact", "data", "default", "expected"),
    [
        pytest.param(
            BATCHABLE,
            {},
            8,
            BATCHABLE.__class__(BATCHABLE.inputs, BATCHABLE.outputs, 8),
            id="batchable-default",
        ),
        pytest.param(BATCHABLE, {}, 0, BATCHABLE, id="batchable-default-zero"),
        pytest.param(
            BATCHABLE,
            {"max_batch_size": 2},
            8,
            _sig([("x", FP32, (-1, 3)), ("ids", INT64, (-1,))], [("y", FP32, (-1, -1))], 2),
            id="batchable-explicit",
        ),
        pytest.param(BATCHABLE, {"max_batch_size": 0}, 8, BATCHABLE, id="batchable-turned-off"),
        pytest.param(FIXED_AXIS0, {}, 8, FIXED_AXIS0, id="fixed-axis0-not-batched"),
        pytest.param(SCALAR_INPUT, {}, 8, SCALAR_INPUT, id="scalar-input-not-batched"),
        pytest.param(FIXED_OUTPUT, {}, 8, FIXED_OUTPUT, id="fixed-output-not-batched"),
        pytest.param(FIXED_AXIS0, {"max_batch_size": 0}, 8, FIXED_AXIS0, id="fixed-explicit-0"),
        pytest.param(
            BATCHABLE,
            {
                "inputs": [{"name": "x", "datatype": "FP32", "dims": [3]}],
                "outputs": [{"name": "y", "dims": [5]}],
            },
            4,
            _sig([("x", FP32, (-1, 3)), ("ids", INT64, (-1,))], [("y", FP32, (-1, 5))], 4),
            id="batched-decl-narrows-dynamic-dim",
        ),
        pytest.param(
            _sig([("x", FP32, (-1, -1))], [("y", FP32, (-1,))]),
            {"max_batch_size": 0, "inputs": [{"name": "x", "dims": [2, 7]}]},
            8,
            _sig([("x", FP32, (2, 7))], [("y", FP32, (-1,))]),
            id="unbatched-decl-narrows-every-dim",
        ),
        pytest.param(
            _sig([("b", FP32, (-1, 3)), ("a", FP32, (-1, -1))], [("y", FP32, (-1,))]),
            {"inputs": [{"name": "a", "dims": [4]}]},
            8,
            _sig([("b", FP32, (-1, 3)), ("a", FP32, (-1, 4))], [("y", FP32, (-1,))], 8),
            id="decl-keeps-artifact-order",
        ),
    ],
)
def test_resolve_signature(
    tmp_path: Path, artifact: Signature, data: dict[str, Any], default: int, expected: Signature
) -> None:
    assert resolve_signature(artifact, _spec(tmp_path, **data), default) == expected


@pytest.mark.parametrize(
    ("artifact", "data", "match"),
    [
        pytest.param(
            FIXED_AXIS0,
            {"max_batch_size": 4},
            "max_batch_size = 4.*input 'x'",
            id="batching-fixed-axis0",
        ),
        pytest.param(
            SCALAR_INPUT, {"max_batch_size": 1}, "input 'scale'", id="batching-scalar-input"
        ),
        pytest.param(FIXED_OUTPUT, {"max_batch_size": 2}, "output 'y'", id="batching-fixed-output"),
        pytest.param(
            BATCHABLE,
            {"inputs": [{"name": "x", "datatype": "INT32"}]},
            "input 'x'.*INT32.*FP32",
            id="datatype-mismatch",
        ),
        pytest.param(
            BATCHABLE,
            {"outputs": [{"name": "y", "datatype": "FP16"}]},
            "output 'y'.*FP16",
            id="output-datatype-mismatch",
        ),
        pytest.param(
            BATCHABLE, {"inputs": [{"name": "z"}]}, "input 'z'.*does not have", id="unknown-input"
        ),
        pytest.param(
            BATCHABLE,
            {"outputs": [{"name": "x"}]},
            "output 'x'.*does not have",
            id="input-declared-as-output",
        ),
        pytest.param(
            BATCHABLE,
            {"inputs": [{"name": "x", "dims": [4]}]},
            "input 'x'.*dims",
            id="dims-conflict-fixed-dim",
        ),
        pytest.param(
            BATCHABLE,
            {"inputs": [{"name": "x", "dims": [3, 1]}]},
            "input 'x'.*dims",
            id="dims-wrong-rank",
        ),
        pytest.param(
            BATCHABLE,
            {"inputs": [{"name": "x", "dims": [-1, 3]}]},
            "input 'x'.*dims",
            id="dims-include-batch-axis",
        ),
        pytest.param(
            FIXED_AXIS0,
            {"inputs": [{"name": "x", "dims": [1, -1]}]},
            "input 'x'.*dims",
            id="dims-widen-fixed-dim",
        ),
    ],
)
def test_resolve_signature_refuses(
    tmp_path: Path, artifact: Signature, data: dict[str, Any], match: str
) -> None:
    with pytest.raises(ModelLoadError, match=match) as info:
        resolve_signature(artifact, _spec(tmp_path, **data), 8)
    assert "'m'" in str(info.value)


# --------------------------------------------------------------------------- format detection


def _artifacts(model_dir: Path, version: str, *names: str) -> None:
    (model_dir / version).mkdir(parents=True, exist_ok=True)
    for name in names:
        (model_dir / version / name).write_bytes(b"x")


@pytest.mark.parametrize(
    ("files", "fmt"),
    [
        (("model.onnx",), "onnx"),
        (("model.tflite", "labels.txt"), "tflite"),
        (("model_edgetpu.tflite",), "edgetpu-tflite"),
        (("manifest.json", "overlay.bit", "overlay.hwh"), "pynq-bundle"),
    ],
)
def test_detect_format(tmp_path: Path, files: tuple[str, ...], fmt: str) -> None:
    model_dir = _model_dir(tmp_path)
    _artifacts(model_dir, "1", *files)
    assert detect_format(model_dir / "1") == fmt
    spec = read_model_spec(model_dir)  # no model.toml: the artifact decides
    assert (spec.format, spec.configured, spec.name) == (fmt, False, "resnet")
    assert spec.artifact_name == files[0]


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (("model.pt",), "holds model.pt, which is no artifact edged serves"),
        ((), "holds nothing, which is no artifact"),
        (("model.onnx", "model.tflite"), r"artifacts of 2 formats \(model.onnx, model.tflite\)"),
        (("model.tflite", "model_edgetpu.tflite"), "artifacts of 2 formats"),
    ],
    ids=["unknown", "empty", "onnx-and-tflite", "cpu-and-edgetpu"],
)
def test_detect_format_refuses(tmp_path: Path, files: tuple[str, ...], match: str) -> None:
    model_dir = _model_dir(tmp_path)
    _artifacts(model_dir, "1", *files)
    with pytest.raises(ModelLoadError, match=match):
        read_model_spec(model_dir)


def test_format_from_model_toml_wins(tmp_path: Path) -> None:
    """model.toml's format picks one of two artifacts; without format the artifact decides."""
    model_dir = _model_dir(tmp_path)
    _artifacts(model_dir, "1", "model.onnx", "model.tflite")
    (model_dir / "model.toml").write_text('format = "tflite"\n')
    assert read_model_spec(model_dir).format == "tflite"
    (model_dir / "model.toml").write_text("max_batch_size = 0\n")
    with pytest.raises(ModelLoadError, match="2 formats"):
        read_model_spec(model_dir)
    (model_dir / "1" / "model.onnx").unlink()
    spec = read_model_spec(model_dir)
    assert (spec.format, spec.max_batch_size, spec.configured) == ("tflite", 0, True)


def test_versions_of_different_formats_conflict(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    _artifacts(model_dir, "1", "model.onnx")
    _artifacts(model_dir, "2", "model.tflite")
    with pytest.raises(ModelLoadError, match="version 1: onnx, version 2: tflite"):
        read_model_spec(model_dir)


def test_model_toml_without_versions_defaults_to_onnx(tmp_path: Path) -> None:
    """A model.toml waiting for its first version (an OTA target) keeps the old default."""
    model_dir = _model_dir(tmp_path)
    (model_dir / "model.toml").write_text("")
    assert read_model_spec(model_dir).format == "onnx"


def test_unreadable_model_toml_names_the_file(tmp_path: Path) -> None:
    """A model.toml the daemon cannot read (here a folder: root reads everything else) is
    this model's load error, naming the file and the system's reason."""
    model_dir = _model_dir(tmp_path)
    (model_dir / "model.toml").mkdir()
    with pytest.raises(ModelLoadError, match=r"model.toml: cannot read it: Is a directory"):
        read_model_spec(model_dir)


# --------------------------------------------------------------------------- [[warmup]]


def test_parse_warmup(tmp_path: Path) -> None:
    spec = parse_model_toml(
        _model_dir(tmp_path),
        {
            "warmup": [
                {
                    "name": "speech",
                    "batch_size": 2,
                    "count": 3,
                    "inputs": {
                        "input": {"dims": [512], "random_data": True},
                        "state": {"dims": [2, 1, 128], "zero_data": True},
                        "sr": {"input_data_file": "warmup/sr.npy"},
                    },
                }
            ]
        },
    )
    (w,) = spec.warmup
    assert (w.name, w.batch_size, w.count, w.where) == ("speech", 2, 3, "warmup[0]")
    assert w.inputs == (
        WarmupInput("input", (512,), "random_data"),
        WarmupInput("state", (2, 1, 128), "zero_data"),
        WarmupInput("sr", None, "input_data_file", "warmup/sr.npy"),
    )


def _w(**inputs: Any) -> dict[str, Any]:
    return {"warmup": [{"name": "w", "inputs": inputs}]}


INVALID_WARMUP = [
    pytest.param({"warmup": {"name": "w"}}, "'warmup' must be an array", id="not-array"),
    pytest.param({"warmup": ["w"]}, "'warmup[0]' must be a table", id="entry-not-table"),
    pytest.param(
        {"warmup": [{"name": "w", "inputs": {"x": {"dims": [], "zero_data": True}}, "n": 1}]},
        "unknown key 'warmup[0].n'",
        id="unknown-key",
    ),
    pytest.param({"warmup": [{"inputs": {}}]}, "'warmup[0].name'", id="no-name"),
    pytest.param(
        {"warmup": [{"name": "w", "batch_size": 0, "inputs": {"x": {}}}]},
        "'warmup[0].batch_size'",
        id="batch-size-zero",
    ),
    pytest.param(
        {"warmup": [{"name": "w", "count": True, "inputs": {"x": {}}}]},
        "'warmup[0].count'",
        id="count-bool",
    ),
    pytest.param({"warmup": [{"name": "w"}]}, "'warmup[0].inputs'", id="no-inputs"),
    pytest.param(_w(x=[1]), "'warmup[0].inputs.x' must be a table", id="input-not-table"),
    pytest.param(_w(x={"dims": [1]}), "'warmup[0].inputs.x' needs exactly one", id="no-data"),
    pytest.param(
        _w(x={"dims": [1], "zero_data": True, "random_data": True}),
        "'warmup[0].inputs.x' needs exactly one",
        id="two-data",
    ),
    pytest.param(
        _w(x={"dims": [1], "zero_data": False}), "'warmup[0].inputs.x.zero_data'", id="false"
    ),
    pytest.param(_w(x={"zero_data": True}), "'warmup[0].inputs.x.dims' is missing", id="dims"),
    pytest.param(
        _w(x={"dims": [-1], "random_data": True}), "'warmup[0].inputs.x.dims'", id="dims-dynamic"
    ),
    pytest.param(
        _w(x={"dims": [1], "zero_data": True, "data_type": "TYPE_FP32"}),
        "unknown key 'warmup[0].inputs.x.data_type'",
        id="input-unknown-key",
    ),
    pytest.param(
        _w(x={"input_data_file": "../x.npy"}),
        "'warmup[0].inputs.x.input_data_file'",
        id="file-escapes",
    ),
    pytest.param(
        _w(x={"input_data_file": "x.bin"}), "'warmup[0].inputs.x.input_data_file'", id="not-npy"
    ),
]


@pytest.mark.parametrize(("data", "key"), INVALID_WARMUP)
def test_parse_warmup_refuses(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        parse_model_toml(_model_dir(tmp_path), data)
    assert key in str(info.value)


# --------------------------------------------------------------------------- completed config


def test_model_toml_text_round_trips(tmp_path: Path) -> None:
    """ModelConfig's model_toml: copied into model.toml, it describes the same model."""
    import tomllib

    from edged.serving.repository import model_toml_text

    model_dir = _model_dir(tmp_path, "vad", ("1",))
    (model_dir / "1" / "model.onnx").write_bytes(b"x")
    spec = read_model_spec(model_dir)
    artifact = Signature(
        inputs=(
            TensorSpec("input", FP32, (-1, -1)),
            TensorSpec("state", FP32, (2, -1, 128)),
            TensorSpec("sr", INT64, ()),
        ),
        outputs=(TensorSpec("output", FP32, (-1, 1)),),
    )
    served = resolve_signature(artifact, spec, default_max_batch_size=8)
    text = model_toml_text(spec, served)
    again = parse_model_toml(model_dir, tomllib.loads(text))
    assert (again.format, again.max_batch_size, again.configured) == ("onnx", 0, True)
    assert again.executor_preference == spec.executor_preference
    assert resolve_signature(artifact, again, default_max_batch_size=8) == served
    assert again.inputs[2] == TensorDecl("sr", INT64, ())


def test_model_toml_text_of_a_batching_model(tmp_path: Path) -> None:
    import tomllib

    from edged.serving.repository import model_toml_text

    model_dir = _model_dir(tmp_path, "cls", ("1",))
    (model_dir / "1" / "model.onnx").write_bytes(b"x")
    spec = read_model_spec(model_dir)
    artifact = Signature(
        inputs=(TensorSpec("x", FP32, (-1, 3, -1, -1)),),
        outputs=(TensorSpec("y", FP32, (-1, 2)),),
    )
    served = resolve_signature(artifact, spec, default_max_batch_size=8)
    text = model_toml_text(spec, served)
    assert "max_batch_size = 8" in text
    assert "dims = [3, -1, -1]" in text  # without the batch axis, as Triton's dims
    again = parse_model_toml(model_dir, tomllib.loads(text))
    assert resolve_signature(artifact, again, default_max_batch_size=8) == served
