"""A KVS server for tests: interceptors that count what it receives and sends, a store that holds.

:class:`KvsServer` runs a real KVS servicer on 127.0.0.1 over a :class:`HeldStore`,
behind the interceptors a test gives; :class:`CountedKvs` is one whose calls and
StreamOps frames are counted. The ``start_kvs_server`` fixture (tests/conftest.py)
stops each one a test starts. :class:`Writes` records the writes and deletes a KVS
receives and may lose their answers; :class:`SharedStoreKvs` is a KVS over a store
that other servers serve too.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

import grpc

from cloudburst.v1 import kvs_service_pb2, lattice_pb2
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.security.authz import Authenticator, AuthInterceptor, Denied
from cloudburst_grpc.security.identity import INVOKER, Identity
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs.local import add_kvs_to_server
from cloudburst_kvs.servicer import KvsServicer
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore
from harness import LoopThread

KVS = "/cloudburst.v1.KvsService/"
USER = lattice_pb2.KEYSPACE_USER
#: The unary calls of one key's op, which a StreamOps stream carries as frames instead.
UNARY = ("GetValue", "PutValue", "DeleteValue")
#: A test KVS's largest message (its max_payload_bytes, GetLimits.max_message_bytes): a larger
#: value is refused in one message, so a client that knows the limit sends it in chunks; under
#: the 64 KiB a stream takes.
LIMIT = 16 << 10


class MessageCounter(grpc.aio.ServerInterceptor):
    """Counts the messages of StreamOps streams as they travel, and the frames they carry."""

    def __init__(self) -> None:
        self.read = 0
        """Messages read from callers."""
        self.ops = 0
        """Frames those messages carried (a batch counts each of its frames)."""
        self.written = 0
        """Messages written to callers."""
        self.answers = 0
        """Answers those messages carried."""
        self.streams: list[list[tuple[str, int]]] = []
        """Per stream opened, its frames: the op and, for a write, its value's bytes."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != KVS + "StreamOps":
            return handler
        behavior = handler.stream_stream

        async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            frames: list[tuple[str, int]] = []
            self.streams.append(frames)
            async for message in requests:
                self.read += 1
                self.ops += len(message.batch) or 1
                for frame in message.batch or (message,):
                    op = frame.WhichOneof("op")
                    value = frame.put.lattice.lww.value.data if op == "put" else b""
                    frames.append((op, len(value)))
                yield message

        def written(message: Any) -> None:
            self.written += 1
            self.answers += len(message.batch) or 1

        if inspect.isasyncgenfunction(behavior):  # the servicer yields its answers

            async def answered(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for message in behavior(counted(requests), context):
                    written(message)
                    yield message

            wrapped: Any = answered
        else:  # the servicer writes its answers

            async def writes(requests: Any, context: Any) -> Any:
                return await behavior(counted(requests), CountingContext(context, written))

            wrapped = writes
        return grpc.stream_stream_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class CountingContext:
    """A servicer context whose writes are counted."""

    def __init__(self, context: Any, written: Callable[[Any], None]) -> None:
        self._context = context
        self._written = written

    async def write(self, message: Any) -> None:
        self._written(message)
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class Recorder(grpc.aio.ServerInterceptor):
    """Records the method of every call the server receives."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        self.methods.append(handler_call_details.method)
        return await continuation(handler_call_details)

    def calls(self, name: str) -> int:
        return self.methods.count(KVS + name)


class Chain(grpc.aio.ServerInterceptor):
    """Runs several interceptors in order (create_server takes one besides its own)."""

    def __init__(self, *interceptors: grpc.aio.ServerInterceptor) -> None:
        self.interceptors = interceptors

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        for interceptor in reversed(self.interceptors):
            continuation = _bound(interceptor, continuation)
        return await continuation(handler_call_details)


def _bound(
    interceptor: grpc.aio.ServerInterceptor,
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
) -> Callable[[grpc.HandlerCallDetails], Awaitable[Any]]:
    async def next_step(details: grpc.HandlerCallDetails) -> Any:
        return await interceptor.intercept_service(continuation, details)

    return next_step


class HeldStore(LatticeStore):
    """An in-memory store whose merges into one key wait until the test lets them go.

    A merge into ``held_key`` sets ``holding`` (a thread's event, for the test) and
    then waits until ``release`` is set (on the store's loop).
    """

    def __init__(self, held_key: str = "held", max_lattice_bytes: int | None = None) -> None:
        super().__init__(MemoryEngine(), max_lattice_bytes=max_lattice_bytes)
        self.held_key = held_key
        self.release = asyncio.Event()
        self.holding = threading.Event()

    async def put(
        self, keyspace: int, key: str, lattice: lattice_pb2.Lattice, **kwargs: Any
    ) -> lattice_pb2.Lattice:
        if key == self.held_key:
            self.holding.set()
            await self.release.wait()
        return await super().put(keyspace, key, lattice, **kwargs)


class Gate(Authenticator):
    """Lets every caller in with ``role``, until ``refusing`` (a revoked credential)."""

    def __init__(self, role: str = INVOKER) -> None:
        super().__init__(None)
        self.role = role
        self.refusing = False

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        if self.refusing:
            raise Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate was revoked: ask for a new one",
                "certificate",
            )
        return Identity(self.role, "token", "test")


class KvsServer:
    """A KVS server on 127.0.0.1, run on ``loop``, behind ``interceptors`` (the first outermost).

    Its store (in memory) holds writes into ``held_key`` until released or stopped;
    ``wait_limit`` is its max_wait_seconds (None: the default). :meth:`start` binds a
    free port, and the same port again after :meth:`stop`.
    """

    def __init__(
        self,
        loop: LoopThread,
        *interceptors: grpc.aio.ServerInterceptor,
        limit: int = LIMIT,
        held_key: str = "held",
        wait_limit: float | None = None,
        max_lattice_bytes: int | None = None,
    ) -> None:
        self.loop = loop
        self.interceptors = interceptors
        self.limit = limit
        self.held_key = held_key
        self.max_lattice_bytes = max_lattice_bytes
        self.config = KvsConfig(engine="memory")
        if wait_limit is not None:
            self.config = KvsConfig(engine="memory", max_wait_seconds=wait_limit)
        self.store = HeldStore(held_key, max_lattice_bytes)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.loop.run(self._start())
        return self

    async def _start(self) -> None:
        await self.store.start()
        try:
            server, _health = create_server(self.limit, Chain(*self.interceptors))
            add_kvs_to_server(server, self.store, self.config, self.limit)
            self.port = bind(server, "127.0.0.1", self.port)
            await server.start()
        except BaseException:
            await self.store.close()
            raise
        self.server = server

    def stop(self) -> None:
        """Stop the server at once (ops in flight end with it), then its store; again: nothing."""
        self.loop.run(self._stop())

    async def _stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        await server.stop(0)
        self.store.release.set()
        await self.store.close()
        self.store = HeldStore(self.held_key, self.max_lattice_bytes)  # for a start again


class CountedKvs(KvsServer):
    """A test KVS whose calls (``recorder``) and StreamOps messages (``counter``) are counted.

    With ``role``, a :class:`Gate` (``gate``) lets callers in with that role (last,
    after the counting); the other options are :class:`KvsServer`'s.
    """

    def __init__(self, loop: LoopThread, role: str | None = None, **options: Any) -> None:
        self.recorder = Recorder()
        self.counter = MessageCounter()
        self.gate = None if role is None else Gate(role)
        interceptors: list[grpc.aio.ServerInterceptor] = [self.counter, self.recorder]
        if self.gate is not None:
            interceptors.append(AuthInterceptor(self.gate))
        super().__init__(loop, *interceptors, **options)

    def unary_calls(self) -> int:
        """The unary calls of single ops the server received (:data:`UNARY`)."""
        return sum(self.recorder.calls(name) for name in UNARY)


#: What a KVS received of one write or delete: the method, and the request (for
#: PutValueChunks its first frame's put, without the value's bytes).
Received = tuple[str, Any]


class Writes(grpc.aio.ServerInterceptor):
    """Records the writes and deletes of user keys a KVS receives.

    With ``lose_answers``, each is applied (by the KVS's servicer) and then answered
    ``UNAVAILABLE``, as by a KVS whose answer was lost: over an op stream, the
    stream ends so. ``between`` runs after a delete is applied, before its answer.
    """

    def __init__(self, lose_answers: bool = False) -> None:
        self.lose_answers = lose_answers
        self.received: list[Received] = []
        self.servicer: KvsServicer | None = None
        self.between: Callable[[str], Awaitable[None]] | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method.removeprefix(KVS)
        if handler is None:
            return handler
        if method in ("PutValue", "DeleteValue"):
            return self._unary(method, handler)
        if method == "PutValueChunks":
            return self._chunks(handler)
        if method == "StreamOps":
            return self._stream(handler) if self.lose_answers else self._recorded_stream(handler)
        return handler

    async def _applied(self, method: str, request: Any, context: Any) -> None:
        """Record the op; when answers are lost, run ``between`` and answer UNAVAILABLE."""
        if request.keyspace != USER:
            return
        self.received.append((method, request))
        if not self.lose_answers:
            return
        if isinstance(request, kvs_service_pb2.DeleteValueRequest) and self.between is not None:
            await self.between(request.key)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the answer was lost")

    def _unary(self, method: str, handler: Any) -> Any:
        behavior = handler.unary_unary

        async def recorded(request: Any, context: Any) -> Any:
            response = await behavior(request, context)
            await self._applied(method, request, context)
            return response

        return grpc.unary_unary_rpc_method_handler(
            recorded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _chunks(self, handler: Any) -> Any:
        behavior = handler.stream_unary

        async def recorded(requests: AsyncIterator[Any], context: Any) -> Any:
            first: list[Any] = []

            async def frames() -> AsyncIterator[Any]:
                async for frame in requests:
                    if frame.WhichOneof("frame") == "put":
                        first.append(frame.put)
                    yield frame

            response = await behavior(frames(), context)
            await self._applied("PutValueChunks", first[0], context)
            return response

        return grpc.stream_unary_rpc_method_handler(
            recorded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _recorded_stream(self, handler: Any) -> Any:
        """A stream served as it is, its writes and deletes recorded as they are read."""
        behavior = handler.stream_stream

        async def frames(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for message in requests:
                for frame in message.batch or (message,):
                    op = frame.WhichOneof("op")
                    request = getattr(frame, op) if op in ("put", "delete") else None
                    if request is not None and request.keyspace == USER:
                        self.received.append((f"StreamOps/{op}", request))
                yield message

        if inspect.isasyncgenfunction(behavior):  # the servicer yields its answers

            async def answered(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async for message in behavior(frames(requests), context):
                    yield message

            recorded: Any = answered
        else:  # the servicer writes its answers

            async def writes(requests: AsyncIterator[Any], context: Any) -> Any:
                return await behavior(frames(requests), context)

            recorded = writes
        return grpc.stream_stream_rpc_method_handler(
            recorded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _stream(self, handler: Any) -> Any:
        """Each op of a stream applied as its unary call, then the stream lost."""

        async def lost(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            assert self.servicer is not None
            async for message in requests:
                for frame in message.batch or (message,):
                    op = frame.WhichOneof("op")
                    if op == "put":
                        await self.servicer.PutValue(frame.put, context)
                        await self._applied("StreamOps/put", frame.put, context)
                    elif op == "delete":
                        await self.servicer.DeleteValue(frame.delete, context)
                        await self._applied("StreamOps/delete", frame.delete, context)
                    else:
                        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no {op} here")
            yield kvs_service_pb2.StreamOpsResponse()  # not reached: every op aborts

        return grpc.stream_stream_rpc_method_handler(
            lost,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class SharedStoreKvs:
    """A KVS server over ``store`` (which other servers may serve too), its writes recorded."""

    store: LatticeStore
    writes: Writes
    limit: int
    server: grpc.aio.Server | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> SharedStoreKvs:
        server, _health = create_server(self.limit, self.writes)
        self.writes.servicer = add_kvs_to_server(
            server, self.store, KvsConfig(engine="memory"), self.limit
        )
        self.port = bind(server, "127.0.0.1", 0)
        await server.start()
        self.server = server
        return self
