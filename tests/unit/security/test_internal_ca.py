"""The private CA of a `cbgrpc serve` with TLS: what it issues and renews; it writes nothing."""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509

from cloudburst_grpc.config import ConfigError
from cloudburst_grpc.security.internal import (
    LEAF_SECONDS,
    LIFETIME_ENV,
    InternalCa,
    MemorySource,
    decode_material,
    encode_material,
    leaf_seconds,
)
from cloudburst_grpc.security.tls import TlsError, TlsMaterial, check_material


def names(pem: bytes) -> tuple[list[str], set[str], list[ipaddress.IPv4Address]]:
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress) if ip.version == 4]
    return uris, set(san.get_values_for_type(x509.DNSName)), ips  # type: ignore[return-value]


def issuer_of(pem: bytes) -> x509.Name:
    return x509.load_pem_x509_certificate(pem).issuer


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own, where :mod:`tempfile` would write."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_parent_certificate_names_role_serve_and_what_the_children_verify() -> None:
    internal = InternalCa("example.test")
    uris, dns, ips = names(internal.source.current().cert_pem)
    assert uris == ["spiffe://example.test/role/serve"]
    assert {"kvs.example.test", "executor.example.test", "scheduler.example.test"} <= dns
    assert "localhost" in dns
    assert ips == [ipaddress.ip_address("127.0.0.1")]


def test_a_child_gets_an_executor_certificate_of_its_own_in_memory(private_tmp: Path) -> None:
    internal = InternalCa("example.test")
    first, second = internal.child_material(), internal.child_material()
    assert first.key_pem != second.key_pem
    for material in (first, second):
        check_material(material, "child")  # the key fits the certificate
        uris, dns, _ = names(material.cert_pem)
        assert uris == ["spiffe://example.test/role/executor"]
        assert "executor.example.test" in dns
        # It chains to the parent's CA, which the parent also trusts.
        assert material.ca_pem == internal.source.current().ca_pem
        assert (
            issuer_of(material.cert_pem) == x509.load_pem_x509_certificate(material.ca_pem).subject
        )
        assert b"PRIVATE KEY" not in material.ca_pem
    # Nothing of it touched the disk.
    assert list(private_tmp.iterdir()) == []


def test_material_crosses_the_pipe_as_one_line_and_is_checked() -> None:
    material = InternalCa("example.test").child_material()
    line = encode_material(material)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_material(line) == material
    other = InternalCa("example.test").child_material()
    mismatched = encode_material(TlsMaterial(material.cert_pem, other.key_pem, material.ca_pem))
    with pytest.raises(TlsError, match="does not belong"):
        decode_material(mismatched)
    for garbage in (b"not json\n", b'{"cert": "x"}\n', b"[1, 2]\n", b'{"cert": 1}\n'):
        with pytest.raises(TlsError, match="supervising server"):
            decode_material(garbage)


def test_a_memory_source_waits_for_material_and_counts_each_update() -> None:
    source = MemorySource("example.test")
    assert source.generation == 0
    with pytest.raises(TlsError):
        source.current()
    assert not source.wait(0.0)
    material = InternalCa("example.test").child_material()
    threading.Thread(target=source.update, args=(material,)).start()
    assert source.wait(30.0)
    assert source.current() == material and source.generation == 1
    newer = InternalCa("example.test").child_material()
    source.update(newer)
    assert source.current() == newer and source.generation == 2
    assert source.poll(0.0) == 2


def test_certificates_last_the_lifetime_given_and_the_parent_renews_its_own() -> None:
    internal = InternalCa("example.test", lifetime_seconds=600.0)
    assert internal.renew_seconds == 200.0
    first = internal.source.current()
    for material in (first, internal.child_material()):
        cert = x509.load_pem_x509_certificate(material.cert_pem)
        left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(seconds=590) < left <= datetime.timedelta(seconds=600)
    # The CA outlives any process that holds it.
    ca = x509.load_pem_x509_certificate(first.ca_pem)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > datetime.timedelta(days=365 * 99)
    generation = internal.source.generation
    internal.renew()
    renewed = internal.source.current()
    assert internal.source.generation == generation + 1
    assert renewed.key_pem != first.key_pem and renewed.ca_pem == first.ca_pem
    assert names(renewed.cert_pem) == names(first.cert_pem)
    check_material(renewed, "renewed")


def test_only_tests_shorten_the_lifetime_and_only_to_a_positive_one() -> None:
    assert leaf_seconds({}) == LEAF_SECONDS == 24 * 3600
    assert leaf_seconds({LIFETIME_ENV: " 2.5 "}) == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(ConfigError, match=LIFETIME_ENV):
            leaf_seconds({LIFETIME_ENV: bad})
