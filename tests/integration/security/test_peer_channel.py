"""Channels to a peer made again after a certificate change: the old ones close once unused.

A real mutual-TLS server on 127.0.0.1 (the health service, whose Watch is a
stream that stays open) and a PeerChannel whose certificate is renewed in memory
and whose channels go idle after a second without calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudburst_grpc.security.certs import Issued, create_ca, issue
from cloudburst_grpc.security.internal import MemorySource
from cloudburst_grpc.security.tls import TlsMaterial
from cloudburst_grpc.server import PeerChannel, create_server

DEADLINE = 30.0
#: The idle time after which a replaced channel closes (gRPC's minimum is one second).
IDLE_SECONDS = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Peer = PeerChannel[health_pb2_grpc.HealthStub]


class Server:
    """A TLS server of role ``executor`` that asks callers for a certificate."""

    def __init__(self, ca: Issued) -> None:
        self.ca = ca
        # The runtime's server: keepalive permissions that agree with peer channels.
        self.server, self.health = create_server(1024 * 1024)
        own = issue(ca, "executor", ["127.0.0.1"])
        credentials = grpc.ssl_server_credentials(
            [(own.key_pem, own.cert_pem)], root_certificates=ca.cert_pem, require_client_auth=True
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        assert self.port

    def material(self) -> TlsMaterial:
        """A new certificate for a caller of role ``scheduler``."""
        leaf = issue(self.ca, "scheduler")
        return TlsMaterial(leaf.cert_pem, leaf.key_pem, self.ca.cert_pem)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    started = Server(create_ca())
    await started.server.start()
    try:
        yield started
    finally:
        await started.server.stop(None)


class Renewed:
    """A PeerChannel to the server and a way to renew its certificate."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.source = MemorySource("cloudburst.local", server.material())
        self.peer: Peer = PeerChannel(
            f"127.0.0.1:{server.port}",
            1024 * 1024,
            self.source,
            "executor",
            health_pb2_grpc.HealthStub,
            idle_seconds=IDLE_SECONDS,
        )

    def renew(self) -> None:
        """Give the caller a new certificate (the next call makes a new channel)."""
        self.source.update(self.server.material())

    async def check(self) -> int:
        """The server's health, asked on the current channel (one real round trip)."""
        answer = await self.peer.stub().Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
        return int(answer.status)


@pytest.fixture
async def renewed(server: Server) -> AsyncIterator[Renewed]:
    made = Renewed(server)
    try:
        yield made
    finally:
        await made.peer.close()


async def reached(channel: grpc.aio.Channel, wanted: grpc.ChannelConnectivity) -> None:
    """Wait until ``channel`` is in state ``wanted`` (within the deadline)."""
    async with asyncio.timeout(DEADLINE):
        while (state := channel.get_state()) != wanted:
            await channel.wait_for_state_change(state)


async def retired_closed(peer: Peer) -> None:
    """Wait until the peer's replaced channels have closed (within the deadline)."""
    async with asyncio.timeout(DEADLINE):
        await peer.retired_closed()


async def test_replaced_channels_close_once_idle(renewed: Renewed) -> None:
    assert await renewed.check() == SERVING
    replaced = []
    for _ in range(3):
        replaced.append(renewed.peer.channel)
        renewed.renew()
        assert await renewed.check() == SERVING  # on a new channel, with the new certificate
        assert renewed.peer.channel is not replaced[-1]
    await retired_closed(renewed.peer)
    for old in replaced:
        assert old.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert renewed.peer.retired == 0  # nothing piles up
    assert await renewed.check() == SERVING
    assert renewed.peer.channel.get_state() == grpc.ChannelConnectivity.READY


async def test_a_replaced_channel_stays_open_while_its_stream_lasts(
    server: Server, renewed: Renewed
) -> None:
    first = renewed.peer.channel
    watch = renewed.peer.stub().Watch(health_pb2.HealthCheckRequest())
    assert (await asyncio.wait_for(watch.read(), DEADLINE)).status == SERVING
    renewed.renew()
    assert await renewed.check() == SERVING
    second = renewed.peer.channel
    assert second is not first
    # The new channel, unused since, goes idle; the replaced one still carries the stream.
    await reached(second, grpc.ChannelConnectivity.IDLE)
    assert first.get_state() == grpc.ChannelConnectivity.READY
    assert renewed.peer.retired == 1
    # The stream goes on: it still gets the server's news.
    await server.health.set("", NOT_SERVING)
    assert (await asyncio.wait_for(watch.read(), DEADLINE)).status == NOT_SERVING
    assert await renewed.check() == NOT_SERVING
    # Once the stream has ended, the replaced channel goes idle and closes.
    watch.cancel()
    await retired_closed(renewed.peer)
    assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert renewed.peer.retired == 0
    assert await renewed.check() == NOT_SERVING


async def test_closing_ends_the_streams_on_replaced_channels(renewed: Renewed) -> None:
    first = renewed.peer.channel
    watch = renewed.peer.stub().Watch(health_pb2.HealthCheckRequest())
    assert (await asyncio.wait_for(watch.read(), DEADLINE)).status == SERVING
    renewed.renew()
    assert await renewed.check() == SERVING
    assert renewed.peer.retired == 1
    await renewed.peer.close()
    assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert renewed.peer.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    assert renewed.peer.retired == 0
    assert await asyncio.wait_for(watch.code(), DEADLINE) == grpc.StatusCode.CANCELLED
