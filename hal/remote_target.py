"""Where the ``remote`` executor sends a model: model.toml's ``[remote]`` table, validated by
the repository (edged.serving.repository) and handed to executors in ``ExecutorOptions``.

A leaf of hal (imports nothing of edged), so that the contract (hal/executor.py) can name it
without importing the network executor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteTarget:
    """A model on another KServe v2 gRPC server (edged or Triton) and how to reach it.
    Secure by default: TLS (the system's CA roots unless ``ca_file``) unless ``insecure``."""

    address: str
    """HOST:PORT of the server's gRPC listener."""
    model: str
    """The model to call there (the tail of a split model, or the whole model)."""
    version: str = ""
    """Its version; "" lets the server pick (its highest ready version)."""
    head: str = ""
    """File in the version folder of the part that runs here first (ONNX, e.g. head.onnx),
    whose outputs the remote model takes; "" sends the request's inputs as they are."""
    timeout_s: float = 2.0
    """Deadline of one call to the server (the call fails with DEADLINE_EXCEEDED after it)."""
    retries: int = 1
    """Calls retried when the server cannot be reached (UNAVAILABLE), after a short back-off;
    any other failure is not retried."""
    insecure: bool = False
    """Plaintext gRPC: only where the link is otherwise protected (loopback, a VPN)."""
    ca_file: str = ""
    """PEM CA bundle that signed the server's certificate; "": the system's roots."""
    cert_file: str = ""
    """Client certificate for mutual TLS (PEM); with ``key_file``."""
    key_file: str = ""
    """Its private key (PEM)."""
    token_file: str = ""
    """File holding the bearer token sent as ``authorization: Bearer <token>``; "": none."""
    server_name: str = ""
    """The name the server's certificate must carry when it differs from the address's host
    (gRPC's ssl_target_name_override); "": the host."""
    server_s: float = 0.0
    """The server's own time per call on ``model`` (the tail's profiled latency), taken off a
    call's time before it counts as link time (hal.remote_link); 0: unknown. Not a model.toml
    key: the daemon's re-planner sets it from the server's profile."""
