"""The repository's version folders on disk: the one home of their rules, reads and writes.

Layout of one model folder (model.toml and warm-up data are ``edged.serving.repository``'s)::

    <repo>/<model>/<version>/      numeric, canonical ("1", "12"; not "01"): a version folder,
                                   immutable once visible; any other folder is ignored
    <repo>/<model>/ACTIVE          optional: the versions served, one per line; without it the
                                   version policy of model.toml picks among the folders
    <repo>/<model>/.ota-staging/   where new versions are assembled before they appear, and where
                                   removed ones go before they are deleted; never a version

Every write survives a crash (``edged.storage``: temp name in the same folder, fsync, rename,
fsync the folder): a version folder appears whole or not at all, disappears whole, and ACTIVE
names either the old versions or the new ones. Serving owns these rules: the swap writes ACTIVE
when it switches (``edged.serving.manager.ModelManager.serve``); OTA installs and removes
version folders and, at start-up before anything is served, puts ACTIVE back after a crash.
Blocking: call from worker threads, never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edged.core.errors import AlreadyExistsError, ModelLoadError
from edged.storage import fsync_dir, write_atomic

ACTIVE_FILE = "ACTIVE"

#: the folder, inside each model's folder, where versions are assembled (same filesystem as
#: the version folders, so the final rename is atomic); removed whole at start-up
STAGING_DIR = ".ota-staging"

#: folders of a repository that are never models: a filesystem's (the repository as a
#: mount point) and Python's byte-code cache
NOT_MODELS = frozenset({"lost+found", "__pycache__"})


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve: the ``latest`` N, a ``specific`` list, or ``all``."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve out of ``available``, ascending."""
        versions = sorted(available)
        if self.all:
            return versions
        if self.specific:
            return [v for v in versions if v in self.specific]
        return versions[-(self.latest or 1) :]


class VersionedModel(Protocol):
    """What choosing the versions to serve reads of a model (``repository.ModelSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def version_policy(self) -> VersionPolicy: ...


# -- reads -----------------------------------------------------------------------------------


def list_models(repo: Path) -> list[str]:
    """Names of the model folders: every folder of ``repo`` whose name does not start with
    "." (nor ``NOT_MODELS``), sorted. Nothing inside them is read here: one unreadable
    folder fails only its own load (``read_model_spec``)."""
    try:
        with os.scandir(repo) as entries:
            return sorted(
                e.name
                for e in entries
                if not e.name.startswith(".") and e.name not in NOT_MODELS and _is_dir(e)
            )
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return True  # listed, so that its load says what is wrong with it


def parse_version(text: str) -> int | None:
    """A version number written canonically ("1", "12"; not "01", "+1" or "²"), else None."""
    if text and text.isascii() and text.isdigit() and text[0] != "0":
        return int(text)
    return None


def available_versions(model_dir: Path) -> list[int]:
    """Version folders (canonical numbers), ascending; temporary and other folders are
    ignored.

    Raises:
        ModelLoadError: the model folder cannot be read (named, with the system's reason).
    """
    try:
        with os.scandir(model_dir) as entries:
            versions = [parse_version(e.name) for e in entries if _is_dir(e)]
    except OSError as e:
        raise ModelLoadError(f"{model_dir}: cannot read the folder: {e.strerror or e}") from e
    return sorted(v for v in versions if v is not None)


def read_active(model_dir: Path) -> list[int] | None:
    """The versions ACTIVE names, or None when there is no ACTIVE file.

    Raises:
        ModelLoadError: ACTIVE holds something other than version numbers.
    """
    path = model_dir / ACTIVE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: is not UTF-8 text") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it: {e.strerror or e}") from e
    versions = [parse_version(w) for w in text.split()]
    if not versions or None in versions:
        raise ModelLoadError(f"{path}: must list one or more version numbers (1, 2, ...)")
    return sorted({v for v in versions if v is not None})


def versions_to_serve(spec: VersionedModel) -> list[int]:
    """ACTIVE when present, else the version policy over the folders present.

    Raises:
        ModelLoadError: no version to serve, or ACTIVE names a missing version.
    """
    available = available_versions(spec.path)
    active = read_active(spec.path)
    if active is not None:
        missing = [v for v in active if v not in available]
        if missing:
            raise ModelLoadError(
                f"{spec.path / ACTIVE_FILE}: names version {missing[0]}, which has no folder"
            )
        return active
    chosen = spec.version_policy.select(available)
    if not chosen:
        raise ModelLoadError(
            f"model '{spec.name}': no version folder matches its version policy "
            f"(folders: {available or 'none'})"
        )
    return chosen


def check_versions(model_dir: Path, versions: Sequence[int]) -> None:
    """That every one of ``versions`` has a folder (what ACTIVE may name).

    Raises:
        ModelLoadError: none named, or one has no folder (named).
    """
    available = available_versions(model_dir)
    missing = [v for v in versions if v not in available]
    if not versions or missing:
        what = f"version {missing[0]} has no folder" if missing else "no version named"
        raise ModelLoadError(f"model '{model_dir.name}': cannot serve: {what} in {model_dir}")


# -- writes ----------------------------------------------------------------------------------


def write_active(model_dir: Path, versions: Sequence[int] | None) -> None:
    """Make ACTIVE name ``versions`` (None: remove ACTIVE, so the version policy decides),
    durably: temp file in the same folder, fsync, rename, fsync the folder."""
    path = model_dir / ACTIVE_FILE
    if versions is None:
        if path.exists():
            path.unlink(missing_ok=True)
            fsync_dir(model_dir)
        return
    text = "".join(f"{v}\n" for v in sorted(set(versions))).encode()
    write_atomic(path, lambda f: f.write(text))


def pin_active(model_dir: Path, versions: Sequence[int] | None) -> None:
    """Without an ACTIVE file, write one naming ``versions`` (what serves now), so that a
    version folder installed next serves nothing until it is switched to; an existing ACTIVE
    is left as it is."""
    if read_active(model_dir) is None:
        write_active(model_dir, versions)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _same_files(folder: Path, files: Mapping[str, Path]) -> bool:
    """``folder`` holds exactly ``files`` (name -> source), byte for byte."""
    present = sorted(p.name for p in folder.iterdir())
    if present != sorted(files):
        return False
    return all(_file_digest(folder / name) == _file_digest(src) for name, src in files.items())


def install_version(model_dir: Path, version: int, files: Mapping[str, Path]) -> bool:
    """Make ``model_dir``/``version``/ hold ``files`` (name -> file on the same filesystem,
    moved): move them into a temporary folder under staging, fsync, rename it into place. An
    existing identical folder is kept. Returns whether a folder was created.

    Raises:
        AlreadyExistsError: the version folder exists with other contents (a version folder
            is never overwritten).
    """
    final = model_dir / str(version)
    if final.exists():
        if final.is_dir() and _same_files(final, files):
            return False
        raise AlreadyExistsError(
            f"{final} exists with other contents; a version folder is never overwritten"
        )
    temp = model_dir / STAGING_DIR / f"version-{version}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    for name, src in files.items():
        os.replace(src, temp / name)
        with open(temp / name, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(temp)
    os.rename(temp, final)  # fails rather than replace a folder that appeared meanwhile
    fsync_dir(model_dir)
    return True


def remove_version(model_dir: Path, version: int) -> None:
    """Remove a version folder: renamed out of the repository first, so a crash never leaves
    half a version under a version name."""
    folder = model_dir / str(version)
    if not folder.is_dir():
        return
    trash = model_dir / STAGING_DIR / f"removed-{version}-{time.time_ns()}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, trash)
    fsync_dir(model_dir)
    shutil.rmtree(trash, ignore_errors=True)


def staging_dir(model_dir: Path) -> Path:
    """Where versions of ``model_dir`` are assembled (not created here)."""
    return model_dir / STAGING_DIR


def clear_staging(model_dir: Path) -> None:
    """Remove whatever assembling versions left in ``model_dir``."""
    shutil.rmtree(model_dir / STAGING_DIR, ignore_errors=True)
