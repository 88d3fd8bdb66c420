"""The access table, the access check's decisions, the tokens file and certificate reloading,
without a daemon (the e2e tests in tests/e2e/test_security.py drive real ones)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zmq.auth
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from edged._proto.edged.v1 import management_pb2
from edged._proto.inference import grpc_service_pb2
from edged.config import build_config
from edged.core.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from edged.core.status import code_of
from edged.frontends import http as http_frontend
from edged.frontends import zmq_wire
from edged.frontends.grpc_access import bearer, is_local, request_args
from edged.security.access import AccessControl, Credentials
from edged.security.roles import ACCESS, ALL_ROLES, Role, parse_identities
from edged.security.tls import CertificateFiles
from edged.security.tokens import TokenStore, add_token, read_tokens, revoke_token
from tests import pki

SERVICES = [
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    management_pb2.DESCRIPTOR.services_by_name["Management"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]


def test_access_table_names_every_grpc_method_and_zmq_op_and_nothing_else() -> None:
    served = {f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods}
    served |= {f"zmq/{op}" for op in zmq_wire.OPS}
    served |= http_frontend.CALLS
    assert set(ACCESS) == served


def test_refusals_have_their_own_status_codes() -> None:
    assert code_of(UnauthenticatedError("x")) == "UNAUTHENTICATED"
    assert code_of(PermissionDeniedError("x")) == "PERMISSION_DENIED"


REMOTE = Credentials("grpc", "ipv4:10.1.2.3:5000", local=False)
LOCAL = Credentials("grpc", "ipv4:127.0.0.1:5000", local=True)
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"


@pytest.mark.parametrize(
    ("access", "credentials", "call", "outcome"),
    [
        # the default policy: nothing configured
        (AccessControl(), LOCAL, LOAD, "OK"),
        (AccessControl(), REMOTE, LOAD, "PERMISSION_DENIED"),
        (AccessControl(), REMOTE, INFER, "OK"),
        (AccessControl(), REMOTE, "zmq/add_samples", "PERMISSION_DENIED"),
        (AccessControl(trust_loopback=False), LOCAL, LOAD, "PERMISSION_DENIED"),
        (AccessControl(anonymous_roles=frozenset()), REMOTE, INFER, "PERMISSION_DENIED"),
        (AccessControl(anonymous_roles=frozenset()), REMOTE, LIVE, "OK"),
        # a call missing from the table is refused
        (AccessControl(), LOCAL, "/x.Y/Z", "PERMISSION_DENIED"),
        # identities: once configured, loopback is no longer trusted
        (AccessControl(identities_configured=True), LOCAL, LOAD, "UNAUTHENTICATED"),
        (
            AccessControl(
                identities={"fleet": frozenset({Role.MANAGE})}, identities_configured=True
            ),
            Credentials("grpc", "ipv4:10.1.2.3:5000", local=False, names=("fleet",)),
            LOAD,
            "OK",
        ),
        (
            AccessControl(identities={"fleet": frozenset({Role.READ})}, identities_configured=True),
            Credentials("grpc", "ipv4:10.1.2.3:5000", local=False, names=("fleet",)),
            LOAD,
            "PERMISSION_DENIED",
        ),
    ],
)
def test_access_decisions(
    access: AccessControl, credentials: Credentials, call: str, outcome: str
) -> None:
    try:
        access.check(call, credentials)
        got = "OK"
    except (UnauthenticatedError, PermissionDeniedError) as e:
        got = code_of(e)
    assert got == outcome


def test_tokens_roles_and_revocation(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    manager = add_token(path, "fleet", [Role.MANAGE, Role.READ])
    reader = add_token(path, "grafana", [Role.READ])
    text = path.read_text()
    assert manager not in text
    assert manager.rsplit("_", 1)[1] not in text
    store = TokenStore(path)
    assert store.refresh()
    assert not store.refresh()  # unchanged: not re-read
    access = AccessControl(tokens=store)
    token_creds = Credentials("zmq", "tcp:10.0.0.9", local=False, token=manager)
    decision = access.check(LOAD, token_creds)
    assert decision.principal.who == "token:fleet"
    with pytest.raises(PermissionDeniedError, match="token:grafana lacks the 'manage' role"):
        access.check(LOAD, Credentials("grpc", "ipv4:10.0.0.9:1", local=False, token=reader))
    # a forged secret with a real id, a malformed token, an anonymous caller
    forged = manager[:15] + ("A" if manager[15] != "A" else "B") + manager[16:]
    for bad in (forged, "nonsense"):
        with pytest.raises(UnauthenticatedError, match="not valid"):
            access.check(LIVE, Credentials("grpc", "ipv4:127.0.0.1:1", local=True, token=bad))
    with pytest.raises(UnauthenticatedError, match="present a token"):
        access.check(LOAD, LOCAL)
    assert revoke_token(path, "fleet")
    assert not revoke_token(path, "fleet")
    assert store.refresh()
    with pytest.raises(UnauthenticatedError):
        access.check(LOAD, token_creds)
    # a broken file keeps the last good tokens in force
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a tokens file"):
        store.refresh()
    assert store.verify(reader) is not None
    counts = access.counts()
    assert counts[("manage", "PERMISSION_DENIED")] == 1
    assert counts[("manage", "UNAUTHENTICATED")] == 2


def test_allowances_are_kept_only_for_callers_without_a_token(tmp_path: Path) -> None:
    """AccessControl.cached: an allowance for a caller without a token is kept by the key
    its frontend knows it by; a token's decision never is (a revoked token is refused at
    once), nor is a refusal (each one counted)."""
    access = AccessControl()
    allowed = access.check(INFER, REMOTE, caller=("tcp", "10.0.0.9:1"))
    assert access.cached(INFER, ("tcp", "10.0.0.9:1")) is allowed
    assert access.cached(INFER, ("tcp", "10.0.0.8:1")) is None
    assert access.cached(LOAD, ("tcp", "10.0.0.9:1")) is None
    for _ in range(2):
        with pytest.raises(PermissionDeniedError):
            access.check(LOAD, REMOTE, caller=("tcp", "10.0.0.9:1"))
        assert access.cached(LOAD, ("tcp", "10.0.0.9:1")) is None
    assert access.counts()[("manage", "PERMISSION_DENIED")] == 2

    path = tmp_path / "tokens.json"
    token = add_token(path, "fleet", [Role.MANAGE])
    store = TokenStore(path)
    store.refresh()
    access = AccessControl(tokens=store)
    creds = Credentials("zmq", "tcp:10.0.0.9", local=False, token=token)
    access.check(LOAD, creds, caller=("tcp", "10.0.0.9:1"))
    assert access.cached(LOAD, ("tcp", "10.0.0.9:1")) is None
    revoke_token(path, "fleet")
    store.refresh()
    with pytest.raises(UnauthenticatedError):
        access.check(LOAD, creds, caller=("tcp", "10.0.0.9:1"))


def test_token_names_and_roles_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    with pytest.raises(ConfigError, match="token name"):
        add_token(path, "bad name", [Role.READ])
    with pytest.raises(ConfigError, match="at least one role"):
        add_token(path, "x", [])
    add_token(path, "x", [Role.READ])
    with pytest.raises(ConfigError, match="exists already"):
        add_token(path, "x", [Role.INFER])
    data = json.loads(path.read_text())
    data["tokens"][0]["roles"] = ["admin"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown role 'admin'"):
        read_tokens(path)


def test_identities_take_curve_keys_with_equals_signs(tmp_path: Path) -> None:
    public, _ = zmq.auth.create_certificates(tmp_path, "app")
    key = zmq.auth.load_certificate(public)[0].decode()
    config = build_config({}, {"EDGED_AUTH_IDENTITIES": f"curve:{key}=infer+learn,cn=read"})
    parsed = parse_identities(config.auth.identities, "auth.identities")
    assert parsed[f"curve:{key}"] == {Role.INFER, Role.LEARN}
    assert parsed["cn"] == {Role.READ}
    with pytest.raises(ConfigError, match=r"auth\.identities"):
        build_config({"auth": {"identities": ["no-roles"]}})
    with pytest.raises(ConfigError, match=r"tls\.key_file"):
        build_config({"tls": {"cert_file": "/x.pem"}})
    with pytest.raises(ConfigError, match=r"zmq\.curve_clients_dir"):
        build_config({"zmq": {"curve_secret_key_file": "/x.key_secret"}})


def test_grpc_credentials_helpers() -> None:
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer([("other", "x")]) is None
    assert is_local("ipv4:127.0.0.1:1")
    assert is_local("ipv6:[::1]:1")
    assert is_local("unix:/s")
    assert not is_local("ipv4:10.0.0.1:1")
    assert not is_local("ipv6:[fe80::1]:1")
    message = grpc_service_pb2.ModelInferRequest(model_name="m" * 300, id="r")
    message.raw_input_contents.append(b"secret bytes")
    assert request_args(message) == {"model_name": "m" * 300, "id": "r"}


def test_certificate_files_reload_when_they_change(tmp_path: Path) -> None:
    ca = pki.issue("ca", ca=True)
    cert, key = pki.issue("one", ca, server=True).write(tmp_path, "server")
    files = CertificateFiles(cert, key, None)
    assert files.fetch() is None  # unchanged
    second = pki.issue("two", ca, server=True)
    key.write_bytes(second.key_pem)  # half-way through a renewal: the pair does not match
    assert files.fetch() is None
    cert.write_bytes(second.cert_pem)
    os.utime(cert, ns=(1, 2))  # a distinct stamp, however coarse the clock
    assert files.fetch() is not None
    assert files.current.chain == second.cert_pem
    assert files.reloads == 1
    with pytest.raises(ConfigError, match="tls"):
        CertificateFiles(cert, tmp_path / "missing.key", None)


def test_every_role_is_named_in_the_table() -> None:
    assert {r for r in ACCESS.values() if r is not None} == ALL_ROLES


def test_security_doc_names_every_call_of_the_table() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    missing = [c for c in ACCESS if c.rpartition("/")[2] not in text]
    assert not missing, f"docs/security.md does not say who may call {missing}"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_token_file_keeps_its_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    add_token(path, "first", [Role.READ])
    os.chown(path, 0, 4321)  # as root:edged on a gateway
    add_token(path, "second", [Role.READ])
    assert (path.stat().st_gid, oct(path.stat().st_mode & 0o777)) == (4321, "0o640")
