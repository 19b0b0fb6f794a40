"""Keepalive: client and server options (cloudburst.transport) agree, so idle streams live, and a
peer that stops answering is noticed within seconds.

Clients ping every keepalive interval, also without data; a gRPC server with
default settings ends such a connection ("too_many_pings") after a few pings.
A peer that stops answering (a hung process: ``SIGSTOP``, a stalled VM) keeps
its connections open; only unanswered pings and connection attempts tell the
caller, which then gets UNAVAILABLE rather than waiting out its deadline. A
proxy that stops passing bytes on plays that peer here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from cloudburst.transport import KEEPALIVE_MS, channel_options, server_options
from freezing_proxy import FreezingProxy

#: Without the server's permission the stream breaks after about four intervals.
IDLE_SECONDS = 6 * KEEPALIVE_MS / 1000
LIMIT = 1024 * 1024


async def _echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


def _server(started: asyncio.Event | None = None) -> grpc.aio.Server:
    async def slow(request: bytes, context: object) -> bytes:
        if started is not None:
            started.set()
        await asyncio.sleep(float(request.decode()))  # a call that takes this long to answer
        return request

    server = grpc.aio.server(options=server_options(LIMIT))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Echo": grpc.stream_stream_rpc_method_handler(_echo),
                    "Slow": grpc.unary_unary_rpc_method_handler(slow),
                },
            ),
        )
    )
    return server


async def test_an_idle_stream_outlives_many_keepalive_pings() -> None:
    server = _server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(LIMIT))
    try:
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream("/test.Echo/Echo")()
        await call.write(b"first")
        assert await asyncio.wait_for(call.read(), 10) == b"first"
        # The stream stays open and idle while the client pings; nothing to wait for but time.
        pending_read = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({pending_read}, timeout=IDLE_SECONDS)
        assert not done, f"the idle stream ended: {pending_read.exception() or 'cleanly'}"
        await call.write(b"second")
        assert await asyncio.wait_for(pending_read, 10) == b"second"
        await call.done_writing()
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_peer_that_stops_answering_is_given_up_within_seconds() -> None:
    started = asyncio.Event()
    server = _server(started)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = FreezingProxy(port)
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=channel_options(LIMIT))
    slow: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Echo/Slow")
    try:
        assert await slow(b"0", timeout=30) == b"0"
        in_flight = asyncio.ensure_future(slow(b"60", timeout=30))
        await asyncio.wait_for(started.wait(), 30)
        proxy.freeze()
        # Without keepalive pings (or with a ping timeout as long) the call would end with
        # DEADLINE_EXCEEDED after its 30 s; it ends UNAVAILABLE, the peer given up for lost.
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await in_flight
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value
        # A new connection is accepted but never answered: given up well within the deadline.
        with pytest.raises(grpc.aio.AioRpcError) as unanswered:
            await slow(b"0", timeout=15)
        assert unanswered.value.code() == grpc.StatusCode.UNAVAILABLE, unanswered.value
        proxy.thaw()
        assert await slow(b"0", timeout=30, wait_for_ready=True) == b"0"
    finally:
        await channel.close()
        await proxy.close()
        await server.stop(0)
