"""Enrolment: only devices the operator enrolled take part in a federation.

The operator gives each device a secret token (``federated.token_file`` on the device) and
lists ``DEVICE_ID TOKEN`` lines in the enrolment file of ``edged-fleet federate --enrolled``.
When a client connects, the server sends it a fresh nonce (Flower's get_properties); the client
answers with its id and ``HMAC-SHA256(token, model:device:nonce)``. A client that fails the
check is never sampled: it receives no parameters and none of its updates are aggregated. The
token never crosses the wire; TLS (the server's certificate, ``federated.root_certificates``)
keeps the exchange private. Standard library only."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

MIN_TOKEN_LENGTH = 16


def proof(token: bytes, model: str, device: str, nonce: str) -> str:
    """The client's answer to ``nonce``."""
    message = f"{model}:{device}:{nonce}".encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def verify(tokens: dict[str, bytes], model: str, device: str, nonce: str, answer: str) -> bool:
    token = tokens.get(device)
    return token is not None and hmac.compare_digest(proof(token, model, device, nonce), answer)


def read_token(path: Path) -> bytes:
    """A device's token file: one line, at least MIN_TOKEN_LENGTH characters.

    Raises: ValueError naming the file; OSError: unreadable."""
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{path}: an enrolment token needs {MIN_TOKEN_LENGTH}+ characters")
    return token.encode()


def read_enrolled(path: Path) -> dict[str, bytes]:
    """The enrolment file: ``DEVICE_ID TOKEN`` per line; ``#`` starts a comment.

    Raises: ValueError naming the file and line; OSError: unreadable."""
    tokens: dict[str, bytes] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"{path}:{number}: expected 'DEVICE_ID TOKEN' with a token of "
                f"{MIN_TOKEN_LENGTH}+ characters"
            )
        if parts[0] in tokens:
            raise ValueError(f"{path}:{number}: device {parts[0]!r} is listed twice")
        tokens[parts[0]] = parts[1].encode()
    return tokens
