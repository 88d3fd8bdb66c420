"""ZeroMQ CURVE: libzmq's own encryption and authentication for tcp:// endpoints.

Keys are zmq.auth certificate files (``zmq.auth.create_certificates`` or ``edged zmq-keys``
writes a ``NAME.key`` public file and a ``NAME.key_secret`` file holding both halves). The
daemon reads its own ``.key_secret`` and accepts the clients whose public ``.key`` files lie
in one folder; zmq.auth's thread authenticator answers the ZAP requests and names an
accepted client by its Z85 public key, which the access check sees as ``curve:<key>``.

Blocking: the loaders and ``refresh`` read files; call them from worker threads (the start-up
path reads them once before serving).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edged.core.errors import ConfigError

#: prefix of a CURVE client's identity in the access check
IDENTITY_PREFIX = "curve:"
#: the ZAP domain of edged's CURVE sockets (zmq.auth matches domains exactly)
ZAP_DOMAIN = "edged"


@dataclass(frozen=True)
class CurveKeys:
    """A client's view: the server's public key and the client's own key pair (bytes, Z85)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_public_file: Path, client_secret_file: Path) -> CurveKeys:
        """From the server's public ``.key`` file and the client's ``.key_secret`` file.

        Raises:
            ConfigError: a file is missing or not a zmq.auth certificate with the key needed.
        """
        server_public, _ = _load(server_public_file, secret=False)
        public, secret = _load(client_secret_file, secret=True)
        assert secret is not None
        return cls(server_public, public, secret)

    def apply(self, socket: zmq.Socket[bytes] | zmq.asyncio.Socket) -> None:
        """Make ``socket`` (not yet connected) a CURVE client."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a zmq.auth key file: {e}") from e
    if secret and not secret_key:
        raise ConfigError(f"{path}: holds no secret key (use the .key_secret file)")
    return public, secret_key


def server_keys(secret_file: Path) -> tuple[bytes, bytes]:
    """The server's (public, secret) key pair.

    Raises:
        ConfigError: naming the config key.
    """
    try:
        public, secret = _load(secret_file, secret=True)
    except ConfigError as e:
        raise ConfigError(f"config key 'zmq.curve_secret_key_file': {e}") from e
    assert secret is not None
    return public, secret


def _folder_stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        sorted(
            (e.name, e.stat().st_mtime_ns, e.stat().st_size)
            for e in os.scandir(folder)
            if e.name.endswith(".key")
        )
    )


class CurveServer:
    """The ZAP authenticator of one context, accepting the client keys in ``clients_dir``."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], secret_file: Path, clients_dir: Path
    ) -> None:
        self.public, self.secret = server_keys(secret_file)
        if not clients_dir.is_dir():
            raise ConfigError(f"config key 'zmq.curve_clients_dir': {clients_dir} is not a folder")
        self.clients_dir = clients_dir
        self._auth = ThreadAuthenticator(context)
        self._stamp: tuple[tuple[str, int, int], ...] | None = None

    def start(self) -> None:
        """Start answering ZAP requests (on the authenticator's own thread)."""
        self._auth.start()
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the client keys if the folder changed; True when it did."""
        stamp = _folder_stamp(self.clients_dir)
        if stamp == self._stamp:
            return False
        self._auth.configure_curve(domain=ZAP_DOMAIN, location=self.clients_dir)
        self._stamp = stamp
        return True

    @property
    def allowed(self) -> int:
        """Client keys accepted now."""
        return len(self._auth.certs.get(ZAP_DOMAIN, {}))

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` (not yet bound) a CURVE server."""
        socket.curve_server = True
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.zap_domain = ZAP_DOMAIN.encode()

    def stop(self) -> None:
        """Stop the authenticator."""
        self._auth.stop()
