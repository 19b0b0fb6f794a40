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
