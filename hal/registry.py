"""Find executor kinds through the ``edged.executors`` entry-point group."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from edged.core.errors import ModelLoadError
from hal.executor import Executor

ENTRY_POINT_GROUP = "edged.executors"


@cache
def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_kinds() -> list[str]:
    """Executor kinds registered by installed packages."""
    return sorted(_entry_points())


def executor_class(kind: str) -> type[Executor]:
    """The Executor subclass registered as ``kind`` (imported on first use).

    Raises:
        ModelLoadError: no package registers ``kind``, importing it failed, or it is not an
            Executor subclass.
    """
    ep = _entry_points().get(kind)
    if ep is None:
        installed = ", ".join(available_kinds()) or "none"
        raise ModelLoadError(f"no executor '{kind}' is installed (installed: {installed})")
    try:
        cls = ep.load()  # type: ignore[attr-defined]
    except Exception as e:
        raise ModelLoadError(f"executor '{kind}' failed to import: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise ModelLoadError(f"executor '{kind}' entry point is not an Executor subclass")
    return cls


def get_executor(kind: str) -> Executor:
    """A new executor of ``kind``.

    Raises:
        ModelLoadError: no package registers ``kind``, or importing it failed.
    """
    return executor_class(kind)()
