"""The frontends' security wiring, from config: the access policy (tokens, identities,
anonymous and loopback roles), TLS credentials per gRPC listener, the gRPC access
interceptor, CURVE key files for ZeroMQ, and the task that re-reads tokens and CURVE client
keys when they change (certificates are re-read by gRPC itself, see ``edged.security.tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from edged.config import Config
from edged.core.errors import ConfigError
from edged.frontends.grpc_access import AccessInterceptor
from edged.frontends.grpc_server import GrpcServer
from edged.security.access import AccessControl
from edged.security.curve import CurveServer
from edged.security.roles import parse_identities, parse_roles
from edged.security.tls import CertificateFiles
from edged.security.tokens import RELOAD_INTERVAL_S, TokenStore

log = structlog.get_logger("edged.security")

_LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1", "unix:")


@dataclass
class Security:
    """What the daemon's frontends enforce."""

    access: AccessControl
    certificates: CertificateFiles | None = None
    tls_listeners: str = "all"
    curve_files: tuple[Path, Path] | None = None
    _reloader: asyncio.Task[None] | None = field(default=None, repr=False)
    _curve: CurveServer | None = field(default=None, repr=False)
    _plaintext: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def from_config(cls, config: Config) -> Security:
        """Read the token file, certificates and keys once (blocking: a worker thread).

        Raises:
            ConfigError: a bad file or value, naming its key.
        """
        auth, tls, zmq = config.auth, config.tls, config.zmq
        tokens = None
        if auth.tokens_file:
            tokens = TokenStore(Path(auth.tokens_file))
            try:
                tokens.refresh()
            except ConfigError as e:
                raise ConfigError(f"config key 'auth.tokens_file': {e}") from e
        if tls.listeners == "management" and not config.server.management_address:
            raise ConfigError(
                "config key 'tls.listeners': 'management' needs server.management_address"
            )
        certificates = None
        if tls.enabled:
            certificates = CertificateFiles(
                Path(tls.cert_file),
                Path(tls.key_file),
                Path(tls.client_ca_file) if tls.client_ca_file else None,
                where="tls.cert_file",
            )
        curve_files = None
        if zmq.curve_secret_key_file:
            curve_files = (Path(zmq.curve_secret_key_file), Path(zmq.curve_clients_dir))
        access = AccessControl(
            tokens=tokens,
            identities=parse_identities(auth.identities, "auth.identities"),
            anonymous_roles=parse_roles(auth.anonymous_roles, "auth.anonymous_roles"),
            trust_loopback=auth.trust_loopback,
            identities_configured=bool(tls.client_ca_file or zmq.curve_clients_dir),
        )
        return cls(access, certificates, tls.listeners, curve_files)

    @property
    def reloadable(self) -> bool:
        """There are credentials to re-read: a tokens file or CURVE client keys."""
        return self.access.tokens is not None or self.curve_files is not None

    def uses_tls(self, management: bool) -> bool:
        """Whether a listener (the one serving Management, or not) uses TLS."""
        return self.certificates is not None and (management or self.tls_listeners == "all")

    def interceptor(self, *, management: bool) -> AccessInterceptor:
        """The access check of one listener."""
        verified = self.uses_tls(management) and (
            self.certificates is not None and self.certificates.client_ca_file is not None
        )
        return AccessInterceptor(self.access, verified_certs=verified)

    def bind(self, server: GrpcServer, address: str, key: str, *, management: bool) -> int:
        """Add the listener at ``address`` (TLS or not); return its port.

        Raises:
            ConfigError: it cannot be bound, naming ``key``.
        """
        try:
            if self.uses_tls(management):
                assert self.certificates is not None
                port = int(server.add_secure_port(address, self.certificates.server_credentials()))
            else:
                port = int(server.add_insecure_port(address))
                if not address.startswith(_LOOPBACK_HOSTS):
                    self._plaintext.append(address)
        except RuntimeError as e:
            raise ConfigError(f"config key '{key}': cannot bind {address}: {e}") from e
        if port == 0 and not address.endswith(":0"):
            raise ConfigError(f"config key '{key}': cannot bind {address}")
        return port

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """The HTTP listener's TLS context from the same [tls] files as gRPC's (None: plain
        HTTP); with a client CA, a client without a certificate it signed is refused at the
        handshake, as on gRPC. Reads files: call on a worker thread. Certificates are read
        once, at start (gRPC re-reads them; the HTTP listener needs a restart).

        Raises:
            ConfigError: the files cannot be loaded, naming tls.cert_file.
        """
        if not self.uses_tls(False):
            return None
        assert self.certificates is not None
        c = self.certificates
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(c.cert_file, c.key_file)
            if c.client_ca_file is not None:
                context.load_verify_locations(c.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"config key 'tls.cert_file': cannot load for HTTP: {e}") from e
        return context

    def note_listener(self, address: str, *, tls: bool) -> None:
        """A non-gRPC TCP listener (HTTP), for the warning about tokens sent in the clear."""
        if not tls and not address.startswith(_LOOPBACK_HOSTS):
            self._plaintext.append(address)

    def log_policy(self, zmq_endpoints: list[str]) -> None:
        """Say at start who may do what; warn where secrets would cross a network in the
        clear or where management is reachable only locally."""
        a = self.access
        log.info(
            "access_policy",
            tls=self.certificates is not None,
            tls_listeners=self.tls_listeners if self.certificates is not None else "",
            client_certificates=bool(self.certificates and self.certificates.client_ca_file),
            curve=self.curve_files is not None,
            **a.describe(),
        )
        if not a.credentials_configured:
            log.warning(
                "access_default_policy",
                detail="no tokens, client CA or CURVE keys configured: management and "
                "learning calls are refused unless they come over loopback or a Unix socket"
                if a.trust_loopback
                else "no tokens, client CA or CURVE keys configured and auth.trust_loopback "
                "is off: only anonymous_roles are granted, to everyone",
            )
        zmq_plain = [
            e
            for e in zmq_endpoints
            if e.startswith("tcp://")
            and self.curve_files is None
            and not e[len("tcp://") :].startswith(_LOOPBACK_HOSTS)
        ]
        if a.tokens is not None and (self._plaintext or zmq_plain):
            log.warning(
                "access_tokens_in_clear",
                listeners=self._plaintext + zmq_plain,
                detail="bearer tokens sent to these non-loopback plaintext listeners can be "
                "read on the network: use TLS (gRPC, HTTP) or CURVE (ZeroMQ)",
            )

    def start_reloading(self, curve: CurveServer | None) -> None:
        """Re-read the tokens file and the CURVE client keys when they change."""
        self._curve = curve
        if self.access.tokens is None and curve is None:
            return
        self._reloader = asyncio.get_running_loop().create_task(
            self._reload(), name="security-reload"
        )

    async def _reload(self) -> None:
        last_error = ""
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            try:
                await self.reload()
                last_error = ""
            except (ConfigError, OSError) as e:
                if str(e) != last_error:  # once per distinct problem, not every second
                    log.warning("credentials_reload_failed", error=str(e))
                last_error = str(e)

    async def reload(self) -> None:
        """Re-read the tokens file and the CURVE client keys if they changed (the SIGHUP hook
        "auth"; the reloader also calls it every second). Certificates need no call: gRPC
        checks their files before each handshake.

        Raises:
            ConfigError: the tokens file is unreadable or malformed (the old tokens stay).
            OSError: the CURVE clients folder cannot be read (the old keys stay).
        """
        tokens = self.access.tokens
        if tokens is not None and await asyncio.to_thread(tokens.refresh):
            log.info("tokens_reloaded", tokens=len(tokens))
        if self._curve is not None and await asyncio.to_thread(self._curve.refresh):
            log.info("curve_clients_reloaded", clients=self._curve.allowed)

    async def stop_reloading(self) -> None:
        """Stop the reloader."""
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
            self._reloader = None
