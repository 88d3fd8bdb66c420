"""The model repository on disk: model.toml, version folders, ACTIVE, version policy.

Rules only (parsing, validation, format detection, policy selection, signature resolution);
the manager does the loading, and the version folders and ACTIVE have their own module
(``edged.serving.versions``: reads and writes). Layout::

    <repo>/<model>/<version>/model.onnx     numeric version folders; others are ignored
    <repo>/<model>/model.toml               optional: narrows what the artifact declares
    <repo>/<model>/warmup/*.npz             optional: warm-up samples, one request each
    <repo>/<model>/ACTIVE                   optional: the versions served, one per line

Every folder of the repository whose name does not start with "." is a model (but
``lost+found`` and ``__pycache__``): one that
cannot be served (no artifact edged knows, two that conflict, an unreadable folder) fails
to load with the reason, and RepositoryIndex lists it UNAVAILABLE with that reason.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edged.core.errors import ModelLoadError, ModelNotFoundError
from edged.core.types import LEARN_STRATEGIES, DataType, Signature, TensorSpec
from edged.serving.partition_spec import PartitionSpec, parse_partition
from edged.serving.versions import VersionPolicy, available_versions, parse_version
from hal.placement import PLACEMENT_MODES, default_executors
from hal.remote_target import RemoteTarget

MODEL_TOML = "model.toml"
WARMUP_DIR = "warmup"
"""``<repo>/<model>/warmup/``: .npz warm-up samples (one request's inputs each), and the .npy
files ``[[warmup]]`` entries name."""

#: artifact file name and default executors (hal.placement's rules) for each format
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnx": ("model.onnx", default_executors("onnx")),
    "tflite": ("model.tflite", default_executors("tflite")),
    # Only the Edge TPU runs edgetpu-custom-op; cpu-litert refuses such a model.
    "edgetpu-tflite": ("model_edgetpu.tflite", default_executors("edgetpu-tflite")),
    # An FPGA bundle: manifest.json beside the bitstream and .hwh in the version folder.
    "pynq-bundle": ("manifest.json", default_executors("pynq-bundle")),
}

#: Triton's platform and backend names, which its tools key on
PLATFORMS: dict[str, tuple[str, str]] = {
    "onnx": ("onnxruntime_onnx", "onnxruntime"),
    # Triton's TFLite backend is `backend: "tflite"` with no platform of its own; the backend
    # name stands in for it. An Edge TPU model is a TFLite model to every Triton tool.
    "tflite": ("tflite", "tflite"),
    "edgetpu-tflite": ("tflite", "tflite"),
    "pynq-bundle": ("pynq", "pynq"),
}


@dataclass(frozen=True)
class DynamicBatching:
    """model.toml's ``[dynamic_batching]``: how requests queue and merge (Triton's names).
    The queue keys apply to models that cannot batch too."""

    enabled: bool = True
    """Merge queued requests into batches (only when max_batch_size > 0)."""
    max_queue_delay_us: int = 0
    """How long the oldest request may wait for a fuller batch; 0: merge only what is
    already queued when an instance frees up, never adding latency."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes dispatched at once, without waiting for the delay."""
    max_queue_size: int = 128
    """Requests waiting; one more is refused with RESOURCE_EXHAUSTED at once."""
    default_timeout_us: int = 0
    """A request not answered in this time fails with DEADLINE_EXCEEDED; 0: no limit. A
    request's own ``timeout`` parameter (µs) overrides it."""
    priority_levels: int = 1
    """Priority levels 1 (highest) .. N; a request's ``priority`` parameter picks one."""
    default_priority_level: int = 1
    """Level of a request that gives no priority."""


@dataclass(frozen=True)
class TensorDecl:
    """An input or output as model.toml declares it (dims exclude the batch axis when the
    model batches, as in Triton's config.pbtxt)."""

    name: str
    datatype: DataType | None = None
    dims: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LearnSpec:
    """model.toml's ``[learn]``: the model is a frozen backbone plus a trainable head, and
    edged may fine-tune the head on the device (docs/learning.md). Every file is in each
    version folder: a fine-tuned version carries its own copy."""

    backbone: str = "backbone.onnx"
    """The frozen backbone (ONNX); its output ``features`` feeds the head."""
    features: str = "features"
    """The backbone output the head reads: FP32 [N, D]."""
    head: str = "head.npz"
    """The head's weights and feature standardisation (edged.learn.head)."""
    state: str = "learn_state.npz"
    """What the strategy carries between fine-tunes: replay and held-out buffers, Fisher, LDA
    statistics (edged.learn.strategies.LearnState)."""
    strategy: str = "replay+lwf"
    """The continual-learning strategy of a fine-tune that names none."""


#: how a [[warmup]] input's values are made (Triton's model_warmup input_data_type)
WARMUP_DATA = ("zero_data", "random_data", "input_data_file")


@dataclass(frozen=True)
class WarmupInput:
    """One input of a ``[[warmup]]`` sample: its dims (without the batch axis when the model
    batches) and where its values come from."""

    name: str
    dims: tuple[int, ...] | None
    """None: the shape of ``input_data_file``'s array."""
    data: str
    """"zero_data", "random_data" or "input_data_file"."""
    file: str = ""
    """With "input_data_file": a .npy file, relative to the model folder."""


@dataclass(frozen=True)
class WarmupSpec:
    """model.toml's ``[[warmup]]`` table (Triton's ``model_warmup``): a sample run ``count``
    times on every instance before the version takes traffic; a failure fails the load."""

    name: str
    batch_size: int = 1
    """Requests of the sample merged into one batch (1 for a model that does not batch)."""
    count: int = 1
    """Times the sample runs on each instance."""
    inputs: tuple[WarmupInput, ...] = ()
    where: str = ""
    """``warmup[i]``, for error messages."""


@dataclass(frozen=True)
class ModelSpec:
    """One model's model.toml, validated."""

    name: str
    path: Path
    format: str = "onnx"
    max_batch_size: int | None = None
    """None: batch when the artifact allows it, up to the daemon's default."""
    executors: tuple[str, ...] = ()
    """Executor kinds to try, best first; () takes the format's defaults."""
    placement: str = "first"
    """"first": the first candidate that loads and warms up; "auto": time every candidate's
    warm-up and keep the fastest."""
    instances: int | None = None
    """Copies of the model, each on its own worker thread; None: the daemon's default."""
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    inputs: tuple[TensorDecl, ...] = ()
    outputs: tuple[TensorDecl, ...] = ()
    learn: LearnSpec | None = None
    """None: the model is not trainable on the device."""
    warmup: tuple[WarmupSpec, ...] = ()
    """model.toml's ``[[warmup]]`` samples, in order."""
    remote: RemoteTarget | None = None
    """model.toml's ``[remote]``: the server the ``remote`` executor sends it to (split
    execution, docs/partition.md); None without one."""
    partition: PartitionSpec | None = None
    """model.toml's ``[partition]``: the cuts a split model may serve and re-planning
    (edged.serving.partition_spec); None without one."""
    pipeline: PipelineSpec | None = None
    """model.toml's ``[pipeline]``: the model is a pipeline of other models' steps
    (docs/pipelines.md), with no artifact of its own; None for a model."""
    configured: bool = True
    """False: the folder has no model.toml; everything was read from the artifact."""

    @property
    def artifact_name(self) -> str:
        """The artifact's file name inside a version folder."""
        return FORMATS[self.format][0]

    @property
    def executor_preference(self) -> tuple[str, ...]:
        """Executors to try, best first."""
        return self.executors or FORMATS[self.format][1]


_MODEL_KEYS = {
    "dynamic_batching",
    "name",
    "format",
    "max_batch_size",
    "executors",
    "placement",
    "instances",
    "version_policy",
    "inputs",
    "outputs",
    "learn",
    "warmup",
    "remote",
    "partition",
    "pipeline",
}

#: the keys a pipeline's model.toml may hold (the others describe an artifact)
_PIPELINE_MODEL_KEYS = {"name", "max_batch_size", "inputs", "outputs", "pipeline"}


@dataclass(frozen=True)
class PipelineStep:
    """One ``[[pipeline.step]]``: a model of the repository run on tensors of the pipeline
    (Triton's ensemble step)."""

    name: str
    """How errors and statistics name the step (default: the model's name)."""
    model: str
    version: int | None = None
    """None: the version the router picks (the highest served) at each request."""
    input_map: tuple[tuple[str, str], ...] = ()
    """(model input, pipeline tensor) pairs: what the step is fed."""
    output_map: tuple[tuple[str, str], ...] = ()
    """(model output, pipeline tensor) pairs: what the step makes for later steps and the
    pipeline's outputs; outputs not named are not asked for."""


@dataclass(frozen=True)
class PipelineSpec:
    """model.toml's ``[pipeline]``: the steps, in the order written (they run in the order
    their tensors allow, independent ones at the same time)."""

    steps: tuple[PipelineStep, ...]


def _fail(path: Path, message: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {message}")


def _tensor_decls(path: Path, key: str, raw: Any) -> tuple[TensorDecl, ...]:
    if not isinstance(raw, list):
        raise _fail(path, f"'{key}' must be an array of tables ([[{key}]])")
    decls = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, f"'{where}' must be a table")
        unknown = set(item) - {"name", "datatype", "dims"}
        if unknown:
            raise _fail(path, f"unknown key '{where}.{sorted(unknown)[0]}'")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(path, f"'{where}.name' must be a non-empty string")
        datatype = None
        if "datatype" in item:
            try:
                datatype = DataType(str(item["datatype"]).upper().removeprefix("TYPE_"))
            except ValueError:
                raise _fail(
                    path, f"'{where}.datatype' {item['datatype']!r} is not a KServe datatype"
                ) from None
        dims = None
        if "dims" in item:
            d = item["dims"]
            if not isinstance(d, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in d
            ):
                raise _fail(path, f"'{where}.dims' must be a list of integers >= -1")
            dims = tuple(d)
        decls.append(TensorDecl(name, datatype, dims))
    return tuple(decls)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dynamic_batching(path: Path, raw: Any) -> DynamicBatching:
    if not isinstance(raw, dict):
        raise _fail(path, "'dynamic_batching' must be a table")
    known = {f.name for f in fields(DynamicBatching)}
    unknown = set(raw) - known
    if unknown:
        raise _fail(path, f"unknown key 'dynamic_batching.{sorted(unknown)[0]}'")
    values = dict(raw)
    if "enabled" in values and not isinstance(values["enabled"], bool):
        raise _fail(path, "'dynamic_batching.enabled' must be true or false")
    minimum = {
        "max_queue_delay_us": 0,
        "max_queue_size": 1,
        "default_timeout_us": 0,
        "priority_levels": 1,
        "default_priority_level": 1,
    }
    for key, low in minimum.items():
        if key in values and not (_is_int(values[key]) and values[key] >= low):
            raise _fail(path, f"'dynamic_batching.{key}' must be an integer >= {low}")
    sizes = values.get("preferred_batch_sizes", [])
    if not isinstance(sizes, list) or not all(_is_int(v) and v > 0 for v in sizes):
        raise _fail(path, "'dynamic_batching.preferred_batch_sizes' must be a list of integers > 0")
    values["preferred_batch_sizes"] = tuple(sorted(set(sizes)))
    result = DynamicBatching(**values)
    if result.default_priority_level > result.priority_levels:
        raise _fail(
            path, "'dynamic_batching.default_priority_level' must be at most 'priority_levels'"
        )
    return result


def _learn(path: Path, fmt: str, raw: Any) -> LearnSpec:
    if not isinstance(raw, dict):
        raise _fail(path, "'learn' must be a table")
    if fmt != "onnx":
        raise _fail(
            path, f"'learn' needs format 'onnx' (the served graph is backbone + head), not {fmt!r}"
        )
    known = {f.name for f in fields(LearnSpec)}
    unknown = set(raw) - known
    if unknown:
        raise _fail(path, f"unknown key 'learn.{sorted(unknown)[0]}'")
    for key, value in raw.items():
        if not isinstance(value, str) or not value:
            raise _fail(path, f"'learn.{key}' must be a non-empty string")
        is_file = key not in {"features", "strategy"}
        if is_file and ("/" in value or "\\" in value or value.startswith(".")):
            raise _fail(path, f"'learn.{key}' must be a file name inside the version folder")
    spec = LearnSpec(**raw)
    if spec.strategy not in LEARN_STRATEGIES:
        raise _fail(
            path,
            f"'learn.strategy' {spec.strategy!r} is not one of {', '.join(LEARN_STRATEGIES)}",
        )
    return spec


def _warmup_input(path: Path, where: str, name: str, raw: Any) -> WarmupInput:
    if not isinstance(raw, dict):
        raise _fail(path, f"'{where}' must be a table")
    unknown = set(raw) - {"dims", *WARMUP_DATA}
    if unknown:
        raise _fail(path, f"unknown key '{where}.{sorted(unknown)[0]}'")
    given = [k for k in WARMUP_DATA if k in raw]
    if len(given) != 1:
        raise _fail(path, f"'{where}' needs exactly one of zero_data, random_data, input_data_file")
    (data,) = given
    value = raw[data]
    file = ""
    if data == "input_data_file":
        if (
            not isinstance(value, str)
            or not value.endswith(".npy")
            or value.startswith(("/", "\\"))
            or ".." in Path(value).parts
        ):
            raise _fail(path, f"'{where}.input_data_file' must be a .npy file in the model folder")
        file = value
    elif value is not True:
        raise _fail(path, f"'{where}.{data}' must be true")
    dims = None
    if "dims" in raw:
        d = raw["dims"]
        if not isinstance(d, list) or not all(_is_int(x) and x >= 0 for x in d):
            raise _fail(path, f"'{where}.dims' must be a list of integers >= 0")
        dims = tuple(d)
    elif data != "input_data_file":
        raise _fail(path, f"'{where}.dims' is missing (the shape of {data})")
    return WarmupInput(name, dims, data, file)


def _warmup(path: Path, raw: Any) -> tuple[WarmupSpec, ...]:
    if not isinstance(raw, list):
        raise _fail(path, "'warmup' must be an array of tables ([[warmup]])")
    samples = []
    for i, item in enumerate(raw):
        where = f"warmup[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, f"'{where}' must be a table")
        unknown = set(item) - {"name", "batch_size", "count", "inputs"}
        if unknown:
            raise _fail(path, f"unknown key '{where}.{sorted(unknown)[0]}'")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(path, f"'{where}.name' must be a non-empty string")
        for key in ("batch_size", "count"):
            if key in item and not (_is_int(item[key]) and 1 <= item[key] <= 1024):
                raise _fail(path, f"'{where}.{key}' must be an integer from 1 to 1024")
        inputs = item.get("inputs")
        if not isinstance(inputs, dict) or not inputs:
            raise _fail(path, f"'{where}.inputs' must be a table of one table per input")
        samples.append(
            WarmupSpec(
                name=name,
                batch_size=item.get("batch_size", 1),
                count=item.get("count", 1),
                inputs=tuple(
                    _warmup_input(path, f"{where}.inputs.{k}", k, v) for k, v in inputs.items()
                ),
                where=where,
            )
        )
    return tuple(samples)


#: [remote]'s keys that name a file; a relative one is read from the model folder
_REMOTE_FILES = ("ca_file", "cert_file", "key_file", "token_file")


def _remote(path: Path, name: str, raw: Any) -> RemoteTarget:
    """model.toml's ``[remote]`` (hal.remote_target.RemoteTarget, whose fields it names)."""
    if not isinstance(raw, dict):
        raise _fail(path, "'remote' must be a table")
    keys = ({f.name for f in fields(RemoteTarget)} - {"timeout_s", "server_s"}) | {"timeout_ms"}
    unknown = set(raw) - keys
    if unknown:
        raise _fail(path, f"unknown key 'remote.{sorted(unknown)[0]}'")
    values = dict(raw)
    address = values.get("address")
    if not isinstance(address, str) or ":" not in address.strip(":"):
        raise _fail(path, "'remote.address' must be HOST:PORT of the server's gRPC listener")
    values.setdefault("model", name)
    for key in ("model", "version", "head", "server_name", *_REMOTE_FILES):
        if key in values and not (isinstance(values[key], str) and (values[key] or key != "model")):
            raise _fail(path, f"'remote.{key}' must be a {'non-empty ' * (key == 'model')}string")
    if values.get("version") and parse_version(values["version"]) is None:
        raise _fail(path, "'remote.version' must be a version number (or empty: the latest)")
    head = values.get("head", "")
    if head and ("/" in head or "\\" in head or head.startswith(".")):
        raise _fail(path, "'remote.head' must be a file name inside the version folder")
    for key, low, high, default in (("timeout_ms", 1, 600_000, 2000), ("retries", 0, 5, 1)):
        value = values.get(key, default)
        if not (_is_int(value) and low <= value <= high):
            raise _fail(path, f"'remote.{key}' must be an integer from {low} to {high}")
    timeout_ms = values.pop("timeout_ms", 2000)
    if not isinstance(values.get("insecure", False), bool):
        raise _fail(path, "'remote.insecure' must be true or false")
    if bool(values.get("cert_file")) != bool(values.get("key_file")):
        raise _fail(path, "'remote.cert_file' and 'remote.key_file' go together")
    # relative to the model folder; an absolute path stays as it is
    values.update({k: str(path.parent / values[k]) for k in _REMOTE_FILES if values.get(k)})
    return RemoteTarget(**values, timeout_s=timeout_ms / 1000)


def _tensor_map(path: Path, where: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v and k for k, v in raw.items()):
        raise _fail(path, f"'{where}' must be a table of model tensor = \"pipeline tensor\"")
    return tuple(raw.items())


def _pipeline(path: Path, raw: Any) -> PipelineSpec:
    if not isinstance(raw, dict):
        raise _fail(path, "'pipeline' must be a table")
    unknown = set(raw) - {"step"}
    if unknown:
        raise _fail(path, f"unknown key 'pipeline.{sorted(unknown)[0]}'")
    items = raw.get("step")
    if not isinstance(items, list) or not items:
        raise _fail(path, "'pipeline.step' must be an array of tables ([[pipeline.step]])")
    steps: list[PipelineStep] = []
    for i, item in enumerate(items):
        where = f"pipeline.step[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, f"'{where}' must be a table")
        unknown = set(item) - {"name", "model", "version", "input_map", "output_map"}
        if unknown:
            raise _fail(path, f"unknown key '{where}.{sorted(unknown)[0]}'")
        model = item.get("model")
        if not isinstance(model, str) or not model:
            raise _fail(path, f"'{where}.model' must be a model name")
        name = item.get("name", model)
        if not isinstance(name, str) or not name:
            raise _fail(path, f"'{where}.name' must be a non-empty string")
        if any(s.name == name for s in steps):
            raise _fail(path, f"'{where}': a step is already named {name!r}; give it a 'name'")
        version = item.get("version")
        if version is not None and not (_is_int(version) and version > 0):
            raise _fail(path, f"'{where}.version' must be a version number (an integer > 0)")
        for key in ("input_map", "output_map"):
            if key not in item:
                raise _fail(path, f"'{where}.{key}' is missing (step '{name}')")
        steps.append(
            PipelineStep(
                name=name,
                model=model,
                version=version,
                input_map=_tensor_map(path, f"{where}.input_map", item["input_map"]),
                output_map=_tensor_map(path, f"{where}.output_map", item["output_map"]),
            )
        )
    return PipelineSpec(tuple(steps))


def _version_policy(path: Path, raw: Any) -> VersionPolicy:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise _fail(
            path,
            "'version_policy' must be one of { latest = N }, { specific = [..] }, { all = true }",
        )
    ((kind, value),) = raw.items()
    if kind == "latest" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return VersionPolicy(latest=value)
    if (
        kind == "specific"
        and isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return VersionPolicy(latest=None, specific=tuple(value))
    if kind == "all" and value is True:
        return VersionPolicy(latest=None, all=True)
    raise _fail(path, f"'version_policy.{kind}' = {value!r} is not valid")


def parse_model_toml(
    model_dir: Path,
    data: Mapping[str, Any],
    default_format: str = "onnx",
    *,
    configured: bool = True,
) -> ModelSpec:
    """Validate model.toml's ``data`` for the model in ``model_dir``; ``default_format`` is
    the format when model.toml names none (the artifact's, see ``detect_format``).

    Raises:
        ModelLoadError: an unknown key or a bad value, named.
    """
    path = model_dir / MODEL_TOML
    unknown = set(data) - _MODEL_KEYS
    if unknown:
        raise _fail(path, f"unknown key '{sorted(unknown)[0]}'")
    name = data.get("name", model_dir.name)
    if name != model_dir.name:
        raise _fail(path, f"'name' is {name!r} but the folder is {model_dir.name!r}")
    if "pipeline" in data:
        return _pipeline_spec(model_dir, data)
    fmt = data.get("format", default_format)
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise _fail(path, f"'format' {fmt!r} is not one of {', '.join(FORMATS)}")
    mbs = data.get("max_batch_size")
    if mbs is not None and (not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 0):
        raise _fail(path, "'max_batch_size' must be an integer >= 0")
    executors = data.get("executors", [])
    if not isinstance(executors, list) or not all(isinstance(e, str) for e in executors):
        raise _fail(path, "'executors' must be a list of executor kinds")
    placement = data.get("placement", "first")
    if placement not in PLACEMENT_MODES:
        raise _fail(path, f"'placement' {placement!r} is not one of {', '.join(PLACEMENT_MODES)}")
    instances = data.get("instances")
    if instances is not None and not (_is_int(instances) and 1 <= instances <= 64):
        raise _fail(path, "'instances' must be an integer from 1 to 64")
    policy = (
        _version_policy(path, data["version_policy"])
        if "version_policy" in data
        else (VersionPolicy())
    )
    remote = _remote(path, name, data["remote"]) if "remote" in data else None
    return ModelSpec(
        name=name,
        path=model_dir,
        format=fmt,
        max_batch_size=mbs,
        executors=tuple(executors),
        placement=placement,
        instances=instances,
        dynamic_batching=_dynamic_batching(path, data.get("dynamic_batching", {})),
        version_policy=policy,
        inputs=_tensor_decls(path, "inputs", data.get("inputs", [])),
        outputs=_tensor_decls(path, "outputs", data.get("outputs", [])),
        learn=_learn(path, fmt, data["learn"]) if "learn" in data else None,
        warmup=_warmup(path, data.get("warmup", [])),
        remote=remote,
        partition=parse_partition(path, data["partition"], remote) if "partition" in data else None,
        configured=configured,
    )


def _pipeline_spec(model_dir: Path, data: Mapping[str, Any]) -> ModelSpec:
    """A pipeline's model.toml: every input declared in full (name, datatype, dims), the
    outputs by name (datatype and dims optional: checked against the step that makes them).

    Raises:
        ModelLoadError: an unknown or artifact-only key, a bad value, named.
    """
    path = model_dir / MODEL_TOML
    other = sorted(set(data) - _PIPELINE_MODEL_KEYS)
    if other:
        raise _fail(
            path, f"'{other[0]}' does not apply to a pipeline (it describes a model's artifact)"
        )
    mbs = data.get("max_batch_size", 0)
    if not _is_int(mbs) or mbs < 0:
        raise _fail(path, "'max_batch_size' must be an integer >= 0")
    inputs = _tensor_decls(path, "inputs", data.get("inputs", []))
    outputs = _tensor_decls(path, "outputs", data.get("outputs", []))
    for key, decls in (("inputs", inputs), ("outputs", outputs)):
        if not decls:
            raise _fail(path, f"a pipeline declares its {key} ([[{key}]])")
        names = [d.name for d in decls]
        if len(set(names)) != len(names):
            raise _fail(path, f"'{key}' names a tensor twice")
    for i, decl in enumerate(inputs):
        if decl.datatype is None or decl.dims is None:
            raise _fail(path, f"'inputs[{i}]' ('{decl.name}') needs a datatype and dims")
    return ModelSpec(
        name=model_dir.name,
        path=model_dir,
        max_batch_size=mbs,
        inputs=inputs,
        outputs=outputs,
        pipeline=_pipeline(path, data["pipeline"]),
    )


def is_pipeline(model_dir: Path) -> bool:
    """Whether ``model_dir``'s model.toml has a ``[pipeline]`` (read without validating it;
    an unreadable or invalid file is a model, whose load says what is wrong)."""
    try:
        return "pipeline" in tomllib.loads((model_dir / MODEL_TOML).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def _artifact_list() -> str:
    return ", ".join(f"{artifact} ({fmt})" for fmt, (artifact, _) in FORMATS.items())


def detect_format(version_dir: Path) -> str:
    """The format of the artifact in ``version_dir``, by its file name (``FORMATS``).

    Raises:
        ModelLoadError: the folder holds no artifact edged serves, or artifacts of two
            formats, or cannot be read.
    """
    try:
        names = sorted(p.name for p in version_dir.iterdir())
    except OSError as e:
        raise ModelLoadError(f"{version_dir}: cannot read the folder: {e.strerror or e}") from e
    found = [fmt for fmt, (artifact, _) in FORMATS.items() if artifact in names]
    if len(found) > 1:
        files = ", ".join(FORMATS[f][0] for f in found)
        raise ModelLoadError(
            f"{version_dir}: holds artifacts of {len(found)} formats ({files}); keep one, or "
            f'name the one to serve with format = "..." in {MODEL_TOML}'
        )
    if not found:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") or "nothing"
        raise ModelLoadError(
            f"{version_dir}: holds {shown}, which is no artifact edged serves "
            f"(it serves: {_artifact_list()})"
        )
    return found[0]


def detect_model_format(model_dir: Path) -> str | None:
    """The format every version folder of ``model_dir`` holds; None without version folders.

    Raises:
        ModelLoadError: a version folder holds no artifact edged serves, or two folders hold
            different formats, or a folder cannot be read.
    """
    formats: dict[int, str] = {}
    for version in available_versions(model_dir):
        formats[version] = detect_format(model_dir / str(version))
    if len(set(formats.values())) > 1:
        listed = ", ".join(f"version {v}: {f}" for v, f in formats.items())
        raise ModelLoadError(
            f"model '{model_dir.name}': version folders hold different formats ({listed}); "
            f'name the one to serve with format = "..." in {model_dir / MODEL_TOML}'
        )
    return next(iter(formats.values()), None)


def read_model_spec(model_dir: Path) -> ModelSpec:
    """Read and validate ``model_dir``/model.toml; without one, the model is served as its
    artifact declares it. The format, when model.toml names none, is the artifact's.

    Raises:
        ModelNotFoundError: the folder does not exist.
        ModelLoadError: model.toml is unreadable, not valid TOML or not a valid model spec;
            no model.toml and no version folder; an artifact no format fits, or two.
    """
    path = model_dir / MODEL_TOML
    try:
        data = tomllib.loads(path.read_text())
        configured = True
    except FileNotFoundError:
        if not model_dir.is_dir():
            raise ModelNotFoundError(
                f"model '{model_dir.name}' is not a folder of the repository"
            ) from None
        data, configured = {}, False
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"not valid TOML: {e}") from e
    except OSError as e:
        raise _fail(path, f"cannot read it: {e.strerror or e}") from e
    detected = None
    if "format" not in data and "pipeline" not in data:
        detected = detect_model_format(model_dir)
        if detected is None and not configured:
            raise ModelLoadError(
                f"model '{model_dir.name}': {model_dir} holds no {MODEL_TOML} and no version "
                f"folder; put the artifact in {model_dir}/1/ (one of: {_artifact_list()})"
            )
    return parse_model_toml(model_dir, data, detected or "onnx", configured=configured)


def _batchable(sig: Signature) -> str | None:
    """None when every tensor has a dynamic axis 0, else why not."""
    for spec in sig.inputs:
        if not spec.shape or spec.shape[0] != -1:
            return f"input '{spec.name}' has shape {list(spec.shape)}, not a dynamic axis 0"
    for spec in sig.outputs:
        if spec.shape and spec.shape[0] != -1:
            return f"output '{spec.name}' has shape {list(spec.shape)}, not a dynamic axis 0"
    return None


def _apply_decls(
    specs: tuple[TensorSpec, ...],
    decls: tuple[TensorDecl, ...],
    batched: bool,
    where: str,
    model: str,
) -> tuple[TensorSpec, ...]:
    by_name = {s.name: s for s in specs}
    for decl in decls:
        if decl.name not in by_name:
            raise ModelLoadError(
                f"model '{model}': model.toml declares {where} '{decl.name}', "
                f"which the artifact does not have (it has: "
                f"{', '.join(by_name)})"
            )
        actual = by_name[decl.name]
        if decl.datatype is not None and decl.datatype is not actual.datatype:
            raise ModelLoadError(
                f"model '{model}': {where} '{decl.name}' is declared "
                f"{decl.datatype} but the artifact has {actual.datatype}"
            )
        if decl.dims is None:
            continue
        artifact_dims = actual.shape[1:] if batched else actual.shape
        if len(decl.dims) != len(artifact_dims) or any(
            a not in (-1, d) for d, a in zip(decl.dims, artifact_dims, strict=True)
        ):
            raise ModelLoadError(
                f"model '{model}': {where} '{decl.name}' is declared with dims "
                f"{list(decl.dims)} but the artifact has {list(artifact_dims)}"
            )
        shape = ((-1,) if batched else ()) + decl.dims
        by_name[decl.name] = TensorSpec(actual.name, actual.datatype, shape)
    return tuple(by_name[s.name] for s in specs)


def resolve_signature(
    artifact: Signature, spec: ModelSpec, default_max_batch_size: int
) -> Signature:
    """The signature served: the artifact's, narrowed by model.toml, with max_batch_size.

    Raises:
        ModelLoadError: model.toml asks for batching the artifact cannot do, or declares a
            tensor the artifact lacks or disagrees with.
    """
    why_not = _batchable(artifact)
    if spec.max_batch_size is None:
        mbs = default_max_batch_size if why_not is None else 0
    else:
        mbs = spec.max_batch_size
        if mbs > 0 and why_not is not None:
            raise ModelLoadError(
                f"model '{spec.name}': max_batch_size = {mbs} but {why_not}; set max_batch_size = 0"
            )
    batched = mbs > 0
    return Signature(
        inputs=_apply_decls(artifact.inputs, spec.inputs, batched, "input", spec.name),
        outputs=_apply_decls(artifact.outputs, spec.outputs, batched, "output", spec.name),
        max_batch_size=mbs,
    )


def _toml_str(value: str) -> str:
    # JSON's escapes (\", \\, \n, \uXXXX) are all valid in a TOML basic string
    return json.dumps(value, ensure_ascii=True)


def model_toml_text(spec: ModelSpec, signature: Signature) -> str:
    """The completed configuration of a served model as model.toml text: what edged read
    from the artifact and model.toml together, ready to copy into a model.toml and narrow."""
    lines = [
        f"# completed by edged ({'model.toml + ' if spec.configured else ''}the artifact)",
        f"name = {_toml_str(spec.name)}",
        f"format = {_toml_str(spec.format)}",
        f"max_batch_size = {signature.max_batch_size}",
        f"executors = [{', '.join(_toml_str(k) for k in spec.executor_preference)}]",
        f"placement = {_toml_str(spec.placement)}",
    ]
    if spec.instances is not None:
        lines.append(f"instances = {spec.instances}")
    for key, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        for tensor in tensors:
            dims = ", ".join(str(d) for d in signature.config_dims(tensor))
            lines += [
                "",
                f"[[{key}]]",
                f"name = {_toml_str(tensor.name)}",
                f"datatype = {_toml_str(tensor.datatype.value)}",
                f"dims = [{dims}]",
            ]
    return "\n".join(lines) + "\n"
