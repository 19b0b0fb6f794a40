"""The SDK's writes and deletes at the KVS itself: the same write when retried, sized for it.

A cluster in this process (each server its own gRPC server on 127.0.0.1:0)
whose scheduler names to clients a KVS that applies each write and delete and
then answers ``UNAVAILABLE``, as a KVS whose answer was lost: the SDK sends the
op again through the scheduler, whose KVS serves the same store. Every attempt
must carry the same request id (and a write the same lattice), so that the
retry of a delete applied already does not delete a value written in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.opstream import MAX_STREAMED_PUT_BYTES, STREAM_ENV
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.local import Node, start_executor_node, start_scheduler_node
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs.local import add_kvs_to_server
from cloudburst_kvs.servicer import KvsServicer
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore
from harness import LoopThread, make_config
from kvs_interceptors import KVS, Chain, Recorder

WAIT = 30.0
USER = lattice_pb2.KEYSPACE_USER
#: max_payload_bytes of the KVS the SDK calls directly; the scheduler's is the default (64 MiB).
DIRECT_LIMIT = 1 << 20

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
        if method == "StreamOps" and self.lose_answers:
            return self._stream(handler)
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
class KvsServer:
    """A KVS server over ``store`` whose user writes and deletes are recorded."""

    store: LatticeStore
    writes: Writes
    limit: int
    server: grpc.aio.Server | None = None
    port: int = 0
    recorder: Recorder = field(default_factory=Recorder)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> KvsServer:
        server, _health = create_server(self.limit, Chain(self.recorder, self.writes))
        self.writes.servicer = add_kvs_to_server(
            server, self.store, KvsConfig(engine="memory"), self.limit
        )
        self.port = bind(server, "127.0.0.1", 0)
        await server.start()
        self.server = server
        return self


@dataclass
class Setup:
    scheduler: Node
    direct: KvsServer
    """The KVS clients call directly: it loses every answer to a write or delete."""
    backing: KvsServer
    """The scheduler's KVS, over the same store."""


@pytest.fixture
def setup(start_node: Callable[..., Node], server_loop: LoopThread) -> Iterator[Setup]:
    store = LatticeStore(MemoryEngine())
    server_loop.run(store.start())
    direct = server_loop.run(KvsServer(store, Writes(lose_answers=True), DIRECT_LIMIT).start())
    config = make_config()
    backing = server_loop.run(KvsServer(store, Writes(), config.server.max_payload_bytes).start())
    config = make_config(scheduler={"direct_kvs_address": direct.address})
    executor = start_node(start_executor_node(config, backing.address, "executor-0"))
    scheduler = start_node(start_scheduler_node(config, backing.address, [executor.address]))
    try:
        yield Setup(scheduler, direct, backing)
    finally:
        for kvs in (direct, backing):
            if kvs.server is not None:
                server_loop.run(kvs.server.stop(0))
        server_loop.run(store.close())


def connect(address: str) -> CloudburstConnection:
    return CloudburstConnection(address, connect_timeout=WAIT, timeout=WAIT)


def _stamp(request: Any) -> tuple[int, str]:
    timestamp = request.lattice.lww.timestamp
    return int(timestamp.time_ns), str(timestamp.writer_id)


#: Each write or delete: whether its connection streams ops, and the op.
OPS: dict[str, tuple[bool, Callable[[CloudburstConnection], Any]]] = {
    "put on the op stream": (True, lambda conn: conn.put_object("small", "s")),
    "put in a unary call": (
        True,
        lambda conn: conn.put_object("unary", b"u" * (MAX_STREAMED_PUT_BYTES + 1)),
    ),
    # Over the direct KVS's message limit, within the scheduler's: in chunks at the KVS,
    # in one message through the scheduler.
    "put in chunks": (True, lambda conn: conn.put_object("chunked", b"c" * (2 * DIRECT_LIMIT))),
    "delete on the op stream": (True, lambda conn: conn.delete_object("small")),
    "delete in a unary call": (False, lambda conn: conn.delete_object("unary")),
}


def test_a_write_or_delete_retried_through_the_scheduler_is_the_same_one(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids: set[str] = set()
    for name, (streamed, operation) in OPS.items():
        setup.direct.writes.received.clear()
        setup.backing.writes.received.clear()
        with monkeypatch.context() as patch:
            if not streamed:
                patch.setenv(STREAM_ENV, "0")
            # A connection of its own: after a lost answer it stays with the scheduler.
            with connect(setup.scheduler.address) as conn:
                assert conn.kvs_address == setup.direct.address, name
                operation(conn)
                assert conn.kvs_address is None, name
        attempts = setup.direct.writes.received + setup.backing.writes.received
        assert setup.direct.writes.received and setup.backing.writes.received, (name, attempts)
        request_ids = {request.request_id for _, request in attempts}
        assert len(request_ids) == 1 and "" not in request_ids, (name, attempts)
        assert not request_ids & ids, f"{name}: a request id of an earlier op"
        ids |= request_ids
        if name.startswith("put"):
            stamps = {_stamp(request) for _, request in attempts}
            assert len(stamps) == 1 and _stamp(attempts[0][1])[0] > 0, (name, attempts)
        if name == "put in chunks":
            methods = [method for method, _ in attempts]
            assert methods == ["PutValueChunks", "PutValue"], methods


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "unary"])
def test_a_value_written_between_the_attempts_of_a_delete_survives(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    if not streamed:
        monkeypatch.setenv(STREAM_ENV, "0")
    clock = LwwClock()

    async def write_between(key: str) -> None:
        """Another writer's value, stored after the delete applied, before its answer."""
        await setup.direct.store.put(USER, key, lww(serialize("written in between"), clock))

    setup.direct.writes.between = write_between
    with connect(setup.scheduler.address) as conn:
        conn.put_object("key", "first")
        assert conn.kvs_address is None  # the write's answer was lost: through the scheduler
    with connect(setup.scheduler.address) as conn:
        assert conn.delete_object("key") is True
        assert conn.kvs_address is None
    # Read at the scheduler's KVS: the retry of the delete did not delete the new value.
    with grpc.insecure_channel(setup.backing.address) as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        response = stub.GetValue(kvs_service_pb2.GetValueRequest(key="key"), timeout=WAIT)
    assert response.found and lattice_value(response.lattice) == "written in between"
