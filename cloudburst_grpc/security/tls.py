"""TLS material, and its source of files reloaded when the files change.

A :class:`CertificateSource` holds a certificate chain, its key and the CA
bundle that peers' certificates must chain to. Servers built from it take new
material for new connections without a restart (gRPC's dynamic server
credentials ask before every handshake); channels built after a change use
the new material. :class:`TlsSource` reads the material from files;
:class:`~cloudburst_grpc.security.consul_ca.ConsulCaSource` from Consul's
service-mesh CA.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudburst_grpc.security.identity import DEFAULT_TRUST_DOMAIN, role_dns_name

logger = logging.getLogger(__name__)

#: Seconds between checks of the files for changes (0: a stat at every use, which is cheap).
RELOAD_CHECK_SECONDS = 0.0


class TlsError(ValueError):
    """TLS files are missing, unreadable or do not belong together."""


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent set of PEM blobs."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def check_material(material: TlsMaterial, what: str) -> None:
    """Raise TlsError unless the certificate, key and CA parse and the key fits the certificate."""
    try:
        certs = x509.load_pem_x509_certificates(material.cert_pem)
        key = serialization.load_pem_private_key(material.key_pem, password=None)
        x509.load_pem_x509_certificates(material.ca_pem)
    except ValueError as exc:
        raise TlsError(f"{what}: not a PEM certificate, key or CA bundle: {exc}") from None
    if certs[0].public_key() != key.public_key():
        raise TlsError(f"{what}: the key does not belong to the certificate")


class CertificateSource:
    """Where a service's TLS material comes from; :meth:`current` is always consistent.

    Subclasses keep :attr:`generation` increasing whenever :meth:`current`
    returns new material.
    """

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    generation: int = 1
    _next_poll: float = 0.0

    def current(self) -> TlsMaterial:
        """The newest consistent material."""
        raise NotImplementedError

    def poll(self, interval: float = 1.0) -> int:
        """The generation, after looking for new material at most once per ``interval`` seconds.

        For hot paths that must notice a change but should not stat files on
        every call.
        """
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + interval
            self.current()
        return self.generation

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        """Server credentials that pick up new material for new connections."""
        served = [self.generation]

        def configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            self.current()  # notices changed files
            # The generation before the material: material changed in between is newer, never
            # older, than the generation recorded (sources update the material first).
            generation = self.generation
            if generation == served[0]:
                return None
            served[0] = generation
            return configuration(self.current())

        return grpc.dynamic_ssl_server_credentials(
            configuration(self.current()),
            fetch,  # type: ignore[arg-type]  # None means "keep", as gRPC documents
            require_client_authentication=require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a channel to a peer: this service's certificate, the CA to trust."""
        material = self.current()
        return grpc.ssl_channel_credentials(material.ca_pem, material.key_pem, material.cert_pem)

    def peer_name(self, role: str) -> str:
        """The name a peer of ``role`` must prove, verified instead of the address dialled.

        Service certificates carry ``<role>.<trust domain>`` as a DNS name.
        """
        return role_dns_name(role, self.trust_domain)


class TlsSource(CertificateSource):
    """Certificate, key and CA read from files and re-read when they change.

    A change that leaves the files inconsistent (a certificate written but not
    yet its key) is logged and ignored until the files agree again.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        ca_file: Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        check_seconds: float = RELOAD_CHECK_SECONDS,
    ) -> None:
        """Read the files once.

        Raises:
            TlsError: A file is missing or the three do not belong together.
        """
        self.files = (Path(cert_file), Path(key_file), Path(ca_file))
        self.trust_domain = trust_domain
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._next_poll = 0.0
        self._stamp = self._stat()
        self._material = self._read()
        self.generation = 1
        """Increases whenever new material is loaded."""

    def _stat(self) -> tuple[tuple[int, int], ...]:
        try:
            return tuple((s.st_mtime_ns, s.st_size) for s in (p.stat() for p in self.files))
        except OSError as exc:
            raise TlsError(f"cannot read TLS file: {exc}") from None

    def _read(self) -> TlsMaterial:
        try:
            cert, key, ca = (p.read_bytes() for p in self.files)
        except OSError as exc:
            raise TlsError(f"cannot read TLS file: {exc}") from None
        material = TlsMaterial(cert, key, ca)
        check_material(material, f"TLS files {', '.join(map(str, self.files))}")
        return material

    def current(self) -> TlsMaterial:
        """The newest consistent material (re-read whenever they changed)."""
        now = time.monotonic()
        if now < self._next_check:
            return self._material
        with self._lock:
            if now < self._next_check:
                return self._material
            self._next_check = now + self._check_seconds
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._material = self._read()
                    self._stamp = stamp
                    self.generation += 1
                    logger.info("loaded new TLS certificate from %s", self.files[0])
            except TlsError as exc:
                logger.warning("keeping the current TLS certificate: %s", exc)
            return self._material
