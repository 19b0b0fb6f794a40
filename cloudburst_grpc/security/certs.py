"""A development certificate authority: ``cbgrpc certs``.

It writes a CA, one certificate per service role and client certificates, so
that a cluster can run with mutual TLS without other tools. Every certificate
names its role in a SPIFFE-style URI SAN
(``spiffe://cloudburst.local/role/scheduler``), which the services check on
each connection; service certificates also carry a DNS name per role
(``scheduler.cloudburst.local``) that peers verify, and the hosts given for
clients that connect by address. Private keys are written readable by their
owner only (0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudburst_grpc.security.identity import (
    CLIENT_ROLES,
    DEFAULT_TRUST_DOMAIN,
    SERVICE_ROLES,
    role_dns_name,
    role_uri,
)

#: How long development certificates stay valid unless told otherwise.
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in PEM."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_ca(
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: int = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
) -> Issued:
    """A self-signed CA for ``trust_domain``."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cloudburst CA {trust_domain}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    role: str,
    hosts: Sequence[str] = (),
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: float = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
) -> Issued:
    """A leaf certificate for ``role`` signed by ``ca``.

    Args:
        ca: The issuing CA.
        role: A service role (``scheduler``, ``executor``, ``kvs``, ``serve``) or a
            client role (``admin``, ``invoker``, ``invoker-restricted``).
        hosts: Host names and IP addresses the certificate is valid for (services).
        trust_domain: The SPIFFE trust domain of the URI SAN.
        days: Validity in days (fractions allowed); negative days give an expired
            certificate (for tests).
        now: The issue time (default: now).

    Raises:
        ValueError: The role is unknown.
    """
    if role not in SERVICE_ROLES and role not in CLIENT_ROLES:
        known = ", ".join([*SERVICE_ROLES, *CLIENT_ROLES])
        raise ValueError(f"unknown role {role!r}; known: {known}")
    now = now or datetime.datetime.now(datetime.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role_uri(role, trust_domain))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role in SERVICE_ROLES:
        names.append(x509.DNSName(role_dns_name(role, trust_domain)))
        names.extend(_host_names(hosts))
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    start = now - datetime.timedelta(minutes=5)
    end = now + datetime.timedelta(days=days)
    if days < 0:
        start = end - datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by the owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_issued(directory: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    """Write ``<name>.pem`` and ``<name>-key.pem`` (0600) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(issued.cert_pem)
    write_private(key_path, issued.key_pem)
    return cert_path, key_path


def create_bundle(
    directory: Path,
    hosts: Sequence[str],
    clients: Sequence[str] = ("admin", "invoker"),
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: int = DEFAULT_DAYS,
) -> list[Path]:
    """Create (or reuse) a CA in ``directory`` and issue every service role and ``clients``.

    An existing ``ca.pem``/``ca-key.pem`` is reused, so more certificates can be
    issued later by the same CA. Returns the files written.
    """
    ca_cert = directory / "ca.pem"
    ca_key = directory / "ca-key.pem"
    written: list[Path] = []
    if ca_cert.exists() and ca_key.exists():
        ca = Issued(ca_cert.read_bytes(), ca_key.read_bytes())
    else:
        ca = create_ca(trust_domain, days)
        written.extend(write_issued(directory, "ca", ca))
    for role in SERVICE_ROLES:
        written.extend(write_issued(directory, role, issue(ca, role, hosts, trust_domain, days)))
    for role in clients:
        if role not in CLIENT_ROLES:
            raise ValueError(f"unknown client role {role!r}; known: {', '.join(CLIENT_ROLES)}")
        written.extend(
            write_issued(directory, f"client-{role}", issue(ca, role, (), trust_domain, days))
        )
    return written
