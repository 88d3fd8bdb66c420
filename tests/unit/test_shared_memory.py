"""The shared-memory registry on a folder standing in for /dev/shm: keys confined to regular
files, copies through the descriptor that notice a shrunk or replaced object, and the caps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edged.core.errors import InvalidInputError, NotFoundError, OverloadedError
from edged.serving.shared_memory import SharedMemoryRegistry, ShmLimits, check_key


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "obj").write_bytes(bytes(range(256)))
    return tmp_path


@pytest.mark.parametrize(
    "key", ["", "/", "a/b", "/a/b", "..", "/..", ".", "x\0y", "k" * 256, "//etc"]
)
def test_keys_that_are_not_plain_names(key: str) -> None:
    with pytest.raises(InvalidInputError, match="not a shm_open name"):
        check_key(key)


def test_plain_keys() -> None:
    assert check_key("/input0") == "input0"
    assert check_key("input0") == "input0"


def test_read_and_write_through_the_descriptor(root: Path) -> None:
    registry = SharedMemoryRegistry(root)
    region = registry.register("r", "/obj", 16, 64)
    assert region.read(0, 4, "t") == bytes([16, 17, 18, 19])
    region.write(4, b"\xff\xfe", "t")
    assert (root / "obj").read_bytes()[20:22] == b"\xff\xfe"
    with pytest.raises(InvalidInputError, match="outside region 'r'"):
        region.read(60, 8, "t")
    registry.close()


def test_shrunk_object_is_refused(root: Path) -> None:
    registry = SharedMemoryRegistry(root)
    region = registry.register("r", "obj", 0, 256)
    os.truncate(root / "obj", 10)
    with pytest.raises(InvalidInputError, match="shrank to 10 bytes"):
        region.read(0, 256, "tensor 'x'")
    with pytest.raises(InvalidInputError, match="shrank"):
        region.write(0, bytes(256), "output 'y'")


def test_replaced_object_is_refused(root: Path) -> None:
    registry = SharedMemoryRegistry(root)
    region = registry.register("r", "obj", 0, 256)
    (root / "obj").unlink()
    (root / "obj").write_bytes(bytes(256))
    with pytest.raises(InvalidInputError, match="removed or replaced"):
        region.read(0, 8, "t")


def test_symlinks_and_special_files_are_refused(root: Path, tmp_path_factory) -> None:
    secret = tmp_path_factory.mktemp("secret") / "file"
    secret.write_bytes(b"s" * 64)
    (root / "link").symlink_to(secret)
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    registry = SharedMemoryRegistry(root)
    with pytest.raises(InvalidInputError, match="symlink"):
        registry.register("a", "link", 0, 8)
    with pytest.raises(InvalidInputError, match="not a regular file"):
        registry.register("b", "fifo", 0, 8)
    with pytest.raises(InvalidInputError):
        registry.register("c", "dir", 0, 8)
    with pytest.raises(NotFoundError):
        registry.register("d", "absent", 0, 8)
    assert registry.status() == []


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        (ShmLimits(max_regions=2), r"\(limits\.shm_max_regions\)"),
        (ShmLimits(max_regions_per_connection=2), "limits.shm_max_regions_per_connection"),
        (ShmLimits(max_bytes=200), r"\(limits\.shm_max_bytes\)"),
        (ShmLimits(max_bytes_per_connection=200), "limits.shm_max_bytes_per_connection"),
    ],
)
def test_caps(root: Path, limits: ShmLimits, key: str) -> None:
    """Two registrations of 100 bytes from connection "a" fit every cap; a third, from "a" or
    from "b", passes exactly the one under test (per-connection caps only for "a")."""
    registry = SharedMemoryRegistry(root, limits)
    registry.register("a1", "obj", 0, 100, owner="a")
    registry.register("a2", "obj", 0, 100, owner="a")
    with pytest.raises(OverloadedError, match=key):
        registry.register("a3", "obj", 0, 100, owner="a")
    per_connection = key.endswith("connection")
    if per_connection:
        registry.register("b1", "obj", 0, 100, owner="b")  # another connection has its own
    else:
        with pytest.raises(OverloadedError, match=key):
            registry.register("b1", "obj", 0, 100, owner="b")
    registry.unregister("a1")
    registry.register("a3", "obj", 0, 100, owner="a")  # a freed slot is usable again


def test_unregister_closes_the_descriptor(root: Path) -> None:
    registry = SharedMemoryRegistry(root)
    region = registry.register("r", "obj", 0, 8)
    fds_before = len(os.listdir("/proc/self/fd"))
    registry.unregister("r")
    assert len(os.listdir("/proc/self/fd")) == fds_before - 1
    with pytest.raises(InvalidInputError, match="unregistered"):
        region.read(0, 8, "t")
