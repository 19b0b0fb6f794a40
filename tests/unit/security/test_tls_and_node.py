"""TLS files reloaded on change; the safe default for binding; security settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudburst_grpc.config import ConfigError, load_config
from cloudburst_grpc.security.certs import create_bundle, create_ca, issue
from cloudburst_grpc.security.node import NodeSecurity, is_loopback
from cloudburst_grpc.security.tls import TlsError, TlsSource


def bundle(tmp_path: Path) -> Path:
    create_bundle(tmp_path, ["127.0.0.1"], ["admin"])
    return tmp_path


def test_new_files_are_picked_up_and_broken_ones_ignored(tmp_path: Path) -> None:
    certs = bundle(tmp_path)
    source = TlsSource(certs / "kvs.pem", certs / "kvs-key.pem", certs / "ca.pem")
    first = source.current()
    assert source.generation == 1
    # A certificate written before its key: the pair does not match, keep the old one.
    replacement = issue(create_ca(), "kvs")
    (certs / "kvs.pem").write_bytes(replacement.cert_pem)
    assert source.current() == first
    (certs / "kvs-key.pem").write_bytes(replacement.key_pem)
    assert source.current().cert_pem == replacement.cert_pem
    assert source.generation == 2


def test_a_key_that_does_not_fit_is_refused_at_start(tmp_path: Path) -> None:
    certs = bundle(tmp_path)
    with pytest.raises(TlsError, match="the key does not belong to the certificate"):
        TlsSource(certs / "kvs.pem", certs / "scheduler-key.pem", certs / "ca.pem")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_wildcard_bind_needs_tls_or_insecure(tmp_path: Path) -> None:
    plain = NodeSecurity.from_config(load_config(environ={}).security)
    plain.check_bind("127.0.0.1")
    with pytest.raises(ConfigError, match="--insecure"):
        plain.check_bind("0.0.0.0")
    insecure = NodeSecurity.from_config(
        load_config(environ={"CBGRPC_SECURITY_INSECURE": "true"}).security
    )
    insecure.check_bind("0.0.0.0")
    assert "insecure" in insecure.insecure_warning
    certs = bundle(tmp_path)
    environ = {
        "CBGRPC_SECURITY_TLS_CERT": str(certs / "kvs.pem"),
        "CBGRPC_SECURITY_TLS_KEY": str(certs / "kvs-key.pem"),
        "CBGRPC_SECURITY_TLS_CA": str(certs / "ca.pem"),
    }
    secured = NodeSecurity.from_config(load_config(environ=environ).security)
    secured.check_bind("0.0.0.0")
    assert secured.insecure_warning == ""
    assert secured.interceptor() is not None
    assert plain.interceptor() is None


def test_security_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="go together"):
        load_config(environ={"CBGRPC_SECURITY_TLS_CERT": "x.pem"})
    with pytest.raises(ConfigError, match="tokens must not travel in clear"):
        load_config(environ={"CBGRPC_SECURITY_TOKENS_FILE": "tokens"})
    with pytest.raises(ConfigError, match="cannot read TLS file"):
        NodeSecurity.from_config(
            load_config(
                environ={
                    "CBGRPC_SECURITY_TLS_CERT": "/nonexistent/c.pem",
                    "CBGRPC_SECURITY_TLS_KEY": "/nonexistent/k.pem",
                    "CBGRPC_SECURITY_TLS_CA": "/nonexistent/ca.pem",
                }
            ).security
        )


def test_the_consul_token_is_not_shown_by_repr() -> None:
    config = load_config(environ={"CONSUL_HTTP_TOKEN": "acl-secret-123"})
    assert config.consul.token == "acl-secret-123"
    assert "acl-secret-123" not in repr(config)


def test_which_ports_demand_client_certificates_and_how_consul_checks_them(
    tmp_path: Path,
) -> None:
    certs = bundle(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    environ = {
        "CBGRPC_SECURITY_TLS_CERT": str(certs / "scheduler.pem"),
        "CBGRPC_SECURITY_TLS_KEY": str(certs / "scheduler-key.pem"),
        "CBGRPC_SECURITY_TLS_CA": str(certs / "ca.pem"),
    }
    certificates_only = NodeSecurity.from_config(load_config(environ=environ).security)
    with_tokens = NodeSecurity.from_config(
        load_config(environ={**environ, "CBGRPC_SECURITY_TOKENS_FILE": str(tokens)}).security
    )
    plain = NodeSecurity.from_config(load_config(environ={}).security)
    assert [with_tokens.check_kind(r) for r in ("scheduler", "serve", "executor", "kvs")] == [
        "grpc-tls",
        "grpc-tls",
        "tcp",
        "tcp",
    ]
    assert certificates_only.check_kind("scheduler") == "tcp"
    assert plain.check_kind("executor") == "grpc"
    assert plain.server_credentials("executor") is None
    assert with_tokens.server_credentials("scheduler") is not None
