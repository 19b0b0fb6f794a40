"""Layered configuration (cloudburst_grpc.config.load_config); always with an explicit environ."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudburst import transport
from cloudburst.serialization import DEFAULT_MAX_PAYLOAD_BYTES
from cloudburst_grpc import config as cfg
from cloudburst_grpc.config import Config, ConfigError, load_config


def _toml(tmp_path: Path, text: str, name: str = "cbgrpc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_env_or_overrides() -> None:
    config = load_config(environ={})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == transport.DEFAULT_PORT == 7600
    assert config.server.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES
    assert config.kvs.engine == "sqlite"
    assert config.kvs.sync == "normal"
    assert config.executor.count == 2
    assert config.scheduler.pin_replicas == 2


def test_unrelated_environment_variables_are_ignored() -> None:
    config = load_config(environ={"PATH": "/bin", "CBGRPC": "x", "CBGRPC_NOSECTION_KEY": "1"})
    assert config == load_config(environ={})


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        '[server]\nport = 7700\ngrace_seconds = 2\n[kvs]\nengine = "memory"\n'
        "[executor]\nthreads = 3\n[scheduler]\ncall_timeout_seconds = 1.5\n",
    )
    config = load_config(path, environ={})
    assert config.server.port == 7700
    assert config.server.grace_seconds == 2.0
    assert isinstance(config.server.grace_seconds, float)
    assert config.kvs.engine == "memory"
    assert config.executor.threads == 3
    assert config.scheduler.call_timeout_seconds == 1.5
    assert config.server.host == "127.0.0.1"  # untouched fields keep defaults


def test_environment_overrides_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[server]\nport = 7700\nhost = "0.0.0.0"\n[kvs]\nengine = "sqlite"\n')
    config = load_config(
        path, environ={"CBGRPC_SERVER_PORT": "7800", "CBGRPC_KVS_ENGINE": "memory"}
    )
    assert config.server.port == 7800
    assert config.kvs.engine == "memory"
    assert config.server.host == "0.0.0.0"


def test_environment_names_with_underscored_fields() -> None:
    config = load_config(
        environ={
            "CBGRPC_SERVER_MAX_PAYLOAD_BYTES": "1024",
            "CBGRPC_EXECUTOR_MAX_QUEUE": "5",
            "CBGRPC_SCHEDULER_PIN_REPLICAS": "3",
            "CBGRPC_KVS_MAX_WAIT_SECONDS": "0.5",
        }
    )
    assert config.server.max_payload_bytes == 1024
    assert config.executor.max_queue == 5
    assert config.scheduler.pin_replicas == 3
    assert config.kvs.max_wait_seconds == 0.5


def test_overrides_win_over_environment_and_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nport = 7700\n")
    config = load_config(
        path,
        overrides={"server": {"port": 7900}},
        environ={"CBGRPC_SERVER_PORT": "7800"},
    )
    assert config.server.port == 7900


def test_none_overrides_do_not_replace_lower_layers() -> None:
    config = load_config(
        overrides={"server": {"port": None, "host": "::1"}, "kvs": {"engine": None}},
        environ={"CBGRPC_SERVER_PORT": "7800", "CBGRPC_KVS_ENGINE": "memory"},
    )
    assert config.server.port == 7800
    assert config.server.host == "::1"
    assert config.kvs.engine == "memory"


def test_cbgrpc_config_env_points_to_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[executor]\ncount = 4\n")
    config = load_config(environ={"CBGRPC_CONFIG": str(path)})
    assert config.executor.count == 4


def test_explicit_path_wins_over_cbgrpc_config(tmp_path: Path) -> None:
    explicit = _toml(tmp_path, "[executor]\ncount = 4\n", "explicit.toml")
    from_env = _toml(tmp_path, "[executor]\ncount = 9\n", "env.toml")
    config = load_config(explicit, environ={"CBGRPC_CONFIG": str(from_env)})
    assert config.executor.count == 4


def test_cbgrpc_config_to_a_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={"CBGRPC_CONFIG": str(missing)})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"{missing}.*does not exist"):
        load_config(missing, environ={})


def test_bad_toml_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_top_level_value_instead_of_table_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "server = 5\n")
    with pytest.raises(ConfigError, match=r"server must be a table like \[server\]"):
        load_config(path, environ={})


def test_unknown_section_in_file_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[database]\nurl = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[database\]; known: server, kvs"):
        load_config(path, environ={})


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nprot = 7600\n")
    with pytest.raises(ConfigError, match=r"unknown setting server\.prot; known: host, port"):
        load_config(path, environ={})


def test_unknown_key_in_environment_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"environment: unknown setting server\.prot"):
        load_config(environ={"CBGRPC_SERVER_PROT": "1"})


def test_unknown_key_in_overrides_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"command line: unknown setting kvs\.colour"):
        load_config(overrides={"kvs": {"colour": "blue"}}, environ={})


@pytest.mark.parametrize("raw", ["abc", "", "7600.0", "0x10"])
def test_malformed_port_in_environment_is_an_error(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"environment: server\.port: .* is not a valid int"):
        load_config(environ={"CBGRPC_SERVER_PORT": raw})


def test_float_for_int_field_in_toml_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[executor]\ncount = 2.5\n")
    with pytest.raises(ConfigError, match=r"executor\.count: 2\.5 is not a valid int"):
        load_config(path, environ={})


def test_bool_for_int_field_in_toml_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[server]\nport = true\n")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(path, environ={})


def test_malformed_float_in_environment_is_an_error() -> None:
    with pytest.raises(ConfigError, match="grace_seconds: 'soon' is not a valid float"):
        load_config(environ={"CBGRPC_SERVER_GRACE_SECONDS": "soon"})


# No Config field is a bool yet, so the bool rule is checked on the converter itself.
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        (True, True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        (False, False),
    ],
)
def test_bool_conversion_accepts_common_spellings(raw: object, expected: bool) -> None:
    assert cfg._convert(raw, bool, "x.flag") is expected


@pytest.mark.parametrize("raw", ["maybe", "", "2"])
def test_bool_conversion_rejects_other_values(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"x.flag: {raw!r} is not a valid bool"):
        cfg._convert(raw, bool, "x.flag")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CBGRPC_KVS_ENGINE": "redis"}, "kvs.engine must be 'sqlite', 'memory' or 'valkey'"),
        ({"CBGRPC_KVS_ENGINE": "valkey"}, "kvs.engine 'valkey' needs kvs.valkey_url"),
        ({"CBGRPC_KVS_ENGINE_TIMEOUT_SECONDS": "0"}, "engine_timeout_seconds must be positive"),
        ({"CBGRPC_KVS_SYNC": "off"}, "kvs.sync must be 'normal' or 'full'"),
        ({"CBGRPC_SERVER_PORT": "65536"}, "server.port must be between 0 and 65535"),
        ({"CBGRPC_SERVER_PORT": "-1"}, "server.port must be between 0 and 65535"),
        ({"CBGRPC_SERVER_MAX_PAYLOAD_BYTES": "0"}, "max_payload_bytes must be positive"),
        ({"CBGRPC_SERVER_GRACE_SECONDS": "-0.1"}, "grace_seconds must not be negative"),
        ({"CBGRPC_KVS_MAX_WAIT_SECONDS": "0"}, "max_wait_seconds must be positive"),
        ({"CBGRPC_KVS_MAX_CLOCK_SKEW_SECONDS": "0"}, "max_clock_skew_seconds must be positive"),
        ({"CBGRPC_EXECUTOR_COUNT": "0"}, "executor.count must be at least 1"),
        ({"CBGRPC_EXECUTOR_THREADS": "0"}, "executor.threads must be at least 1"),
        ({"CBGRPC_EXECUTOR_MAX_QUEUE": "0"}, "executor.max_queue must be at least 1"),
        ({"CBGRPC_EXECUTOR_INLINE_MAX_SECONDS": "-1"}, "inline_max_seconds must be between 0"),
        ({"CBGRPC_EXECUTOR_INLINE_MAX_SECONDS": "1"}, "inline_max_seconds must be between 0"),
        ({"CBGRPC_SCHEDULER_CALL_TIMEOUT_SECONDS": "0"}, "call_timeout_seconds must be positive"),
        ({"CBGRPC_SCHEDULER_PIN_REPLICAS": "0"}, "pin_replicas must be at least 1"),
    ],
)
def test_invalid_choices_and_ranges_are_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=environ)


def test_invalid_engine_in_toml_is_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[kvs]\nengine = "redis"\n')
    with pytest.raises(ConfigError, match=r"kvs\.engine must be 'sqlite', 'memory' or 'valkey'"):
        load_config(path, environ={})


def test_port_zero_is_allowed() -> None:
    assert load_config(environ={"CBGRPC_SERVER_PORT": "0"}).server.port == 0


def test_path_fields_expand_home(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[kvs]\ndata_dir = "~/cb-data"\n')
    assert load_config(path, environ={}).kvs.data_dir == Path.home() / "cb-data"
    from_env = load_config(environ={"CBGRPC_KVS_DATA_DIR": "~/other"})
    assert from_env.kvs.data_dir == Path.home() / "other"
    assert isinstance(from_env.kvs.data_dir, Path)


def test_path_override_is_converted_to_path(tmp_path: Path) -> None:
    config = load_config(overrides={"kvs": {"data_dir": str(tmp_path)}}, environ={})
    assert config.kvs.data_dir == tmp_path


def test_config_is_frozen() -> None:
    config = load_config(environ={})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_validate_returns_the_same_object() -> None:
    config = Config()
    assert config.validate() is config


def test_result_ttl_comes_from_the_environment_and_must_not_be_negative() -> None:
    assert load_config(environ={}).scheduler.result_ttl_seconds == 600.0
    env = {"CBGRPC_SCHEDULER_RESULT_TTL_SECONDS": "0"}
    assert load_config(environ=env).scheduler.result_ttl_seconds == 0.0
    with pytest.raises(ConfigError, match="result_ttl_seconds must not be negative"):
        load_config(environ={"CBGRPC_SCHEDULER_RESULT_TTL_SECONDS": "-1"})
