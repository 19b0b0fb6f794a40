"""What `cbgrpc serve` hands its executor processes, and how it names their exits."""

from __future__ import annotations

import dataclasses
import os
import signal

from cloudburst_grpc.config import (
    Config,
    ExecutorConfig,
    SecurityConfig,
    ServerConfig,
    load_config,
)
from cloudburst_grpc.supervisor import PARENT_ENV, child_environment, describe_exit


def test_a_child_gets_the_resolved_settings_and_none_of_the_parents_sources() -> None:
    config = dataclasses.replace(
        Config(),
        server=ServerConfig(port=7700, max_payload_bytes=1234, metrics_port=-1),
        executor=ExecutorConfig(threads=3, inline_max_seconds=0.0, memory_limit_bytes=1 << 30),
    )
    parent = {
        "PATH": "/bin",
        "CBGRPC_CONFIG": "settings.toml",
        "CBGRPC_SERVER_PORT": "7700",
        "CONSUL_HTTP_ADDR": "127.0.0.1:8500",
    }
    env = child_environment(config, parent)
    assert env["PATH"] == "/bin"
    assert "CBGRPC_CONFIG" not in env and "CONSUL_HTTP_ADDR" not in env
    assert "CBGRPC_SERVER_PORT" not in env  # the child binds a port of its own
    assert "CBGRPC_SERVER_METRICS_PORT" not in env  # no metrics asked for
    assert env[PARENT_ENV] == str(os.getpid())
    # What the child reads back is what the parent resolved.
    child = load_config(environ=env)
    assert child.server.max_payload_bytes == 1234
    assert child.executor == config.executor
    assert child.scheduler == config.scheduler
    assert not child.consul.enabled


def test_a_child_never_sees_the_servers_certificate_files_or_tokens() -> None:
    security = SecurityConfig(
        tls_cert="serve.pem", tls_key="serve-key.pem", tls_ca="ca.pem", tokens_file="tokens"
    )
    env = child_environment(dataclasses.replace(Config(), security=security), {})
    assert not {k for k, v in env.items() if v in ("serve.pem", "serve-key.pem", "ca.pem")}
    assert "CBGRPC_SECURITY_TOKENS_FILE" not in env
    assert not load_config(environ=env).security.tls  # its own material comes over stdin


def test_a_child_serves_metrics_when_the_server_does() -> None:
    config = dataclasses.replace(Config(), server=ServerConfig(metrics_port=9100))
    env = child_environment(config, {})
    assert env["CBGRPC_SERVER_METRICS_PORT"] == "0"
    # Unless OpenTelemetry is off, in which case nobody serves metrics.
    env = child_environment(config, {"OTEL_SDK_DISABLED": "true"})
    assert "CBGRPC_SERVER_METRICS_PORT" not in env


def test_exits_are_named_by_code_or_signal() -> None:
    assert describe_exit(9) == "exit code 9"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
