"""The Valkey back end when engine nodes die: each test kills nodes of a cluster of its own.

Clusters here use a 1 s node timeout, so a dead primary is replaced within seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cloudburst.errors import UnavailableError
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs import valkey_codec as codec
from cloudburst_kvs.valkey_store import ValkeyStore
from valkey_cluster import ValkeyCluster, ValkeyNode, start_cluster

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM
WRITERS = 16


def lww(data: bytes, time_ns: int) -> lattice_pb2.Lattice:
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.time_ns = time_ns
    lattice.lww.timestamp.writer_id = "test"
    lattice.lww.value.data = data
    lattice.lww.value.serializer = value_pb2.SERIALIZER_BYTES
    return lattice


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    cluster = start_cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def store(own_cluster: ValkeyCluster) -> AsyncIterator[ValkeyStore]:
    kvs = ValkeyStore(own_cluster.url, operation_timeout=20.0)
    await kvs.start()
    try:
        yield kvs
    finally:
        await kvs.close()


def keys_on(cluster: ValkeyCluster, node: ValkeyNode, keyspace: int, count: int) -> list[str]:
    """User keys whose slot ``node`` owns."""
    found: list[str] = []
    index = 0
    while len(found) < count:
        key = f"k{index}"
        index += 1
        if cluster.primary_of(codec.data_key(keyspace, key).decode()).port == node.port:
            found.append(key)
    return found


async def test_a_killed_primary_loses_no_acknowledged_write(
    own_cluster: ValkeyCluster, store: ValkeyStore
) -> None:
    victim = own_cluster.primary_of(codec.data_key(SYSTEM, "x").decode())
    victim_keys = keys_on(own_cluster, victim, USER, 3)
    acknowledged: dict[str, bytes] = {}
    stop = asyncio.Event()
    progress = asyncio.Event()

    async def acknowledged_at_least(count: int) -> None:
        async with asyncio.timeout(30):
            while len(acknowledged) < count:
                progress.clear()
                await progress.wait()

    async def writer(index: int) -> None:
        sequence = 0
        while not stop.is_set():
            sequence += 1
            key = f"w{index}-{sequence}"
            data = f"{index}:{sequence}".encode()
            try:
                await store.put(USER, key, lww(data, sequence))
            except UnavailableError:
                continue  # not acknowledged: nothing is promised about it
            acknowledged[key] = data
            progress.set()

    # Waiting reads and watches open on the victim's shard before it dies.
    waiter = asyncio.ensure_future(store.wait_for(USER, victim_keys[0], 60.0))
    watch = await store.subscribe(USER, keys=[victim_keys[1]])
    system_watch = await store.subscribe(SYSTEM, prefix="functions/")
    writers = [asyncio.ensure_future(writer(i)) for i in range(WRITERS)]
    try:
        await acknowledged_at_least(200)
        killed_at = time.monotonic()
        own_cluster.kill(victim)
        # Writes resume: a write to a key of the dead primary's slots, sent after the kill,
        # is acknowledged once a replica took over (the store retries meanwhile).
        await store.put(USER, victim_keys[2], lww(b"probe", 1))
        resumed = time.monotonic() - killed_at
        await acknowledged_at_least(len(acknowledged) + 200)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    new_owner = own_cluster.primary_of(codec.data_key(USER, victim_keys[2]).decode())
    assert new_owner.port != victim.port

    # Writes resumed within 5 s of the kill (the key's slot is served by a promoted replica).
    assert resumed < 5.0, f"writes resumed {resumed:.1f}s after the kill"

    # Every acknowledged write is readable afterwards.
    assert len(acknowledged) > 200
    keys = sorted(acknowledged)
    found = await store.read_many(USER, keys)
    missing = [k for k, lattice in zip(keys, found, strict=True) if lattice is None]
    assert missing == []
    for key, lattice in zip(keys, found, strict=True):
        assert lattice is not None and lattice.lww.value.data == acknowledged[key]

    # The waiting read, the key watch and the system watch wake on writes made after it.
    await store.put(USER, victim_keys[0], lww(b"after", 1))
    await store.put(USER, victim_keys[1], lww(b"after", 1))
    await store.put(SYSTEM, "functions/f", lww(b"after", 1))
    async with asyncio.timeout(20):
        assert await waiter == lww(b"after", 1)
        while True:
            event = await watch.__anext__()
            if event.lattice == lww(b"after", 1):
                break
        while True:
            event = await system_watch.__anext__()
            if event.key == "functions/f" and event.lattice == lww(b"after", 1):
                break
    await watch.aclose()
    await system_watch.aclose()


async def test_durable_writes_are_not_acknowledged_without_a_replica(
    own_cluster: ValkeyCluster,
) -> None:
    primary = own_cluster.primary_of(codec.data_key(USER, "k").decode())
    replicas = [
        node
        for node in own_cluster.nodes
        if f"master_port:{primary.port}" in own_cluster.command(node, "INFO", "replication")
    ]
    assert len(replicas) == 2
    durable = ValkeyStore(own_cluster.url, operation_timeout=1.5)
    relaxed = ValkeyStore(own_cluster.url, durable_writes=False, operation_timeout=1.5)
    await durable.start()
    await relaxed.start()
    try:
        await durable.put(USER, "k", lww(b"replicated", 1))
        for node in replicas:
            own_cluster.kill(node)
        # WAIT 1 on the write's own connection finds no replica: the write is refused,
        # however often it is retried, rather than acknowledged.
        with pytest.raises(UnavailableError, match="did not complete a put"):
            await durable.put(USER, "k", lww(b"unreplicated", 2))
        with pytest.raises(UnavailableError):
            await durable.delete(USER, "k")
        # Without durable writes the primary alone acknowledges.
        assert (await relaxed.put(USER, "k", lww(b"relaxed", 3))).lww.value.data == b"relaxed"
    finally:
        await durable.close()
        await relaxed.close()


async def test_lost_subscriber_connections_are_replaced_and_keys_read_again(
    valkey_cluster: ValkeyCluster,
) -> None:
    kvs = ValkeyStore(valkey_cluster.url, operation_timeout=10.0)
    await kvs.start()
    try:
        waiter = asyncio.ensure_future(kvs.wait_for(USER, "reconnect-key", 30.0))
        watch = await kvs.subscribe(SYSTEM, prefix="reconnect/")
        await kvs.put(SYSTEM, "reconnect/before", lww(b"before", 1))
        async with asyncio.timeout(10):
            assert (await watch.__anext__()).key == "reconnect/before"
        # The server drops every subscriber connection, as a restart or a network blip would.
        for node in valkey_cluster.primaries():
            valkey_cluster.command(node, "CLIENT", "KILL", "TYPE", "pubsub")
        await kvs.put(USER, "reconnect-key", lww(b"after", 1))
        await kvs.put(SYSTEM, "reconnect/after", lww(b"after", 1))
        async with asyncio.timeout(10):
            assert await waiter == lww(b"after", 1)
            # Announced by its message, or found by the reading-again after re-subscribing.
            while (event := await watch.__anext__()).key != "reconnect/after":
                pass
        assert event.lattice == lww(b"after", 1)
        await watch.aclose()
    finally:
        await kvs.close()
