"""The SDK's writes and deletes at the KVS itself: the same write when retried, sized for it.

A cluster in this process (each server its own gRPC server on 127.0.0.1:0)
whose scheduler names to clients a KVS that applies each write and delete and
then answers ``UNAVAILABLE``, as a KVS whose answer was lost: the SDK sends the
op again through the scheduler, whose KVS serves the same store. Every attempt
must carry the same request id (and a write the same lattice), so that the
retry of a delete applied already does not delete a value written in between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.opstream import MAX_STREAMED_PUT_BYTES, STREAM_ENV
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from cloudburst_grpc.local import Node, start_executor_node, start_scheduler_node
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore
from harness import LoopThread, make_config
from kvs_interceptors import SharedStoreKvs, Writes

WAIT = 30.0
USER = lattice_pb2.KEYSPACE_USER
#: max_payload_bytes of the KVS the SDK calls directly; the scheduler's is the default (64 MiB).
DIRECT_LIMIT = 1 << 20


@dataclass
class Setup:
    scheduler: Node
    direct: SharedStoreKvs
    """The KVS clients call directly: it loses every answer to a write or delete."""
    backing: SharedStoreKvs
    """The scheduler's KVS, over the same store."""


@pytest.fixture
def setup(start_node: Callable[..., Node], server_loop: LoopThread) -> Iterator[Setup]:
    store = LatticeStore(MemoryEngine())
    server_loop.run(store.start())
    direct = server_loop.run(SharedStoreKvs(store, Writes(lose_answers=True), DIRECT_LIMIT).start())
    config = make_config()
    backing = server_loop.run(
        SharedStoreKvs(store, Writes(), config.server.max_payload_bytes).start()
    )
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
