"""The executor cache keeps fresh over both storage engines' change streams.

The Valkey engine announces user-keyspace changes per key only (no prefix
watches there), which is what the cache relies on: it watches each cached key
by name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cloudburst.chunks import stored_value
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize
from cloudburst.v1 import lattice_pb2
from cloudburst_executors.cache import ValueCache
from cloudburst_kvs.access import InProcessKvs
from cloudburst_kvs.backend import LatticeBackend
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore
from cloudburst_kvs.valkey_store import ValkeyStore
from valkey_cluster import ValkeyCluster

USER = lattice_pb2.KEYSPACE_USER
CLOCK = LwwClock("another-writer")


@pytest.fixture(params=["memory", "valkey"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[LatticeBackend]:
    store: LatticeBackend
    if request.param == "memory":
        store = LatticeStore(MemoryEngine())
    else:
        cluster: ValkeyCluster = request.getfixturevalue("valkey_cluster")
        store = ValkeyStore(cluster.url, operation_timeout=5.0)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def cached_value(cache: ValueCache, key: str) -> object:
    entry = cache._entries.get(key)
    return None if entry is None or entry.lattice is None else stored_value(entry.lattice)


async def until_cached(cache: ValueCache, key: str, expected: object) -> None:
    deadline = time.monotonic() + 10
    while await cached_value(cache, key) != expected:
        assert time.monotonic() < deadline, f"the cache did not see {expected!r} in time"
        await asyncio.sleep(0.005)


async def test_changes_reach_the_cache_through_key_watches(backend: LatticeBackend) -> None:
    key = f"cache-engine/{time.time_ns()}"
    cache = ValueCache(InProcessKvs(backend, max_wait_seconds=5), max_bytes=1 << 20)
    try:
        await backend.put(USER, key, lww(serialize("one"), CLOCK))
        first = await cache.get(key)
        assert first is not None and lattice_value(first) == "one"
        await backend.put(USER, key, lww(serialize("two"), CLOCK))
        await until_cached(cache, key, "two")
        second = await cache.get(key)
        assert second is not None and lattice_value(second) == "two"
        assert (cache.hits, cache.misses) == (1, 1)
        await backend.delete(USER, key)
        await until_cached(cache, key, None)
        assert await cache.get(key) is None
    finally:
        await cache.close()
