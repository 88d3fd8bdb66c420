"""System shared memory regions (Triton's extension): tensors handed over by address.

A client creates a POSIX shared-memory object (``shm_open`` key, e.g. ``/input0``), registers
it under a name with an offset and size, then names the region in a tensor's parameters
instead of sending its bytes.

Confinement: a key is a plain name of a regular file directly under /dev/shm, opened with
``O_NOFOLLOW`` (a symlink is refused) and checked with ``fstat`` (a regular file, at least
offset + byte_size long). The daemon never maps the object: it keeps the descriptor and
copies with ``preadv``/``pwrite``, after checking, right before each access, that the key still
names the same object and that the object is still long enough. A client that shrinks or
replaces its object gets a clear INVALID_ARGUMENT instead of a SIGBUS in the daemon.

Residual race (documented in docs/grpc.md): between that check and the copy, the client may
still shrink the object (the read comes back short and is refused) or rename another object
over the key (the copy uses the object registered, through its descriptor). Neither can make
the daemon touch a file other than the one the client owned at registration, nor crash it.

Caps: the number of regions and the bytes they span, per connection and overall
(``limits.shm_*``), so that registrations cannot exhaust descriptors.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from edged.core.errors import (
    AlreadyExistsError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    clip,
)

SHM_ROOT = Path("/dev/shm")  # noqa: S108 - where shm_open keeps POSIX shared memory
#: the longest key (a file name: NAME_MAX)
MAX_KEY_BYTES = 255
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class ShmLimits:
    """Caps on registrations (``limits.shm_*``)."""

    max_regions: int = 256
    max_regions_per_connection: int = 64
    max_bytes: int = 4 * 1024**3
    max_bytes_per_connection: int = 1024**3


@dataclass
class Region:
    """A registered window [offset, offset + byte_size) of a shared-memory object, held by
    its descriptor (closed when the region is unregistered)."""

    name: str
    key: str
    offset: int
    byte_size: int
    owner: str
    _fd: int
    _path: Path
    _dev_ino: tuple[int, int]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def _check(self, end: int, what: str) -> None:
        """The key still names the registered object and it still reaches ``end``.

        Raises:
            InvalidInputError: it was replaced, removed or shrunk; names ``what``.
        """
        if self._closed:
            raise InvalidInputError(
                f"{what}: shared memory region '{clip(self.name)}' was unregistered"
            )
        try:
            now = os.stat(self._path, follow_symlinks=False)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != self._dev_ino:
            raise InvalidInputError(
                f"{what}: shared memory key '{clip(self.key)}' of region '{clip(self.name)}' "
                "was removed or replaced after registration; register it again"
            )
        size = os.fstat(self._fd).st_size
        if size < end:
            raise InvalidInputError(
                f"{what}: shared memory key '{clip(self.key)}' of region '{clip(self.name)}' "
                f"shrank to {size} bytes after registration; the request needs {end}"
            )

    def _bounds(self, offset: int, byte_size: int, what: str) -> int:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInputError(
                f"{what}: shared memory span [{offset}, {offset + byte_size}) is outside region "
                f"'{clip(self.name)}' of {self.byte_size} bytes"
            )
        return self.offset + offset

    def read(self, offset: int, byte_size: int, what: str) -> bytearray:
        """A copy of ``byte_size`` bytes at ``offset`` inside the window.

        Raises:
            InvalidInputError: the span leaves the window, or the object was shrunk, replaced
                or unregistered; names ``what``.
        """
        start = self._bounds(offset, byte_size, what)
        buffer = bytearray(byte_size)
        with self._lock:
            self._check(start + byte_size, what)
            got = os.preadv(self._fd, [buffer], start) if byte_size else 0
        if got != byte_size:
            raise InvalidInputError(
                f"{what}: shared memory key '{clip(self.key)}' of region '{clip(self.name)}' "
                f"shrank while it was read ({got} of {byte_size} bytes)"
            )
        return buffer

    def write(self, offset: int, data: bytes | memoryview, what: str) -> None:
        """Write ``data`` at ``offset`` inside the window.

        Raises:
            InvalidInputError: as ``read``.
        """
        start = self._bounds(offset, len(data), what)
        with self._lock:
            self._check(start + len(data), what)
            view = memoryview(data)
            while view:
                written = os.pwrite(self._fd, view, start)
                if written <= 0:
                    raise InvalidInputError(
                        f"{what}: shared memory key '{clip(self.key)}' of region "
                        f"'{clip(self.name)}' took no more bytes"
                    )
                view, start = view[written:], start + written

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


@dataclass(frozen=True)
class Span:
    """``size`` bytes at ``offset`` of a region's window, as a tensor's parameters name them."""

    region: Region
    offset: int
    size: int
    what: str

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytearray:
        """The span's bytes (a copy). Raises InvalidInputError as ``Region.read``."""
        return self.region.read(self.offset, self.size, self.what)

    def write(self, data: bytes | memoryview) -> None:
        """Write ``data`` at the span's start. Raises InvalidInputError as ``Region.write``."""
        self.region.write(self.offset, data, self.what)


def check_key(key: str) -> str:
    """The file name under /dev/shm that ``key`` (``name`` or ``/name``) stands for.

    Raises:
        InvalidInputError: not a plain file name.
    """
    leaf = key[1:] if key.startswith("/") else key
    if (
        not leaf
        or "/" in leaf
        or "\0" in leaf
        or leaf in (".", "..")
        or len(leaf.encode(errors="surrogatepass")) > MAX_KEY_BYTES
    ):
        raise InvalidInputError(
            f"shared memory key '{clip(key)}' is not a shm_open name (a plain file name in "
            f"{SHM_ROOT}, optionally with a leading '/')"
        )
    return leaf


class SharedMemoryRegistry:
    """The regions registered with this daemon, by name; safe from any thread."""

    def __init__(self, root: Path = SHM_ROOT, limits: ShmLimits = ShmLimits()) -> None:
        self._root = root
        self._limits = limits
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def _check_caps(self, owner: str, byte_size: int) -> None:
        limits = self._limits
        mine = [r for r in self._regions.values() if r.owner == owner]
        checks = (
            (len(self._regions) + 1, limits.max_regions, "regions", "limits.shm_max_regions"),
            (
                len(mine) + 1,
                limits.max_regions_per_connection,
                "regions from this connection",
                "limits.shm_max_regions_per_connection",
            ),
            (
                sum(r.byte_size for r in self._regions.values()) + byte_size,
                limits.max_bytes,
                "registered bytes",
                "limits.shm_max_bytes",
            ),
            (
                sum(r.byte_size for r in mine) + byte_size,
                limits.max_bytes_per_connection,
                "registered bytes from this connection",
                "limits.shm_max_bytes_per_connection",
            ),
        )
        for wanted, cap, what, key in checks:
            if wanted > cap:
                raise OverloadedError(
                    f"shared memory: this registration would make {wanted} {what}, over the "
                    f"cap of {cap} ({key}); unregister regions first"
                )

    def register(self, name: str, key: str, offset: int, byte_size: int, owner: str = "") -> Region:
        """Open the shared-memory object ``key`` and register its window as ``name``, on
        behalf of ``owner`` (the client connection, for the per-connection caps).

        Raises:
            InvalidInputError: an empty name, a key that is not a plain name, a symlink or
                anything but a regular file, a negative offset, a zero size, or a window past
                the object's end.
            AlreadyExistsError: ``name`` is registered already.
            NotFoundError: no shared-memory object ``key`` exists.
            OverloadedError: a cap on regions or registered bytes would be passed.
        """
        if not name:
            raise InvalidInputError("shared memory region name is empty")
        leaf = check_key(key)
        if offset < 0 or byte_size <= 0:
            raise InvalidInputError(
                f"shared memory region '{clip(name)}': offset {offset} and byte_size "
                f"{byte_size} must be >= 0 and > 0"
            )
        with self._lock:
            if name in self._regions:
                raise AlreadyExistsError(
                    f"shared memory region '{clip(name)}' is already registered"
                )
            self._check_caps(owner, byte_size)
            path = self._root / leaf
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except FileNotFoundError:
                raise NotFoundError(f"shared memory key '{clip(key)}' does not exist") from None
            except OSError as e:
                why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
                raise InvalidInputError(
                    f"shared memory key '{clip(key)}' cannot be opened: {why}"
                ) from e
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise InvalidInputError(
                        f"shared memory key '{clip(key)}' is not a regular file"
                    )
                if offset + byte_size > info.st_size:
                    raise InvalidInputError(
                        f"shared memory region '{clip(name)}': offset {offset} + byte_size "
                        f"{byte_size} is past the end of '{clip(key)}' ({info.st_size} bytes)"
                    )
            except BaseException:
                os.close(fd)
                raise
            region = Region(
                name, key, offset, byte_size, owner, fd, path, (info.st_dev, info.st_ino)
            )
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
            raise InvalidInputError(
                f"{what}: shared memory region '{clip(name)}' is not registered"
            )
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
                raise NotFoundError(f"shared memory region '{clip(name)}' is not registered")
            return [self._regions[name]]

    def unregister(self, name: str = "") -> None:
        """Forget one region, or all when ``name`` is empty, closing their descriptors (a
        request reading one at that moment finishes first; a later one is refused).

        Raises:
            NotFoundError: ``name`` is not registered.
        """
        with self._lock:
            if not name:
                gone = list(self._regions.values())
                self._regions.clear()
            else:
                region = self._regions.pop(name, None)
                if region is None:
                    raise NotFoundError(f"shared memory region '{clip(name)}' is not registered")
                gone = [region]
        for region in gone:
            region.close()

    def close(self) -> None:
        """Unregister everything (at shutdown)."""
        self.unregister()
