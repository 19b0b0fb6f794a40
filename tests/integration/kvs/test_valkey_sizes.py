"""KvsService over the Valkey engine measures values by the size its reads keep, not by copies.

A real grpc.aio server on 127.0.0.1:0 over the test run's real Valkey cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from cloudburst.transport import channel_options
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs.client import KvsClient
from cloudburst_kvs.local import add_kvs_to_server
from cloudburst_kvs.valkey_store import ValkeyStore
from valkey_cluster import ValkeyCluster

LIMIT = 64 * 1024  # max_payload_bytes of the test server


class MeasuredStore(ValkeyStore):
    """A Valkey store that records what the servicer learns from ``known_size``."""

    def __init__(self, url: str) -> None:
        super().__init__(url, operation_timeout=5.0)
        self.known: list[tuple[str, int | None]] = []

    def known_size(self, keyspace: int, key: str, lattice: lattice_pb2.Lattice) -> int | None:
        size = super().known_size(keyspace, key, lattice)
        self.known.append((key, size))
        return size


@dataclass
class Kvs:
    client: KvsClient
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub
    store: MeasuredStore


@pytest.fixture
async def kvs(valkey_cluster: ValkeyCluster) -> AsyncIterator[Kvs]:
    for node in valkey_cluster.primaries():
        valkey_cluster.command(node, "FLUSHALL")
    async with contextlib.AsyncExitStack() as stack:
        store = MeasuredStore(valkey_cluster.url)
        await store.start()
        stack.push_async_callback(store.close)
        server, _health = create_server(LIMIT)
        add_kvs_to_server(server, store, KvsConfig(engine="valkey"), LIMIT)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop, None)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(LIMIT))
        stack.push_async_callback(channel.close)
        yield Kvs(KvsClient(channel), kvs_service_pb2_grpc.KvsServiceStub(channel), store)


def lww(data: bytes) -> lattice_pb2.Lattice:
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=data)
    return lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(value=value))


async def test_reads_are_measured_by_the_size_the_store_kept(kvs: Kvs) -> None:
    sizes = {"small": 10, "large": LIMIT}  # the large one does not fit in a message
    for key, size in sizes.items():
        await kvs.client.put(key, lww(b"v" * size))

    small = await kvs.stub.GetValue(kvs_service_pb2.GetValueRequest(key="small"))
    assert small.found and not small.chunked and len(small.lattice.lww.value.data) == 10
    large = await kvs.stub.GetValue(kvs_service_pb2.GetValueRequest(key="large", wait=True))
    assert large.found and large.chunked
    batch = await kvs.stub.BatchGetValues(
        kvs_service_pb2.BatchGetValuesRequest(keys=["large", "small"])
    )
    assert [(e.key, e.chunked) for e in batch.entries] == [("large", True), ("small", False)]
    # Every measurement came from the store, exact, none from a copy of the value.
    assert kvs.store.known == [
        ("small", 10),
        ("large", LIMIT),
        ("large", LIMIT),
        ("small", 10),
    ]
    lattice = await kvs.client.get("large")  # the chunked read still gives the whole value
    assert lattice is not None and lattice.lww.value.data == b"v" * LIMIT
