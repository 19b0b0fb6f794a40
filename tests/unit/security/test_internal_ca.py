"""The private CA of a `cbgrpc serve` with TLS: what it issues and where its files go."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator

import pytest
from cryptography import x509

from cloudburst_grpc.security.internal import InternalCa
from cloudburst_grpc.security.tls import TlsSource


def names(pem: bytes) -> tuple[list[str], set[str], list[ipaddress.IPv4Address]]:
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress) if ip.version == 4]
    return uris, set(san.get_values_for_type(x509.DNSName)), ips  # type: ignore[return-value]


@pytest.fixture
def internal() -> Iterator[InternalCa]:
    ca = InternalCa("example.test")
    try:
        yield ca
    finally:
        ca.close()


def test_the_parent_certificate_names_role_serve_and_what_the_children_verify(
    internal: InternalCa,
) -> None:
    uris, dns, ips = names(internal.source.current().cert_pem)
    assert uris == ["spiffe://example.test/role/serve"]
    assert {"kvs.example.test", "executor.example.test", "scheduler.example.test"} <= dns
    assert "localhost" in dns
    assert ips == [ipaddress.ip_address("127.0.0.1")]


def test_a_child_gets_an_executor_certificate_in_private_files(internal: InternalCa) -> None:
    cert, key, ca = internal.child_files("executor-0")
    assert stat.S_IMODE(internal.directory.stat().st_mode) == 0o700
    for path in (cert, key, ca):
        assert path.parent == internal.directory
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    uris, dns, _ = names(cert.read_bytes())
    assert uris == ["spiffe://example.test/role/executor"]
    assert "executor.example.test" in dns
    # The files belong together (as a child reads them), and chain to the parent's CA.
    source = TlsSource(cert, key, ca, "example.test")
    assert source.current().ca_pem == internal.source.current().ca_pem
    # The CA's key is never written.
    assert {p.name for p in internal.directory.iterdir()} == {
        "ca.pem",
        "executor-0.pem",
        "executor-0-key.pem",
    }


def test_close_removes_every_file(internal: InternalCa) -> None:
    internal.child_files("executor-0")
    internal.child_files("executor-1")
    internal.close()
    assert not internal.directory.exists()
    internal.close()  # idempotent
