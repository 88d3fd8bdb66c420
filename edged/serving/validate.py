"""Check a decoded request against the model's signature before it is queued."""

from __future__ import annotations

from collections.abc import Mapping

from edged.core.errors import InvalidInputError, clip
from edged.core.types import Array, DataType, InferRequest, Signature


def validate_request(request: InferRequest, signature: Signature) -> int:
    """Check the inputs (``validate_inputs``) and the requested outputs' names; return the
    batch size (1 for a model that does not batch).

    Raises:
        InvalidInputError: naming the tensor and what is wrong with it.
    """
    batch = validate_inputs(request.model_name, request.inputs, signature)
    for name in request.requested_outputs:
        if signature.output(name) is None:
            raise InvalidInputError(
                f"unknown output tensor '{clip(name)}' requested from model "
                f"'{clip(request.model_name)}' (it returns: "
                f"{', '.join(t.name for t in signature.outputs)})"
            )
    return batch


def validate_inputs(model: str, inputs: Mapping[str, Array], signature: Signature) -> int:
    """Check input tensors (name -> array) against ``model``'s signature: names, datatypes,
    ranks, dims and the batch size; return the batch size (1 for a model that does not
    batch). An inference request's inputs and AddSamples' inputs are checked by this one
    function, so both are refused with the same messages.

    Raises:
        InvalidInputError: naming the tensor and what is wrong with it.
    """
    for name in inputs:
        if signature.input(name) is None:
            raise InvalidInputError(
                f"unknown input tensor '{clip(name)}' for model '{clip(model)}' (it takes: "
                f"{', '.join(t.name for t in signature.inputs)})"
            )
    batch: int | None = None
    batch_from = ""
    for spec in signature.inputs:
        array = inputs.get(spec.name)
        if array is None:
            raise InvalidInputError(f"missing input tensor '{spec.name}' for model '{clip(model)}'")
        try:
            datatype = DataType.from_numpy(array.dtype)
        except ValueError as e:
            raise InvalidInputError(f"input tensor '{spec.name}': {e}") from e
        if datatype is not spec.datatype:
            raise InvalidInputError(
                f"input tensor '{spec.name}': datatype {datatype} does not match the model's "
                f"{spec.datatype}"
            )
        expected = signature.client_shape(spec)
        if array.ndim != len(expected) or any(
            e not in (-1, a) for e, a in zip(expected, array.shape, strict=True)
        ):
            raise InvalidInputError(
                f"input tensor '{spec.name}': shape {list(array.shape)} does not match the "
                f"model's {list(expected)}"
            )
        if signature.max_batch_size > 0:
            size = array.shape[0]
            if size < 1 or size > signature.max_batch_size:
                raise InvalidInputError(
                    f"input tensor '{spec.name}': batch size {size} is outside 1.."
                    f"{signature.max_batch_size} (the model's max_batch_size)"
                )
            if batch is not None and size != batch:
                raise InvalidInputError(
                    f"input tensor '{spec.name}': batch size {size} differs from input "
                    f"'{batch_from}' ({batch})"
                )
            batch, batch_from = size, spec.name
    return batch or 1


def request_options(parameters: Mapping[str, object]) -> tuple[int, int]:
    """The scheduling parameters of a request, Triton's names: ``priority`` (level, 0 for the
    model's default) and ``timeout`` (µs, 0 for the model's default); returns (priority,
    timeout in ns). Other parameters are ignored.

    Raises:
        InvalidInputError: a scheduling parameter is not a non-negative integer.
    """
    values = []
    for key in ("priority", "timeout"):
        value = parameters.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInputError(
                f"parameter '{key}' must be a non-negative integer, got {clip(repr(value))}"
            )
        values.append(value)
    return values[0], values[1] * 1000
