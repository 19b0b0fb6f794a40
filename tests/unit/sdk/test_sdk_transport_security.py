"""The SDK's TLS settings: from arguments, else the environment; the token never shown."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cloudburst.errors import CloudburstError
from cloudburst.transport import ClientSecurity


def test_plaintext_unless_something_asks_for_tls() -> None:
    assert not ClientSecurity.resolve(None, environ={}).tls
    assert ClientSecurity.resolve(True, environ={}).tls
    assert ClientSecurity.resolve(None, environ={}).channel_credentials() is None


def test_arguments_win_over_the_environment_and_false_turns_tls_off() -> None:
    environ = {"CLOUDBURST_TOKEN": "from-env", "CLOUDBURST_TLS_CA": "env-ca.pem"}
    security = ClientSecurity.resolve(None, environ=environ, token="given")
    assert (security.token, security.ca_file, security.tls) == ("given", "env-ca.pem", True)
    assert not ClientSecurity.resolve(False, environ=environ).tls


def test_the_token_is_not_in_the_repr() -> None:
    security = ClientSecurity.resolve(None, environ={}, token="cbt_very-secret")
    assert "cbt_very-secret" not in repr(security)
    assert isinstance(security.channel_credentials(), grpc.ChannelCredentials)


def test_unreadable_files_and_a_certificate_without_key_are_explained(tmp_path: Path) -> None:
    missing = ClientSecurity.resolve(None, environ={}, ca_file=str(tmp_path / "none.pem"))
    with pytest.raises(CloudburstError, match="cannot read TLS file"):
        missing.channel_credentials()
    half = ClientSecurity.resolve(None, environ={}, cert_file="client.pem")
    with pytest.raises(CloudburstError, match="needs its key"):
        half.channel_credentials()


def test_a_client_certificates_problems_are_named(tmp_path: Path) -> None:
    import datetime

    from cloudburst import _client_cert
    from cloudburst_grpc.security.certs import create_ca, issue, write_issued

    ca = create_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    write_issued(tmp_path / "good", "client-admin", issue(ca, "admin"))
    write_issued(tmp_path / "foreign", "client-admin", issue(create_ca(), "admin"))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    write_issued(tmp_path / "early", "client-admin", issue(ca, "admin", now=later))
    good, foreign, early = (
        str(tmp_path / name / "client-admin.pem") for name in ("good", "foreign", "early")
    )
    ca_file = str(tmp_path / "ca.pem")
    assert _client_cert.validity_problem(good) is None
    assert _client_cert.issuer_problem(good, ca_file) is None
    assert "is not valid before" in (_client_cert.validity_problem(early) or "")
    problem = _client_cert.issuer_problem(foreign, ca_file) or ""
    assert f"is not signed by the CA in {ca_file}" in problem
    assert "cloudburst CA" in problem  # the issuer it names
    # What cannot be read is no reason to refuse: the server decides.
    assert _client_cert.validity_problem(str(tmp_path / "missing.pem")) is None
    assert _client_cert.refused_in_handshake("ipv4:127.0.0.1:1: Socket closed")
    assert not _client_cert.refused_in_handshake("ipv4:127.0.0.1:1: Connection refused")
