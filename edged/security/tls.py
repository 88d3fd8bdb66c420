"""TLS for gRPC: server credentials that follow their files, client credentials from files.

The server uses grpc's dynamic server credentials: before each TLS handshake gRPC asks
``CertificateFiles.fetch`` (on one of its own threads, never the event loop) whether the
certificate configuration changed; it compares the files' modification times, sizes and
inodes, and re-reads them only when one changed. A handshake in progress keeps the
configuration it started with, and open connections keep theirs, so replacing the files (the
usual ``mv new.pem cert.pem`` of a renewal) drops no traffic. A half-written or mismatched
pair is not taken: the old configuration stays until the files form a usable pair again.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import structlog

from edged.core.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography's x509 costs ~9 MiB of RSS once imported: it is imported where a certificate is
# read, so a daemon without TLS never loads it (the idle-RSS budget of docs/performance.md).

log = structlog.get_logger("edged.tls")


@dataclass(frozen=True)
class _Loaded:
    key: bytes
    chain: bytes
    client_ca: bytes | None


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def check_pair(key_pem: bytes, chain_pem: bytes) -> x509.Certificate:
    """The leaf certificate of ``chain_pem``, checked to belong to ``key_pem``.

    Raises:
        ValueError: not PEM, or the key is not the certificate's.
    """
    from cryptography import x509  # noqa: PLC0415 (see above)
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    leaf = x509.load_pem_x509_certificate(chain_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != leaf.public_key().public_bytes(enc, pub):
        raise ValueError("the key does not belong to the certificate")
    return leaf


class CertificateFiles:
    """A server certificate chain, its key and an optional client CA bundle, read from files
    and re-read when they change."""

    def __init__(
        self, cert_file: Path, key_file: Path, client_ca_file: Path | None, *, where: str = "tls"
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._where = where
        self._lock = threading.Lock()
        self._stamps: tuple[tuple[int, int, int], ...] = ()
        self.reloads = 0
        self.current = self._read()  # raises ConfigError at start

    def _paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def _read(self) -> _Loaded:
        try:
            stamps = tuple(_stamp(p) for p in self._paths())
            key = self.key_file.read_bytes()
            chain = self.cert_file.read_bytes()
            ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
            leaf = check_pair(key, chain)
            if ca is not None:
                from cryptography import x509  # noqa: PLC0415 (see the imports)

                x509.load_pem_x509_certificates(ca)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"config key '{self._where}': {e}") from e
        self._stamps = stamps
        log.info(
            "tls_certificate_loaded",
            subject=leaf.subject.rfc4514_string(),
            not_after=leaf.not_valid_after_utc.isoformat(),
            client_ca=str(self.client_ca_file or ""),
        )
        return _Loaded(key, chain, ca)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The configuration in force, as gRPC takes it."""
        c = self.current
        return grpc.ssl_server_certificate_configuration(
            [(c.key, c.chain)], root_certificates=c.client_ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration when the files
        changed and form a usable pair, else None (keep the current one)."""
        with self._lock:
            try:
                stamps = tuple(_stamp(p) for p in self._paths())
            except OSError:
                return None  # a file is being replaced; keep what works
            if stamps == self._stamps:
                return None
            try:
                self.current = self._read()
            except ConfigError as e:
                self._stamps = stamps  # not again until the files change once more
                log.warning("tls_reload_failed", error=str(e))
                return None
            self.reloads += 1
            return self.configuration()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials for ``add_secure_port``; with a client CA, a client
        without a certificate it signed is refused at the handshake (gRPC's Python API has
        no optional client certificates)."""
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(),
            self.fetch,
            require_client_authentication=self.client_ca_file is not None,
        )


def client_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials:
    """Channel credentials: ``ca`` to verify the server (None: the system's roots), ``cert``
    and ``key`` for mutual TLS.

    Raises:
        ConfigError: a file cannot be read, or only one of cert and key is given.
    """
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together (mutual TLS needs both)")
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes() if ca else None,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
    except OSError as e:
        raise ConfigError(f"cannot read a TLS file: {e}") from e


def peer_names(auth_context: dict[str, list[bytes]]) -> tuple[str, ...]:
    """A verified client certificate's subject CN and SANs, from gRPC's auth context (empty
    without a client certificate)."""
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, []):
            name = value.decode(errors="replace")
            if name not in names:
                names.append(name)
    return tuple(names)
