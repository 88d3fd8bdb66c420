"""edged.config: defaults, the TOML file, EDGED_ variables and overrides, and every refusal."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from edged.config import Config, build_config, describe, load_config
from edged.core.errors import ConfigError

ALL_KEYS = {
    "server.grpc_address",
    "server.http_address",
    "server.max_request_bytes",
    "server.shutdown_grace_s",
    "server.shared_memory",
    "server.stream_max_in_flight",
    "server.grpc_threads",
    "server.management_address",
    "limits.max_inputs",
    "limits.max_outputs",
    "limits.max_parameters",
    "limits.shm_max_regions",
    "limits.shm_max_regions_per_connection",
    "limits.shm_max_bytes",
    "limits.shm_max_bytes_per_connection",
    "models.repository",
    "models.strict_readiness",
    "models.default_max_batch_size",
    "models.instances",
    "models.threads",
    "models.load_timeout_s",
    "executors.failure_threshold",
    "executors.inference_timeout_s",
    "executors.retry_after_s",
    "zmq.enabled",
    "zmq.addresses",
    "zmq.max_message_bytes",
    "zmq.max_in_flight",
    "zmq.curve_secret_key_file",
    "zmq.curve_clients_dir",
    "tls.cert_file",
    "tls.key_file",
    "tls.client_ca_file",
    "tls.listeners",
    "auth.tokens_file",
    "auth.identities",
    "auth.anonymous_roles",
    "auth.trust_loopback",
    "metrics.enabled",
    "metrics.address",
    "log.level",
    "log.format",
    "log.capture_native_stderr",
    "ota.state_dir",
    "ota.state_roots",
    "ota.repository_url",
    "ota.root",
    "ota.poll_interval_s",
    "ota.health_window_s",
    "ota.health_min_requests",
    "ota.max_error_rate",
    "ota.max_p99_ms",
    "ota.optimize_agreement_slack",
    "ota.optimize_error_slack",
    "ota.min_free_bytes",
    "ota.max_bundle_bytes",
    "ota.max_unpacked_bytes",
    "ota.max_bundle_files",
    "ota.fetch_timeout_s",
    "ota.history_limit",
    "ota.pause_after_state",
    "ota.pause_s",
    "learn.enabled",
    "learn.max_samples",
    "learn.max_store_bytes",
    "learn.max_request_samples",
    "learn.holdout_share",
    "learn.trigger_samples",
    "learn.min_samples",
    "learn.max_old_drop",
    "learn.min_new_gain",
    "learn.epochs",
    "learn.seed",
    "learn.job_timeout_s",
    "learn.job_memory_mb",
    "learn.job_nice",
    "learn.history_limit",
    "federated.enabled",
    "federated.server",
    "federated.models",
    "federated.python",
    "federated.root_certificates",
    "federated.insecure",
    "federated.device_id",
    "federated.token_file",
    "federated.retry_s",
    "federated.session_timeout_s",
}

FILE = """\
[server]
grpc_address = "0.0.0.0:9001"
max_request_bytes = 1024
shutdown_grace_s = 2

[models]
repository = "/srv/models"
strict_readiness = true
default_max_batch_size = 0

[log]
level = "debug"
format = "console"
"""


def _get(config: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "edged.toml"
    path.write_text(FILE)
    return path


# --------------------------------------------------------------------------- values


def test_defaults() -> None:
    config = build_config({}, env={})
    assert config == Config()
    assert config.server.grpc_address == "127.0.0.1:8001"
    assert config.server.max_request_bytes == 64 * 1024 * 1024
    assert config.server.shutdown_grace_s == 10.0
    assert config.server.stream_max_in_flight == 64
    assert config.models.repository == "/var/lib/edged/models"
    assert config.models.strict_readiness is True
    assert config.models.default_max_batch_size == 8
    assert config.models.load_timeout_s == 300.0
    assert config.log.level == "info"
    assert config.log.format == "json"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert load_config(path, env={}) == Config()


def test_file_values(config_file: Path) -> None:
    config = load_config(config_file, env={})
    assert config.server.grpc_address == "0.0.0.0:9001"
    assert config.server.max_request_bytes == 1024
    assert config.server.shutdown_grace_s == 2.0
    assert type(config.server.shutdown_grace_s) is float  # a TOML int for a float key
    assert config.server.stream_max_in_flight == 64  # not in the file: default
    assert config.models.repository == "/srv/models"
    assert config.models.default_max_batch_size == 0
    assert config.log.level == "debug"
    assert config.log.format == "console"


def test_edged_config_names_the_file(config_file: Path) -> None:
    config = load_config(env={"EDGED_CONFIG": str(config_file)})
    assert config.server.grpc_address == "0.0.0.0:9001"


def test_explicit_path_wins_over_edged_config(config_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[log]\nlevel = "error"\n')
    config = load_config(other, env={"EDGED_CONFIG": str(config_file)})
    assert config.log.level == "error"
    assert config.server.grpc_address == "127.0.0.1:8001"


ENV = {
    "EDGED_SERVER_GRPC_ADDRESS": "[::1]:7000",
    "EDGED_SERVER_MAX_REQUEST_BYTES": "2048",
    "EDGED_SERVER_SHUTDOWN_GRACE_S": "0.5",
    "EDGED_MODELS_STRICT_READINESS": "false",
    "EDGED_MODELS_LOAD_TIMEOUT_S": "30",
    "EDGED_LOG_LEVEL": "warning",
}


def test_env_wins_over_file(config_file: Path) -> None:
    config = load_config(config_file, env=ENV)
    assert config.server.grpc_address == "[::1]:7000"
    assert config.server.max_request_bytes == 2048
    assert config.server.shutdown_grace_s == 0.5
    assert config.models.strict_readiness is False
    assert config.models.load_timeout_s == 30.0
    assert config.log.level == "warning"
    # keys the environment does not set keep the file's values
    assert config.models.repository == "/srv/models"
    assert config.log.format == "console"


def test_overrides_win_over_env(config_file: Path) -> None:
    config = load_config(
        config_file,
        env=ENV,
        overrides={
            "server.grpc_address": "127.0.0.1:0",
            "models.repository": "/tmp/models",
            "models.strict_readiness": True,
        },
    )
    assert config.server.grpc_address == "127.0.0.1:0"
    assert config.models.repository == "/tmp/models"
    assert config.models.strict_readiness is True
    assert config.server.max_request_bytes == 2048  # from env, not overridden


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_env_bool_spellings(text: str, expected: bool) -> None:
    config = build_config({}, env={"EDGED_MODELS_STRICT_READINESS": text})
    assert config.models.strict_readiness is expected


@pytest.mark.parametrize(
    ("name", "text", "dotted", "expected"),
    [
        ("EDGED_SERVER_STREAM_MAX_IN_FLIGHT", "3", "server.stream_max_in_flight", 3),
        ("EDGED_MODELS_DEFAULT_MAX_BATCH_SIZE", "0", "models.default_max_batch_size", 0),
        ("EDGED_SERVER_SHUTDOWN_GRACE_S", "0", "server.shutdown_grace_s", 0.0),
        ("EDGED_MODELS_LOAD_TIMEOUT_S", "1e2", "models.load_timeout_s", 100.0),
        ("EDGED_MODELS_REPOSITORY", "/data/m", "models.repository", "/data/m"),
        ("EDGED_LOG_FORMAT", "json", "log.format", "json"),
    ],
)
def test_env_values_from_strings(name: str, text: str, dotted: str, expected: Any) -> None:
    value = _get(build_config({}, env={name: text}), dotted)
    assert value == expected
    assert type(value) is type(expected)


def test_edged_config_is_not_a_key() -> None:
    assert build_config({}, env={"EDGED_CONFIG": "/nowhere.toml"}) == Config()


def test_other_env_vars_are_ignored() -> None:
    assert build_config({}, env={"PATH": "/bin", "EDGEDX": "1", "edged_log_level": "x"}) == Config()


def test_describe_lists_every_key_with_its_env_var() -> None:
    rows = describe()
    assert {row[0] for row in rows} == ALL_KEYS
    assert len(rows) == len(ALL_KEYS)
    defaults = Config()
    for dotted, env_name, default, doc in rows:
        assert env_name == "EDGED_" + dotted.replace(".", "_").upper()
        assert default == _get(defaults, dotted)
        assert doc
        # the variable describe() names is one build_config accepts
        if isinstance(default, bool):
            text = str(default).lower()
        elif isinstance(default, tuple):
            text = ",".join(default)
        else:
            text = str(default)
        assert _get(build_config({}, env={env_name: text}), dotted) == default


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().server.grpc_address = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- refusals


BUILD_ERRORS = [
    pytest.param({"network": {}}, {}, "network", id="unknown-section"),
    pytest.param({"server": 5}, {}, "server", id="section-not-a-table"),
    pytest.param({"server": {"port": 1}}, {}, "server.port", id="unknown-key"),
    pytest.param({}, {"EDGED_SERVER_PORT": "1"}, "EDGED_SERVER_PORT", id="unknown-env-var"),
    pytest.param({}, {"EDGED_LOGS_LEVEL": "info"}, "EDGED_LOGS_LEVEL", id="unknown-env-section"),
    pytest.param(
        {"server": {"max_request_bytes": "10"}}, {}, "server.max_request_bytes", id="string-for-int"
    ),
    pytest.param(
        {"server": {"max_request_bytes": True}}, {}, "server.max_request_bytes", id="bool-for-int"
    ),
    pytest.param(
        {"server": {"max_request_bytes": 1.5}}, {}, "server.max_request_bytes", id="float-for-int"
    ),
    pytest.param(
        {"server": {"shutdown_grace_s": True}}, {}, "server.shutdown_grace_s", id="bool-for-float"
    ),
    pytest.param(
        {"server": {"shutdown_grace_s": "1"}}, {}, "server.shutdown_grace_s", id="string-for-float"
    ),
    pytest.param(
        {"models": {"strict_readiness": 1}}, {}, "models.strict_readiness", id="int-for-bool"
    ),
    pytest.param(
        {"models": {"strict_readiness": "true"}},
        {},
        "models.strict_readiness",
        id="string-for-bool-in-file",
    ),
    pytest.param({"models": {"repository": 5}}, {}, "models.repository", id="int-for-string"),
    pytest.param(
        {},
        {"EDGED_SERVER_MAX_REQUEST_BYTES": "lots"},
        "server.max_request_bytes",
        id="env-not-an-int",
    ),
    pytest.param(
        {},
        {"EDGED_SERVER_MAX_REQUEST_BYTES": "1.5"},
        "server.max_request_bytes",
        id="env-float-for-int",
    ),
    pytest.param(
        {}, {"EDGED_MODELS_LOAD_TIMEOUT_S": "soon"}, "models.load_timeout_s", id="env-not-a-float"
    ),
    pytest.param(
        {},
        {"EDGED_MODELS_STRICT_READINESS": "maybe"},
        "models.strict_readiness",
        id="env-not-a-bool",
    ),
    pytest.param(
        {"server": {"max_request_bytes": -1}},
        {},
        "server.max_request_bytes",
        id="negative-max-request-bytes",
    ),
    pytest.param(
        {"server": {"max_request_bytes": 0}},
        {},
        "server.max_request_bytes",
        id="zero-max-request-bytes",
    ),
    pytest.param(
        {"server": {"stream_max_in_flight": 0}},
        {},
        "server.stream_max_in_flight",
        id="zero-stream-max-in-flight",
    ),
    pytest.param(
        {"server": {"grpc_threads": 0}}, {}, "server.grpc_threads", id="zero-grpc-threads"
    ),
    pytest.param(
        {"server": {"grpc_threads": 5000}}, {}, "server.grpc_threads", id="too-many-grpc-threads"
    ),
    pytest.param(
        {"server": {"shutdown_grace_s": -0.1}}, {}, "server.shutdown_grace_s", id="negative-grace"
    ),
    pytest.param(
        {"models": {"default_max_batch_size": -1}},
        {},
        "models.default_max_batch_size",
        id="negative-default-max-batch-size",
    ),
    pytest.param(
        {"models": {"load_timeout_s": 0}}, {}, "models.load_timeout_s", id="zero-load-timeout"
    ),
    pytest.param(
        {}, {"EDGED_MODELS_LOAD_TIMEOUT_S": "nan"}, "models.load_timeout_s", id="nan-load-timeout"
    ),
    pytest.param(
        {"server": {"grpc_address": "localhost"}},
        {},
        "server.grpc_address",
        id="address-without-port",
    ),
    pytest.param(
        {"server": {"grpc_address": ":8001"}}, {}, "server.grpc_address", id="address-without-host"
    ),
    pytest.param(
        {"server": {"grpc_address": "localhost:"}},
        {},
        "server.grpc_address",
        id="address-empty-port",
    ),
    pytest.param(
        {"server": {"grpc_address": "localhost:70000"}}, {}, "server.grpc_address", id="port-70000"
    ),
    pytest.param(
        {"server": {"grpc_address": "localhost:http"}},
        {},
        "server.grpc_address",
        id="port-not-numeric",
    ),
    pytest.param(
        {}, {"EDGED_SERVER_GRPC_ADDRESS": "host:-1"}, "server.grpc_address", id="env-negative-port"
    ),
    pytest.param(
        {}, {"EDGED_SERVER_HTTP_ADDRESS": "host:port"}, "server.http_address", id="http-address"
    ),
    pytest.param({"log": {"level": "verbose"}}, {}, "log.level", id="log-level-verbose"),
    pytest.param({"log": {"format": "xml"}}, {}, "log.format", id="log-format-xml"),
]


@pytest.mark.parametrize(("data", "env", "key"), BUILD_ERRORS)
def test_build_config_refuses(data: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(data, env=env)
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        pytest.param(
            {"server.max_request_bytes": -5}, "server.max_request_bytes", id="override-out-of-range"
        ),
        pytest.param({"log.level": "loud"}, "log.level", id="override-bad-choice"),
        pytest.param(
            {"server.max_request_bytes": "10"},
            "server.max_request_bytes",
            id="override-string-for-int",
        ),
        pytest.param({"server.nope": 1}, "server.nope", id="override-unknown-key"),
        pytest.param({"nope.key": 1}, "nope", id="override-unknown-section"),
        pytest.param({"repository": "/x"}, "repository", id="override-not-dotted"),
    ],
)
def test_build_config_refuses_overrides(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, env={}, overrides=overrides)
    assert key in str(info.value)


def test_env_beats_file_but_is_still_checked(config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"log\.level"):
        load_config(config_file, env={"EDGED_LOG_LEVEL": "INFO"})


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_missing_file_named_by_edged_config(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(env={"EDGED_CONFIG": str(path)})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"[server\n", id="unclosed-table"),
        pytest.param(b"[server]\ngrpc_address = \n", id="missing-value"),
        pytest.param(b"[log]\nlevel = 'a'\nlevel = 'b'\n", id="duplicate-key"),
        pytest.param(b'[log]\nlevel = "\xff"\n', id="not-utf8"),
    ],
)
def test_invalid_toml(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert str(tmp_path) in str(info.value)


def test_file_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "edged.toml"
    path.write_text('[server]\ngrpc_adress = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r"server\.grpc_adress"):
        load_config(path, env={})


def test_list_keys_from_toml_and_environment() -> None:
    config = build_config({"zmq": {"addresses": ["tcp://127.0.0.1:0", "ipc:///run/e.sock"]}})
    assert config.zmq.addresses == ("tcp://127.0.0.1:0", "ipc:///run/e.sock")
    config = build_config({}, {"EDGED_ZMQ_ADDRESSES": "tcp://127.0.0.1:1, ipc:///tmp/x"})
    assert config.zmq.addresses == ("tcp://127.0.0.1:1", "ipc:///tmp/x")


@pytest.mark.parametrize("value", [["udp://1.2.3.4:5"], [], ["tcp://nohost"], "tcp://a:1", [1]])
def test_bad_zmq_addresses_name_the_key(value) -> None:
    with pytest.raises(ConfigError, match=r"zmq\.addresses"):
        build_config({"zmq": {"addresses": value}})


# --------------------------------------------------------------------------- [ota]


def test_ota_defaults_and_paths() -> None:
    ota = Config().ota
    assert not ota.enabled
    assert ota.poll_interval_s == 0.0
    assert ota.root_path == Path("/var/lib/edged/state/tuf/root.json")
    ota = build_config(
        {"ota": {"repository_url": "http://127.0.0.1:1/repo", "state_dir": "/s"}}, env={}
    ).ota
    assert ota.enabled
    assert ota.root_path == Path("/s/tuf/root.json")
    ota = build_config({}, env={"EDGED_OTA_ROOT": "/etc/edged/root.json"}).ota
    assert ota.root_path == Path("/etc/edged/root.json")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        pytest.param({"repository_url": "ftp://x"}, "ota.repository_url", id="url-scheme"),
        pytest.param({"max_error_rate": 1.5}, "ota.max_error_rate", id="rate-above-1"),
        pytest.param({"max_error_rate": -0.1}, "ota.max_error_rate", id="rate-negative"),
        pytest.param({"health_window_s": -1}, "ota.health_window_s", id="negative-window"),
        pytest.param({"max_bundle_bytes": 0}, "ota.max_bundle_bytes", id="zero-bundle"),
        pytest.param({"pause_after_state": "COMMITTED"}, "ota.pause_after_state", id="rest-state"),
        pytest.param({"pause_after_state": "staged"}, "ota.pause_after_state", id="lower-case"),
    ],
)
def test_ota_refusals(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"ota": data}, env={})
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("data", "env", "overrides", "suggestion"),
    [
        pytest.param({"server": {"grpc_adress": "x"}}, {}, {}, "grpc_address", id="toml-key"),
        pytest.param({"modles": {}}, {}, {}, "models", id="toml-section"),
        pytest.param({}, {"EDGED_LOG_LEVLE": "info"}, {}, "EDGED_LOG_LEVEL", id="env-var"),
        pytest.param({}, {}, {"models.repositry": "x"}, "models.repository", id="override"),
    ],
)
def test_unknown_keys_suggest_the_closest_known_one(
    data: dict[str, Any], env: dict[str, str], overrides: dict[str, Any], suggestion: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"(did you mean '{suggestion}'?)")):
        build_config(data, env, overrides)


def test_unknown_key_far_from_every_known_one_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"server": {"zzzzzzzz": 1}})
    assert "did you mean" not in str(caught.value)
    assert "server.zzzzzzzz" in str(caught.value)


def test_http_address_empty_turns_the_listener_off() -> None:
    assert build_config({}, env={"EDGED_SERVER_HTTP_ADDRESS": ""}).server.http_address == ""
    assert Config().server.http_address == "127.0.0.1:8000"


def test_federation_needs_learning_and_a_trusted_server() -> None:
    with pytest.raises(ConfigError, match=r"'federated.enabled': needs learn.enabled"):
        build_config({"federated": {"enabled": True, "server": "h:1", "insecure": True}})
    with pytest.raises(ConfigError, match=r"'federated.root_certificates': required"):
        build_config({"learn": {"enabled": True}, "federated": {"enabled": True, "server": "h:1"}})
    with pytest.raises(ConfigError, match=r"'federated.server': required"):
        build_config({"learn": {"enabled": True}, "federated": {"enabled": True}})
    config = build_config(
        {"learn": {"enabled": True}},
        env={
            "EDGED_FEDERATED_ENABLED": "true",
            "EDGED_FEDERATED_SERVER": "fleet:9092",
            "EDGED_FEDERATED_ROOT_CERTIFICATES": "/etc/edged/ca.pem",
        },
    )
    assert config.federated.server == "fleet:9092"
