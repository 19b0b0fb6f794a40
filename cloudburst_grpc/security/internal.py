"""The private CA between ``cbgrpc serve`` and its executor processes.

With TLS, a ``cbgrpc serve`` that isolates its executors makes a CA of its own
at start: the user's certificates stay on the public port, and the children
and the parent's internal port use certificates from this CA only. Its key
never leaves the parent's memory; the children's certificates and keys are
written into a private directory (0700, files 0600) that :meth:`InternalCa.close`
removes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cloudburst_grpc.security.certs import create_ca, issue, write_issued, write_private
from cloudburst_grpc.security.identity import EXECUTOR, KVS, SCHEDULER, SERVE, role_dns_name
from cloudburst_grpc.security.tls import CertificateSource, TlsMaterial

#: The hosts the internal certificates are valid for: the children and the internal port
#: listen on loopback only.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class StaticSource(CertificateSource):
    """TLS material held in memory, never changing."""

    def __init__(self, material: TlsMaterial, trust_domain: str) -> None:
        """Hold ``material`` of ``trust_domain``."""
        self._material = material
        self.trust_domain = trust_domain

    def current(self) -> TlsMaterial:
        """The material given at construction."""
        return self._material


class InternalCa:
    """An ephemeral CA, the parent's certificate from it and its children's files."""

    def __init__(self, trust_domain: str) -> None:
        """Make the CA, the parent's certificate and the private directory.

        The parent's certificate names role ``serve`` (which may call the
        executors) and the DNS names the children verify when they call the
        parent's KVS, messaging and scheduler.
        """
        self.trust_domain = trust_domain
        self._ca = create_ca(trust_domain)
        hosts = [role_dns_name(r, trust_domain) for r in (KVS, EXECUTOR, SCHEDULER)]
        parent = issue(self._ca, SERVE, [*hosts, *LOOPBACK_HOSTS], trust_domain)
        self.source = StaticSource(
            TlsMaterial(parent.cert_pem, parent.key_pem, self._ca.cert_pem), trust_domain
        )
        """The parent's material: its internal port and its channels to the children."""
        self.directory = Path(tempfile.mkdtemp(prefix="cbgrpc-internal-ca-"))  # mode 0700
        self._ca_file = self.directory / "ca.pem"
        write_private(self._ca_file, self._ca.cert_pem)

    def child_files(self, name: str) -> tuple[Path, Path, Path]:
        """Issue an executor certificate for child ``name``: its (cert, key, CA) files."""
        issued = issue(self._ca, EXECUTOR, LOOPBACK_HOSTS, self.trust_domain)
        cert, key = write_issued(self.directory, name, issued)
        cert.chmod(0o600)
        return cert, key, self._ca_file

    def close(self) -> None:
        """Remove the private directory and every file in it; idempotent."""
        shutil.rmtree(self.directory, ignore_errors=True)
