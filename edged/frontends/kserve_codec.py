"""KServe v2 protobuf messages <-> edged.core requests and responses.

Inputs come as ``raw_input_contents`` (viewed without copying) or typed ``contents``; outputs
always go out as ``raw_output_contents``, the only form the Triton client decodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import model_config_pb2 as mc
from edged.core.errors import InvalidInputError, UnsupportedError, clip
from edged.core.limits import RequestLimits
from edged.core.tensors import check_shape, decode_raw, element_count, encode_raw
from edged.core.types import Array, DataType, InferRequest, InferResponse, Signature, TensorSpec
from edged.core.views import ModelConfiguration, ModelMetadata, TensorMetadata
from edged.serving.dataplane import SharedMemoryRegistry, Span

#: which typed ``contents`` field carries each datatype (FP16 has none: raw only)
CONTENTS_FIELD: dict[DataType, str] = {
    DataType.BOOL: "bool_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}
_ALL_CONTENTS_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))

#: Triton's ModelConfig data_type for each datatype
CONFIG_DATATYPE: dict[DataType, int] = {
    dt: mc.DataType.Value("TYPE_STRING" if dt is DataType.BYTES else f"TYPE_{dt.value}")
    for dt in DataType
}

#: one input tensor: of a ModelInferRequest, and of an AddSamplesRequest (the same message)
InputTensor = pb.ModelInferRequest.InferInputTensor

_SHM_PARAMETERS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")


def parameter_value(param: pb.InferParameter) -> object:
    """The Python value an InferParameter holds."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def _datatype(name: str, text: str) -> DataType:
    try:
        return DataType(text)
    except ValueError:
        raise InvalidInputError(
            f"tensor '{clip(name)}': datatype '{clip(text)}' is not one of {', '.join(DataType)}"
        ) from None


def _typed_contents(
    name: str, datatype: DataType, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> Array:
    field = CONTENTS_FIELD.get(datatype)
    if field is None and element_count(shape) == 0:
        return np.empty(shape, dtype=datatype.numpy_dtype)
    if field is None:
        raise InvalidInputError(
            f"tensor '{clip(name)}': {datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    for other in _ALL_CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInputError(
                f"tensor '{clip(name)}': {datatype} data must be in "
                f"contents.{field}, not contents.{other}"
            )
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"tensor '{clip(name)}': contents.{field} holds {len(values)} "
            f"elements, shape {list(shape)} needs {count}"
        )
    if datatype is DataType.BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = datatype.numpy_dtype
    if dtype.kind in "iu" and count:
        wide = np.fromiter(values, dtype=np.int64 if dtype.kind == "i" else np.uint64, count=count)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInputError(
                f"tensor '{clip(name)}': a value in contents.{field} is outside the range of "
                f"{datatype}"
            )
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def _has_typed_contents(tensor: InputTensor) -> bool:
    return tensor.HasField("contents") and any(
        len(getattr(tensor.contents, f)) for f in _ALL_CONTENTS_FIELDS
    )


def _uses_shm(parameters: Mapping[str, pb.InferParameter]) -> bool:
    return any(p in parameters for p in _SHM_PARAMETERS)


def _int_parameter(
    parameters: Mapping[str, pb.InferParameter], key: str, what: str, default: int | None = None
) -> int:
    if key not in parameters:
        if default is None:
            raise InvalidInputError(f"{what}: parameter '{key}' is required")
        return default
    value = parameter_value(parameters[key])
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInputError(f"{what}: parameter '{key}' must be a non-negative integer")
    return value


def shm_span(
    parameters: Mapping[str, pb.InferParameter], regions: SharedMemoryRegistry | None, what: str
) -> Span:
    """The bytes a tensor's ``shared_memory_*`` parameters name, bounds-checked.

    Raises:
        UnsupportedError: the daemon has no shared-memory registry.
        InvalidInputError: a missing or bad parameter, an unregistered region, or a span
            outside the region; names ``what``.
    """
    if regions is None:
        raise UnsupportedError(f"{what}: shared memory is not enabled")
    name = (
        parameter_value(parameters["shared_memory_region"])
        if ("shared_memory_region" in parameters)
        else None
    )
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{what}: parameter 'shared_memory_region' must name a region")
    offset = _int_parameter(parameters, "shared_memory_offset", what, 0)
    size = _int_parameter(parameters, "shared_memory_byte_size", what)
    region = regions.get(name, what)
    if offset + size > region.byte_size:
        raise InvalidInputError(
            f"{what}: shared memory span [{offset}, {offset + size}) is outside region "
            f"'{clip(name)}' of {region.byte_size} bytes"
        )
    return Span(region, offset, size, what)


def _decode_input(
    tensor: InputTensor,
    raw: bytes | None,
    regions: SharedMemoryRegistry | None,
) -> Array:
    name = tensor.name
    datatype = _datatype(name, tensor.datatype)
    shape = check_shape(name, tensor.shape)
    typed = _has_typed_contents(tensor)
    if _uses_shm(tensor.parameters):
        span = shm_span(tensor.parameters, regions, f"tensor '{clip(name)}'")
        if typed:
            raise InvalidInputError(
                f"tensor '{clip(name)}': both shared memory and typed contents are set; send one"
            )
        return decode_raw(name, datatype, shape, memoryview(span.read()))
    if raw is not None:
        if typed:
            raise InvalidInputError(
                f"tensor '{clip(name)}': both raw_input_contents and typed contents are set; "
                "send one"
            )
        return decode_raw(name, datatype, shape, raw)
    if typed or element_count(shape) == 0:
        return _typed_contents(name, datatype, shape, tensor.contents)
    raise InvalidInputError(
        f"tensor '{clip(name)}': no data (neither raw_input_contents nor contents is set)"
    )


#: a request with more tensors than this, or any BYTES, typed-contents or shared-memory
#: tensor, is decoded on a worker thread rather than on the event loop
INLINE_MAX_TENSORS = 8


def check_limits(message: pb.ModelInferRequest, limits: RequestLimits) -> None:
    """Check a request's counts against ``limits`` before any of it is decoded (cheap: only
    lengths are read).

    Raises:
        OverloadedError: too many inputs, outputs or parameters; names the limit.
    """
    limits.check(
        inputs=len(message.inputs),
        outputs=len(message.outputs),
        parameters=len(message.parameters),
    )
    check_input_limits(message.inputs, limits)
    for i, out in enumerate(message.outputs):
        limits.check_tensor_parameters(f"outputs[{i}]", len(out.parameters))


def check_input_limits(tensors: Sequence[InputTensor], limits: RequestLimits) -> None:
    """``check_limits`` of input tensors alone (AddSamples carries no outputs or parameters).

    Raises:
        OverloadedError: too many tensors, or too many parameters on one; names the limit.
    """
    limits.check(inputs=len(tensors), outputs=0, parameters=0)
    for i, tensor in enumerate(tensors):
        limits.check_tensor_parameters(f"inputs[{i}]", len(tensor.parameters))


def inputs_decode_inline(tensors: Sequence[InputTensor]) -> bool:
    """Whether decoding ``tensors`` is cheap enough for the event loop: a few tensors, all in
    ``raw_input_contents`` (viewed, not copied), none BYTES (split element by element)."""
    if len(tensors) > INLINE_MAX_TENSORS:
        return False
    return not any(
        t.datatype == "BYTES" or t.HasField("contents") or _uses_shm(t.parameters) for t in tensors
    )


def request_from_proto(
    message: pb.ModelInferRequest, regions: SharedMemoryRegistry | None = None
) -> InferRequest:
    """Decode and check a ModelInferRequest's wire-level form (its inputs by
    ``inputs_from_proto``).

    Raises:
        InvalidInputError: bad datatype, shape, byte length, contents, shared-memory span, or a
            tensor given twice or both raw and typed; names the tensor.
        UnsupportedError: the classification extension, or shared memory without a registry.
    """
    if not message.model_name:
        raise InvalidInputError("model_name is empty")
    inputs = inputs_from_proto(message.inputs, message.raw_input_contents, regions)
    requested = []
    for out in message.outputs:
        if "classification" in out.parameters:
            raise UnsupportedError(
                f"output '{clip(out.name)}': the classification extension is not supported"
            )
        if out.name not in requested:
            requested.append(out.name)
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        requested_outputs=tuple(requested),
        parameters=parameters_of(message.parameters),
    )


def inputs_from_proto(
    tensors: Sequence[InputTensor],
    raw: Sequence[bytes],
    regions: SharedMemoryRegistry | None = None,
) -> dict[str, Array]:
    """Decode and check input tensors and their ``raw_input_contents``, as an inference
    request's and AddSamples' are.

    ``raw`` holds one entry per input that is not in shared memory, in order (as tritonclient
    sends them). Shared-memory inputs are views onto their region.

    Raises:
        InvalidInputError: bad datatype, shape, byte length, contents, shared-memory span, or a
            tensor given twice or both raw and typed; names the tensor.
        UnsupportedError: shared memory without a registry.
    """
    carried = [t for t in tensors if not _uses_shm(t.parameters)]
    if raw and len(raw) != len(carried):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(carried)} inputs not in "
            "shared memory; it needs one per input"
        )
    next_raw = iter(raw)
    inputs: dict[str, Array] = {}
    for i, tensor in enumerate(tensors):
        if not tensor.name:
            raise InvalidInputError(f"inputs[{i}] has no name")
        if tensor.name in inputs:
            raise InvalidInputError(f"tensor '{clip(tensor.name)}' is given more than once")
        own = next(next_raw) if raw and not _uses_shm(tensor.parameters) else None
        inputs[tensor.name] = _decode_input(tensor, own, regions)
    return inputs


def output_spans(
    message: pb.ModelInferRequest, regions: SharedMemoryRegistry | None
) -> dict[str, Span]:
    """Where each output asked for in shared memory goes (checked before inference runs).

    Raises:
        InvalidInputError, UnsupportedError: as ``shm_span``.
    """
    return {
        out.name: shm_span(out.parameters, regions, f"output '{clip(out.name)}'")
        for out in message.outputs
        if _uses_shm(out.parameters)
    }


def response_to_proto(
    response: InferResponse, spans: Mapping[str, Span] | None = None
) -> pb.ModelInferResponse:
    """A ModelInferResponse carrying every output in ``raw_output_contents``, except those
    written into shared memory (``spans``): their entry is empty (so that indices stay aligned,
    as tritonclient reads them) and their parameters say where and how many bytes.

    Raises:
        InvalidInputError: an output does not fit its shared-memory span, or the region was
            shrunk, replaced or unregistered since the request was decoded.
    """
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    spans = spans or {}
    for name, array in response.outputs.items():
        if name in spans:
            data = encode_raw(array)
            span = spans[name]
            if len(data) > len(span):
                raise InvalidInputError(
                    f"output '{clip(name)}' needs {len(data)} bytes but its shared memory span has "
                    f"{len(span)}"
                )
            span.write(data)
            tensor = message.outputs.add(
                name=name, datatype=DataType.from_numpy(array.dtype).value, shape=array.shape
            )
            tensor.parameters["shared_memory_byte_size"].int64_param = len(data)
            message.raw_output_contents.append(b"")
            continue
        datatype = DataType.from_numpy(array.dtype)
        message.outputs.add(name=name, datatype=datatype.value, shape=array.shape)
        message.raw_output_contents.append(encode_raw(array))
    return message


def tensor_metadata(
    signature: Signature, specs: tuple[TensorSpec, ...]
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """ModelMetadata tensors: shapes as a client sends them (batch axis as -1)."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=s.name, datatype=s.datatype.value, shape=signature.client_shape(s)
        )
        for s in specs
    ]


def metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    """A ModelMetadataResponse."""

    def tensors(
        specs: tuple[TensorMetadata, ...],
    ) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=t.datatype, shape=list(t.shape)
            )
            for t in specs
        ]

    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=list(meta.versions),
        platform=meta.platform,
        inputs=tensors(meta.inputs),
        outputs=tensors(meta.outputs),
    )


def config_to_proto(c: ModelConfiguration) -> mc.ModelConfig:
    """Triton's ModelConfig of a served model version, with its model.toml as the parameter
    ``model_toml`` and, when it batches, its dynamic batching and queue policy."""
    config = model_config(
        c.name,
        c.signature,
        c.platform,
        c.backend,
        c.instances,
        list(c.versions),
        executor=c.executor,
    )
    config.parameters["model_toml"].string_value = c.model_toml
    if c.steps:  # a pipeline: Triton's ensemble, no instances of its own
        del config.instance_group[:]
        for step in c.steps:
            config.ensemble_scheduling.step.add(
                model_name=step.model,
                model_version=step.version,
                input_map=dict(step.input_map),
                output_map=dict(step.output_map),
            )
    if c.dynamic_batching:
        db = config.dynamic_batching
        db.max_queue_delay_microseconds = c.max_queue_delay_us
        db.preferred_batch_size.extend(c.preferred_batch_sizes)
        db.priority_levels = c.priority_levels
        db.default_priority_level = c.default_priority
        db.default_queue_policy.max_queue_size = c.max_queue_size
        db.default_queue_policy.default_timeout_microseconds = c.default_timeout_us
    return config


def _set_dims(tensor: mc.ModelInput | mc.ModelOutput, dims: tuple[int, ...], batched: bool) -> None:
    """Triton never has empty dims: a batched tensor with only the batch axis is written as
    dims [1] reshaped to [], as Triton's own configs do."""
    if batched and not dims:
        tensor.dims.append(1)
        tensor.reshape.SetInParent()
    else:
        tensor.dims.extend(dims)


#: Triton's instance-group kind for each executor kind: KIND_GPU for CUDA, KIND_CPU for
#: the CPU runtimes, KIND_MODEL ("placement decided by the model/backend itself") for devices
#: Triton has no kind for (Edge TPU, FPGA) and for kinds other packages add.
INSTANCE_KIND: dict[str, mc.ModelInstanceGroup.Kind.ValueType] = {
    "cuda": mc.ModelInstanceGroup.Kind.KIND_GPU,
    "cpu-onnx": mc.ModelInstanceGroup.Kind.KIND_CPU,
    "cpu-litert": mc.ModelInstanceGroup.Kind.KIND_CPU,
    "edgetpu": mc.ModelInstanceGroup.Kind.KIND_MODEL,
    "pynq": mc.ModelInstanceGroup.Kind.KIND_MODEL,
}


def instance_kind(executor: str) -> mc.ModelInstanceGroup.Kind.ValueType:
    """The instance-group kind that says where ``executor`` runs."""
    if executor in INSTANCE_KIND:
        return INSTANCE_KIND[executor]
    if executor.startswith("cpu-"):
        return mc.ModelInstanceGroup.Kind.KIND_CPU
    return mc.ModelInstanceGroup.Kind.KIND_MODEL


def model_config(
    name: str,
    signature: Signature,
    platform: str,
    backend: str,
    instances: int,
    versions: list[int],
    executor: str = "cpu-onnx",
    gpus: tuple[int, ...] = (),
) -> mc.ModelConfig:
    """Triton's ModelConfig for a served model: enough for perf_analyzer and model_analyzer.
    Where it runs is in ``instance_group`` (kind, and ``gpus`` for CUDA) and in the
    ``executor`` parameter (edged's executor kind)."""
    config = mc.ModelConfig(
        name=name, platform=platform, backend=backend, max_batch_size=signature.max_batch_size
    )
    batched = signature.max_batch_size > 0
    for spec in signature.inputs:
        dtype = CONFIG_DATATYPE[spec.datatype]
        _set_dims(
            config.input.add(name=spec.name, data_type=dtype), signature.config_dims(spec), batched
        )
    for spec in signature.outputs:
        dtype = CONFIG_DATATYPE[spec.datatype]
        _set_dims(
            config.output.add(name=spec.name, data_type=dtype), signature.config_dims(spec), batched
        )
    config.version_policy.specific.versions.extend(versions)
    kind = instance_kind(executor)
    group = config.instance_group.add(name=f"{name}_{executor}", count=instances, kind=kind)
    if kind == mc.ModelInstanceGroup.Kind.KIND_GPU:
        group.gpus.extend(gpus or (0,))
    config.parameters["executor"].string_value = executor
    return config


def request_to_proto(request: InferRequest) -> pb.ModelInferRequest:
    """Encode a request (used by ``edged infer`` and tests)."""
    message = pb.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    for name, array in request.inputs.items():
        datatype = DataType.from_numpy(array.dtype)
        message.inputs.add(name=name, datatype=datatype.value, shape=array.shape)
        message.raw_input_contents.append(encode_raw(array))
    for name in request.requested_outputs:
        message.outputs.add(name=name)
    return message


def response_from_proto(message: pb.ModelInferResponse) -> InferResponse:
    """Decode a response's raw outputs (used by ``edged infer`` and tests).

    Raises:
        InvalidInputError: an output lacks raw contents or has an unknown datatype.
    """
    raw = message.raw_output_contents
    outputs: dict[str, Any] = {}
    for i, tensor in enumerate(message.outputs):
        if i >= len(raw):
            raise InvalidInputError(
                f"output '{clip(tensor.name)}' has no raw_output_contents entry"
            )
        datatype = _datatype(tensor.name, tensor.datatype)
        outputs[tensor.name] = decode_raw(tensor.name, datatype, tensor.shape, raw[i])
    return InferResponse(message.model_name, message.model_version, outputs, message.id)


def parameters_of(mapping: Mapping[str, pb.InferParameter]) -> dict[str, object]:
    """A protobuf parameter map as plain values."""
    return {k: parameter_value(v) for k, v in mapping.items()}
