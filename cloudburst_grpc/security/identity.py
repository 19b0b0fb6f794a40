"""Identities: who a peer is, from its certificate or its token.

A certificate names its holder in a SPIFFE-style URI SAN:

* ``spiffe://<trust domain>/role/<role>``: certificates from ``cbgrpc certs``;
* ``spiffe://<id>.consul/ns/<ns>/dc/<dc>/svc/<service>``: Consul's service-mesh
  CA, where the service name (``cloudburst-scheduler``, ...) gives the role.

Service roles are what the cluster's processes are; client roles are what
users may do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

#: The trust domain of certificates from ``cbgrpc certs``.
DEFAULT_TRUST_DOMAIN = "cloudburst.local"

SCHEDULER = "scheduler"
EXECUTOR = "executor"
KVS = "kvs"
#: ``cbgrpc serve``: every service in one process.
SERVE = "serve"
ADMIN = "admin"
INVOKER = "invoker"
#: An invoker whose arguments and stored values must not be executable (no pickles).
INVOKER_RESTRICTED = "invoker-restricted"

#: The roles of the cluster's own processes.
SERVICE_ROLES = (SCHEDULER, EXECUTOR, KVS, SERVE)
#: The roles a client (token or certificate) may hold.
CLIENT_ROLES = (ADMIN, INVOKER, INVOKER_RESTRICTED)

#: Consul service names and the role each stands for.
CONSUL_SERVICE_ROLES = {
    "cloudburst-scheduler": SCHEDULER,
    "cloudburst-executor": EXECUTOR,
    "cloudburst-kvs": KVS,
}


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    role: str
    """One of SERVICE_ROLES or CLIENT_ROLES."""
    source: str
    """How it was established: ``certificate`` or ``token``."""
    name: str = ""
    """The URI SAN of a certificate, or the name of a token; never a secret."""


def role_uri(role: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The URI SAN naming ``role``: ``spiffe://<trust_domain>/role/<role>``."""
    return f"spiffe://{trust_domain}/role/{role}"


def role_dns_name(role: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The DNS SAN of a service role's certificate, which peers verify: ``<role>.<domain>``."""
    return f"{role}.{trust_domain}"


def role_from_uri(uri: str, trust_domains: Sequence[str] = (DEFAULT_TRUST_DOMAIN,)) -> str | None:
    """The role a SPIFFE URI names, or None when it names none this cluster knows.

    ``trust_domains`` lists the trust domains of ``cbgrpc certs`` URIs to accept;
    Consul service URIs are accepted from any ``*.consul`` trust domain (the CA
    that signed them was already checked).
    """
    if not uri.startswith("spiffe://"):
        return None
    domain, _, path = uri.removeprefix("spiffe://").partition("/")
    parts = path.split("/")
    if domain in trust_domains and len(parts) == 2 and parts[0] == "role":
        role = parts[1]
        return role if role in SERVICE_ROLES or role in CLIENT_ROLES else None
    if domain.endswith(".consul") and len(parts) >= 2 and parts[-2] == "svc":
        return CONSUL_SERVICE_ROLES.get(parts[-1])
    return None


def uris_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The URI SANs of a TLS peer's certificate, as gRPC reports them."""
    uris = [v.decode() for v in auth_context.get("peer_spiffe_id", ())]
    if not uris:
        uris = [
            v.decode()
            for v in auth_context.get("x509_subject_alternative_name", ())
            if v.startswith(b"spiffe://")
        ]
    return uris
