"""The errors of over-the-air updates, fleet side and device side.

Each names what failed: the archive member, the bundle field, the output and its error, the
repository file. Foreign errors (tarfile, TOML, numpy, python-tuf) are wrapped with
``raise ... from e``.
"""

from __future__ import annotations

from edged.core.errors import EdgedError


class OtaError(EdgedError):
    """An over-the-air update step failed; the message says which and why."""


class UnsafeArchiveError(OtaError):
    """An archive was refused before (or while) unpacking: a link, device or fifo member, a
    path that escapes, a duplicate name, or a count, size or compression ratio above the
    limits. Nothing of it is left on disk."""


class BundleError(OtaError):
    """A model bundle is malformed or cannot be built: bundle.toml, model.toml, the artifacts
    or selftest.npz missing or invalid."""


class SelfTestError(OtaError):
    """A model's outputs on its bundle's self-test inputs differ from the expected outputs
    (or an output is missing)."""


class PublishError(OtaError):
    """The fleet's TUF repository refused an operation: not initialised (or already), a key
    missing, unreadable or not the one root trusts, or a version not newer than one already
    published."""


def describe_error(error: BaseException) -> str:
    """An error as recorded in an update's status: its class name, then its message."""
    return f"{type(error).__name__}: {error}"
