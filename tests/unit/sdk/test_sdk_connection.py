"""Address parsing of the SDK connection (cloudburst.connection.parse_address), no sockets."""

from __future__ import annotations

import pytest

from cloudburst.connection import consul_base_url, parse_address
from cloudburst.errors import InvalidArgumentError, UnavailableError
from cloudburst.transport import DEFAULT_PORT


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1 ", "127.0.0.1:7600"),
        ("  localhost\n", "localhost:7600"),
        ("host:1234", "host:1234"),
        (" host:1 ", "host:1"),
        ("host:65535", "host:65535"),
        ("host:007", "host:7"),
        ("[::1]:5", "[::1]:5"),
        ("[::1]", "[::1]:7600"),
        ("::1", "[::1]:7600"),
        ("fe80::1:2", "[fe80::1:2]:7600"),
        ("grpc://host:9", "host:9"),
        ("http://host", "host:7600"),
        ("tcp://[::1]:8", "[::1]:8"),
    ],
)
def test_parse_address(address: str, target: str) -> None:
    assert parse_address(address) == target


def test_default_port_is_the_servers_default() -> None:
    assert DEFAULT_PORT == 7600
    assert parse_address("h") == f"h:{DEFAULT_PORT}"


@pytest.mark.parametrize("address", ["host:abc", "host:0", "host:65536", "host:", "host:-1"])
def test_bad_port_raises_invalid_argument(address: str) -> None:
    with pytest.raises(InvalidArgumentError, match="must be a number from 1 to 65535"):
        parse_address(address)


@pytest.mark.parametrize("address", ["", "   ", "\t\n"])
def test_empty_address_raises_invalid_argument(address: str) -> None:
    with pytest.raises(InvalidArgumentError, match="must be a host or host:port"):
        parse_address(address)


def test_non_string_address_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        parse_address(7600)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["[::1]:abc", "[::1]:0", "[::1]:70000", "[::1]:"])
def test_bad_port_after_bracketed_ipv6_raises_invalid_argument(address: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_address(address)


@pytest.mark.parametrize(
    ("address", "base"),
    [
        ("127.0.0.1:8500", "http://127.0.0.1:8500"),
        ("consul.internal", "http://consul.internal:8500"),
        ("https://consul.internal", "https://consul.internal:8501"),
        ("http://10.0.0.5:18500/", "http://10.0.0.5:18500"),
        ("[::1]", "http://[::1]:8500"),
    ],
)
def test_consul_address_defaults_to_consuls_ports(address: str, base: str) -> None:
    assert consul_base_url(address) == base


@pytest.mark.parametrize("address", ["", "ftp://consul", "consul:notaport", "http://"])
def test_bad_consul_address_names_the_expected_form(address: str) -> None:
    with pytest.raises(UnavailableError, match="host:port"):
        consul_base_url(address)
