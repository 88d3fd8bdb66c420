"""The fleet's TUF repository: a folder that any static HTTP server can serve.

Layout (consistent snapshots on, so clients never see a half-published state)::

    <dir>/metadata/1.root.json          the first root: what a device is shipped with
    <dir>/metadata/root.json            the latest root (the same file while it has one version)
    <dir>/metadata/N.targets.json       every targets version; targets.json is the latest
    <dir>/metadata/N.snapshot.json      every snapshot version; snapshot.json is the latest
    <dir>/metadata/timestamp.json       the only unversioned file clients fetch
    <dir>/targets/models/<model>/<sha256>.<version>.tar.gz     one bundle per version
    <keys>/offline/root.pem, targets.pem      signing keys that never need to be online
    <keys>/online/snapshot.pem, timestamp.pem the keys ``refresh`` needs (a cron job)

``<keys>`` is ``<dir>/keys`` unless given: serve only ``metadata/`` and ``targets/``, never the
folder itself, or keep the keys elsewhere. Key files are ed25519 PKCS#8 PEM, mode 0600, in
folders of mode 0700; a key file readable by others is refused, as ssh does.

Targets are ``models/<model>/<version>.tar.gz`` with custom metadata ``{"edged": {"model",
"version", "format", "signature", "selftest"}}``. Every publish signs new targets, snapshot and
timestamp versions; ``refresh`` signs new snapshot and timestamp versions only (they expire
first), with the online keys.

Rules without I/O (the target naming, ``target_path``, is ``edged.ota.targets``, which a
device reads too): ``served_path``, ``custom_metadata``,
``published_versions``, ``check_new_version``, ``Expiry``. I/O around them: ``init``,
``publish``, ``refresh``, ``status``, ``target_file``. Every file is written to a temp file in its
folder, fsynced and renamed; the timestamp is written last, so a client either sees the whole
new version or the whole old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edged.ota import bundle
from edged.ota.errors import PublishError
from edged.ota.targets import parse_target_path, target_path
from edged.storage import fsync_dir, write_atomic

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
KEYS_DIR = "keys"
LOCK_FILE = ".edged-fleet.lock"

#: which key folder each top-level role's key lives in
KEY_PLACES: dict[str, str] = {
    Root.type: "offline",
    Targets.type: "offline",
    Snapshot.type: "online",
    Timestamp.type: "online",
}
ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)

_HASH = "sha256"
_CHUNK = 1024 * 1024
_T = TypeVar("_T", Root, Targets, Snapshot, Timestamp)


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = field(default_factory=lambda: timedelta(days=365))
    """Root: re-signed only by hand with the offline root key (rotation is out of scope)."""
    targets: timedelta = field(default_factory=lambda: timedelta(days=90))
    """Targets: publish at least this often (the offline targets key signs it)."""
    snapshot: timedelta = field(default_factory=lambda: timedelta(days=7))
    """Snapshot: ``refresh`` must run more often than this."""
    timestamp: timedelta = field(default_factory=lambda: timedelta(days=1))
    """Timestamp: ``refresh`` must run more often than this (hourly from cron is typical)."""

    def __post_init__(self) -> None:
        for role in ROLES:
            period = getattr(self, role)
            if not isinstance(period, timedelta) or period <= timedelta(0):
                raise ValueError(f"Expiry.{role} must be a positive timedelta, not {period!r}")

    def of(self, role: str) -> timedelta:
        """The period of ``role``."""
        period: timedelta = getattr(self, role)
        return period


@dataclass(frozen=True)
class Published:
    """What ``publish`` did."""

    target: str
    """The target path clients ask for."""
    file: Path
    """Where the bundle is served from."""
    length: int
    sha256: str
    custom: dict[str, Any]
    versions: dict[str, int]
    """The new metadata version of targets, snapshot and timestamp."""


# -- rules (no I/O) --------------------------------------------------------------------------


def served_path(target: str, digest: str) -> str:
    """Where a consistent-snapshot repository serves ``target`` (relative to targets/): the
    file name prefixed with its hash, as TUF clients ask for it."""
    dirname, sep, basename = target.rpartition("/")
    return f"{dirname}{sep}{digest}.{basename}"


def custom_metadata(info: bundle.BundleInfo) -> dict[str, Any]:
    """The target's custom metadata: what a device checks before it downloads anything."""
    m = info.manifest
    if m.inputs or m.outputs:
        signature: dict[str, Any] = bundle.signature_table(m)
    else:
        signature = {
            key: [
                {
                    "name": d.name,
                    **({"datatype": d.datatype.value} if d.datatype else {}),
                    **({"dims": list(d.dims)} if d.dims is not None else {}),
                }
                for d in decls
            ]
            for key, decls in (("inputs", info.model.inputs), ("outputs", info.model.outputs))
        }
    return {
        "edged": {
            "model": m.name,
            "version": m.version,
            "format": m.format,
            "signature": signature,
            "selftest": True,
        }
    }


def published_versions(targets: Targets) -> dict[str, list[int]]:
    """{model: versions ascending} of the bundle targets in ``targets``."""
    found: dict[str, list[int]] = {}
    for path in targets.targets:
        parsed = parse_target_path(path)
        if parsed is not None:
            found.setdefault(parsed[0], []).append(parsed[1])
    return {model: sorted(versions) for model, versions in sorted(found.items())}


def check_new_version(model: str, version: int, published: Sequence[int], force: bool) -> None:
    """Refuse a version at or below one already published, unless forced.

    Raises:
        PublishError: why, and what ``--force`` would mean.
    """
    if force or not published or version > max(published):
        return
    newest = max(published)
    what = "is already published" if version in published else f"is below {newest}"
    raise PublishError(
        f"refusing to publish {model} version {version}: it {what} (published: "
        f"{', '.join(map(str, published))}). A device never installs a version at or below "
        f"the one it runs, so only devices without version {newest} would take it, and a device "
        "that has this version number installed keeps its own bytes. Publish version "
        f"{newest + 1}, or pass --force to publish {version} anyway."
    )


# -- files -----------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    write_atomic(path, lambda f: f.write(data), mode)


def _copy_atomic(source: Path, path: Path) -> None:
    with open(source, "rb") as src:
        write_atomic(path, lambda out: shutil.copyfileobj(src, out, _CHUNK))


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            length += len(chunk)
    return length, h.hexdigest()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One writer at a time per repository."""
    with open(directory / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def _metadata_dir(directory: Path) -> Path:
    return Path(directory) / METADATA_DIR


def _keys_dir(directory: Path, keys_dir: Path | None) -> Path:
    return Path(keys_dir) if keys_dir is not None else Path(directory) / KEYS_DIR


def key_file(keys_dir: Path, role: str) -> Path:
    """The private key file of a top-level role."""
    return Path(keys_dir) / KEY_PLACES[role] / f"{role}.pem"


def load_metadata(directory: Path, role: str, cls: type[_T]) -> Metadata[_T]:
    """The latest metadata of a top-level ``role`` (``metadata/<role>.json``).

    Raises:
        PublishError: the folder is not a repository, or the file is unreadable.
    """
    path = _metadata_dir(directory) / f"{role}.json"
    try:
        md: Metadata[Any] = Metadata.from_file(str(path))
    except FileNotFoundError:
        raise PublishError(
            f"{directory} is not a fleet repository ({path} is missing; run edged-fleet init)"
        ) from None
    except (OSError, DeserializationError) as e:
        raise PublishError(f"{path}: cannot read it: {e}") from e
    if not isinstance(md.signed, cls):
        raise PublishError(f"{path} holds {md.signed.type} metadata, not {cls.type}")
    return md


def write_metadata(directory: Path, md: Metadata[Any]) -> bytes:
    """Write ``md`` as ``N.<role>.json`` (root, targets, snapshot) and ``<role>.json``; the
    timestamp only as ``timestamp.json``. Returns the bytes written."""
    role = md.signed.type
    data = md.to_bytes(JSONSerializer(compact=False))
    folder = _metadata_dir(directory)
    if role != Timestamp.type:
        _write_atomic(folder / f"{md.signed.version}.{role}.json", data)
    _write_atomic(folder / f"{role}.json", data)
    return data


def _write_key(path: Path, signer: CryptoSigner) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def load_signer(keys_dir: Path, role: str, root: Root) -> Signer:
    """The signer of ``role`` from its key file, checked against the key root trusts.

    Raises:
        PublishError: the file is missing, readable by others, not a PEM private key, or not
            the key root lists for the role.
    """
    path = key_file(keys_dir, role)
    try:
        st = path.stat()
        pem = path.read_bytes()
    except FileNotFoundError:
        raise PublishError(
            f"the {role} key {path} is missing ({KEY_PLACES[role]} keys: give --keys)"
        ) from None
    except OSError as e:
        raise PublishError(f"the {role} key {path} cannot be read: {e}") from e
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PublishError(
            f"the {role} key {path} is readable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
        )
    try:
        private = load_pem_private_key(pem, None)
    except (ValueError, TypeError) as e:
        raise PublishError(f"the {role} key {path} is not an unencrypted PEM key: {e}") from e
    for keyid in root.roles[role].keyids:
        public = root.keys[keyid]
        with contextlib.suppress(ValueError):  # KeyMismatchError is a ValueError
            return CryptoSigner(private, public)  # type: ignore[arg-type]
    raise PublishError(f"the {role} key {path} is not a key root.json trusts for {role}")


def _sign(md: Metadata[Any], signer: Signer, expires: datetime, bump: bool = True) -> None:
    if bump:
        md.signed.version += 1
    md.signed.expires = expires
    md.sign(signer, append=False)


def _snapshot_and_timestamp(
    directory: Path,
    targets_bytes: bytes,
    targets_version: int,
    signers: Mapping[str, Signer],
    expiry: Expiry,
    now: datetime,
    first: bool = False,
) -> dict[str, int]:
    """Sign a new snapshot naming this targets version, then a new timestamp naming it."""
    if first:
        snapshot: Metadata[Snapshot] = Metadata(Snapshot())
    else:
        snapshot = load_metadata(directory, Snapshot.type, Snapshot)
    snapshot.signed.meta[f"{Targets.type}.json"] = MetaFile.from_data(
        targets_version, targets_bytes, [_HASH]
    )
    _sign(snapshot, signers[Snapshot.type], now + expiry.snapshot, bump=not first)
    snapshot_bytes = write_metadata(directory, snapshot)
    if first:
        timestamp: Metadata[Timestamp] = Metadata(Timestamp())
    else:
        timestamp = load_metadata(directory, Timestamp.type, Timestamp)
    timestamp.signed.snapshot_meta = MetaFile.from_data(
        snapshot.signed.version, snapshot_bytes, [_HASH]
    )
    _sign(timestamp, signers[Timestamp.type], now + expiry.timestamp, bump=not first)
    write_metadata(directory, timestamp)
    return {Snapshot.type: snapshot.signed.version, Timestamp.type: timestamp.signed.version}


# -- operations ------------------------------------------------------------------------------


def init(
    directory: Path,
    *,
    keys_dir: Path | None = None,
    expiry: Expiry = Expiry(),
    now: datetime | None = None,
) -> dict[str, Any]:
    """Create a repository: one new ed25519 key per top-level role, root (consistent
    snapshots), empty targets, snapshot and timestamp, all version 1. Returns ``status``.

    Raises:
        PublishError: the folder already holds a repository or keys (never overwritten).
    """
    directory = Path(directory)
    keys = _keys_dir(directory, keys_dir)
    when = _now(now)
    folder = _metadata_dir(directory)
    existing = [p for p in (folder / "1.root.json", folder / "root.json") if p.exists()]
    existing += [key_file(keys, role) for role in ROLES if key_file(keys, role).exists()]
    if existing:
        raise PublishError(
            f"{directory} already holds a repository ({existing[0]} exists); init never "
            "overwrites metadata or keys"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (directory / TARGETS_DIR).mkdir(exist_ok=True)
    with _locked(directory):
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        for role, signer in signers.items():
            _write_key(key_file(keys, role), signer)
        root: Metadata[Root] = Metadata(Root(consistent_snapshot=True))
        for role, signer in signers.items():
            root.signed.add_key(signer.public_key, role)
        _sign(root, signers[Root.type], when + expiry.root, bump=False)
        write_metadata(directory, root)
        targets: Metadata[Targets] = Metadata(Targets())
        _sign(targets, signers[Targets.type], when + expiry.targets, bump=False)
        targets_bytes = write_metadata(directory, targets)
        _snapshot_and_timestamp(directory, targets_bytes, 1, signers, expiry, when, first=True)
    return status(directory, now=now)


def publish(
    directory: Path,
    bundle_path: Path,
    *,
    force: bool = False,
    keys_dir: Path | None = None,
    expiry: Expiry = Expiry(),
    now: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> Published:
    """Check a bundle whole (as a device will), store it as target
    ``models/<model>/<version>.tar.gz``, and sign new targets, snapshot and timestamp versions.
    ``progress`` is told each step as it starts.

    Raises:
        UnsafeArchiveError, BundleError: the bundle is unsafe or malformed.
        PublishError: not a repository, a key is missing or wrong, or the version is not newer
            than those published (unless ``force``).
    """
    say = progress or (lambda _: None)
    directory, bundle_path = Path(directory), Path(bundle_path)
    keys = _keys_dir(directory, keys_dir)
    when = _now(now)
    say(f"checking {bundle_path} whole, as a device will (unpack, manifest, artifacts)")
    info = bundle.inspect_bundle(bundle_path)
    manifest = info.manifest
    target = target_path(manifest.name, manifest.version)
    with _locked(directory):
        say(f"{manifest.name} version {manifest.version}: loading metadata and keys")
        root = load_metadata(directory, Root.type, Root).signed
        targets = load_metadata(directory, Targets.type, Targets)
        versions = published_versions(targets.signed).get(manifest.name, [])
        check_new_version(manifest.name, manifest.version, versions, force)
        signers = {role: load_signer(keys, role, root) for role in ROLES[1:]}
        length, digest = _digest(bundle_path)
        custom = custom_metadata(info)
        served = directory / TARGETS_DIR / served_path(target, digest)
        served.parent.mkdir(parents=True, exist_ok=True)
        if not (served.exists() and _digest(served) == (length, digest)):
            say(f"copying {length} bytes to {served.relative_to(directory)}")
            _copy_atomic(bundle_path, served)
        if _digest(served) != (length, digest):
            raise PublishError(f"{bundle_path} changed while it was being published")
        targets.signed.targets[target] = TargetFile(
            length, {_HASH: digest}, target, {"custom": custom}
        )
        say(f"signing targets version {targets.signed.version + 1}")
        _sign(targets, signers[Targets.type], when + expiry.targets)
        targets_bytes = write_metadata(directory, targets)
        say("signing snapshot and timestamp")
        new = _snapshot_and_timestamp(
            directory, targets_bytes, targets.signed.version, signers, expiry, when
        )
    return Published(
        target=target,
        file=served,
        length=length,
        sha256=digest,
        custom=custom,
        versions={Targets.type: targets.signed.version, **new},
    )


def refresh(
    directory: Path,
    *,
    keys_dir: Path | None = None,
    expiry: Expiry = Expiry(),
    now: datetime | None = None,
) -> dict[str, int]:
    """Sign new snapshot and timestamp versions (new expiry dates) with the online keys; the
    targets metadata is checked first and never re-signed. Returns the new versions.

    Raises:
        PublishError: not a repository, an online key is missing or wrong, or targets.json is
            not signed by the targets key root trusts (nothing is signed then).
    """
    directory = Path(directory)
    keys = _keys_dir(directory, keys_dir)
    when = _now(now)
    with _locked(directory):
        root = load_metadata(directory, Root.type, Root).signed
        targets = load_metadata(directory, Targets.type, Targets)
        try:
            root.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
        except UnsignedMetadataError as e:
            raise PublishError(
                f"targets.json v{targets.signed.version} is not signed by the targets key "
                f"root.json trusts; refusing to snapshot it: {e}"
            ) from e
        signers = {role: load_signer(keys, role, root) for role in ROLES[2:]}
        targets_bytes = (
            _metadata_dir(directory) / f"{targets.signed.version}.{Targets.type}.json"
        ).read_bytes()
        return _snapshot_and_timestamp(
            directory, targets_bytes, targets.signed.version, signers, expiry, when
        )


def target_file(directory: Path, target: str) -> Path:
    """The file that serves ``target`` in the latest targets metadata.

    Raises:
        PublishError: not a repository, or no such target.
    """
    targets = load_metadata(directory, Targets.type, Targets).signed
    info = targets.targets.get(target)
    if info is None:
        raise PublishError(f"{target} is not published in {directory}")
    return Path(directory) / TARGETS_DIR / served_path(target, info.hashes[_HASH])


def status(directory: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """What the repository publishes, as plain data: each role's version, expiry and whether
    root's keys verify it; each model's versions with their files; and the problems found
    (expired or unverified metadata, a snapshot or timestamp naming another version, a
    missing target file).

    Raises:
        PublishError: not a repository, or metadata is unreadable.
    """
    directory = Path(directory)
    when = _now(now)
    root_md = load_metadata(directory, Root.type, Root)
    root = root_md.signed
    mds: dict[str, Metadata[Any]] = {
        Root.type: root_md,
        Targets.type: load_metadata(directory, Targets.type, Targets),
        Snapshot.type: load_metadata(directory, Snapshot.type, Snapshot),
        Timestamp.type: load_metadata(directory, Timestamp.type, Timestamp),
    }
    problems: list[str] = []
    roles: dict[str, Any] = {}
    for role, md in mds.items():
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
            verified = True
        except UnsignedMetadataError as e:
            verified = False
            problems.append(f"{role}.json v{md.signed.version} does not verify: {e}")
        expired = md.signed.is_expired(when)
        if expired:
            problems.append(f"{role}.json expired at {md.signed.expires.isoformat()}")
        roles[role] = {
            "version": md.signed.version,
            "expires": md.signed.expires.isoformat(),
            "expired": expired,
            "verified": verified,
            "key_place": KEY_PLACES[role],
        }
    targets: Targets = mds[Targets.type].signed
    snapshot: Snapshot = mds[Snapshot.type].signed
    timestamp: Timestamp = mds[Timestamp.type].signed
    named = snapshot.meta.get(f"{Targets.type}.json")
    if named is None or named.version != targets.version:
        problems.append(
            f"snapshot.json names targets v{named.version if named else '?'}, "
            f"not the latest v{targets.version}"
        )
    if timestamp.snapshot_meta.version != snapshot.version:
        problems.append(
            f"timestamp.json names snapshot v{timestamp.snapshot_meta.version}, "
            f"not the latest v{snapshot.version}"
        )
    models: dict[str, list[dict[str, Any]]] = {}
    for model, versions in published_versions(targets).items():
        for version in versions:
            target = target_path(model, version)
            info = targets.targets[target]
            served = Path(TARGETS_DIR) / served_path(target, info.hashes.get(_HASH, ""))
            present = (directory / served).is_file()
            if not present:
                problems.append(f"{target}: {served} is missing")
            custom = info.custom.get("edged", {}) if isinstance(info.custom, dict) else {}
            models.setdefault(model, []).append(
                {
                    "version": version,
                    "target": target,
                    "file": str(served),
                    "length": info.length,
                    "sha256": info.hashes.get(_HASH),
                    "format": custom.get("format") if isinstance(custom, dict) else None,
                    "present": present,
                }
            )
    return {
        "repository": str(directory),
        "consistent_snapshot": bool(root.consistent_snapshot),
        "roles": roles,
        "models": models,
        "problems": problems,
    }
