"""The daemon's configuration: typed dataclasses, loaded from TOML with EDGED_ overrides.

Every key ``[section] key`` can also be set by the environment variable
``EDGED_<SECTION>_<KEY>`` (upper case), which wins over the file. An unknown key, section or
``EDGED_`` variable, or a value of the wrong type or range, stops the start with a
``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.core.errors import ConfigError
from edged.security.client import CLIENT_ENV
from edged.security.roles import parse_identities, parse_roles

DEFAULT_CONFIG_PATH = Path("/etc/edged/edged.toml")
ENV_PREFIX = "EDGED_"
# Environment variables with the prefix that are not config keys: the config file, and the
# client commands' credentials (`edged infer|learn`, `edged-fleet rollout`; docs/security.md).
_ENV_NOT_KEYS = frozenset({"EDGED_CONFIG", *CLIENT_ENV.values()})


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _grpc_threads(value: Any) -> str | None:
    return None if 0 < value <= 1024 else "must be from 1 to 1024"


def _address(value: Any) -> str | None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be HOST:PORT with a port from 0 to 65535"
    return None


def _optional_address(value: Any) -> str | None:
    return _address(value) if value else None


def _roles(value: Any) -> str | None:
    try:
        parse_roles(value, "roles")
    except ConfigError as e:
        return str(e)
    return None


def _identities(value: Any) -> str | None:
    try:
        parse_identities(value, "entry")
    except ConfigError as e:
        return str(e)
    return None


def _zmq_addresses(value: Any) -> str | None:
    for address in value:
        if not address.startswith(("tcp://", "ipc://")):
            return f"{address!r} must start with tcp:// or ipc://"
        if address.startswith("tcp://") and _address(address[len("tcp://") :]):
            return f"{address!r} must be tcp://HOST:PORT"
    return None if value else "must list at least one address"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """The suffix " (did you mean 'x'?)" naming the closest known name, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key(doc: str, check: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    return {"doc": doc, "check": check}


@dataclass(frozen=True)
class ServerConfig:
    """[server]: the network frontends and the daemon's lifecycle."""

    grpc_address: str = field(
        default="127.0.0.1:8001",
        metadata=_key(
            "HOST:PORT the KServe v2 gRPC service listens on; port 0 picks one.", _address
        ),
    )
    http_address: str = field(
        default="127.0.0.1:8000",
        metadata=_key(
            "HOST:PORT the KServe v2 HTTP/REST service listens on (Triton's default port); "
            "port 0 picks one. Empty: no HTTP listener.",
            _optional_address,
        ),
    )
    max_request_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_key(
            "Largest gRPC message or HTTP request body accepted; larger ones get "
            "RESOURCE_EXHAUSTED (HTTP 429).",
            _positive,
        ),
    )
    shutdown_grace_s: float = field(
        default=10.0,
        metadata=_key("On SIGTERM, how long in-flight requests may take to finish.", _non_negative),
    )
    shared_memory: bool = field(
        default=True,
        metadata=_key(
            "Serve Triton's system shared memory extension: clients on this host may name "
            "/dev/shm objects for the daemon to read inputs from and write outputs to."
        ),
    )
    stream_max_in_flight: int = field(
        default=64,
        metadata=_key("Requests one ModelStreamInfer stream may have running at once.", _positive),
    )
    grpc_threads: int = field(
        default=64,
        metadata=_key(
            "Handler threads of each gRPC listener: the gRPC calls answered at once (an "
            "inference waits on its thread for its answer; a ModelStreamInfer stream holds one "
            "for its life); further calls wait for a free thread. At most 1024.",
            _grpc_threads,
        ),
    )
    management_address: str = field(
        default="",
        metadata=_key(
            "HOST:PORT of a second gRPC listener serving edged.v1.Management (OTA, learning) "
            "beside the KServe service; Management then leaves grpc_address. Empty: one "
            "listener serves both.",
            _optional_address,
        ),
    )


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: bounds on the work one request or one client may cause."""

    max_inputs: int = field(
        default=256,
        metadata=_key(
            "Most input tensors in one inference request (gRPC or ZeroMQ); more get "
            "RESOURCE_EXHAUSTED before anything is decoded.",
            _positive,
        ),
    )
    max_outputs: int = field(
        default=256,
        metadata=_key(
            "Most requested outputs in one inference request; more get RESOURCE_EXHAUSTED.",
            _positive,
        ),
    )
    max_parameters: int = field(
        default=64,
        metadata=_key(
            "Most parameters on one request, and on one of its tensors; more get "
            "RESOURCE_EXHAUSTED.",
            _positive,
        ),
    )
    shm_max_regions: int = field(
        default=256,
        metadata=_key(
            "Most system shared memory regions registered at once (each holds a file "
            "descriptor); one more gets RESOURCE_EXHAUSTED.",
            _positive,
        ),
    )
    shm_max_regions_per_connection: int = field(
        default=64,
        metadata=_key(
            "Most shared memory regions one client connection may have registered.", _positive
        ),
    )
    shm_max_bytes: int = field(
        default=4 * 1024**3,
        metadata=_key("Most bytes all registered shared memory regions may span.", _positive),
    )
    shm_max_bytes_per_connection: int = field(
        default=1024**3,
        metadata=_key(
            "Most bytes the shared memory regions of one client connection may span.",
            _positive,
        ),
    )


@dataclass(frozen=True)
class ModelsConfig:
    """[models]: the model repository and how models are loaded."""

    repository: str = field(
        default="/var/lib/edged/models",
        metadata=_key(
            "Folder holding <model>/<version>/ folders (and optional <model>/model.toml)."
        ),
    )
    strict_readiness: bool = field(
        default=True,
        metadata=_key(
            "ServerReady only while every model asked to serve (at start-up or by "
            "RepositoryModelLoad, and not unloaded since) is serving."
        ),
    )
    default_max_batch_size: int = field(
        default=8,
        metadata=_key(
            "max_batch_size for a model whose model.toml omits it and whose inputs and outputs "
            "all have a dynamic axis 0; 0 turns batching off for such models.",
            _non_negative,
        ),
    )
    instances: int = field(
        default=0,
        metadata=_key(
            "Copies of each model (each on its own worker thread) when model.toml does not "
            "say; 0: one per core, at most 4. Runtime threads per copy = cores / copies.",
            _non_negative,
        ),
    )
    threads: int = field(
        default=0,
        metadata=_key(
            "Runtime threads per model copy (ONNX Runtime intra-op, LiteRT num_threads); "
            "0: cores / copies.",
            _non_negative,
        ),
    )
    load_timeout_s: float = field(
        default=300.0,
        metadata=_key(
            "Longest a model may take to load and warm up before it is failed.", _positive
        ),
    )


@dataclass(frozen=True)
class ExecutorsConfig:
    """[executors]: placement's circuit breakers: when an executor that keeps failing is
    taken out of rotation, and when it is tried again (docs/hal.md)."""

    failure_threshold: int = field(
        default=3,
        metadata=_key(
            "Consecutive executor failures (ExecutorError, or an inference over "
            "inference_timeout_s) of one model version that open its breaker and move it to "
            "the next candidate executor.",
            _positive,
        ),
    )
    inference_timeout_s: float = field(
        default=30.0,
        metadata=_key(
            "Longest one batch may run on an executor; a slower one fails with "
            "DEADLINE_EXCEEDED and counts as an executor failure; 0: no limit.",
            _non_negative,
        ),
    )
    retry_after_s: float = field(
        default=60.0,
        metadata=_key(
            "How long an executor whose breaker opened stays out of rotation before the "
            "daemon tries it again (load, warm up, compare) and moves the model back.",
            _positive,
        ),
    )


@dataclass(frozen=True)
class ZmqConfig:
    """[zmq]: the low-latency ZeroMQ endpoint (docs/zmq-protocol.md)."""

    enabled: bool = field(default=True, metadata=_key("Serve the ZeroMQ endpoint."))
    addresses: tuple[str, ...] = field(
        default=("tcp://127.0.0.1:5555",),
        metadata=_key(
            "Endpoints the ROUTER socket binds: tcp://HOST:PORT (port 0 picks one) or "
            "ipc:///path. In the environment: comma-separated.",
            _zmq_addresses,
        ),
    )
    max_message_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_key("Largest ZeroMQ message accepted; larger ones are dropped.", _positive),
    )
    max_in_flight: int = field(
        default=256,
        metadata=_key(
            "Requests the endpoint runs at once; more wait in ZeroMQ's queues.", _positive
        ),
    )
    curve_secret_key_file: str = field(
        default="",
        metadata=_key(
            "The server's CURVE key pair (a zmq.auth .key_secret file): tcp:// endpoints then "
            "encrypt and accept only the clients in curve_clients_dir; ipc:// endpoints keep "
            "file permissions. Empty: no CURVE."
        ),
    )
    curve_clients_dir: str = field(
        default="",
        metadata=_key(
            "Folder of the allowed clients' CURVE public keys (zmq.auth .key files), re-read "
            "when it changes; required with curve_secret_key_file."
        ),
    )

    def __post_init__(self) -> None:
        if bool(self.curve_secret_key_file) != bool(self.curve_clients_dir):
            raise ConfigError(
                "config key 'zmq.curve_clients_dir': zmq.curve_secret_key_file and "
                "zmq.curve_clients_dir go together"
            )


@dataclass(frozen=True)
class TlsConfig:
    """[tls]: TLS on the gRPC listeners, mutual TLS with a client CA (docs/security.md). The
    files are re-read when they change (each new connection checks), so a renewal needs no
    restart and drops no connection."""

    cert_file: str = field(
        default="",
        metadata=_key("PEM certificate chain of the server (leaf first); empty: plaintext gRPC."),
    )
    key_file: str = field(
        default="", metadata=_key("PEM private key of cert_file (unencrypted; mode 0600).")
    )
    client_ca_file: str = field(
        default="",
        metadata=_key(
            "PEM bundle of the CAs that sign client certificates: every client must present "
            "one at the handshake (mutual TLS), and its subject CN/SANs name it in "
            "auth.identities; empty: no client certificates."
        ),
    )
    listeners: str = field(
        default="all",
        metadata=_key(
            "Which gRPC listeners use TLS: all, or only server.management_address (the "
            "inference listener stays plaintext, e.g. on loopback).",
            _one_of("all", "management"),
        ),
    )

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(
                "config key 'tls.key_file': tls.cert_file and tls.key_file go together"
            )
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("config key 'tls.client_ca_file': needs tls.cert_file and key_file")

    @property
    def enabled(self) -> bool:
        """A server certificate is configured."""
        return bool(self.cert_file)


@dataclass(frozen=True)
class AuthConfig:
    """[auth]: who may call what (docs/security.md). Roles: infer, read, manage, learn."""

    tokens_file: str = field(
        default="",
        metadata=_key(
            "File of hashed bearer tokens written by edged token add and revoke, re-read "
            "when it changes; empty: no tokens."
        ),
    )
    identities: tuple[str, ...] = field(
        default=(),
        metadata=_key(
            "Roles of verified client identities, as NAME=ROLE+ROLE: NAME is a client "
            "certificate's subject CN or a SAN, or curve:<Z85 public key> of a ZeroMQ CURVE "
            "client. In the environment: comma-separated.",
            _identities,
        ),
    )
    anonymous_roles: tuple[str, ...] = field(
        default=("infer", "read"),
        metadata=_key(
            "Roles every caller has, with or without credentials; empty to require a token or "
            "identity for everything but liveness and readiness.",
            _roles,
        ),
    )
    trust_loopback: bool = field(
        default=True,
        metadata=_key(
            "While no credential is configured (no tokens_file, tls.client_ca_file or "
            "zmq.curve_clients_dir), callers over loopback or a Unix socket get every role "
            "and others only anonymous_roles; off: loopback is treated as any peer."
        ),
    )


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus text exposition over HTTP."""

    enabled: bool = field(default=True, metadata=_key("Serve /metrics."))
    address: str = field(
        default="127.0.0.1:8002",
        metadata=_key("HOST:PORT of the metrics endpoint; port 0 picks one.", _address),
    )


@dataclass(frozen=True)
class LogConfig:
    """[log]: structured logs on stdout (with journald priorities under systemd)."""

    level: str = field(
        default="info",
        metadata=_key("Lowest level logged.", _one_of("debug", "info", "warning", "error")),
    )
    format: str = field(
        default="json",
        metadata=_key(
            "json: one JSON object per line; console: for a person at a terminal.",
            _one_of("json", "console"),
        ),
    )
    capture_native_stderr: bool = field(
        default=True,
        metadata=_key(
            "Turn what native libraries (ONNX Runtime, LiteRT, gRPC core) write to stderr "
            "into native_stderr events; off: their lines pass through raw."
        ),
    )


def _rate(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be from 0 to 1"


def _share(value: Any) -> str | None:
    return None if 0 < value < 1 else "must be between 0 and 1 (exclusive)"


def _absolute_paths(value: Any) -> str | None:
    relative = [v for v in value if not Path(v).is_absolute()]
    return f"{relative[0]!r} is not an absolute path" if relative else None


def _url(value: Any) -> str | None:
    if value and not str(value).startswith(("http://", "https://")):
        return "must be empty (OTA off) or an http:// or https:// URL"
    return None


@dataclass(frozen=True)
class OtaConfig:
    """[ota]: over-the-air model updates from a TUF repository (docs/ota.md)."""

    state_dir: str = field(
        default="/var/lib/edged/state",
        metadata=_key(
            "Folder for state that survives restarts: the OTA database (ota.sqlite3), TUF "
            "metadata (tuf/) and, with learn.enabled, the sample store and fine-tune jobs "
            "(learn.sqlite3, learn/)."
        ),
    )
    state_roots: tuple[str, ...] = field(
        default=("/var/lib/edged",),
        metadata=_key(
            "Folders state_dir must be inside when OTA or learning uses it (refused at start "
            "otherwise), besides the StateDirectory systemd gives the service "
            "($STATE_DIRECTORY). In the environment: comma-separated.",
            _absolute_paths,
        ),
    )
    repository_url: str = field(
        default="",
        metadata=_key(
            "Base URL of the fleet's TUF repository (metadata under <url>/metadata/, targets "
            "under <url>/targets/); empty: OTA is off.",
            _url,
        ),
    )
    root: str = field(
        default="",
        metadata=_key(
            "The trusted root.json the TUF client starts from when it has none yet; empty: "
            "<state_dir>/tuf/root.json."
        ),
    )
    poll_interval_s: float = field(
        default=0.0,
        metadata=_key(
            "How often to look for a newer version of every served model and update to it; "
            "0: only when asked (StartUpdate).",
            _non_negative,
        ),
    )
    health_window_s: float = field(
        default=60.0,
        metadata=_key(
            "How long a new version serves on trial before it is committed.", _non_negative
        ),
    )
    health_min_requests: int = field(
        default=20,
        metadata=_key(
            "Fewest requests in the window that error rate and latency are judged on; with "
            "fewer, the version is committed on its self-test.",
            _non_negative,
        ),
    )
    max_error_rate: float = field(
        default=0.01,
        metadata=_key(
            "Highest share of failed requests (0 to 1; invalid requests not counted) in the "
            "window before the new version is rolled back.",
            _rate,
        ),
    )
    max_p99_ms: float = field(
        default=0.0,
        metadata=_key(
            "Highest p99 request latency (ms) in the window before the new version is rolled "
            "back; 0: latency is not judged.",
            _non_negative,
        ),
    )
    optimize_agreement_slack: float = field(
        default=0.01,
        metadata=_key(
            "For a bundle of an edged optimize variant: how far (0 to 1) the variant's "
            "top-1 agreement with its parent on the bundle's held-out check set may fall "
            "below the agreement recorded when it was optimised before its self-test "
            "refuses it (the device's executor may round differently from the fleet's).",
            _rate,
        ),
    )
    optimize_error_slack: float = field(
        default=0.05,
        metadata=_key(
            "For a bundle of an edged optimize variant: how far its relative output error "
            "against its parent on the check set (||variant - parent|| / ||parent||) may rise "
            "above the error recorded when it was optimised before its self-test refuses it.",
            _non_negative,
        ),
    )
    min_free_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_key(
            "Free disk space that must remain in the state and model folders after a bundle "
            "is downloaded and unpacked; an update that would go below fails first.",
            _non_negative,
        ),
    )
    max_bundle_bytes: int = field(
        default=512 * 1024 * 1024,
        metadata=_key(
            "Largest bundle (.tar.gz) downloaded; a larger signed target is refused.", _positive
        ),
    )
    max_unpacked_bytes: int = field(
        default=512 * 1024 * 1024,
        metadata=_key("Largest total size of a bundle's unpacked files.", _positive),
    )
    max_bundle_files: int = field(
        default=64,
        metadata=_key("Most entries a bundle may hold.", _positive),
    )
    fetch_timeout_s: float = field(
        default=30.0,
        metadata=_key("Socket timeout of every TUF metadata and target download.", _positive),
    )
    history_limit: int = field(
        default=100,
        metadata=_key("Updates kept per model for ListUpdates.", _positive),
    )
    pause_after_state: str = field(
        default="",
        metadata=_key(
            "Fault-injection aid for tests, never for production: after persisting this "
            "state (DOWNLOADING, VERIFIED, STAGED, WARMING, ACTIVE_TRIAL, ROLLING_BACK), the "
            "update sleeps pause_s seconds, so a test can kill the daemon there; empty: off.",
            _one_of(
                "", "DOWNLOADING", "VERIFIED", "STAGED", "WARMING", "ACTIVE_TRIAL", "ROLLING_BACK"
            ),
        ),
    )
    pause_s: float = field(
        default=0.0,
        metadata=_key("How long pause_after_state sleeps.", _non_negative),
    )

    @property
    def enabled(self) -> bool:
        """OTA is on: a repository URL is configured."""
        return bool(self.repository_url)

    @property
    def root_path(self) -> Path:
        """The bootstrap root.json."""
        return Path(self.root) if self.root else Path(self.state_dir) / "tuf" / "root.json"


@dataclass(frozen=True)
class LearnConfig:
    """[learn]: on-device fine-tuning of models that declare a trainable head
    (docs/learning.md). Samples and jobs live under ``ota.state_dir`` (learn.sqlite3,
    learn/)."""

    enabled: bool = field(
        default=False,
        metadata=_key(
            "Take labelled samples (AddSamples) and fine-tune the models whose model.toml has "
            "a [learn] table; off: those models just serve."
        ),
    )
    max_samples: int = field(
        default=20000,
        metadata=_key(
            "Most samples stored per model; past it the oldest samples already learned (or "
            "rejected) are dropped, and AddSamples is refused with RESOURCE_EXHAUSTED when "
            "none can be.",
            _positive,
        ),
    )
    max_store_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_key(
            "Most bytes of stored features across all models (same rule as max_samples).",
            _positive,
        ),
    )
    max_request_samples: int = field(
        default=1024,
        metadata=_key("Most samples one AddSamples request may carry.", _positive),
    )
    holdout_share: float = field(
        default=0.2,
        metadata=_key(
            "Share of new samples held out (never trained on) to judge a fine-tune on new "
            "data; every round(1/share)-th sample of a model is held out.",
            _share,
        ),
    )
    trigger_samples: int = field(
        default=0,
        metadata=_key(
            "Start a fine-tune once this many new samples of a model are waiting; 0: only "
            "when StartFineTune asks.",
            _non_negative,
        ),
    )
    min_samples: int = field(
        default=20,
        metadata=_key(
            "Fewest new samples a fine-tune needs (at least one of them held out).", _positive
        ),
    )
    max_old_drop: float = field(
        default=2.0,
        metadata=_key(
            "Gate: most accuracy points the candidate may lose on held-out old data.",
            _non_negative,
        ),
    )
    min_new_gain: float = field(
        default=5.0,
        metadata=_key(
            "Gate: fewest accuracy points the candidate must gain on held-out new data.",
        ),
    )
    epochs: int = field(
        default=120,
        metadata=_key(
            "Passes over the new samples (and replay) in one fine-tune (1 to 1000); 120 meets "
            "every benchmark target at ~0.3 s per 500 samples (docs/learning.md).",
            _positive,
        ),
    )
    seed: int = field(
        default=0,
        metadata=_key(
            "Seed of every random choice of a fine-tune (a job's seed is seed + its id).",
            _non_negative,
        ),
    )
    job_timeout_s: float = field(
        default=600.0,
        metadata=_key(
            "Longest a fine-tune's worker process may run (wall and CPU time) before it is "
            "killed and the job fails.",
            _positive,
        ),
    )
    job_memory_mb: int = field(
        default=2048,
        metadata=_key(
            "Address-space limit (RLIMIT_AS, MiB) of a fine-tune's worker process; 0: none.",
            _non_negative,
        ),
    )
    job_nice: int = field(
        default=10,
        metadata=_key(
            "Niceness added to a fine-tune's worker process, so serving keeps the CPU.",
            _non_negative,
        ),
    )
    history_limit: int = field(
        default=100,
        metadata=_key("Jobs kept per model for ListJobs.", _positive),
    )


@dataclass(frozen=True)
class FederatedConfig:
    """[federated]: this device's part in the fleet's federated learning with Flower
    (docs/federated.md). Off by default: a device takes part only when its operator turns it
    on (and enrols it on the server); ``enabled = false`` opts it out."""

    enabled: bool = field(
        default=False,
        metadata=_key(
            "Take part in federated learning: a Flower client per trainable model trains on "
            "the stored features and sends back head parameters only; needs learn.enabled."
        ),
    )
    server: str = field(
        default="",
        metadata=_key(
            "HOST:PORT of the fleet's Flower server (edged-fleet federate); required when enabled.",
            _optional_address,
        ),
    )
    models: tuple[str, ...] = field(
        default=(),
        metadata=_key("Trainable models that take part; empty: every trainable model."),
    )
    python: str = field(
        default="",
        metadata=_key(
            "Interpreter of the federated environment (flwr, docs/adr/0012); empty: "
            "<edged's prefix>-federated/bin/python."
        ),
    )
    root_certificates: str = field(
        default="",
        metadata=_key(
            "PEM file of the CA(s) that verify the Flower server's certificate (TLS); "
            "required when enabled, unless insecure."
        ),
    )
    insecure: bool = field(
        default=False,
        metadata=_key(
            "Talk to the Flower server without TLS: loopback tests only, never on a fleet."
        ),
    )
    device_id: str = field(
        default="",
        metadata=_key("The id this device is enrolled under; empty: the host name."),
    )
    token_file: str = field(
        default="",
        metadata=_key(
            "File holding this device's enrolment token (edged-fleet federate --enrolled)."
        ),
    )
    retry_s: float = field(
        default=30.0,
        metadata=_key(
            "Wait before a client reconnects after a federation ended or failed.", _positive
        ),
    )
    session_timeout_s: float = field(
        default=3600.0,
        metadata=_key(
            "Longest a client process runs (connected or waiting) before it is stopped and "
            "started afresh.",
            _positive,
        ),
    )

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not self.server:
            raise ConfigError("config key 'federated.server': required with federated.enabled")
        if not (self.root_certificates or self.insecure):
            raise ConfigError(
                "config key 'federated.root_certificates': required with federated.enabled "
                "(or federated.insecure on loopback)"
            )


@dataclass(frozen=True)
class Config:
    """The whole configuration; each field is one TOML section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    executors: ExecutorsConfig = field(default_factory=ExecutorsConfig)
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)

    def __post_init__(self) -> None:
        if self.federated.enabled and not self.learn.enabled:
            raise ConfigError(
                "config key 'federated.enabled': needs learn.enabled (a federation trains on "
                "the learning store's samples and publishes through its gate)"
            )


def _sections() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _to_bool(raw: Any, from_env: bool) -> bool:
    if isinstance(raw, bool):
        return raw
    words = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }
    if from_env and str(raw).lower() in words:
        return words[str(raw).lower()]
    raise ValueError


def _to_int(raw: Any, from_env: bool) -> int:
    if isinstance(raw, bool) or not (isinstance(raw, int) or from_env):
        raise ValueError
    return int(raw)


def _to_float(raw: Any, from_env: bool) -> float:
    if isinstance(raw, bool) or not (isinstance(raw, int | float) or from_env):
        raise ValueError
    return float(raw)


def _to_str(raw: Any, from_env: bool) -> str:
    if not isinstance(raw, str):
        raise ValueError
    return raw


def _to_strings(raw: Any, from_env: bool) -> tuple[str, ...]:
    if from_env and isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise ValueError
    return tuple(raw)


_COERCERS: dict[Any, tuple[str, Callable[[Any, bool], Any]]] = {
    bool: ("bool", _to_bool),
    int: ("int", _to_int),
    float: ("float", _to_float),
    str: ("str", _to_str),
    tuple[str, ...]: ("a list of strings", _to_strings),
}


def _coerce(key: str, kind: Any, raw: Any, from_env: bool) -> Any:
    """``raw`` as ``kind``; environment values arrive as strings."""
    expected, coerce = _COERCERS[kind]
    try:
        return coerce(raw, from_env)
    except ValueError:
        raise ConfigError(f"config key '{key}': expected {expected}, got {raw!r}") from None


def _env_values(
    env: Mapping[str, str], sections: Mapping[str, type[Any]]
) -> dict[str, tuple[str, str, str]]:
    """{variable: (section, key, value)} for every EDGED_ variable in ``env``."""
    env_keys = {
        f"{ENV_PREFIX}{section}_{f.name}".upper(): (section, f.name)
        for section, cls in sections.items()
        for f in dataclasses.fields(cls)
    }
    found = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name not in env_keys:
            raise ConfigError(
                f"unknown config environment variable '{name}'{_did_you_mean(name, env_keys)}"
            )
        found[name] = (*env_keys[name], value)
    return found


def build_config(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A Config from parsed TOML ``data``, then ``EDGED_`` variables in ``env``, then
    ``overrides`` (dotted keys such as ``"models.repository"``, from command-line flags).

    Raises:
        ConfigError: an unknown section, key or EDGED_ variable, or a bad value; the message
            names the key.
    """
    sections = _sections()
    values: dict[str, dict[str, tuple[Any, bool]]] = {name: {} for name in sections}

    for section, table in data.items():
        if section not in sections:
            hint = _did_you_mean(section, sections)
            raise ConfigError(
                f"unknown config section '[{section}]'{hint} (known: {', '.join(sections)})"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"config key '{section}' must be a table")
        known = {f.name for f in dataclasses.fields(sections[section])}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(
                    f"unknown config key '{section}.{key}'{_did_you_mean(key, known)}"
                )
            values[section][key] = (value, False)

    for section, key, value in _env_values(env or {}, sections).values():
        values[section][key] = (value, True)

    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in sections or key not in {
            f.name for f in dataclasses.fields(sections[section])
        }:
            every = [f"{s}.{f.name}" for s, c in sections.items() for f in dataclasses.fields(c)]
            raise ConfigError(f"unknown config key '{dotted}'{_did_you_mean(dotted, every)}")
        values[section][key] = (value, False)

    built: dict[str, Any] = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in values[section]:
                continue
            raw, from_env = values[section][f.name]
            key = f"{section}.{f.name}"
            value = _coerce(key, hints[f.name], raw, from_env)
            check = f.metadata.get("check")
            problem = check(value) if check else None
            if problem:
                raise ConfigError(f"config key '{key}': {problem} (got {value!r})")
            kwargs[f.name] = value
        built[section] = cls(**kwargs)
    return Config(**built)


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the TOML file at ``path`` (or the default path when it exists) and apply ``env``
    (default: ``os.environ``) and ``overrides``.

    Raises:
        ConfigError: the file named is missing or is not valid TOML, or any key is bad.
    """
    env = os.environ if env is None else env
    if path is None and env.get("EDGED_CONFIG"):
        path = Path(env["EDGED_CONFIG"])
    data: dict[str, Any] = {}
    if path is None:
        path = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from e
    return build_config(data, env, overrides)


def describe() -> list[tuple[str, str, Any, str]]:
    """Every key as (dotted key, environment variable, default, doc), for docs and --help."""
    rows = []
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            rows.append(
                (
                    f"{section}.{f.name}",
                    f"{ENV_PREFIX}{section}_{f.name}".upper(),
                    f.default,
                    f.metadata.get("doc", ""),
                )
            )
    return rows
