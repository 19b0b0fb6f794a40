"""The private CA between ``cbgrpc serve`` and its executor processes.

With TLS, a ``cbgrpc serve`` that isolates its executors makes a CA of its own
at start: the user's certificates stay on the public port, and the children
and the parent's internal port use certificates from this CA only. No key of
it ever touches a disk: the CA's key never leaves the parent's memory, and
each child gets its certificate, key and the CA's certificate over its
standard input (:func:`encode_material`), which nobody else can read and which
a process killed with SIGKILL leaves nothing of.
"""

from __future__ import annotations

import json
import threading

from cloudburst_grpc.security.certs import create_ca, issue
from cloudburst_grpc.security.identity import EXECUTOR, KVS, SCHEDULER, SERVE, role_dns_name
from cloudburst_grpc.security.tls import CertificateSource, TlsError, TlsMaterial, check_material

#: The hosts the internal certificates are valid for: the children and the internal port
#: listen on loopback only.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def encode_material(material: TlsMaterial) -> bytes:
    """``material`` as one line (JSON of the three PEM blobs), as a child reads it."""
    fields = {
        "cert": material.cert_pem.decode("ascii"),
        "key": material.key_pem.decode("ascii"),
        "ca": material.ca_pem.decode("ascii"),
    }
    return json.dumps(fields).encode("ascii") + b"\n"


def decode_material(line: bytes) -> TlsMaterial:
    """The material of a line made by :func:`encode_material`.

    Raises:
        TlsError: The line is not such material, or its parts do not belong together.
    """
    try:
        fields = json.loads(line)
        material = TlsMaterial(
            fields["cert"].encode("ascii"),
            fields["key"].encode("ascii"),
            fields["ca"].encode("ascii"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TlsError(f"malformed TLS material from the supervising server: {exc!r}") from None
    check_material(material, "TLS material from the supervising server")
    return material


class MemorySource(CertificateSource):
    """TLS material held in memory, replaced by :meth:`update` (from any thread)."""

    def __init__(self, trust_domain: str, material: TlsMaterial | None = None) -> None:
        """Hold ``material`` of ``trust_domain``; without it, wait for :meth:`update`."""
        self.trust_domain = trust_domain
        self._material = material
        self._changed = threading.Condition()
        self.generation = 0 if material is None else 1

    def current(self) -> TlsMaterial:
        """The newest material.

        Raises:
            TlsError: None was given yet.
        """
        material = self._material
        if material is None:
            raise TlsError("no TLS material yet")
        return material

    def update(self, material: TlsMaterial) -> None:
        """Use ``material`` from now on (new connections and channels made after this)."""
        with self._changed:
            self._material = material
            self.generation += 1
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until there is material; whether there is."""
        with self._changed:
            return self._changed.wait_for(lambda: self._material is not None, timeout)


class InternalCa:
    """An ephemeral CA in memory, the parent's certificate from it, its children's."""

    def __init__(self, trust_domain: str) -> None:
        """Make the CA and the parent's certificate.

        The parent's certificate names role ``serve`` (which may call the
        executors) and the DNS names the children verify when they call the
        parent's KVS, messaging and scheduler.
        """
        self.trust_domain = trust_domain
        self._ca = create_ca(trust_domain)
        hosts = [role_dns_name(r, trust_domain) for r in (KVS, EXECUTOR, SCHEDULER)]
        parent = issue(self._ca, SERVE, [*hosts, *LOOPBACK_HOSTS], trust_domain)
        self.source = MemorySource(
            trust_domain, TlsMaterial(parent.cert_pem, parent.key_pem, self._ca.cert_pem)
        )
        """The parent's material: its internal port and its channels to the children."""

    def child_material(self) -> TlsMaterial:
        """A new executor certificate for a child, its key and the CA's certificate."""
        issued = issue(self._ca, EXECUTOR, LOOPBACK_HOSTS, self.trust_domain)
        return TlsMaterial(issued.cert_pem, issued.key_pem, self._ca.cert_pem)
