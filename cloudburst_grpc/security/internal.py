"""The private CA between ``cbgrpc serve`` and its executor processes.

With TLS, a ``cbgrpc serve`` that isolates its executors makes a CA of its own
at start: the user's certificates stay on the public port, and the children
and the parent's internal port use certificates from this CA only. No key of
it ever touches a disk: the CA's key never leaves the parent's memory, and
each child gets its certificate, key and the CA's certificate over its
standard input (:func:`encode_material`), which nobody else can read and which
a process killed with SIGKILL leaves nothing of.

The CA lives as long as the process that holds it, and is made valid for far
longer. The certificates it issues (the children hold theirs beside user code)
last :data:`LEAF_SECONDS`: the supervisor renews the parent's and sends each
child a new one after a third of that (:meth:`InternalCa.renew`), and new
connections use the new ones. :data:`LIFETIME_ENV` shortens the lifetime, for
tests only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping

from cloudburst_grpc.config import ConfigError
from cloudburst_grpc.security.certs import create_ca, issue
from cloudburst_grpc.security.identity import EXECUTOR, KVS, SCHEDULER, SERVE, role_dns_name
from cloudburst_grpc.security.tls import CertificateSource, TlsError, TlsMaterial, check_material

#: The hosts the internal certificates are valid for: the children and the internal port
#: listen on loopback only.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
#: How long the certificates of the parent and its children last (renewed after a third).
LEAF_SECONDS = 24 * 3600.0
#: The CA's validity: beyond the life of any process, the only place its key exists.
CA_DAYS = 100 * 365
#: For tests only: the certificates' lifetime in seconds instead of :data:`LEAF_SECONDS`.
LIFETIME_ENV = "CBGRPC_TEST_INTERNAL_CERT_SECONDS"


def leaf_seconds(environ: Mapping[str, str]) -> float:
    """The lifetime of the internal certificates: :data:`LEAF_SECONDS` unless a test shortens it.

    Raises:
        ConfigError: :data:`LIFETIME_ENV` is set but not a positive number.
    """
    raw = environ.get(LIFETIME_ENV, "").strip()
    if not raw:
        return LEAF_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"{LIFETIME_ENV} must be a positive number of seconds, not {raw!r}")
    return seconds


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

    def __init__(self, trust_domain: str, lifetime_seconds: float = LEAF_SECONDS) -> None:
        """Make the CA and the parent's certificate.

        The parent's certificate names role ``serve`` (which may call the
        executors) and the DNS names the children verify when they call the
        parent's KVS, messaging and scheduler. Certificates last
        ``lifetime_seconds``.
        """
        self.trust_domain = trust_domain
        self.lifetime_seconds = lifetime_seconds
        self._ca = create_ca(trust_domain, CA_DAYS)
        self.source = MemorySource(trust_domain, self._parent_material())
        """The parent's material: its internal port and its channels to the children."""

    @property
    def renew_seconds(self) -> float:
        """How often certificates are renewed: after a third of their lifetime.

        A renewal that fails thus leaves a certificate time to be renewed at the next.
        """
        return self.lifetime_seconds / 3

    def _issue(self, role: str, hosts: list[str]) -> TlsMaterial:
        days = self.lifetime_seconds / 86400
        issued = issue(self._ca, role, hosts, self.trust_domain, days)
        return TlsMaterial(issued.cert_pem, issued.key_pem, self._ca.cert_pem)

    def _parent_material(self) -> TlsMaterial:
        hosts = [role_dns_name(r, self.trust_domain) for r in (KVS, EXECUTOR, SCHEDULER)]
        return self._issue(SERVE, [*hosts, *LOOPBACK_HOSTS])

    def child_material(self) -> TlsMaterial:
        """A new executor certificate for a child, its key and the CA's certificate."""
        return self._issue(EXECUTOR, list(LOOPBACK_HOSTS))

    def renew(self) -> None:
        """Give the parent a new certificate (its children get theirs from the supervisor)."""
        self.source.update(self._parent_material())
