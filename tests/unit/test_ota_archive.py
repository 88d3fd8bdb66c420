"""Safe unpacking: every unsafe archive is refused before anything is written (table), a good
one unpacks exactly, and the name rules hold for any name (hypothesis)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.ota import archive
from edged.ota.archive import Kind, Limits, Member, check_name
from edged.ota.errors import OtaError, UnsafeArchiveError

MiB = 1024 * 1024


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_tar(
    path: Path,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    gz: bool = True,
    pax_headers: dict[str, str] | None = None,
) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=pax_headers
    ) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def zeros_member(name: str, size: int) -> Callable[[Path], Path]:
    """A gzip'd tar of one file of zeros, streamed (never held in memory whole)."""

    def make(path: Path) -> Path:
        with (
            gzip.open(path, "wb", compresslevel=1) as gz,
            tarfile.open(fileobj=gz, mode="w") as tar,  # type: ignore[call-overload]
        ):
            info = tarfile.TarInfo(name)
            info.size = size

            class Zeros:
                left = size

                def read(self, n: int = -1) -> bytes:
                    n = self.left if n < 0 else min(n, self.left)
                    self.left -= n
                    return bytes(n)

            tar.addfile(info, Zeros())  # type: ignore[arg-type]
        return path

    return make


def huge_declared_size(path: Path) -> Path:
    """A header declaring a 1 TiB file followed by no data at all."""
    info = tarfile.TarInfo("model.onnx")
    info.size = 1 << 40
    header = info.tobuf(tarfile.PAX_FORMAT)
    path.write_bytes(gzip.compress(header + bytes(1024), mtime=0))
    return path


def from_members(*members: tuple[tarfile.TarInfo, bytes | None]) -> Callable[[Path], Path]:
    return lambda path: write_tar(path, list(members))


CASES = [
    pytest.param(from_members(_file("../x")), "'..' component", id="parent-traversal"),
    pytest.param(from_members(_file("a/../../x")), "'..' component", id="nested-traversal"),
    pytest.param(from_members(_file("/etc/x")), "absolute path", id="absolute"),
    pytest.param(
        from_members(_special("link", tarfile.SYMTYPE, "/etc/passwd")),
        "symbolic link",
        id="symlink",
    ),
    pytest.param(
        from_members(_file("model.onnx"), _special("copy", tarfile.LNKTYPE, "model.onnx")),
        "hard link",
        id="hardlink",
    ),
    pytest.param(from_members(_special("tty", tarfile.CHRTYPE)), "device node", id="chardev"),
    pytest.param(from_members(_special("sda", tarfile.BLKTYPE)), "device node", id="blockdev"),
    pytest.param(from_members(_special("pipe", tarfile.FIFOTYPE)), "fifo", id="fifo"),
    pytest.param(
        from_members(*[_file(f"f{i}") for i in range(65)]), "more than 64 members", id="count"
    ),
    pytest.param(zeros_member("zeros.bin", 64 * MiB), "compression ratio", id="zip-bomb-ratio"),
    pytest.param(huge_declared_size, "more than 536870912 bytes", id="declared-size"),
    pytest.param(from_members(_file("a"), _file("a")), "duplicate name", id="duplicate"),
    pytest.param(
        from_members(_file("Model.onnx"), _file("model.onnx")), "duplicate name", id="case-dup"
    ),
    pytest.param(from_members(_file("a"), _file("a/b")), "is a file, not a folder", id="file-dir"),
    pytest.param(from_members(_file("a b")), "is not made of", id="space"),
    pytest.param(from_members(_file("na\u00efve")), "is not made of", id="non-ascii"),
    pytest.param(from_members(_file(".hidden")), "is not made of", id="dotfile"),
    pytest.param(from_members(_file("a\\..\\b")), "is not made of", id="backslash"),
    pytest.param(from_members(_file("./a")), "'.' path component", id="dot-component"),
    pytest.param(from_members(_file("x" * 200)), "above the limit of 128", id="long-component"),
    pytest.param(from_members(_file("/".join("d" * 9))), "9 path components", id="too-deep"),
]


@pytest.mark.parametrize(("make", "message"), CASES)
def test_unsafe_archive_is_refused_and_nothing_is_written(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    path = make(tmp_path / "bundle.tar.gz")
    dest = tmp_path / "dest"
    dest.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(UnsafeArchiveError, match=message):
        archive.scan(path)
    with pytest.raises(UnsafeArchiveError, match=message):
        archive.extract(path, dest)

    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / "x").exists()


def test_size_limit_is_judged_on_the_headers(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "b.tar.gz", [_file("a", bytes(600)), _file("b", bytes(600))])
    with pytest.raises(UnsafeArchiveError, match="files total more than 1000 bytes"):
        archive.scan(path, Limits(max_bytes=1000))
    assert archive.scan(path, Limits(max_bytes=1200)).total_bytes == 1200


def test_decompression_is_capped_while_it_happens(tmp_path: Path) -> None:
    # a pax header is read whole by tarfile: 4 MiB of it must stop at the stream cap
    path = write_tar(tmp_path / "b.tar.gz", [_file("a")], pax_headers={"comment": "z" * (4 * MiB)})
    with pytest.raises(UnsafeArchiveError, match="unpacks to more than"):
        archive.scan(path, Limits(max_bytes=MiB, max_ratio=1e9))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"not an archive at all" * 40, "not a readable tar archive", id="garbage"),
        pytest.param(gzip.compress(b"\x01" * 2048)[:40], "not a readable tar archive", id="cut"),
    ],
)
def test_unreadable_archive_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "b.tar.gz"
    path.write_bytes(content)
    with pytest.raises(UnsafeArchiveError, match=message):
        archive.scan(path)


def test_archive_must_be_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UnsafeArchiveError, match="not a regular file"):
        archive.scan(tmp_path / "pipe")


@pytest.mark.parametrize("gz", [True, False], ids=["tar.gz", "tar"])
def test_good_archive_unpacks_into_a_fresh_folder(tmp_path: Path, gz: bool) -> None:
    blob = os.urandom(3 * MiB + 17)
    folder_info = tarfile.TarInfo("sub")
    folder_info.type = tarfile.DIRTYPE
    path = write_tar(
        tmp_path / "bundle.tar",
        [
            _file("bundle.toml", b'name = "m"\n'),
            _file("model.onnx", blob),
            (folder_info, None),
            _file("sub/empty.bin", b""),
            _file("deep/er/x.npy", b"abc"),
        ],
        gz=gz,
    )
    dest = tmp_path / "model" / ".ota-staging"
    dest.mkdir(parents=True)

    listing = archive.scan(path)
    folder = archive.extract(path, dest)

    assert [m.name for m in listing] == [
        "bundle.toml",
        "model.onnx",
        "sub",
        "sub/empty.bin",
        "deep/er/x.npy",
    ]
    assert listing.total_bytes == len(blob) + 11 + 3
    assert Member("sub", Kind.DIR, 0) in listing.members
    assert folder.parent == dest
    assert folder.name.startswith(".unpack-")
    assert list(dest.iterdir()) == [folder]
    assert (folder / "model.onnx").read_bytes() == blob
    assert (folder / "bundle.toml").read_bytes() == b'name = "m"\n'
    assert (folder / "sub" / "empty.bin").read_bytes() == b""
    assert (folder / "deep" / "er" / "x.npy").read_bytes() == b"abc"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["bundle.toml", "deep/er/x.npy", "model.onnx", "sub/empty.bin"]
    assert oct((folder / "model.onnx").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar", "model"]


def test_read_files_reads_named_members_only(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "b.tar.gz", [_file("bundle.toml", b"a = 1"), _file("m", b"x")])
    assert archive.read_files(path, ["bundle.toml", "absent"], 100) == {"bundle.toml": b"a = 1"}
    with pytest.raises(UnsafeArchiveError, match="above the 2 read into memory"):
        archive.read_files(path, ["bundle.toml"], 2)


def test_unsafe_archive_error_is_an_ota_error() -> None:
    assert issubclass(UnsafeArchiveError, OtaError)


def test_limits_are_bounded() -> None:
    limits = Limits()
    assert (limits.max_files, limits.max_bytes, limits.max_ratio) == (64, 512 * MiB, 200.0)
    with pytest.raises(ValueError, match="max_files"):
        Limits(max_files=0)
    with pytest.raises(ValueError, match="max_ratio"):
        Limits(max_ratio=0.5)


def test_free_space(tmp_path: Path) -> None:
    assert archive.free_space_ok(tmp_path / "not" / "yet", 1, 0)
    assert not archive.free_space_ok(tmp_path, 1 << 62, 0)
    with pytest.raises(ValueError, match=">= 0"):
        archive.free_space_ok(tmp_path, -1, 0)


# -- names, for any text ---------------------------------------------------------------------

SAFE_COMPONENT = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(st.lists(SAFE_COMPONENT, min_size=1, max_size=8))
def test_safe_names_are_accepted_and_stay_inside(parts: list[str]) -> None:
    name = "/".join(parts)
    assert check_name(name) == name
    assert check_name(name + "/") == name
    base = Path("/base")
    resolved = (base / name).resolve(strict=False)
    assert resolved.is_relative_to(base)


@given(
    st.lists(SAFE_COMPONENT, max_size=4),
    st.lists(SAFE_COMPONENT, max_size=4),
    st.sampled_from(["..", ".", ""]),
)
def test_dot_and_empty_components_are_refused(
    before: list[str], after: list[str], bad: str
) -> None:
    if bad == "" and not after:
        after = ["x"]  # a trailing slash alone marks a folder: make the empty component inner
    name = "/".join([*before, bad, *after])
    with pytest.raises(UnsafeArchiveError):
        check_name(name)


@given(st.text(min_size=1, max_size=60))
def test_any_accepted_name_is_relative_and_plain(name: str) -> None:
    try:
        normal = check_name(name)
    except UnsafeArchiveError:
        return
    assert not normal.startswith("/")
    parts = normal.split("/")
    assert all(p and p not in {".", ".."} and p[0] not in ".-" for p in parts)
    assert normal.isascii()
    assert (Path("/base") / normal).resolve(strict=False).is_relative_to(Path("/base"))


@given(st.text(min_size=1, max_size=30).map(lambda s: "/" + s))
def test_absolute_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeArchiveError):
        check_name(name)
