"""Real daemons on loopback with TLS, mutual TLS, bearer tokens, CURVE and the audit log
(docs/security.md): every call of the access table, per role, over gRPC and ZeroMQ;
certificates refused at the handshake; certificate rotation under load; CURVE keys; the
`edged token`, `edged infer` and `edged-fleet rollout` client flags."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import zmq.auth
from cryptography import x509

from edged._proto.inference import grpc_service_pb2 as pb
from edged.client import CurveKeys, ZmqClient, ZmqClientError
from edged.frontends.http import HTTP_STATUS
from edged.security.roles import ACCESS, AUDITED, Role
from tests import pki
from tests.daemon_process import REPO_ROOT, DaemonProcess, run_cli

ROLES = [r.value for r in Role]
GRPC_CALLS = sorted(c for c in ACCESS if c.startswith("/"))
ZMQ_CALLS = sorted(c for c in ACCESS if c.startswith("zmq/"))
AUTH_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED"}
#: calls whose handler answers with a stream
STREAMING = {
    "/inference.GRPCInferenceService/ModelStreamInfer": "stream_stream",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
    "/grpc.health.v1.Health/Watch": "unary_stream",
}
DIGIT = np.zeros((1, 64), dtype=np.float32)
#: request bodies where an empty one would do harm or prove nothing (default: empty)
PAYLOADS = {
    "/inference.GRPCInferenceService/RepositoryModelLoad": pb.RepositoryModelLoadRequest(
        model_name="digits"
    ).SerializeToString(),
    "/inference.GRPCInferenceService/RepositoryModelUnload": pb.RepositoryModelUnloadRequest(
        model_name="no-such-model"
    ).SerializeToString(),
}


def digits_repo(root: Path) -> Path:
    repo = root / "models"
    shutil.copytree(REPO_ROOT / "models" / "digits", repo / "digits", ignore=_no_py)
    return repo


def _no_py(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".py")]


def serve(repo: Path, env: dict[str, str], *args: str) -> DaemonProcess:
    daemon = DaemonProcess(["--models", str(repo), "--grpc-address", "127.0.0.1:0", *args], env)
    daemon.wait_live()
    daemon.wait_for("server_ready", timeout=60)
    return daemon


def add_token(tokens_file: Path, name: str, roles: str) -> str:
    done = run_cli("token", "add", name, "--roles", roles, "--file", str(tokens_file))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("edged_")
    return token


def call_code(channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """Call ``method`` with an empty request; the status code name ("OK" on success)."""
    kind = STREAMING.get(method, "unary_unary")
    body = PAYLOADS.get(method, b"")
    try:
        if kind == "unary_unary":
            channel.unary_unary(method)(body, timeout=20, metadata=metadata)
        elif kind == "unary_stream":
            stream = channel.unary_stream(method)(body, timeout=20, metadata=metadata)
            next(iter(stream))
            stream.cancel()
        else:
            stream = channel.stream_stream(method)(iter([b""]), timeout=20, metadata=metadata)
            next(iter(stream))
            stream.cancel()
    except grpc.RpcError as e:
        return str(e.code().name)
    return "OK"


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# -- tokens: every call of the table, per role -------------------------------------------------


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A daemon with one token per role, no anonymous roles, and the audit log."""
    root = tmp_path_factory.mktemp("tokens")
    tokens_file = root / "tokens.json"
    tokens = {role: add_token(tokens_file, f"{role}-client", role) for role in ROLES}
    ipc = root / "edged.sock"
    daemon = serve(
        digits_repo(root),
        {
            "EDGED_AUTH_TOKENS_FILE": str(tokens_file),
            "EDGED_AUTH_ANONYMOUS_ROLES": "",
            "EDGED_ZMQ_ADDRESSES": f"tcp://127.0.0.1:0,ipc://{ipc}",
        },
    )
    try:
        yield {"daemon": daemon, "tokens": tokens, "file": tokens_file}
    finally:
        assert daemon.stop() == 0, daemon.stderr


@pytest.mark.parametrize("role", [*ROLES, None, "bogus"])
@pytest.mark.parametrize("method", GRPC_CALLS)
def test_every_grpc_call_per_token_role(
    token_daemon: dict[str, Any], method: str, role: str | None
) -> None:
    required = ACCESS[method]
    token = (
        token_daemon["tokens"][role]
        if role in ROLES
        else "edged_00000000_" + "x" * 43
        if role == "bogus"
        else None
    )
    with grpc.insecure_channel(token_daemon["daemon"].address) as channel:
        code = call_code(channel, method, bearer(token))
    if role == "bogus":
        assert code == "UNAUTHENTICATED"
    elif required is None or role == required:
        assert code not in AUTH_CODES, code
    elif role is None:
        assert code == "UNAUTHENTICATED"  # credentials exist that could be presented
    else:
        assert code == "PERMISSION_DENIED"


def _zmq_call(client: ZmqClient, op: str) -> str:
    try:
        if op == "infer":
            client.infer("digits", {"input": DIGIT})
        elif op == "add_samples":
            client.add_samples("digits", {"input": DIGIT}, [1])
        elif op == "model_ready":
            client.is_model_ready("digits")
        elif op == "model_metadata":
            client.model_metadata("digits")
        elif op == "live":
            client.is_live()
        elif op == "ready":
            client.is_ready()
        else:
            client.server_metadata()
    except ZmqClientError as e:
        return e.code
    return "OK"


@pytest.mark.parametrize("role", [*ROLES, None])
@pytest.mark.parametrize("call", ZMQ_CALLS)
def test_every_zmq_op_per_token_role(
    token_daemon: dict[str, Any], call: str, role: str | None
) -> None:
    required = ACCESS[call]
    token = token_daemon["tokens"][role] if role else None
    tcp = next(e for e in token_daemon["daemon"].zmq_endpoints if e.startswith("tcp://"))
    with ZmqClient(tcp, timeout=20, token=token) as client:
        code = _zmq_call(client, call.removeprefix("zmq/"))
    if required is None or role == required:
        assert code not in AUTH_CODES, code
    elif role is None:
        assert code == "UNAUTHENTICATED"
    else:
        assert code == "PERMISSION_DENIED"


#: one request per HTTP call of the access table: (method, path, body); load/unload name a
#: model that is not there, so that an allowed call changes nothing
HTTP_REQUESTS: dict[str, tuple[str, str, bytes | None]] = {
    "http/live": ("GET", "/v2/health/live", None),
    "http/ready": ("GET", "/v2/health/ready", None),
    "http/model_ready": ("GET", "/v2/models/digits/ready", None),
    "http/server_metadata": ("GET", "/v2", None),
    "http/model_metadata": ("GET", "/v2/models/digits", None),
    "http/model_config": ("GET", "/v2/models/digits/config", None),
    "http/model_statistics": ("GET", "/v2/models/digits/stats", None),
    "http/repository_index": ("POST", "/v2/repository/index", b"{}"),
    "http/infer": (
        "POST",
        "/v2/models/digits/infer",
        json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
        ).encode(),
    ),
    "http/load": ("POST", "/v2/repository/models/absent/load", b"{}"),
    "http/unload": ("POST", "/v2/repository/models/absent/unload", b"{}"),
}
CODE_OF_HTTP = {status: code for code, status in HTTP_STATUS.items()}


def http_call(address: str, call: str, token: str | None) -> str:
    """Make the HTTP request of ``call``; the status code name its HTTP status stands for."""
    method, path, body = HTTP_REQUESTS[call]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(
        f"http://{address}{path}", data=body, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    return CODE_OF_HTTP.get(status, "OTHER")


def test_every_http_call_of_the_table_is_exercised() -> None:
    assert set(HTTP_REQUESTS) == {c for c in ACCESS if c.startswith("http/")}


@pytest.mark.parametrize("role", [*ROLES, None, "bogus"])
@pytest.mark.parametrize("call", sorted(HTTP_REQUESTS))
def test_every_http_call_per_token_role(
    token_daemon: dict[str, Any], call: str, role: str | None
) -> None:
    required = ACCESS[call]
    token = (
        token_daemon["tokens"][role]
        if role in ROLES
        else "edged_00000000_" + "x" * 43
        if role == "bogus"
        else None
    )
    code = http_call(token_daemon["daemon"].http_address, call, token)

    if role == "bogus":
        assert code == "UNAUTHENTICATED"
    elif required is None or role == required:
        assert code not in AUTH_CODES, code
    elif role is None:
        assert code == "UNAUTHENTICATED"
    else:
        assert code == "PERMISSION_DENIED"


def test_audit_log_records_each_management_call(token_daemon: dict[str, Any]) -> None:
    daemon: DaemonProcess = token_daemon["daemon"]
    tokens = token_daemon["tokens"]
    with grpcclient.InferenceServerClient(daemon.address) as client:
        client.load_model("digits", headers={"authorization": f"Bearer {tokens['manage']}"})
        with pytest.raises(Exception, match=r"PERMISSION_DENIED|lacks"):
            client.unload_model("audited", headers={"authorization": f"Bearer {tokens['read']}"})
    ok = daemon.wait_for(
        "audit",
        call="/inference.GRPCInferenceService/RepositoryModelLoad",
        outcome="OK",
        who="token:manage-client",
    )
    assert ok["role"] == "manage"
    assert ok["args"]["model_name"] == "digits"
    assert ok["peer"].startswith("ipv4:127.0.0.1:")

    def audited() -> list[dict[str, Any]]:
        return [
            e
            for e in list(daemon.events)
            if e["event"] == "audit" and e.get("args", {}).get("model_name") == "audited"
        ]

    assert _eventually(audited)
    refused = audited()[0]
    assert refused["call"] == "/inference.GRPCInferenceService/RepositoryModelUnload"
    assert refused["outcome"] == "PERMISSION_DENIED"
    assert refused["who"] == "token:read-client"
    assert refused["level"] == "warning"
    # the token itself never reaches the log
    assert not any(t in json.dumps(daemon.events) for t in tokens.values())
    with (
        ZmqClient(daemon.zmq_endpoints[0], timeout=20, token=tokens["learn"]) as zc,
        pytest.raises(ZmqClientError, match="UNAVAILABLE"),  # learning is off
    ):
        zc.add_samples("digits", {"input": DIGIT}, [3])
    zmq_event = daemon.wait_for(
        "audit", call="zmq/add_samples", outcome="UNAVAILABLE", who="token:learn-client"
    )
    assert zmq_event["args"] == {"model": "digits", "version": "", "labels_count": 1}
    metrics = urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics").read().decode()
    assert 'edged_access_calls_total{outcome="OK",role="manage"}' in metrics
    assert 'edged_access_calls_total{outcome="PERMISSION_DENIED",role="manage"}' in metrics


@pytest.mark.parametrize("call", sorted(c for c, r in ACCESS.items() if r in AUDITED))
def test_audit_log_has_an_event_for_each_management_and_learning_call(
    token_daemon: dict[str, Any], call: str
) -> None:
    daemon: DaemonProcess = token_daemon["daemon"]
    role = ACCESS[call]
    assert role is not None
    token = token_daemon["tokens"][role]
    if call.startswith("zmq/"):
        with ZmqClient(daemon.zmq_endpoints[0], timeout=20, token=token) as client:
            code = _zmq_call(client, call.removeprefix("zmq/"))
    elif call.startswith("http/"):
        code = http_call(daemon.http_address, call, token)
    else:
        with grpc.insecure_channel(daemon.address) as channel:
            code = call_code(channel, call, bearer(token))
    event = daemon.wait_for("audit", call=call, who=f"token:{role}-client", outcome=code)
    assert event["role"] == role
    transport = "grpc" if call.startswith("/") else call.partition("/")[0]
    assert event["transport"] == transport


def test_unix_socket_is_not_trusted_once_tokens_exist(token_daemon: dict[str, Any]) -> None:
    ipc = next(e for e in token_daemon["daemon"].zmq_endpoints if e.startswith("ipc://"))
    with ZmqClient(ipc, timeout=20) as client:
        assert _zmq_call(client, "add_samples") == "UNAUTHENTICATED"
        assert client.is_live()


def test_token_add_and_revoke_reach_a_running_daemon(token_daemon: dict[str, Any]) -> None:
    daemon: DaemonProcess = token_daemon["daemon"]
    tokens_file: Path = token_daemon["file"]
    assert "edged_" not in tokens_file.read_text()  # only hashes are stored
    token = add_token(tokens_file, "short-lived", "read,manage")
    listed = run_cli("token", "list", "--json", "--file", str(tokens_file))
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["short-lived"]["roles"] == ["manage", "read"]
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o640"
    method = "/inference.GRPCInferenceService/ModelConfig"
    with grpc.insecure_channel(daemon.address) as channel:
        assert _eventually(lambda: call_code(channel, method, bearer(token)) == "NOT_FOUND")
        done = run_cli("token", "revoke", "short-lived", "--file", str(tokens_file))
        assert done.returncode == 0, done.stderr
        assert _eventually(lambda: call_code(channel, method, bearer(token)) == "UNAUTHENTICATED")
    assert run_cli("token", "revoke", "short-lived", "--file", str(tokens_file)).returncode == 1


def test_sighup_rereads_credentials(token_daemon: dict[str, Any]) -> None:
    daemon: DaemonProcess = token_daemon["daemon"]
    daemon.proc.send_signal(signal.SIGHUP)
    finished = daemon.wait_for("reload_finished")
    assert finished["results"]["auth"] == "ok"
    assert daemon.proc.poll() is None


def _eventually(check: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


# -- the default policy: nothing configured -------------------------------------------------


def _lan_address() -> str | None:
    """This host's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_default_policy_allows_management_only_over_loopback(tmp_path: Path) -> None:
    ipc = tmp_path / "edged.sock"
    daemon = DaemonProcess(
        ["--models", str(digits_repo(tmp_path)), "--grpc-address", "0.0.0.0:0"],
        {"EDGED_ZMQ_ADDRESSES": f"tcp://0.0.0.0:0,ipc://{ipc}"},
    )
    try:
        daemon.wait_live()
        daemon.wait_for("server_ready", timeout=60)
        warning = daemon.wait_for("access_default_policy")
        assert "loopback" in warning["detail"]
        port = daemon.address.rpartition(":")[2]
        zport = daemon.zmq_endpoints[0].rpartition(":")[2]
        method = "/inference.GRPCInferenceService/RepositoryModelLoad"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert call_code(channel, method, ()) not in AUTH_CODES
        for local in (f"tcp://127.0.0.1:{zport}", f"ipc://{ipc}"):
            with ZmqClient(local, timeout=20) as client:
                assert _zmq_call(client, "add_samples") == "UNAVAILABLE"  # allowed; learning off
        lan = _lan_address()
        if lan is None:
            pytest.skip("no non-loopback interface to call from")
        with grpc.insecure_channel(f"{lan}:{port}") as channel:
            assert call_code(channel, method, ()) == "PERMISSION_DENIED"
            infer = "/inference.GRPCInferenceService/ModelInfer"
            assert call_code(channel, infer, ()) not in AUTH_CODES
        with ZmqClient(f"tcp://{lan}:{zport}", timeout=20) as client:
            assert _zmq_call(client, "add_samples") == "PERMISSION_DENIED"
            assert _zmq_call(client, "infer") == "OK"
        refused = daemon.wait_for("audit", call=method, outcome="PERMISSION_DENIED")
        assert refused["who"] == "anonymous"
    finally:
        assert daemon.stop() == 0, daemon.stderr


# -- mutual TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a stranger CA, a server certificate and client certificates."""
    folder = tmp_path_factory.mktemp("pki")
    ca = pki.issue("edged test CA", ca=True, not_after_days=60)
    stranger = pki.issue("another CA", ca=True)
    files: dict[str, Any] = {"ca": ca, "folder": folder}
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    (folder / "stranger-ca.pem").write_bytes(stranger.cert_pem)
    files["server"] = pki.issue("gateway-1", ca, server=True).write(folder, "server")
    files["fleet"] = pki.issue("fleet-manager", ca).write(folder, "fleet")
    files["reader"] = pki.issue("dashboard", ca, dns=("dash.example",)).write(folder, "reader")
    files["expired"] = pki.issue("fleet-manager", ca, not_before_days=-10, not_after_days=-1).write(
        folder, "expired"
    )
    files["foreign"] = pki.issue("fleet-manager", stranger).write(folder, "foreign")
    return files


def tls_env(ca_dir: dict[str, Any], **extra: str) -> dict[str, str]:
    cert, key = ca_dir["server"]
    return {
        "EDGED_TLS_CERT_FILE": str(cert),
        "EDGED_TLS_KEY_FILE": str(key),
        "EDGED_TLS_CLIENT_CA_FILE": str(ca_dir["folder"] / "ca.pem"),
        "EDGED_AUTH_IDENTITIES": "fleet-manager=manage+read+infer,dash.example=read",
        "EDGED_AUTH_ANONYMOUS_ROLES": "",
        **extra,
    }


def mtls_channel(ca_dir: dict[str, Any], address: str, who: str | None) -> grpc.Channel:
    ca = (ca_dir["folder"] / "ca.pem").read_bytes()
    if who is None:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
    cert, key = ca_dir[who]
    creds = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    return grpc.secure_channel(address, creds)


@pytest.fixture(scope="module")
def split_daemon(
    tmp_path_factory: pytest.TempPathFactory, ca_dir: dict[str, Any]
) -> Iterator[DaemonProcess]:
    """Plain inference on loopback, management on its own listener with mTLS required."""
    root = tmp_path_factory.mktemp("split")
    daemon = serve(
        digits_repo(root),
        tls_env(
            ca_dir,
            EDGED_SERVER_MANAGEMENT_ADDRESS="127.0.0.1:0",
            EDGED_TLS_LISTENERS="management",
            EDGED_AUTH_ANONYMOUS_ROLES="infer,read",
        ),
    )
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.stderr


LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
STATUS = "/edged.v1.Management/GetUpdateStatus"
START = "/edged.v1.Management/StartUpdate"


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("fleet", {LOAD: "OK", STATUS: "UNAVAILABLE", START: "UNAVAILABLE"}),  # OTA is off
        ("reader", {LOAD: "PERMISSION_DENIED", STATUS: "UNAVAILABLE", START: "PERMISSION_DENIED"}),
    ],
)
def test_management_listener_maps_certificates_to_roles(
    split_daemon: DaemonProcess, ca_dir: dict[str, Any], who: str, expected: dict[str, str]
) -> None:
    live = split_daemon.wait_for("server_live")
    with mtls_channel(ca_dir, live["management_address"], who) as channel:
        assert grpc.channel_ready_future(channel).result(timeout=20) is None
        for method, code in expected.items():
            assert call_code(channel, method, ()) == code, method
    subject = {"fleet": "fleet-manager", "reader": "dashboard"}[who]
    event = split_daemon.wait_for("audit", call=START, who=f"cert:{subject}")
    assert event["outcome"] == expected[START]


@pytest.mark.parametrize("who", ["expired", "foreign", None])
def test_management_listener_refuses_bad_client_certificates(
    split_daemon: DaemonProcess, ca_dir: dict[str, Any], who: str | None
) -> None:
    live = split_daemon.wait_for("server_live")
    with mtls_channel(ca_dir, live["management_address"], who) as channel:
        assert call_code(channel, STATUS, ()) == "UNAVAILABLE"  # the handshake fails
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)


def test_inference_listener_is_plain_and_serves_no_management(
    split_daemon: DaemonProcess,
) -> None:
    with grpcclient.InferenceServerClient(split_daemon.address) as client:
        out = client.infer("digits", [_digits_input()]).as_numpy("label")
        assert out.shape == (1,)
    with grpc.insecure_channel(split_daemon.address) as channel:
        assert call_code(channel, STATUS, ()) == "UNIMPLEMENTED"
        # the inference listener has no client CA: a management call of the KServe API
        # cannot be authenticated there
        assert call_code(channel, LOAD, ()) == "UNAUTHENTICATED"


@pytest.fixture(scope="module")
def https_daemon(
    tmp_path_factory: pytest.TempPathFactory, ca_dir: dict[str, Any]
) -> Iterator[DaemonProcess]:
    """Every listener with mutual TLS, the HTTP one included."""
    daemon = serve(digits_repo(tmp_path_factory.mktemp("https")), tls_env(ca_dir))
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.stderr


def https_status(
    ca_dir: dict[str, Any], address: str, who: str | None, method: str, path: str
) -> int:
    context = ssl.create_default_context(cafile=str(ca_dir["folder"] / "ca.pem"))
    context.check_hostname = False  # the certificate names localhost; the chain is verified
    if who is not None:
        context.load_cert_chain(*ca_dir[who])
    request = urllib.request.Request(
        f"https://{address}{path}", data=b"{}" if method == "POST" else None, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=20, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        ("fleet", "POST", "/v2/repository/models/digits/load", 200),
        ("fleet", "GET", "/v2/models/digits/stats", 200),
        ("reader", "GET", "/v2/models/digits", 200),
        ("reader", "POST", "/v2/repository/models/digits/load", 403),
    ],
)
def test_https_listener_maps_client_certificates_to_roles(
    https_daemon: DaemonProcess,
    ca_dir: dict[str, Any],
    who: str,
    method: str,
    path: str,
    status: int,
) -> None:
    assert https_status(ca_dir, https_daemon.http_address, who, method, path) == status


@pytest.mark.parametrize("who", ["expired", "foreign", None])
def test_https_listener_refuses_bad_client_certificates(
    https_daemon: DaemonProcess, ca_dir: dict[str, Any], who: str | None
) -> None:
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https_status(ca_dir, https_daemon.http_address, who, "GET", "/v2")


def _digits_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(DIGIT)
    return tensor


# -- rotation under load -----------------------------------------------------------------------


def _served_serial(address: str, ca_dir: dict[str, Any]) -> int:
    """The serial number of the certificate a new TLS handshake gets."""
    context = ssl.create_default_context(cafile=str(ca_dir["folder"] / "ca.pem"))
    cert, key = ca_dir["fleet"]
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificate_rotation_under_load_fails_no_request(
    tmp_path: Path, ca_dir: dict[str, Any]
) -> None:
    live_dir = tmp_path / "tls"
    cert, key = pki.issue("gateway-1", ca_dir["ca"], server=True).write(live_dir, "server")
    daemon = serve(
        digits_repo(tmp_path),
        tls_env(ca_dir, EDGED_TLS_CERT_FILE=str(cert), EDGED_TLS_KEY_FILE=str(key)),
    )
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def load(worker: int) -> None:
        ca = (ca_dir["folder"] / "ca.pem").read_bytes()
        ccert, ckey = ca_dir["fleet"]
        creds = grpc.ssl_channel_credentials(ca, ckey.read_bytes(), ccert.read_bytes())
        while not stop.is_set():
            # a new connection (and handshake) every few requests
            with grpc.secure_channel(daemon.address, creds) as channel:
                stub = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=lambda m: m.SerializeToString(),
                )
                for _ in range(5):
                    try:
                        stub(_infer_request(), timeout=30)
                        done[0] += 1
                    except grpc.RpcError as e:
                        failures.append(f"{worker}: {e.code().name}: {e.details()}")

    try:
        first = _served_serial(daemon.address, ca_dir)
        workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        served = {first}
        for round_ in range(3):
            _eventually(lambda r=round_: done[0] > 20 * (r + 1))
            new = pki.issue("gateway-1", ca_dir["ca"], server=True)
            # a renewal as tools do it: new files beside, renamed over the old ones
            staged_cert, staged_key = new.write(live_dir / "staged", "server")
            os.replace(staged_key, key)
            os.replace(staged_cert, cert)
            serial = new.cert.serial_number
            assert _eventually(lambda s=serial: _served_serial(daemon.address, ca_dir) == s)
            served.add(serial)
        _eventually(lambda: done[0] > 100)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
        code = daemon.stop()
    assert failures == []
    assert len(served) == 4
    assert done[0] > 100
    assert len([e for e in daemon.events if e["event"] == "tls_certificate_loaded"]) >= 4
    assert code == 0, daemon.stderr


def _infer_request() -> Any:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(DIGIT.tobytes())
    return request


# -- the client commands' TLS flags ------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_daemon(
    tmp_path_factory: pytest.TempPathFactory, ca_dir: dict[str, Any]
) -> Iterator[DaemonProcess]:
    daemon = serve(digits_repo(tmp_path_factory.mktemp("mtls")), tls_env(ca_dir))
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.stderr


def test_edged_infer_with_ca_cert_key(
    mtls_daemon: DaemonProcess, ca_dir: dict[str, Any], tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", DIGIT)
    cert, key = ca_dir["fleet"]
    ca = str(ca_dir["folder"] / "ca.pem")
    args = ["infer", "digits", "--input", f"input={tmp_path / 'x.npy'}"]
    args += ["--address", mtls_daemon.address, "--timeout", "20"]
    done = run_cli(*args, "--ca", ca, "--cert", str(cert), "--key", str(key))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["label"]["shape"] == [1]
    # the same from the environment
    env = {"EDGED_CLIENT_CA": ca, "EDGED_CLIENT_CERT": str(cert), "EDGED_CLIENT_KEY": str(key)}
    assert run_cli(*args, env=env).returncode == 0
    without = run_cli(*args, "--ca", ca)
    assert without.returncode == 1
    assert "UNAVAILABLE" in without.stderr


def test_edged_fleet_rollout_with_ca_cert_key(
    mtls_daemon: DaemonProcess, ca_dir: dict[str, Any]
) -> None:
    import subprocess
    import sys

    cert, key = ca_dir["fleet"]
    base = [sys.executable, "-m", "edged.fleet", "rollout", "--devices", mtls_daemon.address]
    base += ["--model", "digits", "--version", "2", "--json", "--health-timeout", "20"]
    tls = ["--ca", str(ca_dir["folder"] / "ca.pem"), "--cert", str(cert), "--key", str(key)]
    done = subprocess.run(
        [*base, *tls], capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT
    )
    report = json.loads(done.stdout)
    # through mutual TLS to the management API; it answers that OTA is off
    assert "over-the-air updates are off" in report["devices"][0]["last_error"]
    plain = subprocess.run(
        base, capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT
    )
    assert "UNAVAILABLE" in json.loads(plain.stdout)["devices"][0]["last_error"]
    assert "over-the-air" not in plain.stdout


# -- ZeroMQ CURVE ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curve_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("curve")
    keys, clients = root / "keys", root / "clients"
    clients.mkdir()
    for name in ("server", "app", "other", "late"):
        done = run_cli("zmq-keys", str(keys), name)
        assert done.returncode == 0, done.stderr
    for name in ("app", "other"):
        shutil.copy(keys / f"{name}.key", clients / f"{name}.key")
    app_public, _ = zmq.auth.load_certificate(keys / "app.key")
    ipc = root / "edged.sock"
    daemon = serve(
        digits_repo(root),
        {
            "EDGED_ZMQ_ADDRESSES": f"tcp://127.0.0.1:0,ipc://{ipc}",
            "EDGED_ZMQ_CURVE_SECRET_KEY_FILE": str(keys / "server.key_secret"),
            "EDGED_ZMQ_CURVE_CLIENTS_DIR": str(clients),
            "EDGED_AUTH_IDENTITIES": f"curve:{app_public.decode()}=infer",
            "EDGED_AUTH_ANONYMOUS_ROLES": "read",
        },
    )
    try:
        yield {"daemon": daemon, "keys": keys, "clients": clients}
    finally:
        assert daemon.stop() == 0, daemon.stderr


def _curve_client(setup: dict[str, Any], name: str | None, timeout: float = 20) -> ZmqClient:
    tcp = next(e for e in setup["daemon"].zmq_endpoints if e.startswith("tcp://"))
    keys = setup["keys"]
    curve = CurveKeys.from_files(keys / "server.key", keys / f"{name}.key_secret") if name else None
    return ZmqClient(tcp, timeout=timeout, curve=curve)


def test_curve_client_with_a_mapped_key_infers(curve_setup: dict[str, Any]) -> None:
    with _curve_client(curve_setup, "app") as client:
        assert client.infer("digits", {"input": DIGIT})["label"].shape == (1,)
    event = curve_setup["daemon"].wait_for("access_policy")
    assert event["curve"] is True


def test_async_client_with_curve_keys(curve_setup: dict[str, Any]) -> None:
    import asyncio

    from edged.client import AsyncZmqClient

    keys = curve_setup["keys"]
    tcp = next(e for e in curve_setup["daemon"].zmq_endpoints if e.startswith("tcp://"))
    curve = CurveKeys.from_files(keys / "server.key", keys / "app.key_secret")

    async def run() -> tuple[int, str]:
        async with AsyncZmqClient(tcp, timeout=20, curve=curve) as client:
            outs = await asyncio.gather(
                *(client.infer("digits", {"input": DIGIT}) for _ in range(8))
            )
            try:
                await client.add_samples("digits", {"input": DIGIT}, [1])
            except ZmqClientError as e:
                return len(outs), e.code
            return len(outs), "OK"

    assert asyncio.run(run()) == (8, "PERMISSION_DENIED")  # the key maps to infer only


def test_curve_client_without_a_role_is_denied(curve_setup: dict[str, Any]) -> None:
    with _curve_client(curve_setup, "other") as client:
        assert client.model_metadata("digits")["name"] == "digits"  # anonymous: read
        assert _zmq_call(client, "infer") == "PERMISSION_DENIED"


@pytest.mark.parametrize("name", [None, "late"])
def test_curve_refuses_plain_and_unknown_clients(
    curve_setup: dict[str, Any], name: str | None
) -> None:
    # no CURVE, or a key not in the folder: the handshake fails and nothing is answered
    with (
        _curve_client(curve_setup, name, timeout=3) as client,
        pytest.raises(ZmqClientError, match="DEADLINE_EXCEEDED"),
    ):
        client.is_live()


def test_curve_key_added_to_the_folder_is_accepted(curve_setup: dict[str, Any]) -> None:
    shutil.copy(curve_setup["keys"] / "late.key", curve_setup["clients"] / "late.key")
    curve_setup["daemon"].wait_for("curve_clients_reloaded", clients=3)
    with _curve_client(curve_setup, "late") as client:
        assert client.is_live()


def test_curve_leaves_the_ipc_endpoint_plain(curve_setup: dict[str, Any]) -> None:
    ipc = next(e for e in curve_setup["daemon"].zmq_endpoints if e.startswith("ipc://"))
    with ZmqClient(ipc, timeout=20) as client:
        assert client.is_live()
        assert client.model_metadata("digits")["name"] == "digits"
