"""Which role a SPIFFE URI names."""

from __future__ import annotations

import pytest

from cloudburst_grpc.security.identity import role_from_uri, role_uri, uris_from_auth_context


@pytest.mark.parametrize(
    ("uri", "role"),
    [
        ("spiffe://cloudburst.local/role/scheduler", "scheduler"),
        ("spiffe://cloudburst.local/role/invoker-restricted", "invoker-restricted"),
        ("spiffe://cloudburst.local/role/root", None),
        ("spiffe://elsewhere.local/role/admin", None),
        ("spiffe://11111111.consul/ns/default/dc/dc1/svc/cloudburst-executor", "executor"),
        ("spiffe://11111111.consul/ns/default/dc/dc1/svc/web", None),
        ("https://cloudburst.local/role/admin", None),
    ],
)
def test_role_from_uri(uri: str, role: str | None) -> None:
    assert role_from_uri(uri) == role


def test_another_trust_domain_when_configured() -> None:
    uri = role_uri("kvs", "prod.example")
    assert role_from_uri(uri, ("prod.example",)) == "kvs"


def test_uris_from_auth_context_prefers_the_spiffe_id() -> None:
    context = {
        "peer_spiffe_id": [b"spiffe://cloudburst.local/role/kvs"],
        "x509_subject_alternative_name": [b"kvs.cloudburst.local"],
    }
    assert uris_from_auth_context(context) == ["spiffe://cloudburst.local/role/kvs"]
    sans = {"x509_subject_alternative_name": [b"x.local", b"spiffe://cloudburst.local/role/kvs"]}
    assert uris_from_auth_context(sans) == ["spiffe://cloudburst.local/role/kvs"]
    assert uris_from_auth_context({}) == []
