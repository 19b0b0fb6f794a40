"""The Consul client's TLS and token settings (no Consul needed: nothing is sent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudburst_grpc.config import ConfigError, ConsulConfig
from cloudburst_grpc.discovery.consul import ConsulClient
from cloudburst_grpc.security.certs import create_ca, write_issued


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as files."""
    return write_issued(directory, "client", create_ca())


async def test_the_client_uses_the_token_and_tls_settings(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    client = ConsulClient(
        ConsulConfig(
            address="https://consul.internal:8501",
            token="secret-token",
            ca_file=str(cert),
            cert_file=str(cert),
            key_file=str(key),
        )
    )
    try:
        assert client.where == "https://consul.internal:8501"
        assert client._consul.token == "secret-token"
        assert client._consul.http.verify == str(cert)
        assert client._consul.http.cert == (str(cert), str(key))
    finally:
        await client.close()


async def test_missing_tls_files_are_a_configuration_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="cannot use the Consul TLS files"):
        ConsulClient(ConsulConfig(address="https://c:8501", cert_file=missing, key_file=missing))
