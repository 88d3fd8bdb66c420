"""KServe v2 REST bodies <-> edged.core requests and responses, with Triton's binary tensor
data extension.

A request body is a JSON header, optionally followed by binary tensor data: the header's
length is then in the ``Inference-Header-Content-Length`` HTTP header, and each input whose
``parameters.binary_data_size`` is set takes that many bytes, in order, from what follows
(the raw layout of ``edged.core.tensors``, as gRPC's ``raw_input_contents``). Outputs go back
as JSON ``data`` unless the request asked for binary (``parameters.binary_data`` on an output,
or ``parameters.binary_data_output`` on the request): then as bytes after the JSON header.
Pure functions, no I/O; the frontend runs large bodies through them on a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edged.core.errors import InvalidInputError, UnsupportedError, clip
from edged.core.limits import RequestLimits
from edged.core.stats import Duration, StatisticsSnapshot
from edged.core.tensors import check_shape, decode_raw, element_count, encode_raw
from edged.core.types import Array, DataType, InferRequest, InferResponse

#: the HTTP header that says where the JSON part of a body ends
HEADER_LENGTH = "inference-header-content-length"


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInputError(f"{what} must be a JSON array")
    return value


def parse_json(body: bytes | memoryview, what: str = "request body") -> dict[str, Any]:
    """A JSON object (an empty body is ``{}``).

    Raises:
        InvalidInputError: not UTF-8 JSON, or not an object.
    """
    if not len(body):
        return {}
    try:
        value = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"{what} is not valid JSON: {clip(e, 120)}") from None
    return _object(value, what)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary data after it.

    Raises:
        InvalidInputError: a bad ``Inference-Header-Content-Length`` or bad JSON.
    """
    view = memoryview(body)
    if header_length is None:
        return parse_json(view), view[len(view) :]
    try:
        size = int(header_length)
    except ValueError:
        size = -1
    if not 0 <= size <= len(body):
        raise InvalidInputError(
            f"Inference-Header-Content-Length '{clip(header_length)}' must be an integer "
            f"between 0 and the body's {len(body)} bytes"
        )
    return parse_json(view[:size], "inference header"), view[size:]


def _parameters(entry: Mapping[str, Any], what: str) -> dict[str, Any]:
    return _object(entry.get("parameters") or {}, f"{what} parameters")


def check_limits(header: Mapping[str, Any], limits: RequestLimits) -> None:
    """Counts against ``limits`` before any tensor is decoded.

    Raises:
        OverloadedError: too many inputs, outputs or parameters; names the limit.
        InvalidInputError: ``inputs``/``outputs``/``parameters`` of the wrong JSON type.
    """
    inputs = _list(header.get("inputs", []), "'inputs'")
    outputs = _list(header.get("outputs", []), "'outputs'")
    limits.check(
        inputs=len(inputs),
        outputs=len(outputs),
        parameters=len(_parameters(header, "request")),
    )
    for kind, entries in (("inputs", inputs), ("outputs", outputs)):
        for i, entry in enumerate(entries):
            what = f"{kind}[{i}]"
            limits.check_tensor_parameters(what, len(_parameters(_object(entry, what), what)))


def _datatype(name: str, text: object) -> DataType:
    try:
        return DataType(str(text))
    except ValueError:
        raise InvalidInputError(
            f"tensor '{clip(name)}': datatype '{clip(text)}' is not one of {', '.join(DataType)}"
        ) from None


def _json_array(name: str, datatype: DataType, shape: tuple[int, ...], data: object) -> Array:
    """``data`` (flat or nested, row-major) as an array of ``shape``."""
    count = element_count(shape)
    try:
        if datatype is DataType.BYTES:
            flat = np.array(data, dtype=object).reshape(-1)
            if flat.size != count:
                raise InvalidInputError(
                    f"tensor '{clip(name)}': data holds {flat.size} elements, shape "
                    f"{list(shape)} needs {count}"
                )
            out = np.empty(count, dtype=object)
            for i, v in enumerate(flat):
                if not isinstance(v, str):
                    raise InvalidInputError(f"tensor '{clip(name)}': BYTES data must be strings")
                out[i] = v.encode()
            return out.reshape(shape)
        wide = np.array(data, dtype=np.float64 if datatype.numpy_dtype.kind == "f" else object)
    except ValueError as e:
        raise InvalidInputError(
            f"tensor '{clip(name)}': data is not a regular array: {e}"
        ) from None
    flat = wide.reshape(-1)
    if flat.size != count:
        raise InvalidInputError(
            f"tensor '{clip(name)}': data holds {flat.size} elements, shape {list(shape)} "
            f"needs {count}"
        )
    dtype = datatype.numpy_dtype
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in flat):
            raise InvalidInputError(f"tensor '{clip(name)}': BOOL data must be true or false")
        return flat.astype(dtype).reshape(shape)
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise InvalidInputError(f"tensor '{clip(name)}': {datatype} data must be integers")
        info = np.iinfo(dtype)
        if count and (min(flat) < info.min or max(flat) > info.max):
            raise InvalidInputError(
                f"tensor '{clip(name)}': a value is outside the range of {datatype}"
            )
        return np.array(flat.tolist(), dtype=dtype).reshape(shape)
    return flat.astype(dtype).reshape(shape)


def _binary_size(name: str, params: Mapping[str, Any], has_data: bool) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInputError(
            f"tensor '{clip(name)}': binary_data_size must be a non-negative integer"
        )
    if has_data:
        raise InvalidInputError(
            f"tensor '{clip(name)}': both binary_data_size and data are set; send one"
        )
    return size


def _no_shared_memory(what: str, params: Mapping[str, Any]) -> None:
    if any(k.startswith("shared_memory_") for k in params):
        raise UnsupportedError(f"{what}: shared memory is served over gRPC only")


def _entry_name(entry: object, what: str) -> tuple[dict[str, Any], str]:
    obj = _object(entry, what)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{what} has no name")
    return obj, name


def _inputs(header: Mapping[str, Any], binary: memoryview) -> dict[str, Array]:
    inputs: dict[str, Array] = {}
    offset = 0
    for i, item in enumerate(_list(header.get("inputs", []), "'inputs'")):
        entry, name = _entry_name(item, f"inputs[{i}]")
        if name in inputs:
            raise InvalidInputError(f"tensor '{clip(name)}' is given more than once")
        datatype = _datatype(name, entry.get("datatype"))
        shape = check_shape(name, _list(entry.get("shape"), f"tensor '{clip(name)}' shape"))
        params = _parameters(entry, f"tensor '{clip(name)}'")
        _no_shared_memory(f"tensor '{clip(name)}'", params)
        size = _binary_size(name, params, "data" in entry)
        if size is not None:
            if offset + size > len(binary):
                raise InvalidInputError(
                    f"tensor '{clip(name)}': binary_data_size {size} runs past the "
                    f"{len(binary) - offset} bytes of binary data left"
                )
            inputs[name] = decode_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in entry:
            inputs[name] = _json_array(name, datatype, shape, entry["data"])
        elif element_count(shape) == 0:
            inputs[name] = np.empty(shape, dtype=datatype.numpy_dtype)
        else:
            raise InvalidInputError(
                f"tensor '{clip(name)}': no data (neither 'data' nor binary_data_size is set)"
            )
    if offset != len(binary):
        raise InvalidInputError(
            f"{len(binary) - offset} bytes of binary data follow the inference header but no "
            "input's binary_data_size claims them"
        )
    return inputs


def _outputs(header: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    requested: list[str] = []
    binary: set[str] = set()
    for i, item in enumerate(_list(header.get("outputs", []), "'outputs'")):
        entry, name = _entry_name(item, f"outputs[{i}]")
        params = _parameters(entry, f"output '{clip(name)}'")
        if "classification" in params:
            raise UnsupportedError(
                f"output '{clip(name)}': the classification extension is not supported"
            )
        _no_shared_memory(f"output '{clip(name)}'", params)
        if params.get("binary_data") is True:
            binary.add(name)
        if name not in requested:
            requested.append(name)
    return requested, binary


def request_from_json(
    model: str, version: str, header: Mapping[str, Any], binary: memoryview
) -> tuple[InferRequest, set[str], bool]:
    """Decode an inference request: the request, the outputs asked for in binary, and
    whether every output goes back binary (``binary_data_output``).

    Raises:
        InvalidInputError: a bad tensor (datatype, shape, data, binary size), a tensor given
            twice, binary data left over or missing; names the tensor.
        UnsupportedError: the classification extension or shared memory (gRPC only).
    """
    rid = header.get("id", "")
    if not isinstance(rid, str):
        raise InvalidInputError("'id' must be a string")
    params = _parameters(header, "request")
    inputs = _inputs(header, binary)
    requested, binary_outputs = _outputs(header)
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=rid,
        inputs=inputs,
        requested_outputs=tuple(requested),
        parameters={k: v for k, v in params.items() if k != "binary_data_output"},
    )
    return request, binary_outputs, params.get("binary_data_output") is True


def _json_data(array: Array) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype.kind in "OSU":
        return [
            v.decode(errors="replace") if isinstance(v, bytes | bytearray) else str(v)
            for v in flat
        ]
    return list(flat.tolist())


def response_to_body(
    response: InferResponse, binary_outputs: set[str], all_binary: bool
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    outputs = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": DataType.from_numpy(array.dtype).value,
            "shape": list(array.shape),
        }
        if all_binary or name in binary_outputs:
            data = encode_raw(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = _json_data(array)
        outputs.append(entry)
    head: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        head["id"] = response.id
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def decodes_inline(body_size: int) -> bool:
    """Whether a body is small enough to decode on the event loop."""
    return body_size <= 64 * 1024


def encodes_inline(response: InferResponse) -> bool:
    """Whether a response is cheap enough to encode on the event loop."""
    arrays = response.outputs.values()
    return all(a.dtype.kind not in "OSU" for a in arrays) and sum(a.nbytes for a in arrays) <= (
        64 * 1024
    )


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_to_json(stats: Sequence[StatisticsSnapshot]) -> dict[str, Any]:
    """Triton's statistics response."""
    return {
        "model_stats": [
            {
                "name": s.name,
                "version": str(s.version),
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": _duration(s.success),
                    "fail": _duration(s.fail),
                    "queue": _duration(s.queue),
                    "compute_input": _duration(s.compute_input),
                    "compute_infer": _duration(s.compute_infer),
                    "compute_output": _duration(s.compute_output),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(b.compute_input),
                        "compute_infer": _duration(b.compute_infer),
                        "compute_output": _duration(b.compute_output),
                    }
                    for size, b in sorted(s.batches.items())
                ],
            }
            for s in stats
        ]
    }
