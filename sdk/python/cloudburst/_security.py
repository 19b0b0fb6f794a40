"""How the SDK authenticates: TLS, a bearer token, or a client certificate.

A cluster secured as docs/security.md describes accepts clients that connect
with TLS (trusting the cluster's CA) and present a bearer token, or a client
certificate signed by that CA. Settings not given as arguments come from
the environment (``CLOUDBURST_TLS_CA``, ``CLOUDBURST_TOKEN``,
``CLOUDBURST_TLS_CERT``, ``CLOUDBURST_TLS_KEY``, ``CLOUDBURST_TLS_SERVER_NAME``),
so a program written for an open server runs unchanged against a secured one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from cloudburst.errors import CloudburstError

#: Environment variables and the settings they fill when no argument gives them.
ENVIRONMENT = {
    "ca_file": "CLOUDBURST_TLS_CA",
    "token": "CLOUDBURST_TOKEN",
    "cert_file": "CLOUDBURST_TLS_CERT",
    "key_file": "CLOUDBURST_TLS_KEY",
    "server_name": "CLOUDBURST_TLS_SERVER_NAME",
}


@dataclass(frozen=True)
class ClientSecurity:
    """TLS settings of a connection; all empty means plaintext (a loopback `cbgrpc serve`)."""

    ca_file: str = ""
    """PEM CA bundle to trust; empty: the system's roots."""
    token: str = ""
    """Bearer token sent with every call."""
    cert_file: str = ""
    """PEM client certificate (instead of, or beside, a token)."""
    key_file: str = ""
    """PEM key of cert_file."""
    server_name: str = ""
    """The name to verify the server's certificate against, when not the dialled host."""
    enabled: bool = False
    """Use TLS even when no file or token is given (the system's roots)."""

    @classmethod
    def resolve(
        cls,
        tls: bool | None,
        environ: Mapping[str, str] | None = None,
        **given: str,
    ) -> ClientSecurity:
        """Settings from the arguments given, else from the environment.

        ``tls=False`` turns TLS off whatever the environment says.
        """
        if tls is False:
            return cls()
        environ = os.environ if environ is None else environ
        values = {
            name: given.get(name) or environ.get(var, "") for name, var in ENVIRONMENT.items()
        }
        return cls(**values, enabled=bool(tls))

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return self.enabled or bool(self.ca_file or self.token or self.cert_file)

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials: TLS, plus the token on every call.

        Raises:
            CloudburstError: A file cannot be read, or a certificate lacks its key.
        """
        if bool(self.cert_file) != bool(self.key_file):
            raise CloudburstError("a client certificate needs its key: give both or neither")

        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as exc:
                raise CloudburstError(f"cannot read TLS file {path}: {exc.strerror}") from None

        credentials = grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return credentials

    def options(self) -> list[tuple[str, str]]:
        """Channel options: the server name to verify, when given."""
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def __repr__(self) -> str:
        """Never show the token."""
        token = "<set>" if self.token else ""
        return (
            f"ClientSecurity(ca_file={self.ca_file!r}, token={token!r}, "
            f"cert_file={self.cert_file!r}, key_file={self.key_file!r}, "
            f"server_name={self.server_name!r})"
        )
