"""What clients and servers agree on to reach each other.

The default port, the Consul service name schedulers register under, and the
gRPC channel options (message size limits, keepalive) are defined here once:
the SDK uses them to connect, and the runtime (``cbgrpc``) uses the same values
to listen, register and connect its own services, so the two cannot drift
apart.
"""

from __future__ import annotations

#: The port ``cbgrpc serve`` listens on, and the SDK connects to, by default.
DEFAULT_PORT = 7600

#: The Consul service name schedulers register under (and the SDK discovers).
SCHEDULER_SERVICE = "cloudburst-scheduler"

#: Bytes of protocol overhead allowed on top of the payload limit in one message.
MESSAGE_OVERHEAD_BYTES = 1024 * 1024

#: Milliseconds between keepalive pings on every connection, idle or not.
KEEPALIVE_MS = 30_000

#: Milliseconds a keepalive ping may go unanswered before the peer is taken for lost.
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(
    max_payload_bytes: int, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, int]]:
    """Options for channels that carry values up to ``max_payload_bytes``.

    The transport limit sits above the payload limit so that an oversized value
    reaches the service and is refused with a message that names the limit.
    Keepalive pings go every ``keepalive_ms``, also on a connection that is
    idle, so a lost peer is noticed within seconds even by a caller that only
    waits; servers built with :func:`server_options` accept them.
    """
    limit = max_payload_bytes * 2 + MESSAGE_OVERHEAD_BYTES
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(
    max_payload_bytes: int, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, int]]:
    """Options for servers that talk to channels made with :func:`channel_options`.

    The same limits and keepalive, and the permission for clients to ping that
    often on a connection that carries no data: by default a gRPC server
    allows one such ping every five minutes and ends the connection (GOAWAY
    "too_many_pings") after a few quicker ones, which would break an idle
    stream, and every call waiting on it, after about two minutes.
    """
    return [
        *channel_options(max_payload_bytes, keepalive_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
    ]
