"""Every failure a client can see, one type each.

Errors know nothing of transports: each frontend maps these types to its own status codes in
one place (``edged.core.status.CODE_BY_ERROR``). Foreign exceptions are wrapped with
``raise ... from e`` so the cause survives in logs but never leaks into a reply.
"""

from __future__ import annotations


class EdgedError(Exception):
    """Base of every error edged reports to a client."""


class InvalidInputError(EdgedError):
    """The request is malformed: a tensor's name, dtype, shape or contents is wrong."""


class ModelNotFoundError(EdgedError):
    """No model (or no such version of it) exists in the repository."""


class ModelNotReadyError(EdgedError):
    """The model exists but is not serving: loading, unloading or failed to load."""


class UnavailableError(EdgedError):
    """The daemon is not taking requests (starting or shutting down)."""


class OverloadedError(EdgedError):
    """A bounded resource is full: a queue, or the size limit of one request."""


class DeadlineExceededError(EdgedError):
    """The request's timeout expired before it was answered."""


class ExecutorError(EdgedError):
    """The executor running the model failed while loading or running it."""


class ExecutorTimeoutError(ExecutorError):
    """An inference ran longer than ``executors.inference_timeout_s`` on its executor (a
    hung device or driver). The batch fails with DEADLINE_EXCEEDED; it counts as an executor
    failure towards the breaker, like any ExecutorError."""


class ModelLoadError(EdgedError):
    """A model could not be loaded: bad model.toml, unreadable artifact, failed warm-up."""


class ConfigError(EdgedError):
    """A configuration key is unknown or its value is invalid; names the key."""


class UnsupportedError(EdgedError):
    """The request asks for a feature edged does not implement."""


class NotFoundError(EdgedError):
    """A named resource other than a model (a shared-memory region, ...) does not exist."""


class AlreadyExistsError(EdgedError):
    """A named resource the request would create exists already."""


#: the most characters of client-supplied text an error message or log line quotes
CLIP_CHARS = 64
#: the longest error message a frontend sends (gRPC carries it in a trailer, whose size the
#: client caps: an over-long message would turn into RESOURCE_EXHAUSTED)
MAX_MESSAGE_CHARS = 1024


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """Client-supplied ``text`` fit to quote in an error message or a log line: at most
    ``limit`` characters, control characters escaped, what was cut said with its length."""
    value = text if isinstance(text, str) else str(text)
    if len(value) > limit:
        value = f"{value[:limit]}...({len(value)} chars)"
    if not value.isprintable():
        value = value.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return value


def clip_message(message: str) -> str:
    """An error message as a frontend sends it: at most ``MAX_MESSAGE_CHARS`` characters."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[: MAX_MESSAGE_CHARS - 20]}...(truncated)"


class UnauthenticatedError(EdgedError):
    """The call needs credentials the caller did not present, or presented credentials (a
    bearer token) that are not valid."""


class PermissionDeniedError(EdgedError):
    """The caller is known (or anonymous where no credential is configured) but lacks the
    role the call needs."""
