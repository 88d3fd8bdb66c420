"""Bearer tokens: made and revoked by ``edged token``, stored hashed, verified by the daemon.

A token reads ``edged_<id>_<secret>``: ``id`` (8 hex digits) finds its entry, ``secret`` (32
random bytes, URL-safe base64) proves it. The file keeps, per token, its name, id, roles, a
random salt and SHA-256(salt + secret); never the secret. A salted fast hash is enough here:
the secret is 256 random bits, not a password, so there is nothing to guess that a slow hash
would protect, and verifying costs about a microsecond per request.

The file (JSON, written atomically, mode 0640) is re-read by ``TokenStore.refresh`` when its
modification time, size or inode changes, so ``edged token add|revoke`` take effect on a
running daemon within ``RELOAD_INTERVAL_S``.

Blocking: ``refresh`` and the file functions do file I/O; call them from worker threads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edged.core.errors import ConfigError
from edged.security.roles import Role, parse_roles
from edged.storage import write_atomic

#: seconds between checks of the tokens file for changes
RELOAD_INTERVAL_S = 1.0
FORMAT_VERSION = 1
_TOKEN = re.compile(r"edged_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")


@dataclass(frozen=True)
class TokenEntry:
    """One stored token (without its secret)."""

    name: str
    id: str
    roles: frozenset[Role]
    salt: bytes
    digest: bytes
    created: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "roles": sorted(r.value for r in self.roles),
            "salt": self.salt.hex(),
            "sha256": self.digest.hex(),
            "created": self.created,
        }


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def parse_tokens(text: str, where: str) -> dict[str, TokenEntry]:
    """The entries of a tokens file's ``text``, by id.

    Raises:
        ConfigError: not a tokens file, naming ``where`` and the bad field.
    """
    try:
        data = json.loads(text) if text.strip() else {"version": FORMAT_VERSION, "tokens": []}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not a tokens file (JSON): {e}") from e
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{where}: 'version' must be {FORMAT_VERSION}")
    rows = data.get("tokens")
    if not isinstance(rows, list):
        raise ConfigError(f"{where}: 'tokens' must be a list")
    entries: dict[str, TokenEntry] = {}
    for i, row in enumerate(rows):
        try:
            entry = TokenEntry(
                name=str(row["name"]),
                id=str(row["id"]),
                roles=parse_roles(row["roles"], f"tokens[{i}].roles"),
                salt=bytes.fromhex(row["salt"]),
                digest=bytes.fromhex(row["sha256"]),
                created=str(row.get("created", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: tokens[{i}] is malformed: {e}") from None
        entries[entry.id] = entry
    return entries


def read_tokens(path: Path) -> dict[str, TokenEntry]:
    """The entries in the tokens file at ``path`` (none when it does not exist).

    Raises:
        ConfigError: unreadable or malformed.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the tokens file: {e}") from e
    return parse_tokens(text, str(path))


def _write(path: Path, entries: Iterable[TokenEntry]) -> None:
    """Replace the file; a file that exists keeps its owner and group (e.g. root:edged, so
    the daemon's user can still read what root wrote)."""
    body = json.dumps(
        {"version": FORMAT_VERSION, "tokens": [e.to_json() for e in entries]}, indent=2
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None

    def write(f: BinaryIO) -> None:
        if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
        f.write(body + b"\n")

    write_atomic(path, write, 0o640)


def add_token(path: Path, name: str, roles: Iterable[Role]) -> str:
    """Make a token called ``name`` with ``roles``, store its hash; return the token (shown
    once: it cannot be recovered from the file).

    Raises:
        ConfigError: a bad or taken name, no roles, or a bad file.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"token name {name!r}: 1-64 letters, digits and . _ @ : - (starting with a letter "
            "or digit)"
        )
    wanted = frozenset(roles)
    if not wanted:
        raise ConfigError("a token needs at least one role")
    entries = read_tokens(path)
    if any(e.name == name for e in entries.values()):
        raise ConfigError(f"a token named {name!r} exists already (revoke it first)")
    token_id = secrets.token_hex(4)
    while token_id in entries:
        token_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    entries[token_id] = TokenEntry(
        name=name,
        id=token_id,
        roles=wanted,
        salt=salt,
        digest=_digest(salt, secret),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _write(path, entries.values())
    return f"edged_{token_id}_{secret}"


def revoke_token(path: Path, name: str) -> bool:
    """Remove the token called ``name``; False when there is none."""
    entries = read_tokens(path)
    kept = [e for e in entries.values() if e.name != name]
    if len(kept) == len(entries):
        return False
    _write(path, kept)
    return True


class TokenStore:
    """The tokens file as the daemon sees it: verified against in memory, re-read by
    ``refresh`` (a worker thread) when the file changes. A file that turns bad keeps the last
    good entries, and ``refresh`` says why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: Mapping[str, TokenEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when it was re-read.

        Raises:
            ConfigError: the file changed and is unreadable or malformed (the old entries
                stay in force).
        """
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        with self._lock:
            if stamp == self._stamp:
                return False
            self._stamp = stamp
        entries = read_tokens(self.path)
        self._entries = entries
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, token: str) -> TokenEntry | None:
        """The entry ``token`` proves, or None."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        entry = self._entries.get(match.group(1))
        if entry is None or not hmac.compare_digest(
            entry.digest, _digest(entry.salt, match.group(2))
        ):
            return None
        return entry
