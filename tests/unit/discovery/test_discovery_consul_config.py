from __future__ import annotations

import pytest

from cloudburst.errors import UnavailableError
from cloudburst_grpc.config import ConfigError, ConsulConfig, load_config
from cloudburst_grpc.discovery.consul import _backoff, _split_address


def test_discovery_is_off_without_an_address() -> None:
    assert not load_config(environ={}).consul.enabled


def test_consul_standard_variables_fill_the_consul_section() -> None:
    config = load_config(
        environ={
            "CONSUL_HTTP_ADDR": "https://consul.internal:8501",
            "CONSUL_HTTP_TOKEN": "secret-token",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_HTTP_SSL_VERIFY": "false",
            "CONSUL_CACERT": "/etc/consul/ca.pem",
            "CONSUL_CLIENT_CERT": "/etc/consul/client.pem",
            "CONSUL_CLIENT_KEY": "/etc/consul/client-key.pem",
            "CONSUL_TLS_SERVER_NAME": "server.dc1.example",
        }
    ).consul
    assert config.enabled
    assert config.address == "https://consul.internal:8501"
    assert config.token == "secret-token"
    assert config.ssl is True and config.verify is False
    assert (config.ca_file, config.cert_file, config.key_file) == (
        "/etc/consul/ca.pem",
        "/etc/consul/client.pem",
        "/etc/consul/client-key.pem",
    )
    assert config.tls_server_name == "server.dc1.example"


def test_cbgrpc_variables_and_flags_override_consul_variables() -> None:
    environ = {"CONSUL_HTTP_ADDR": "a:8500", "CBGRPC_CONSUL_ADDRESS": "b:8500"}
    assert load_config(environ=environ).consul.address == "b:8500"
    flags = {"consul": {"address": "c:8500", "check_interval_seconds": 0.5}}
    config = load_config(overrides=flags, environ=environ).consul
    assert config.address == "c:8500" and config.check_interval_seconds == 0.5


def test_bad_consul_settings_are_refused_with_the_setting_named() -> None:
    with pytest.raises(ConfigError, match=r"consul\.deregister_after_seconds"):
        load_config(environ={"CBGRPC_CONSUL_DEREGISTER_AFTER_SECONDS": "5"})
    with pytest.raises(ConfigError, match=r"consul\.verify"):
        load_config(environ={"CONSUL_HTTP_SSL_VERIFY": "maybe"})


@pytest.mark.parametrize("given", ["CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"])
def test_a_consul_client_certificate_without_its_key_is_refused_at_once(given: str) -> None:
    with pytest.raises(ConfigError, match=r"consul\.cert_file and consul\.key_file"):
        load_config(environ={"CONSUL_HTTP_ADDR": "https://c:8501", given: "/etc/consul/x.pem"})


@pytest.mark.parametrize(
    ("address", "ssl", "expected"),
    [
        ("127.0.0.1:8500", False, ("127.0.0.1", 8500, "http")),
        ("consul.internal", False, ("consul.internal", 8500, "http")),
        ("consul.internal:8501", True, ("consul.internal", 8501, "https")),
        ("https://consul.internal:9501", False, ("consul.internal", 9501, "https")),
        ("http://10.0.0.5:8500", True, ("10.0.0.5", 8500, "http")),
    ],
)
def test_consul_addresses(address: str, ssl: bool, expected: tuple[str, int, str]) -> None:
    assert _split_address(ConsulConfig(address=address, ssl=ssl)) == expected


def test_a_malformed_consul_port_is_reported() -> None:
    with pytest.raises(UnavailableError, match="not host:port"):
        _split_address(ConsulConfig(address="consul:notaport"))


def test_retry_back_off_grows_to_its_ceiling() -> None:
    delays = [_backoff(attempt, 10.0) for attempt in range(12)]
    assert delays[0] < 0.5
    assert all(d <= 10.0 * 1.25 for d in delays)
    assert delays[-1] >= 10.0 * 0.75
