"""Consul CA pieces that need no Consul: addresses, CSRs, roots, configuration."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudburst_grpc.config import ConfigError, ConsulConfig, SecurityConfig, load_config
from cloudburst_grpc.security.certs import create_bundle
from cloudburst_grpc.security.consul_ca import (
    ServersAddress,
    _tls_problem,
    default_grpc_address,
    make_csr,
    parse_roots,
    parse_servers_address,
    servers_target,
    service_uri,
)
from cloudburst_grpc.security.identity import role_from_uri
from cloudburst_grpc.security.node import NodeSecurity
from cloudburst_grpc.security.tls import TlsError


@pytest.mark.parametrize(
    ("address", "ssl", "expected"),
    [
        ("127.0.0.1:8500", False, "127.0.0.1:8502"),
        ("consul.internal", False, "consul.internal:8502"),
        ("http://10.0.0.2:8500", False, "10.0.0.2:8502"),
        ("https://consul.internal:8501", False, "https://consul.internal:8503"),
        ("consul.internal:8501", True, "https://consul.internal:8503"),
        ("[::1]:8500", False, "[::1]:8502"),
    ],
)
def test_consuls_grpc_api_defaults_to_the_http_host(address: str, ssl: bool, expected: str) -> None:
    assert default_grpc_address(ConsulConfig(address=address, ssl=ssl)) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("servers", ServersAddress(8502, tls=False)),
        ("servers:9502", ServersAddress(9502, tls=False)),
        ("https://servers", ServersAddress(8503, tls=True)),
        ("https://servers:9503", ServersAddress(9503, tls=True)),
        ("127.0.0.1:8502", None),
        ("https://consul.internal:8503", None),
        ("servers.internal:8502", None),
    ],
)
def test_a_servers_address_names_the_port_and_tls(
    address: str, expected: ServersAddress | None
) -> None:
    assert parse_servers_address(address) == expected


@pytest.mark.parametrize("address", ["servers:", "servers:grpc", "https://servers:70000"])
def test_a_servers_address_with_a_bad_port_is_refused(address: str) -> None:
    with pytest.raises(TlsError, match="after 'servers:' comes the Consul servers' gRPC port"):
        parse_servers_address(address)


@pytest.mark.parametrize(
    ("peers", "expected"),
    [
        (["10.0.1.5:8300"], "ipv4:10.0.1.5:8502"),
        (
            ["10.0.1.5:8300", "10.0.2.7:8300", "10.0.3.9:8300"],
            "ipv4:10.0.1.5:8502,10.0.2.7:8502,10.0.3.9:8502",
        ),
        (["[fd00::1]:8300", "[fd00::2]:8300"], "ipv6:[fd00::1]:8502,[fd00::2]:8502"),
        (["[fd00::1]:8300", "10.0.1.5:8300"], "ipv4:10.0.1.5:8502"),
        (["10.0.1.5:8300", "10.0.1.5:8300", "not-an-ip:8300"], "ipv4:10.0.1.5:8502"),
        (["10.0.1.5"], "ipv4:10.0.1.5:8502"),
    ],
)
def test_the_servers_target_names_every_server_on_the_grpc_port(
    peers: list[str], expected: str
) -> None:
    assert servers_target(peers, 8502) == expected


def test_an_agent_that_knows_no_server_is_explained() -> None:
    with pytest.raises(TlsError, match=r"knows no servers .* has it joined the cluster"):
        servers_target([], 8502)


def test_the_csr_names_the_service_uri_and_every_host_once() -> None:
    uri = service_uri("1234.consul", "dc1", "cloudburst-executor")
    assert uri == "spiffe://1234.consul/ns/default/dc/dc1/svc/cloudburst-executor"
    key_pem, csr_pem = make_csr(
        uri, ["executor.cloudburst.local", "10.0.0.5", "localhost", "10.0.0.5"]
    )
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert csr.public_key() == key.public_key()
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Consul accepts exactly one URI and no e-mail address.
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert names.get_values_for_type(x509.RFC822Name) == []
    assert names.get_values_for_type(x509.DNSName) == ["executor.cloudburst.local", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


def test_the_uri_consul_signs_names_the_role() -> None:
    # The id in the CSR is the one Consul puts in the certificate; callers are known by it.
    for service, role in (
        ("cloudburst-scheduler", "scheduler"),
        ("cloudburst-executor", "executor"),
        ("cloudburst-kvs", "kvs"),
    ):
        uri = service_uri("b4c047af-937a-8cd8-3ad4-4761b1e6931b.consul", "dc1", service)
        assert role_from_uri(uri) == role
    assert role_from_uri(service_uri("x.consul", "dc1", "web")) is None


def test_every_root_and_intermediate_is_trusted() -> None:
    body = {
        "TrustDomain": "1234.consul",
        "ActiveRootID": "b",
        "Roots": [
            {"ID": "a", "RootCert": "ROOT-A", "IntermediateCerts": None},
            {"ID": "b", "RootCert": "ROOT-B\n", "IntermediateCerts": ["INTER-B"]},
        ],
    }
    roots = parse_roots(body)
    assert roots.trust_domain == "1234.consul"
    assert roots.active_id == "b"
    assert roots.ca_pem == b"ROOT-A\nROOT-B\nINTER-B\n"


def test_consul_certificates_need_a_consul_address_and_no_files() -> None:
    with pytest.raises(ConfigError, match=r"tls_source 'consul' needs consul\.address"):
        load_config(overrides={"security": {"tls_source": "consul"}}, environ={})
    with pytest.raises(ConfigError, match="leave out tls_cert, tls_key and tls_ca"):
        load_config(
            overrides={
                "consul": {"address": "127.0.0.1:8500"},
                "security": {
                    "tls_source": "consul",
                    "tls_cert": "a.pem",
                    "tls_key": "a-key.pem",
                    "tls_ca": "ca.pem",
                },
            },
            environ={},
        )
    with pytest.raises(ConfigError, match="tls_source must be 'files' or 'consul'"):
        load_config(overrides={"security": {"tls_source": "vault"}}, environ={})
    config = load_config(
        overrides={"consul": {"address": "127.0.0.1:8500"}, "security": {"tls_source": "consul"}},
        environ={},
    )
    assert config.security.tls
    # Tokens need TLS; Consul's certificates are TLS.
    assert load_config(
        overrides={
            "consul": {"address": "127.0.0.1:8500"},
            "security": {"tls_source": "consul", "tokens_file": "tokens"},
        },
        environ={},
    ).security.tokens_file


def test_a_scheduler_on_consul_certificates_needs_tokens() -> None:
    import asyncio

    from cloudburst_grpc.local import start_scheduler_node

    config = load_config(
        overrides={"consul": {"address": "127.0.0.1:1"}, "security": {"tls_source": "consul"}},
        environ={},
    )
    # Refused before Consul is asked anything (nothing listens at 127.0.0.1:1).
    with pytest.raises(ConfigError, match="needs --tokens-file"):
        asyncio.run(start_scheduler_node(config))


def test_serve_cannot_take_consul_certificates() -> None:
    # cbgrpc serve has no Consul service name; it is refused with a reason.
    with pytest.raises(ConfigError, match="tls_source 'consul' is for the cluster's services"):
        NodeSecurity.from_config(SecurityConfig(tls_source="consul"))


def test_file_certificates_are_unchanged(tmp_path: Path) -> None:
    directory = tmp_path
    create_bundle(directory, hosts=[], clients=[])
    security = NodeSecurity.from_config(
        SecurityConfig(
            tls_cert=str(directory / "kvs.pem"),
            tls_key=str(directory / "kvs-key.pem"),
            tls_ca=str(directory / "ca.pem"),
        )
    )
    assert security.tls is not None
    assert security.tls.peer_name("executor") == "executor.cloudburst.local"


# gRPC's words for failed TLS connections to Consul, as seen against a real agent.
VERIFY_FAILED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8503: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
    "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
WRONG_NAME = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8503: Custom "
    "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed."
)
PLAINTEXT = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8502: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
    "OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)
REFUSED = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:8503: "
    "Unwrap failed (TSI_DATA_CORRUPTED)"
)


@pytest.mark.parametrize(
    ("details", "consul", "problem"),
    [
        (VERIFY_FAILED, ConsulConfig(ca_file="ca.pem"), "not signed by a CA in consul.ca_file"),
        (
            VERIFY_FAILED,
            ConsulConfig(),
            "not signed by a CA in the system's CAs (set consul.ca_file",
        ),
        (WRONG_NAME, ConsulConfig(), "does not name the host dialled"),
        (PLAINTEXT, ConsulConfig(), "does not speak TLS: that is the plaintext gRPC port"),
        (REFUSED, ConsulConfig(), "set consul.cert_file and key_file"),
        (REFUSED, ConsulConfig(cert_file="c.pem", key_file="k.pem"), "trust the CA of consul.cert"),
    ],
)
def test_a_failed_tls_connection_to_consul_says_what_to_check(
    details: str, consul: ConsulConfig, problem: str
) -> None:
    assert problem in (_tls_problem(details, consul) or "")


def test_a_connection_failure_without_tls_words_is_not_a_tls_problem() -> None:
    details = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
    assert _tls_problem(details + "Connection refused", ConsulConfig()) is None
