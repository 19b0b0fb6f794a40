"""The floor: bare grpc.aio services with the hop structure of a cloudburst call.

No protobuf, no codegen: generic method handlers carry raw bytes (identity
serialization), so what is measured is gRPC and asyncio, nothing else. Every
message is an 8-byte call id followed by the payload.

Each server role is its own process (``python -m bench.floor --role ROLE``):

- ``echo``: ``Echo`` (unary, returns the request), ``Put`` (unary, large
  request, 2-byte answer), ``Get`` (unary, small request, answer of the size
  asked for), ``Bidi`` (bidirectional stream, echoes every message).
- ``a`` (first hop): ``HopUnary`` forwards to B with a unary call of its own
  (started at once; A answers its caller without waiting for B), ``HopStream``
  forwards every message it reads onto one long-lived stream to B.
- ``b`` (second hop): ``HopUnary`` delivers to the client with a unary call to
  the client's own server (``Deliver``), ``HopStream`` delivers onto the
  client's long-lived ``Results`` stream.

:class:`EngineFloor` is the one floor that is not a gRPC server: the storage
engine the KVS runs with, called directly from the bench process (no gRPC, no
event loop), for the floor of the KVS's 100 B reads and writes.

So a three-hop call is client -> A -> B -> client: three one-way transfers,
each between two processes, each over a unary call (``hop3_unary``) or over a
message on an already open stream (``hop3_stream``). :class:`FloorClient` is
the client side; it multiplexes concurrent callers over one stream per hop,
as the SDK multiplexes calls over its one ``StreamCalls`` stream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sqlite3
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from bench.procs import pin_from_environment
from cloudburst import malloc
from cloudburst_kvs.storage import SQLITE_FILE_NAME, open_engine

SERVICE = "bench.Floor"
SMALL_PAYLOAD = 100
OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
_ID = struct.Struct(">Q")

# Workload names.
F_UNARY = "unary round trip, 100 B"
F_BIDI = "bidi stream round trip, 100 B"
F_HOP3_STREAM = "3 hops over open streams (client->A->B->client)"
F_HOP3_UNARY = "3 hops over unary calls (client->A->B->client)"
F_HOP4_STREAM = "4 hops over open streams (client->A->A2->B->client)"
F_PUT_LARGE = "unary call, 1 MiB request"
F_GET_LARGE = "unary call, 1 MiB response"
F_ENGINE_READ = "storage engine read, 100 B (in-process)"
F_ENGINE_WRITE = "storage engine write, 100 B (in-process)"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


# -- servers -------------------------------------------------------------------------


class EchoRole:
    def __init__(self) -> None:
        self._payloads: dict[int, bytes] = {}

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    async def put(self, request: bytes, context: Any) -> bytes:
        return b"ok"

    async def get(self, request: bytes, context: Any) -> bytes:
        size = int(request)
        payload = self._payloads.get(size)
        if payload is None:
            payload = self._payloads[size] = os.urandom(size)
        return payload

    async def bidi(self, requests: AsyncIterator[bytes], context: Any) -> None:
        async for message in requests:
            await context.write(message)

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
                "Put": grpc.unary_unary_rpc_method_handler(self.put),
                "Get": grpc.unary_unary_rpc_method_handler(self.get),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


async def _forward(method: Any, message: bytes) -> None:
    await method(message)


class HopA:
    """First hop: forwards to B."""

    def __init__(self, next_address: str) -> None:
        self._channel = grpc.aio.insecure_channel(next_address, options=OPTIONS)
        self._unary = self._channel.unary_unary(_method("HopUnary"))
        self._stream: Any = None
        self._stream_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def hop_unary(self, request: bytes, context: Any) -> bytes:
        task = asyncio.create_task(_forward(self._unary, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return b""

    async def hop_stream(self, requests: AsyncIterator[bytes], context: Any) -> None:
        async with self._stream_lock:
            if self._stream is None:
                self._stream = self._channel.stream_stream(_method("HopStream"))()
        out = self._stream
        async for message in requests:
            await out.write(message)

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "HopUnary": grpc.unary_unary_rpc_method_handler(self.hop_unary),
                "HopStream": grpc.stream_stream_rpc_method_handler(self.hop_stream),
            },
        )


class HopB:
    """Second hop: delivers to the client that subscribed."""

    def __init__(self) -> None:
        self._deliver: Any = None
        self._results: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def subscribe(self, request: bytes, context: Any) -> bytes:
        channel = grpc.aio.insecure_channel(request.decode(), options=OPTIONS)
        self._deliver = channel.unary_unary(_method("Deliver"))
        return b"ok"

    async def hop_unary(self, request: bytes, context: Any) -> bytes:
        task = asyncio.create_task(_forward(self._deliver, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return b""

    async def hop_stream(self, requests: AsyncIterator[bytes], context: Any) -> None:
        async for message in requests:
            self._results.put_nowait(message)

    async def results(self, requests: AsyncIterator[bytes], context: Any) -> None:
        while True:
            await context.write(await self._results.get())

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Subscribe": grpc.unary_unary_rpc_method_handler(self.subscribe),
                "HopUnary": grpc.unary_unary_rpc_method_handler(self.hop_unary),
                "HopStream": grpc.stream_stream_rpc_method_handler(self.hop_stream),
                "Results": grpc.stream_stream_rpc_method_handler(self.results),
            },
        )


async def serve(role: str, next_address: str | None) -> None:
    server = grpc.aio.server(options=OPTIONS)
    if role == "echo":
        handlers = EchoRole().handlers()
    elif role == "a":
        if not next_address:
            raise SystemExit("--next is required for role a")
        handlers = HopA(next_address).handlers()
    else:
        handlers = HopB().handlers()
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"floor {role}: listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    def orphaned() -> None:
        # If the bench dies without stopping us, do not linger.
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, orphaned)

    loop.call_later(1.0, orphaned)
    await stop.wait()
    await server.stop(0)


# -- client --------------------------------------------------------------------------


class FloorClient:
    """The client side of every floor workload; lives on one asyncio loop."""

    def __init__(self, echo: str, hop_a: str, hop_b: str, hop_a4: str | None = None) -> None:
        """``hop_a4``: the first of two A servers in a row before B, for :meth:`hop4_stream`."""
        self._addresses = (echo, hop_a, hop_b)
        self._hop_a4 = hop_a4
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.small = os.urandom(SMALL_PAYLOAD)
        self.large = os.urandom(1024 * 1024)

    async def start(self) -> None:
        echo, hop_a, hop_b = self._addresses
        self._echo_ch = grpc.aio.insecure_channel(echo, options=OPTIONS)
        self._a_ch = grpc.aio.insecure_channel(hop_a, options=OPTIONS)
        self._b_ch = grpc.aio.insecure_channel(hop_b, options=OPTIONS)
        for channel in (self._echo_ch, self._a_ch, self._b_ch):
            await asyncio.wait_for(channel.channel_ready(), 30)
        self._echo = self._echo_ch.unary_unary(_method("Echo"))
        self._put = self._echo_ch.unary_unary(_method("Put"))
        self._get = self._echo_ch.unary_unary(_method("Get"))
        self._hop_unary = self._a_ch.unary_unary(_method("HopUnary"))
        # The client's own server, for B's unary deliveries.
        self._sink = grpc.aio.server(options=OPTIONS)
        self._sink.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"Deliver": grpc.unary_unary_rpc_method_handler(self._deliver)}
                ),
            )
        )
        sink_port = self._sink.add_insecure_port("127.0.0.1:0")
        await self._sink.start()
        await self._b_ch.unary_unary(_method("Subscribe"))(f"127.0.0.1:{sink_port}".encode())
        # Long-lived streams: to the echo server, to A, and B's results back to us.
        self._bidi = self._echo_ch.stream_stream(_method("Bidi"))()
        self._bidi_lock = asyncio.Lock()
        self._hop_stream = self._a_ch.stream_stream(_method("HopStream"))()
        self._hop_lock = asyncio.Lock()
        self._results = self._b_ch.stream_stream(_method("Results"))()
        self._hop4_stream: Any = None
        if self._hop_a4 is not None:
            self._a4_ch = grpc.aio.insecure_channel(self._hop_a4, options=OPTIONS)
            await asyncio.wait_for(self._a4_ch.channel_ready(), 30)
            self._hop4_stream = self._a4_ch.stream_stream(_method("HopStream"))()
            self._hop4_lock = asyncio.Lock()
        self._tasks.append(asyncio.create_task(self._read(self._bidi)))
        self._tasks.append(asyncio.create_task(self._read(self._results)))
        # One of each, so every stream is open before anything is timed.
        await self.bidi_rtt()
        await self.hop3_stream()
        await self.hop3_unary()

    async def _read(self, call: Any) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            self._resolve(message)

    def _resolve(self, message: bytes) -> None:
        (call_id,) = _ID.unpack_from(message)
        future = self._pending.pop(call_id, None)
        if future is not None and not future.done():
            future.set_result(message)

    async def _deliver(self, request: bytes, context: Any) -> bytes:
        self._resolve(request)
        return b""

    def _expect(self) -> tuple[bytes, asyncio.Future[bytes]]:
        call_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        return _ID.pack(call_id) + self.small, future

    # Every operation returns the payload size it got back, for a cheap check.

    async def unary_rtt(self) -> int:
        """One unary call with 100 bytes each way (a bare unary round trip)."""
        return len(await self._echo(self.small))

    async def unary_put_1mb(self) -> int:
        """One unary call carrying 1 MiB, answered with 2 bytes."""
        return len(await self._put(self.large))

    async def unary_get_1mb(self) -> int:
        """One unary call answered with 1 MiB."""
        return len(await self._get(b"1048576"))

    async def bidi_rtt(self) -> int:
        """A message and its echo on one open bidirectional stream."""
        message, future = self._expect()
        async with self._bidi_lock:
            await self._bidi.write(message)
        return len(await future) - _ID.size

    async def hop3_stream(self) -> int:
        """client -> A -> B -> client, one message on an open stream per hop."""
        message, future = self._expect()
        async with self._hop_lock:
            await self._hop_stream.write(message)
        return len(await future) - _ID.size

    async def hop4_stream(self) -> int:
        """client -> A -> A2 -> B -> client: :meth:`hop3_stream` with one more hop."""
        message, future = self._expect()
        async with self._hop4_lock:
            await self._hop4_stream.write(message)
        return len(await future) - _ID.size

    async def hop3_unary(self) -> int:
        """client -> A -> B -> client, one unary call per hop."""
        message, future = self._expect()
        await self._hop_unary(message)
        return len(await future) - _ID.size

    async def close(self) -> None:
        for call in (self._bidi, self._hop_stream, self._hop4_stream):
            if call is not None:
                await call.done_writing()
        self._results.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        four = [self._a4_ch] if self._hop4_stream is not None else []
        for channel in (self._echo_ch, self._a_ch, self._b_ch, *four):
            await channel.close()
        await self._sink.stop(0)


# -- the storage engine -----------------------------------------------------------------


class EngineFloor:
    """The storage engine the KVS runs with, called directly in this process.

    - ``write``: the engine's write of one 100 B row (``StorageEngine.write``
      with one put: for SQLite one transaction, ``synchronous=NORMAL`` as the
      KVS's default; for the memory engine a call that keeps nothing).
    - ``read``: the engine's own point read of that row: for SQLite a
      ``SELECT`` by primary key on a connection of its own to the same
      database file; for the memory engine, which keeps no copy, a lookup in
      a dict (where a memory or SQLite KVS keeps every value).

    For Valkey (``valkey_url``, the cluster the KVS uses) both are one round
    trip from this process to the key's primary: ``SET`` and ``GET`` of 100 B
    through the synchronous cluster client, without the ``WAIT`` for a replica
    that the KVS's durable writes add.
    """

    def __init__(self, storage: str, directory: Path, valkey_url: str | None = None) -> None:
        self.storage = storage
        self.key = "bench/engine/small"
        self.row = (0, self.key, os.urandom(SMALL_PAYLOAD))
        self._rows = {(0, self.key): self.row[2]}
        self._reader: sqlite3.Connection | None = None
        self._valkey: Any = None
        if storage == "valkey":
            from redis.cluster import ClusterNode, RedisCluster

            if not valkey_url:
                raise ValueError("the valkey engine floor needs the URL of a Valkey Cluster")
            seeds = valkey_url.split("://", 1)[1].split(",")
            nodes = [ClusterNode(h, int(p)) for h, _, p in (s.rpartition(":") for s in seeds)]
            self._valkey = RedisCluster(startup_nodes=nodes)
            self.engine: Any = None
            self.write()
            return
        self.engine = open_engine(storage, directory)
        self.engine.write([self.row], [])
        if storage == "sqlite":
            self._reader = sqlite3.connect(directory / SQLITE_FILE_NAME, check_same_thread=False)

    def read(self) -> int:
        """Read the row back; returns its size."""
        if self._valkey is not None:
            return len(self._valkey.get(self.key))
        if self._reader is None:
            return len(self._rows[(0, self.key)])
        row = self._reader.execute(
            "SELECT lattice FROM lattices WHERE keyspace = ? AND key = ?", (0, self.key)
        ).fetchone()
        return len(row[0])

    def write(self) -> int:
        """Write the row (replacing it); returns its size."""
        if self._valkey is not None:
            self._valkey.set(self.key, self.row[2])
        else:
            self.engine.write([self.row], [])
        return len(self.row[2])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._valkey is not None:
            self._valkey.close()
            self._valkey = None
        if self.engine is not None:
            self.engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a floor server for the bench")
    parser.add_argument("--role", choices=["echo", "a", "b"], required=True)
    parser.add_argument("--next", dest="next_address", help="B's address (role a)")
    args = parser.parse_args(argv)
    pin_from_environment()
    malloc.tune()  # as every cbgrpc process and every SDK client does
    asyncio.run(serve(args.role, args.next_address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
