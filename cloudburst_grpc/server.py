"""Building gRPC servers with the shared interceptors, health and reflection."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloudburst.transport import open_channel, server_options
from cloudburst_grpc import reflection, telemetry
from cloudburst_grpc.interceptors import ErrorMappingInterceptor

if TYPE_CHECKING:
    from cloudburst_grpc.security.tls import CertificateSource

logger = logging.getLogger(__name__)

Stub = TypeVar("Stub")


def insecure_channel(address: str, max_payload_bytes: int) -> grpc.aio.Channel:
    """A channel to another service, traced when tracing is on."""
    return open_channel(address, max_payload_bytes, interceptors=telemetry.client_interceptors())


def peer_channel(
    address: str, max_payload_bytes: int, tls: CertificateSource | None, role: str
) -> grpc.aio.Channel:
    """A channel to a peer service of ``role``: mutual TLS when ``tls`` is given.

    With TLS the peer must prove ``role`` with its certificate, and this
    service shows its own.
    """
    if tls is None:
        return insecure_channel(address, max_payload_bytes)
    return open_channel(
        address,
        max_payload_bytes,
        tls.channel_credentials(),
        tls.peer_name(role),
        telemetry.client_interceptors(),
    )


class PeerChannel(Generic[Stub]):
    """A channel to a peer and its stub, made again once this node's certificate changed.

    gRPC fixes a channel's credentials when it is made, so a channel would show
    its first certificate on every reconnection, even after that one expired.
    :meth:`stub` (called whenever a call or stream starts) makes a new channel
    after the TLS files changed; calls in flight finish on the old one, which
    is closed with this object.
    """

    def __init__(
        self,
        address: str,
        max_payload_bytes: int,
        tls: CertificateSource | None,
        role: str,
        stub_type: Callable[[grpc.aio.Channel], Stub],
    ) -> None:
        """Open the first channel to the peer of ``role`` at ``address``."""
        self._args = (address, max_payload_bytes, tls, role)
        self._tls = tls
        self._stub_type = stub_type
        self._generation = tls.generation if tls is not None else 0
        self.channel = peer_channel(address, max_payload_bytes, tls, role)
        self._stub = stub_type(self.channel)
        self._retired: list[grpc.aio.Channel] = []

    def stub(self) -> Stub:
        """The stub of the current channel (a new one after a certificate change)."""
        if self._tls is not None:
            self._tls.current()  # notices changed files
            if self._tls.generation != self._generation:
                self._generation = self._tls.generation
                self._retired.append(self.channel)
                self.channel = peer_channel(*self._args)
                self._stub = self._stub_type(self.channel)
                logger.info("new channel to %s with the new certificate", self._args[0])
        return self._stub

    async def close(self) -> None:
        """Close the current channel and the retired ones."""
        for channel in [*self._retired, self.channel]:
            await channel.close()
        self._retired.clear()


def create_server(
    max_payload_bytes: int, auth: grpc.aio.ServerInterceptor | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Create an aio server with error mapping and a health service (NOT yet started).

    ``auth``, when given, authorizes every call before the servicer sees it.
    """
    interceptors: list[Any] = [*telemetry.server_interceptors()]
    if auth is not None:
        interceptors.append(auth)
    server = grpc.aio.server(
        # Tracing outermost, so a span also covers authorization and the error mapping.
        interceptors=[*interceptors, ErrorMappingInterceptor()],
        options=[*server_options(max_payload_bytes), ("grpc.so_reuseport", 0)],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve gRPC reflection (v1 and v1alpha, with comments) for the services and health."""
    names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    reflection.enable_reflection(server, names)


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind a port (TLS with ``credentials``) and return the port bound (port 0 picks one).

    Raises:
        OSError: The address cannot be bound, with a message that says which.
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}; is another process using it?") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}; is another process using the port?")
    return bound
