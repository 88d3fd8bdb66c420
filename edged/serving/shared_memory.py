"""System shared memory regions (Triton's extension): tensors handed over by address.

A client creates a POSIX shared-memory object (``shm_open`` key, e.g. ``/input0``), registers
it under a name with an offset and size, then names the region in a tensor's parameters
instead of sending its bytes. Every access is bounds-checked against the registered window; a
region is unmapped once unregistered and no tensor views it any more.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from edged.core.errors import AlreadyExistsError, InvalidInputError, NotFoundError

SHM_ROOT = Path("/dev/shm")  # noqa: S108 - where shm_open keeps POSIX shared memory


@dataclass(frozen=True)
class Region:
    """A registered window [offset, offset + byte_size) of a shared-memory object."""

    name: str
    key: str
    offset: int
    byte_size: int
    _map: mmap.mmap

    def view(self, offset: int, byte_size: int, what: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` inside the window.

        Raises:
            InvalidInputError: the span leaves the window; names ``what``.
        """
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInputError(
                f"{what}: shared memory span [{offset}, {offset + byte_size}) is outside region "
                f"'{self.name}' of {self.byte_size} bytes"
            )
        start = self.offset + offset
        return memoryview(self._map)[start : start + byte_size]


class SharedMemoryRegistry:
    """The regions registered with this daemon, by name; safe from any thread."""

    def __init__(self, root: Path = SHM_ROOT) -> None:
        self._root = root
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Map the window of the shared-memory object ``key``.

        Raises:
            InvalidInputError: an empty name, a key that is not a plain name, a negative
                offset, a zero size, or a window past the object's end.
            AlreadyExistsError: ``name`` is registered already.
            NotFoundError: no shared-memory object ``key`` exists.
        """
        if not name:
            raise InvalidInputError("shared memory region name is empty")
        leaf = key.lstrip("/")
        if not leaf or "/" in leaf or leaf in (".", ".."):
            raise InvalidInputError(f"shared memory key '{key}' is not a shm_open name")
        if offset < 0 or byte_size <= 0:
            raise InvalidInputError(
                f"shared memory region '{name}': offset {offset} and byte_size {byte_size} must "
                "be >= 0 and > 0"
            )
        with self._lock:
            if name in self._regions:
                raise AlreadyExistsError(f"shared memory region '{name}' is already registered")
            try:
                fd = os.open(self._root / leaf, os.O_RDWR)
            except FileNotFoundError:
                raise NotFoundError(f"shared memory key '{key}' does not exist") from None
            except OSError as e:
                raise InvalidInputError(f"shared memory key '{key}' cannot be opened: {e}") from e
            try:
                size = os.fstat(fd).st_size
                if offset + byte_size > size:
                    raise InvalidInputError(
                        f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                        f"is past the end of '{key}' ({size} bytes)"
                    )
                mapped = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            region = Region(name, key, offset, byte_size, mapped)
            self._regions[name] = region
            return region

    def get(self, name: str, what: str = "request") -> Region:
        """The region registered as ``name``, which ``what`` (a tensor) names.

        Raises:
            InvalidInputError: no such region; names ``what``.
        """
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise InvalidInputError(f"{what}: shared memory region '{name}' is not registered")
        return region

    def status(self, name: str = "") -> list[Region]:
        """Every region, or the one named.

        Raises:
            NotFoundError: ``name`` is not registered.
        """
        with self._lock:
            if not name:
                return list(self._regions.values())
            if name not in self._regions:
                raise NotFoundError(f"shared memory region '{name}' is not registered")
            return [self._regions[name]]

    def unregister(self, name: str = "") -> None:
        """Forget one region, or all when ``name`` is empty. The mapping closes when the last
        tensor viewing it is gone.

        Raises:
            NotFoundError: ``name`` is not registered.
        """
        with self._lock:
            if not name:
                self._regions.clear()
                return
            if self._regions.pop(name, None) is None:
                raise NotFoundError(f"shared memory region '{name}' is not registered")
