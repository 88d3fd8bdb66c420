"""Roles, and the one table of which role every call needs (no I/O here).

Every frontend names a call the same way: a gRPC call by its method path
(``/inference.GRPCInferenceService/ModelInfer``), a ZeroMQ message by ``zmq/<op>``, a later
frontend by its own prefix. ``ACCESS`` maps each name to the role it needs, or ``None`` for a
call open to anyone who can reach the listener (liveness, readiness, health: what a
supervisor probes). A call missing from the table is refused: adding a call means adding a
row here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from edged.core.errors import ConfigError


class Role(StrEnum):
    """What a caller may do. Roles are independent: a fleet manager that rolls out and
    watches updates needs ``manage`` and ``read``."""

    INFER = "infer"  # inference, and shared-memory regions for it
    READ = "read"  # metadata, configuration, statistics, repository index, update/job status
    MANAGE = "manage"  # load/unload models, start updates, roll back
    LEARN = "learn"  # add samples, start fine-tunes


ALL_ROLES = frozenset(Role)
#: roles whose every call (allowed or refused) is written to the audit log
AUDITED = frozenset({Role.MANAGE, Role.LEARN})

_KSERVE = "/inference.GRPCInferenceService/"
_MANAGEMENT = "/edged.v1.Management/"
_HEALTH = "/grpc.health.v1.Health/"

#: call name -> the role it needs (None: open)
ACCESS: Mapping[str, Role | None] = {
    # KServe v2 / Open Inference Protocol
    f"{_KSERVE}ServerLive": None,
    f"{_KSERVE}ServerReady": None,
    f"{_KSERVE}ModelReady": Role.READ,
    f"{_KSERVE}ServerMetadata": Role.READ,
    f"{_KSERVE}ModelMetadata": Role.READ,
    f"{_KSERVE}ModelConfig": Role.READ,
    f"{_KSERVE}ModelStatistics": Role.READ,
    f"{_KSERVE}RepositoryIndex": Role.READ,
    f"{_KSERVE}ModelInfer": Role.INFER,
    f"{_KSERVE}ModelStreamInfer": Role.INFER,
    f"{_KSERVE}SystemSharedMemoryStatus": Role.INFER,
    f"{_KSERVE}SystemSharedMemoryRegister": Role.INFER,
    f"{_KSERVE}SystemSharedMemoryUnregister": Role.INFER,
    f"{_KSERVE}CudaSharedMemoryStatus": Role.INFER,
    f"{_KSERVE}CudaSharedMemoryRegister": Role.INFER,
    f"{_KSERVE}CudaSharedMemoryUnregister": Role.INFER,
    f"{_KSERVE}RepositoryModelLoad": Role.MANAGE,
    f"{_KSERVE}RepositoryModelUnload": Role.MANAGE,
    f"{_KSERVE}TraceSetting": Role.MANAGE,
    f"{_KSERVE}LogSettings": Role.MANAGE,
    # edged.v1.Management: over-the-air updates and on-device learning
    f"{_MANAGEMENT}StartUpdate": Role.MANAGE,
    f"{_MANAGEMENT}Rollback": Role.MANAGE,
    f"{_MANAGEMENT}GetUpdateStatus": Role.READ,
    f"{_MANAGEMENT}ListUpdates": Role.READ,
    f"{_MANAGEMENT}AddSamples": Role.LEARN,
    f"{_MANAGEMENT}StartFineTune": Role.LEARN,
    f"{_MANAGEMENT}GetJob": Role.READ,
    f"{_MANAGEMENT}ListJobs": Role.READ,
    # grpc.health.v1 and reflection
    f"{_HEALTH}Check": None,
    f"{_HEALTH}Watch": None,
    f"{_HEALTH}List": Role.READ,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Role.READ,
    # ZeroMQ (docs/zmq-protocol.md)
    "zmq/live": None,
    "zmq/ready": None,
    "zmq/model_ready": Role.READ,
    "zmq/server_metadata": Role.READ,
    "zmq/model_metadata": Role.READ,
    "zmq/infer": Role.INFER,
    "zmq/add_samples": Role.LEARN,
    # KServe v2 HTTP/REST (docs/http.md)
    "http/live": None,
    "http/ready": None,
    "http/model_ready": Role.READ,
    "http/server_metadata": Role.READ,
    "http/model_metadata": Role.READ,
    "http/model_config": Role.READ,
    "http/model_statistics": Role.READ,
    "http/repository_index": Role.READ,
    "http/infer": Role.INFER,
    "http/load": Role.MANAGE,
    "http/unload": Role.MANAGE,
}


def parse_roles(values: Iterable[str] | str, where: str) -> frozenset[Role]:
    """Role names (a list, or one string split at ',' and '+') as a set.

    Raises:
        ConfigError: an unknown role, naming ``where``.
    """
    if isinstance(values, str):
        values = [v for part in values.split(",") for v in part.split("+")]
    roles = set()
    for value in values:
        name = str(value).strip()
        if not name:
            continue
        try:
            roles.add(Role(name))
        except ValueError:
            raise ConfigError(
                f"{where}: unknown role {name!r} (roles: {', '.join(Role)})"
            ) from None
    return frozenset(roles)


def parse_identities(entries: Iterable[str], where: str) -> dict[str, frozenset[Role]]:
    """``NAME=ROLE+ROLE`` entries (a client certificate's subject CN or SAN, or ``curve:`` and
    a ZeroMQ CURVE public key) as {name: roles}.

    Raises:
        ConfigError: a malformed entry or an unknown role, naming ``where``.
    """
    identities: dict[str, frozenset[Role]] = {}
    for entry in entries:
        name, sep, roles = entry.rpartition("=")  # a Z85 key may hold "="
        if not sep or not name.strip():
            raise ConfigError(f"{where}: {entry!r} must be NAME=ROLE+ROLE...")
        identities[name.strip()] = parse_roles(roles, f"{where} ({name.strip()})")
    return identities
