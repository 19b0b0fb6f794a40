"""Keepalive: client and server options (cloudburst.transport) agree, so idle streams live.

Clients ping every keepalive interval, also without data; a gRPC server with
default settings ends such a connection ("too_many_pings") after a few pings.
The interval is shortened here so that the idle time covers several pings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cloudburst.transport import channel_options, server_options

KEEPALIVE_MS = 1000
#: Without the server's permission the stream breaks after about four intervals.
IDLE_SECONDS = 6 * KEEPALIVE_MS / 1000
LIMIT = 1024 * 1024


async def _echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def test_an_idle_stream_outlives_many_keepalive_pings() -> None:
    server = grpc.aio.server(options=server_options(LIMIT, keepalive_ms=KEEPALIVE_MS))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(_echo)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=channel_options(LIMIT, keepalive_ms=KEEPALIVE_MS)
    )
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
