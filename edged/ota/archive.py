"""Safe unpacking of a bundle archive (a tar, gzip-compressed or not): judge all, then write.

The rules do no I/O: ``check_name`` judges one member name, ``member_of`` one tar header and
``check_members`` a whole listing, each against ``Limits``. ``scan`` streams the archive through
them before anything is written; decompression is capped while it happens, so a bomb is stopped
after a bounded amount of work, never after it filled the disk or the memory. ``extract`` scans,
then writes every file into a fresh temporary folder beside where it will live (same
filesystem), with bounded reads and ``O_EXCL | O_NOFOLLOW``, fsyncs the files and folders, and
returns the folder for the caller to rename into place. On any failure nothing it wrote is left.

Refused (each with ``UnsafeArchiveError`` naming the member and the rule): links (symbolic or
hard), devices, fifos, sparse files and any other non-regular member; absolute paths, ``..`` or
``.`` components, empty components, names outside ``[A-Za-z0-9._-]`` or starting with ``.``
or ``-``; names equal but for case; a file that is also another member's folder; more members,
more unpacked bytes or a higher compression ratio than the limits.
"""

from __future__ import annotations

import contextlib
import enum
import gzip
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from edged.ota.errors import UnsafeArchiveError
from edged.storage import fsync_dir

MiB = 1024 * 1024

#: one path component: a letter, digit or underscore, then letters, digits, ``.``, ``_``, ``-``
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

#: bytes a tar stream holds beyond its files: per member a header, a pax header and its
#: record, and padding; per archive the end marker and the record padding
_PER_MEMBER_OVERHEAD = 4 * 512
_PER_ARCHIVE_OVERHEAD = 2 * tarfile.RECORDSIZE

_CHUNK = 1 * MiB
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Limits:
    """What an archive may hold; every field has a bounded default."""

    max_files: int = 64
    """Most members (files and folders)."""
    max_bytes: int = 512 * MiB
    """Largest total size of the files once unpacked."""
    max_ratio: float = 200.0
    """Largest ratio of unpacked (tar stream) bytes to compressed bytes read so far."""
    ratio_floor_bytes: int = 1 * MiB
    """The ratio is judged once this many bytes are unpacked: the tar headers of a few small
    files compress far better than any model does."""
    max_name_length: int = 255
    """Longest member path, in characters."""
    max_component_length: int = 128
    """Longest single component of a member path."""
    max_depth: int = 8
    """Most components in a member path."""

    def __post_init__(self) -> None:
        for name in (
            "max_files",
            "max_bytes",
            "ratio_floor_bytes",
            "max_name_length",
            "max_component_length",
            "max_depth",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be an integer >= 1, not {value!r}")
        if not self.max_ratio >= 1.0:
            raise ValueError(f"Limits.max_ratio must be >= 1, not {self.max_ratio!r}")

    @property
    def max_stream_bytes(self) -> int:
        """Most bytes the tar stream may unpack to: the files plus tar's own overhead."""
        return self.max_bytes + _PER_MEMBER_OVERHEAD * (self.max_files + 1) + _PER_ARCHIVE_OVERHEAD


class Kind(enum.StrEnum):
    """What a member is; nothing else is accepted."""

    FILE = "file"
    DIR = "dir"


@dataclass(frozen=True)
class Member:
    """One accepted member: its normalised path ("a/b", no trailing slash), kind and size."""

    name: str
    kind: Kind
    size: int


@dataclass(frozen=True)
class Listing:
    """What ``scan`` found: the members in archive order and the archive's size."""

    members: tuple[Member, ...]
    archive_bytes: int

    @property
    def total_bytes(self) -> int:
        """Bytes the files take once unpacked."""
        return sum(m.size for m in self.members if m.kind is Kind.FILE)

    @property
    def files(self) -> tuple[Member, ...]:
        """The file members."""
        return tuple(m for m in self.members if m.kind is Kind.FILE)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


# -- rules (no I/O) --------------------------------------------------------------------------


def check_name(name: str, limits: Limits = Limits()) -> str:
    """The normalised form of member ``name`` (a folder's trailing ``/`` removed).

    Raises:
        UnsafeArchiveError: the name is empty, absolute, escapes (``..``), has an empty or
            ``.`` component, is too long or too deep, or holds a character outside the safe
            set.
    """
    if not name:
        raise UnsafeArchiveError("member with an empty name")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"member {name!r}: absolute path")
    text = name.removesuffix("/")
    parts = text.split("/")
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r}: a '..' component escapes the folder")
    if len(name) > limits.max_name_length:
        raise UnsafeArchiveError(
            f"member {name[:40]!r}...: name is {len(name)} characters, above the limit of "
            f"{limits.max_name_length}"
        )
    if len(parts) > limits.max_depth:
        raise UnsafeArchiveError(
            f"member {name!r}: {len(parts)} path components, above the limit of {limits.max_depth}"
        )
    for part in parts:
        if part in {"", "."}:
            raise UnsafeArchiveError(f"member {name!r}: empty or '.' path component")
        if len(part) > limits.max_component_length:
            raise UnsafeArchiveError(
                f"member {name!r}: component is {len(part)} characters, above the limit of "
                f"{limits.max_component_length}"
            )
        if not _COMPONENT.fullmatch(part):
            raise UnsafeArchiveError(
                f"member {name!r}: component {part!r} is not made of [A-Za-z0-9._-] "
                "(or starts with '.' or '-')"
            )
    return text


def member_of(info: tarfile.TarInfo, limits: Limits = Limits()) -> Member:
    """The ``Member`` a tar header describes.

    Raises:
        UnsafeArchiveError: the member is not a regular file or folder, or its name is unsafe.
    """
    name = info.name
    if info.issym():
        raise UnsafeArchiveError(f"member {name!r}: symbolic link (to {info.linkname!r})")
    if info.islnk():
        raise UnsafeArchiveError(f"member {name!r}: hard link (to {info.linkname!r})")
    if info.ischr() or info.isblk():
        raise UnsafeArchiveError(f"member {name!r}: device node")
    if info.isfifo():
        raise UnsafeArchiveError(f"member {name!r}: fifo")
    if info.issparse():
        raise UnsafeArchiveError(f"member {name!r}: sparse file")
    if info.isdir():
        kind = Kind.DIR
    elif info.isreg():
        kind = Kind.FILE
    else:
        raise UnsafeArchiveError(f"member {name!r}: unsupported tar type {info.type!r}")
    normal = check_name(name, limits)
    if info.size < 0:  # pragma: no cover - tarfile refuses negative sizes itself
        raise UnsafeArchiveError(f"member {name!r}: negative size")
    return Member(normal, kind, info.size if kind is Kind.FILE else 0)


def check_members(members: Sequence[Member], limits: Limits = Limits()) -> None:
    """Judge a whole listing (names already checked one by one).

    Raises:
        UnsafeArchiveError: too many members, too many bytes, a duplicate name (case-folded,
            as a case-insensitive filesystem would see it), or a file that is also another
            member's folder.
    """
    if len(members) > limits.max_files:
        raise UnsafeArchiveError(f"{len(members)} members, above the limit of {limits.max_files}")
    total = sum(m.size for m in members if m.kind is Kind.FILE)
    if total > limits.max_bytes:
        raise UnsafeArchiveError(
            f"files total {total} bytes unpacked, above the limit of {limits.max_bytes}"
        )
    seen: dict[str, Member] = {}
    for m in members:
        key = m.name.casefold()
        if key in seen:
            raise UnsafeArchiveError(f"member {m.name!r}: duplicate name (as {seen[key].name!r})")
        seen[key] = m
    for m in members:
        parts = m.name.casefold().split("/")
        for depth in range(1, len(parts)):
            parent = seen.get("/".join(parts[:depth]))
            if parent is not None and parent.kind is Kind.FILE:
                raise UnsafeArchiveError(
                    f"member {m.name!r}: {parent.name!r} is a file, not a folder"
                )


# -- I/O -------------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Counting:
    """A binary reader that counts what it returns."""

    def __init__(self, inner: _Readable) -> None:
        self.inner = inner
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        return data


class _Capped:
    """The unpacked tar stream: every read bounded, unpacked bytes and ratio judged as they
    come, so no read can ask for more than the limit allows."""

    def __init__(self, inner: _Readable, compressed: _Counting, path: Path, limits: Limits):
        self.inner = inner
        self.compressed = compressed
        self.path = path
        self.limits = limits
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        room = self.limits.max_stream_bytes - self.count + 1
        size = room if size is None or size < 0 else min(size, room)
        data = self.inner.read(size)
        self.count += len(data)
        self.judge()
        return data

    def judge(self) -> None:
        if self.count > self.limits.max_stream_bytes:
            raise UnsafeArchiveError(
                f"{self.path.name}: unpacks to more than {self.limits.max_stream_bytes} bytes "
                f"(files limited to {self.limits.max_bytes})"
            )
        if self.count >= self.limits.ratio_floor_bytes:
            ratio = self.count / max(1, self.compressed.count)
            if ratio > self.limits.max_ratio:
                raise UnsafeArchiveError(
                    f"{self.path.name}: compression ratio above {self.limits.max_ratio:g} "
                    f"({self.count} bytes unpacked from {self.compressed.count})"
                )


@contextlib.contextmanager
def _open(path: Path, limits: Limits) -> Iterator[tuple[tarfile.TarFile, int]]:
    """The archive as a streaming TarFile over a capped stream, and its size in bytes."""
    try:
        # non-blocking, so that a fifo put in the archive's place cannot hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UnsafeArchiveError(f"{path}: cannot open the archive: {e}") from e
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeArchiveError(f"{path}: not a regular file")
        raw: IO[bytes] = stack.enter_context(os.fdopen(os.dup(fd), "rb"))
        counting = _Counting(raw)
        head = raw.read(2)
        raw.seek(0)
        inner: _Readable = counting
        if head == _GZIP_MAGIC:
            gz = gzip.GzipFile(filename="", mode="rb", fileobj=counting)  # type: ignore[call-overload]
            inner = stack.enter_context(gz)
        capped = _Capped(inner, counting, path, limits)
        try:
            tar = stack.enter_context(
                tarfile.open(fileobj=capped, mode="r|")  # type: ignore[call-overload]
            )
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UnsafeArchiveError(f"{path}: not a readable tar archive: {e}") from e
        yield tar, st.st_size


def _next_member(tar: tarfile.TarFile, path: Path) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UnsafeArchiveError(f"{path}: not a readable tar archive: {e}") from e


def _members(
    tar: tarfile.TarFile, path: Path, limits: Limits
) -> Iterator[tuple[tarfile.TarInfo, Member]]:
    """Each header as a checked member; counts and totals judged as they arrive, so a huge
    declared size is refused before tarfile skips over it."""
    count = 0
    total = 0
    while (info := _next_member(tar, path)) is not None:
        member = member_of(info, limits)
        count += 1
        total += member.size
        if count > limits.max_files:
            raise UnsafeArchiveError(
                f"{path.name}: more than {limits.max_files} members (the limit)"
            )
        if total > limits.max_bytes:
            raise UnsafeArchiveError(
                f"{path.name}: files total more than {limits.max_bytes} bytes unpacked "
                f"(the limit), at member {member.name!r}"
            )
        yield info, member


def scan(archive_path: Path, limits: Limits = Limits()) -> Listing:
    """Read the whole archive and judge it, writing nothing.

    Raises:
        UnsafeArchiveError: a member, the listing or the stream breaks a rule, or the file is
            not a readable tar archive.
    """
    path = Path(archive_path)
    members: list[Member] = []
    with _open(path, limits) as (tar, size):
        for _, member in _members(tar, path, limits):
            members.append(member)
    check_members(members, limits)
    return Listing(tuple(members), size)


def _write_file(source: IO[bytes], target: Path, size: int, path: Path, name: str) -> None:
    """Copy exactly ``size`` bytes (the size already judged) into a new file; fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        remaining = size
        while remaining > 0:
            try:
                chunk = source.read(min(_CHUNK, remaining))
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise UnsafeArchiveError(f"{path.name}: cannot read member {name!r}: {e}") from e
            if not chunk:
                raise UnsafeArchiveError(
                    f"{path.name}: member {name!r} ends before its declared {size} bytes"
                )
            out.write(chunk)
            remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())


def extract(archive_path: Path, dest_parent: Path, limits: Limits = Limits()) -> Path:
    """Scan the archive, then unpack it into a new temporary folder inside ``dest_parent``
    (so that the caller's final rename stays on one filesystem). Files and folders are
    fsynced. Returns the folder.

    Raises:
        UnsafeArchiveError: the archive breaks a rule (see ``scan``), or changed between the
            scan and the unpacking; nothing is left behind.
        OSError: writing failed (disk full, permissions); nothing is left behind.
    """
    path = Path(archive_path)
    listing = scan(path, limits)
    folder = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_parent))
    try:
        folders = [folder]
        expected = iter(listing.members)
        with _open(path, limits) as (tar, _):
            for info, member in _members(tar, path, limits):
                if member != next(expected, None):
                    raise UnsafeArchiveError(
                        f"{path.name}: changed between scan and unpacking (at {member.name!r})"
                    )
                target = folder.joinpath(*member.name.split("/"))
                parent = target if member.kind is Kind.DIR else target.parent
                for missing in reversed([parent, *parent.parents]):
                    if missing.is_relative_to(folder) and not missing.exists():
                        missing.mkdir(mode=0o755)
                        folders.append(missing)
                if member.kind is Kind.FILE:
                    try:
                        source = tar.extractfile(info)
                    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                        raise UnsafeArchiveError(
                            f"{path.name}: cannot read member {member.name!r}: {e}"
                        ) from e
                    assert source is not None  # a regular file always has contents
                    with source:
                        _write_file(source, target, member.size, path, member.name)
        if next(expected, None) is not None:
            raise UnsafeArchiveError(f"{path.name}: changed between scan and unpacking")
        for each in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(each)
        fsync_dir(Path(dest_parent))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def free_space_ok(path: Path, need_bytes: int, floor_bytes: int) -> bool:
    """Whether writing ``need_bytes`` more under ``path`` (or its nearest existing parent)
    leaves at least ``floor_bytes`` free on that filesystem.

    Raises:
        ValueError: a negative byte count.
    """
    if need_bytes < 0 or floor_bytes < 0:
        raise ValueError(f"byte counts must be >= 0, not {need_bytes} and {floor_bytes}")
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free - need_bytes >= floor_bytes


def read_files(
    archive_path: Path,
    names: Sequence[str],
    max_file_bytes: int,
    limits: Limits = Limits(),
) -> dict[str, bytes]:
    """Scan the archive, then read the named files into memory (a manifest, a small config)
    without writing anything. Names absent from the archive are absent from the result.

    Raises:
        UnsafeArchiveError: the archive breaks a rule (see ``scan``), changed meanwhile, or a
            named file is larger than ``max_file_bytes``.
    """
    path = Path(archive_path)
    listing = scan(path, limits)
    wanted = set(names)
    for member in listing.files:
        if member.name in wanted and member.size > max_file_bytes:
            raise UnsafeArchiveError(
                f"{path.name}: member {member.name!r} is {member.size} bytes, above the "
                f"{max_file_bytes} read into memory"
            )
    found: dict[str, bytes] = {}
    with _open(path, limits) as (tar, _):
        for info, member in _members(tar, path, limits):
            if member.kind is not Kind.FILE or member.name not in wanted:
                continue
            if member.size > max_file_bytes:
                raise UnsafeArchiveError(f"{path.name}: changed between scan and reading")
            source = tar.extractfile(info)
            assert source is not None  # a regular file always has contents
            with source:
                data = source.read(member.size)
            if len(data) != member.size:
                raise UnsafeArchiveError(
                    f"{path.name}: member {member.name!r} ends before its declared "
                    f"{member.size} bytes"
                )
            found[member.name] = data
    return found
