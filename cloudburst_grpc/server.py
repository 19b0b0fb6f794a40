"""Building gRPC servers with the shared interceptors, health and reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cloudburst.transport import open_channel, server_options
from cloudburst_grpc import reflection, telemetry
from cloudburst_grpc.interceptors import ErrorMappingInterceptor, ProtocolInterceptor

if TYPE_CHECKING:
    from cloudburst_grpc.security.tls import CertificateSource

logger = logging.getLogger(__name__)

Stub = TypeVar("Stub")


def insecure_channel(address: str, max_payload_bytes: int) -> grpc.aio.Channel:
    """A channel to another service, traced when tracing is on."""
    return open_channel(address, max_payload_bytes, interceptors=telemetry.client_interceptors())


#: Seconds without calls after which gRPC lets a peer channel's connection go (gRPC's
#: default, stated because a replaced channel is closed once it is that idle).
IDLE_SECONDS = 30 * 60.0

#: Seconds a call that started on a replaced channel as it went idle may take to finish.
CLOSE_GRACE_SECONDS = 60.0


def peer_channel(
    address: str,
    max_payload_bytes: int,
    tls: CertificateSource | None,
    role: str,
    idle_seconds: float = IDLE_SECONDS,
) -> grpc.aio.Channel:
    """A channel to a peer service of ``role``: mutual TLS when ``tls`` is given.

    With TLS the peer must prove ``role`` with its certificate, and this
    service shows its own. The channel goes idle (drops its connection) after
    ``idle_seconds`` without calls.
    """
    idle = [("grpc.client_idle_timeout_ms", round(idle_seconds * 1000))]
    if tls is None:
        return open_channel(
            address,
            max_payload_bytes,
            interceptors=telemetry.client_interceptors(),
            extra_options=idle,
        )
    return open_channel(
        address,
        max_payload_bytes,
        tls.channel_credentials(),
        tls.peer_name(role),
        telemetry.client_interceptors(),
        idle,
    )


class RetiredChannels:
    """Channels replaced by newer ones, each closed once gRPC finds it idle.

    A replaced channel gets no new calls, but the calls and streams already on
    it go on (none is cut). gRPC puts a channel in IDLE once it has had no call
    in progress for its idle timeout (a long stream keeps it from that); then it
    is closed, and forgotten.
    """

    def __init__(self, peer: str) -> None:
        """Retire channels to ``peer`` (an address, for log lines)."""
        self._peer = peer
        self._tasks: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        """How many replaced channels are still open."""
        return len(self._tasks)

    async def closed(self) -> None:
        """Wait until the replaced channels open now have closed."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    def retire(
        self, channel: grpc.aio.Channel, then: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Close ``channel`` once no call has used it for its idle time; then await ``then()``."""

        async def close_when_idle() -> None:
            idle = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.SHUTDOWN)
            while (state := channel.get_state()) not in idle:
                await channel.wait_for_state_change(state)
            # A call made just before the channel was replaced may not have reached gRPC's
            # state yet: it has the grace period to finish (shielded: cancelling the
            # close half-way would leave the channel neither open nor closed).
            await asyncio.shield(channel.close(grace=CLOSE_GRACE_SECONDS))
            logger.debug("closed an idle replaced channel to %s", self._peer)
            if then is not None:
                await then()

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.pop(channel, None)
            if not task.cancelled() and (error := task.exception()) is not None:
                logger.warning("closing a channel to %s failed: %r", self._peer, error)

        task = asyncio.get_running_loop().create_task(close_when_idle())
        self._tasks[channel] = task
        task.add_done_callback(done)

    async def close(self) -> None:
        """Close every replaced channel now (ending the calls on them)."""
        retired = list(self._tasks.items())
        self._tasks.clear()
        for _, task in retired:
            task.cancel()
        await asyncio.gather(*(task for _, task in retired), return_exceptions=True)
        for channel, _ in retired:
            await channel.close()


class PeerChannel(Generic[Stub]):
    """A channel to a peer and its stub, made again once this node's certificate changed.

    gRPC fixes a channel's credentials when it is made, so a channel would show
    its first certificate on every reconnection, even after that one expired.
    :meth:`stub` (called whenever a call or stream starts) makes a new channel
    after the TLS files changed. The old channel gets no new calls; the calls
    and streams on it go on (none is cut), and it closes once gRPC finds it
    idle: ``idle_seconds`` after the last of them ended. Closing this object
    closes every channel at once.
    """

    def __init__(
        self,
        address: str,
        max_payload_bytes: int,
        tls: CertificateSource | None,
        role: str,
        stub_type: Callable[[grpc.aio.Channel], Stub],
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        """Open the first channel to the peer of ``role`` at ``address``."""
        self._args = (address, max_payload_bytes, tls, role, idle_seconds)
        self._tls = tls
        self._stub_type = stub_type
        self._generation = tls.generation if tls is not None else 0
        self.channel = peer_channel(*self._args)
        self._stub = stub_type(self.channel)
        self._retired = RetiredChannels(address)

    @property
    def retired(self) -> int:
        """How many replaced channels are still open."""
        return len(self._retired)

    async def retired_closed(self) -> None:
        """Wait until the replaced channels open now have closed."""
        await self._retired.closed()

    def stub(self) -> Stub:
        """The stub of the current channel (a new one after a certificate change)."""
        if self._tls is not None:
            self._tls.current()  # notices changed files
            if self._tls.generation != self._generation:
                self._generation = self._tls.generation
                self._retired.retire(self.channel)
                self.channel = peer_channel(*self._args)
                self._stub = self._stub_type(self.channel)
                logger.info("new channel to %s with the new certificate", self._args[0])
        return self._stub

    async def close(self) -> None:
        """Close the current channel and the replaced ones (ending the calls on them)."""
        await self._retired.close()
        await self.channel.close()


def create_server(
    max_payload_bytes: int,
    auth: grpc.aio.ServerInterceptor | None = None,
    role: str = "server",
    protocol_version: int | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Create an aio server with error mapping and a health service (NOT yet started).

    ``auth``, when given, authorizes every call before the servicer sees it.
    Callers that speak another wire protocol than ``protocol_version`` (this
    process's, by default) are refused first, in the name of ``role``.
    """
    interceptors: list[Any] = [
        *telemetry.server_interceptors(),
        ProtocolInterceptor(role, protocol_version),
    ]
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
