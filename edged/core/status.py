"""Status codes: the one table from domain errors to the codes clients see.

The names are gRPC's canonical codes (google.rpc.Code), which every frontend speaks: the gRPC
frontend as ``grpc.StatusCode``, the ZeroMQ frontend as these strings.
"""

from __future__ import annotations

from collections.abc import Mapping

from edged.core import errors

CODE_BY_ERROR: dict[type[errors.EdgedError], str] = {
    errors.InvalidInputError: "INVALID_ARGUMENT",
    errors.ModelNotFoundError: "NOT_FOUND",
    errors.ModelNotReadyError: "UNAVAILABLE",
    errors.UnavailableError: "UNAVAILABLE",
    errors.OverloadedError: "RESOURCE_EXHAUSTED",
    errors.DeadlineExceededError: "DEADLINE_EXCEEDED",
    errors.ExecutorTimeoutError: "DEADLINE_EXCEEDED",
    errors.ExecutorError: "INTERNAL",
    errors.ModelLoadError: "INTERNAL",
    errors.ConfigError: "INVALID_ARGUMENT",
    errors.UnsupportedError: "UNIMPLEMENTED",
    errors.NotFoundError: "NOT_FOUND",
    errors.AlreadyExistsError: "ALREADY_EXISTS",
    errors.UnauthenticatedError: "UNAUTHENTICATED",
    errors.PermissionDeniedError: "PERMISSION_DENIED",
}


def code_of_type(error_type: type[errors.EdgedError]) -> str:
    """The status code of a domain error type (its nearest mapped base class)."""
    for cls in error_type.__mro__:
        if cls in CODE_BY_ERROR:
            return CODE_BY_ERROR[cls]
    return "INTERNAL"


def code_of(error: errors.EdgedError) -> str:
    """The status code of a domain error (its nearest mapped base class)."""
    return code_of_type(type(error))


def count_by_code(counts: Mapping[type[errors.EdgedError], int]) -> dict[str, int]:
    """Counts kept by domain error type, summed by the status code each maps to: what a
    frontend reports (statistics are kept by type, ``edged.serving.stats``)."""
    by_code: dict[str, int] = {}
    for error_type, count in counts.items():
        code = code_of_type(error_type)
        by_code[code] = by_code.get(code, 0) + count
    return by_code
