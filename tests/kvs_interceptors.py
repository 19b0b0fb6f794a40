"""Server interceptors that count what a test KVS receives and sends, and a store that holds."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cloudburst.v1 import lattice_pb2
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore

KVS = "/cloudburst.v1.KvsService/"


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
