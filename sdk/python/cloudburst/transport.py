"""What clients and servers agree on to reach each other.

The default port, the Consul service name schedulers register under, the
gRPC channel options (message size limits, keepalive) and how a channel is
secured are defined here once: the SDK uses them to connect, and the runtime
(``cbgrpc``) uses the same values to listen, register and connect its own
services, so the two cannot drift apart.

A secured cluster (docs/security.md) accepts clients that connect with TLS
(trusting the cluster's CA) and present a bearer token, or a client
certificate signed by that CA: :class:`ClientSecurity`. Settings not given as
arguments come from the environment (``CLOUDBURST_TLS_CA``,
``CLOUDBURST_TOKEN``, ``CLOUDBURST_TLS_CERT``, ``CLOUDBURST_TLS_KEY``,
``CLOUDBURST_TLS_SERVER_NAME``), so a program written for an open server runs
unchanged against a secured one. :func:`open_channel` builds every channel,
the SDK's and the runtime's, plaintext or TLS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cloudburst import protocol, tracing
from cloudburst.errors import CloudburstError, InvalidArgumentError

#: The port ``cbgrpc serve`` listens on, and the SDK connects to, by default.
DEFAULT_PORT = 7600

#: The Consul service name schedulers register under (and the SDK discovers).
SCHEDULER_SERVICE = "cloudburst-scheduler"
#: The key of a scheduler's Consul service meta that names its port for clients with
#: certificates (``--client-cert-port``), when it has one beside its token port.
CLIENT_CERT_PORT_META = "client_cert_port"

#: Bytes of protocol overhead allowed on top of the payload limit in one message.
MESSAGE_OVERHEAD_BYTES = 1024 * 1024

#: Milliseconds between keepalive pings on every connection, idle or not.
KEEPALIVE_MS = 1_000

#: Milliseconds a ping may go unanswered before the peer is taken for lost: a hung
#: process (``SIGSTOP``, a stalled VM) keeps its connections open, and this is how a
#: caller waiting on it learns within seconds that it will not answer.
KEEPALIVE_TIMEOUT_MS = 2_000

#: The environment variable that replaces :data:`KEEPALIVE_TIMEOUT_MS` (in seconds) in
#: every process it is set for. A ping's answer queues behind the data its peer sends
#: first, so on a slow link with deep buffers (a home uplink, say) a large transfer can
#: hold it back longer than 2 s; a longer timeout keeps such transfers up, at the cost
#: of noticing hung peers later. Only the pings' interval needs the servers' consent.
PING_TIMEOUT_ENV = "CLOUDBURST_PING_TIMEOUT_SECONDS"

#: Milliseconds a new connection may take to be answered (TCP, TLS and the peer's
#: HTTP/2 settings); the kernel accepts connections for a hung process, which then
#: never answers them.
CONNECT_TIMEOUT_MS = 3_000

#: The longest wait between two attempts to reconnect to a lost peer. gRPC's own
#: default grows to 120 s, so a peer back after a minute's outage would stay
#: unused for up to two more minutes; 5 s bounds that at a small cost in attempts.
MAX_RECONNECT_BACKOFF_MS = 5_000


def channel_options(
    max_payload_bytes: int, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, int]]:
    """Options for channels that carry values up to ``max_payload_bytes``.

    The transport limit sits above the payload limit so that an oversized value
    reaches the service and is refused with a message that names the limit.
    Keepalive pings go every ``keepalive_ms``, also on a connection that is
    idle; a peer that does not answer one within :data:`KEEPALIVE_TIMEOUT_MS`
    is taken for lost, and every call on the connection ends with
    ``UNAVAILABLE``. A live peer answers pings however long its calls run, so
    only dead or hung peers are cut off. Servers built with
    :func:`server_options` accept pings this often.
    """
    limit = max_payload_bytes * 2 + MESSAGE_OVERHEAD_BYTES
    ping_timeout = ping_timeout_ms()
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", ping_timeout),
        # Keepalive pings may share a ping already in flight, which this bounds.
        ("grpc.http2.ping_timeout_ms", ping_timeout),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Also the time allowed to one connection attempt.
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def ping_timeout_ms(environ: Mapping[str, str] | None = None) -> int:
    """Milliseconds a ping may go unanswered: :data:`PING_TIMEOUT_ENV` if set, else the default.

    Raises:
        InvalidArgumentError: The variable is not a positive number of seconds.
    """
    raw = (os.environ if environ is None else environ).get(PING_TIMEOUT_ENV, "").strip()
    if not raw:
        return KEEPALIVE_TIMEOUT_MS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86_400:
        raise InvalidArgumentError(
            f"{PING_TIMEOUT_ENV} must be a positive number of seconds (below a day), not {raw!r}"
        )
    return max(int(seconds * 1000), 1)


def server_options(
    max_payload_bytes: int, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, int]]:
    """Options for servers that talk to channels made with :func:`channel_options`.

    The same limits and keepalive, and the permission for clients to ping that
    often on a connection that carries no data: by default a gRPC server
    allows one such ping every five minutes and ends the connection (GOAWAY
    "too_many_pings") after a few quicker ones, which would break an idle
    stream, and every call waiting on it, within seconds.
    """
    return [
        *channel_options(max_payload_bytes, keepalive_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
    ]


def open_channel(
    target: str,
    max_payload_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
    interceptors: Sequence[Any] | None = None,
    extra_options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel with the agreed options: plaintext, or TLS with ``credentials``.

    ``server_name``, with TLS, is the name the server's certificate must carry
    instead of the dialled host (the runtime's peers check a role this way).
    ``extra_options`` are further gRPC channel options. Every call on the
    channel tells the server which wire protocol this process speaks, in its
    user agent (see :mod:`cloudburst.protocol`).
    """
    options: list[tuple[str, Any]] = [
        *channel_options(max_payload_bytes),
        ("grpc.primary_user_agent", protocol.user_agent()),
        *extra_options,
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


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

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """The credentials of :func:`open_channel`: None for plaintext."""
        return self.credentials() if self.tls else None

    def channel(self, target: str, max_payload_bytes: int) -> grpc.aio.Channel:
        """A client's channel to ``target`` with these settings, traced when tracing is on."""
        return open_channel(
            target,
            max_payload_bytes,
            self.channel_credentials(),
            self.server_name,
            tracing.client_interceptors(),
        )

    def __repr__(self) -> str:
        """Never show the token."""
        token = "<set>" if self.token else ""
        return (
            f"ClientSecurity(ca_file={self.ca_file!r}, token={token!r}, "
            f"cert_file={self.cert_file!r}, key_file={self.key_file!r}, "
            f"server_name={self.server_name!r})"
        )
