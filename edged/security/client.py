"""The client side, for ``edged infer|learn`` and ``edged-fleet rollout``: TLS files and a
bearer token from flags or ``EDGED_CLIENT_*`` variables, made into a gRPC channel and call
metadata."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

CLIENT_ENV = {
    "ca": "EDGED_CLIENT_CA",
    "cert": "EDGED_CLIENT_CERT",
    "key": "EDGED_CLIENT_KEY",
    "token": "EDGED_CLIENT_TOKEN",
}
"""The environment variables the client flags default to; not config keys (edged.config lets
them pass instead of refusing them as unknown ``EDGED_`` variables)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--ca, --cert, --key, --tls and --token on a client command."""
    group = parser.add_argument_group(
        "TLS and authentication (docs/security.md)",
        f"Each flag defaults to an environment variable: {', '.join(CLIENT_ENV.values())}.",
    )
    group.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="PEM CA bundle that signed the daemon's certificate (turns TLS on)",
    )
    group.add_argument(
        "--cert", type=Path, metavar="FILE", help="client certificate for mutual TLS (PEM)"
    )
    group.add_argument("--key", type=Path, metavar="FILE", help="its private key (PEM)")
    group.add_argument(
        "--tls",
        action="store_true",
        help="TLS with the system's CA roots (implied by --ca, --cert and --key)",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        help="bearer token from edged token add (prefer EDGED_CLIENT_TOKEN: a flag shows in ps)",
    )


@dataclass(frozen=True)
class ClientAuth:
    """How a client command reaches a daemon."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    tls: bool = False
    token: str | None = None

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> ClientAuth:
        """Flags first, then the environment."""
        env = os.environ if env is None else env

        def pick(name: str) -> str | None:
            value = getattr(args, name, None)
            return str(value) if value else env.get(CLIENT_ENV[name]) or None

        ca, cert, key = (pick(n) for n in ("ca", "cert", "key"))
        return cls(
            ca=Path(ca) if ca else None,
            cert=Path(cert) if cert else None,
            key=Path(key) if key else None,
            tls=bool(getattr(args, "tls", False) or ca or cert or key),
            token=pick("token"),
        )

    def channel(self, address: str) -> grpc.Channel:
        """A channel to ``address``: TLS when configured, else plaintext; with a token, every
        call on it carries ``authorization: Bearer <token>``.

        Raises:
            ConfigError: a TLS file cannot be read, or --cert without --key.
        """
        # imported here: `edged devices` and `edged --help` need neither gRPC nor cryptography
        import grpc  # noqa: PLC0415

        from edged.security.tls import client_credentials  # noqa: PLC0415

        if self.tls:
            channel = grpc.secure_channel(
                address, client_credentials(self.ca, self.cert, self.key)
            )
        else:
            channel = grpc.insecure_channel(address)
        if not self.token:
            return channel
        return grpc.intercept_channel(channel, _bearer_interceptor(self.token))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the token (none without one), for clients that build their
        own channels (tritonclient: ``headers=``)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _bearer_interceptor(token: str) -> Any:
    """A client interceptor adding ``authorization: Bearer <token>`` to unary calls."""
    import grpc  # noqa: PLC0415

    class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
        def _details(self, details: Any) -> Any:
            metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
            return details._replace(metadata=metadata)

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

    return Bearer()
