"""The executor's value cache over a real in-memory lattice store and its change stream."""

from __future__ import annotations

import array
import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from cloudburst.chunks import LargeValue, Stored, stored_value
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize
from cloudburst.v1 import executor_service_pb2, lattice_pb2, value_pb2
from cloudburst_executors.cache import ENTRY_OVERHEAD_BYTES, ValueCache, handout, read_reference
from cloudburst_grpc.kvs_access import SYSTEM, USER
from cloudburst_kvs.access import InProcessKvs
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore


class CountingKvs(InProcessKvs):
    """The in-process KVS access, counting the reads that reach the store."""

    reads = 0

    async def get(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> lattice_pb2.Lattice | None:
        self.reads += 1
        return await super().get(key, keyspace, wait=wait, timeout=timeout)


@pytest.fixture
async def store() -> AsyncIterator[LatticeStore]:
    store = LatticeStore(MemoryEngine())
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def kvs(store: LatticeStore) -> CountingKvs:
    return CountingKvs(store, max_wait_seconds=5)


@pytest.fixture
async def cache(kvs: CountingKvs) -> AsyncIterator[ValueCache]:
    cache = ValueCache(kvs, max_bytes=1 << 20, name="test")
    try:
        yield cache
    finally:
        await cache.close()


CLOCK = LwwClock("other-writer")


def value_of(value: object) -> lattice_pb2.Lattice:
    return lww(serialize(value), CLOCK)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.001)


async def read(cache: ValueCache, key: str) -> object:
    lattice = await cache.get(key)
    return None if lattice is None else lattice_value(lattice)


async def test_a_second_read_is_served_from_memory(
    cache: ValueCache, kvs: CountingKvs, store: LatticeStore
) -> None:
    await store.put(USER, "k", value_of([1, 2, 3]))
    assert await read(cache, "k") == [1, 2, 3]
    assert await read(cache, "k") == [1, 2, 3]
    assert kvs.reads == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes > 0
    assert cache.keys() == ["k"]


async def test_another_writers_change_reaches_the_cached_value(
    cache: ValueCache, kvs: CountingKvs, store: LatticeStore
) -> None:
    await store.put(USER, "k", value_of("old"))
    assert await read(cache, "k") == "old"
    await store.put(USER, "k", value_of("new"))
    await until(lambda: lattice_value(cache._entries["k"].lattice) == "new")  # type: ignore[arg-type]
    assert await read(cache, "k") == "new"
    assert kvs.reads == 1, "the change came through the watch, not a read"


async def test_a_delete_elsewhere_empties_the_entry(cache: ValueCache, store: LatticeStore) -> None:
    await store.put(USER, "k", value_of("here"))
    assert await read(cache, "k") == "here"
    await store.delete(USER, "k")
    await until(lambda: not cache._entries)  # nor is the deleted key watched any more
    assert await read(cache, "k") is None


async def test_a_write_through_the_cache_is_read_back_at_once(
    cache: ValueCache, store: LatticeStore
) -> None:
    await store.put(USER, "k", value_of(1))
    assert await read(cache, "k") == 1
    writer = LwwClock("executor")
    await cache.put("k", lww(serialize(2), writer))
    # No wait for the change notification: the write itself updated the entry.
    assert await read(cache, "k") == 2
    assert cache.stats().hits == 1


async def test_a_cached_write_older_than_the_reader_asks_for_is_not_served(
    cache: ValueCache, kvs: CountingKvs, store: LatticeStore
) -> None:
    await store.put(USER, "k", value_of("v"))
    written = (await store.read(USER, "k")).lww.timestamp.time_ns  # type: ignore[union-attr]
    assert await read(cache, "k") == "v"
    # The reader wrote the key after the cached write (as far as it knows): go to the KVS.
    newer = value_pb2.Reference(key="k", not_before_ns=written + 1)
    lattice = await read_reference(cache, newer, 5)
    assert lattice is not None and stored_value(lattice) == "v"
    assert kvs.reads == 2
    # A reader whose last write is the cached one (or older) is served from memory.
    same = value_pb2.Reference(key="k", not_before_ns=written)
    await read_reference(cache, same, 5)
    assert kvs.reads == 2
    assert cache.stats().hits == 1


async def test_least_recently_used_values_go_first_within_the_budget(
    kvs: CountingKvs, store: LatticeStore
) -> None:
    cache = ValueCache(kvs, max_bytes=3 * 1200, name="small")
    try:
        for key in ("a", "b", "c", "d"):
            await store.put(USER, key, value_of(b"x" * 900))
        for key in ("a", "b", "c"):
            await read(cache, key)
        await read(cache, "a")  # "b" is now the least recently used
        await read(cache, "d")
        assert cache.keys() == ["a", "c", "d"]
        stats = cache.stats()
        assert stats.evictions == 1
        assert stats.bytes <= stats.max_bytes
        await store.put(USER, "huge", value_of(b"x" * 10_000))
        assert await read(cache, "huge") == b"x" * 10_000
        assert "huge" not in cache.keys(), "a value over the whole budget is not cached"
    finally:
        await cache.close()


async def test_a_kept_decoded_value_lasts_as_long_as_its_cached_value(
    cache: ValueCache, store: LatticeStore
) -> None:
    await store.put(USER, "k", value_of(b"old" * 1000))
    lattice = await cache.get("k")
    assert lattice is not None
    before = cache.stats().bytes
    kept = handout(lattice_value(lattice))
    assert kept is not None
    cache.keep("k", lattice, *kept)
    assert cache.stats().bytes >= before + 3000, "the kept value counts against the budget"
    again = await cache.get("k")
    assert again is lattice
    hand_out = cache.kept("k", again)
    assert hand_out is not None and hand_out() == b"old" * 1000
    await store.put(USER, "k", value_of(b"new"))
    await until(lambda: cache._entries["k"].lattice is not lattice)
    newer = await cache.get("k")
    assert newer is not None
    assert cache.kept("k", newer) is None, "a new value is decoded anew"
    assert cache.kept("k", lattice) is None
    assert cache.stats().bytes < before


async def test_a_kept_value_that_does_not_fit_the_budget_is_not_kept(
    kvs: CountingKvs, store: LatticeStore
) -> None:
    cache = ValueCache(kvs, max_bytes=3000, name="small")
    try:
        await store.put(USER, "k", value_of(b"x" * 2000))
        lattice = await cache.get("k")
        assert lattice is not None
        cache.keep("k", lattice, lambda: b"x" * 2000, 2000)
        assert cache.kept("k", lattice) is None
        assert cache.keys() == ["k"], "the cached value itself stays"
    finally:
        await cache.close()


def test_only_values_each_call_can_own_cheaply_are_handed_out_again() -> None:
    assert handout([1, 2]) is None, "a list may hold objects a function changes"
    assert handout({"a": 1}) is None
    text = handout("text")
    assert text is not None and text[0]() == "text"
    buffer = bytearray(b"abc")
    given = handout(buffer)
    assert given is not None
    buffer[0] = ord("z")  # the original belongs to the call that decoded it
    first, second = given[0](), given[0]()
    assert first == second == bytearray(b"abc")
    first[1] = ord("y")
    assert given[0]() == bytearray(b"abc"), "each call gets a copy of its own"
    numbers = array.array("d", [1.0, 2.0])
    handed = handout(numbers)
    assert handed is not None and handed[1] == 16
    copy_of = handed[0]()
    copy_of[0] = 9.0
    assert handed[0]() == array.array("d", [1.0, 2.0])


def test_numpy_arrays_of_numbers_are_copied_and_of_objects_not_kept() -> None:
    numpy = pytest.importorskip("numpy")
    values = numpy.arange(4, dtype="float64")
    handed = handout(values)
    assert handed is not None and handed[1] == 32
    mine = handed[0]()
    mine[0] = 7.0
    assert handed[0]()[0] == 0.0
    assert handout(numpy.array([[1], "a"], dtype=object)) is None


async def test_listeners_hear_every_key_then_the_changes(
    cache: ValueCache, store: LatticeStore
) -> None:
    await store.put(USER, "a", value_of(1))
    await store.put(USER, "b", value_of(2))
    await read(cache, "a")
    reports: list[executor_service_pb2.CacheReport] = []
    stop = cache.listen(reports.append)
    assert reports[0].full and list(reports[0].added) == ["a"]
    await read(cache, "b")
    await cache.delete("a")
    await until(lambda: len(reports) >= 2)
    changes = reports[1:]
    assert {k for r in changes for k in r.added} == {"b"}
    assert {k for r in changes for k in r.removed} == {"a"}
    stop()
    await cache.delete("b")
    await asyncio.sleep(0)  # a report would be sent on the next turn of the loop
    assert len(reports) == len(changes) + 1


async def test_an_ended_watch_drops_its_entries(
    cache: ValueCache, kvs: CountingKvs, store: LatticeStore
) -> None:
    await store.put(USER, "k", value_of("v"))
    assert await read(cache, "k") == "v"
    store.end_watches()
    await until(lambda: cache.keys() == [])
    assert await read(cache, "k") == "v"
    assert kvs.reads == 2


async def test_system_keys_and_missing_keys_are_not_cached(
    cache: ValueCache, kvs: CountingKvs, store: LatticeStore
) -> None:
    await store.put(SYSTEM, "fn", value_of("definition"))
    for _ in range(2):
        lattice = await cache.get("fn", SYSTEM)
        assert lattice is not None
    assert await read(cache, "nothing") is None
    assert await read(cache, "nothing") is None
    assert kvs.reads == 4
    assert cache.keys() == []
    assert not cache._entries, "no watch is kept open for a key that does not exist"


async def test_a_waiting_read_is_cached_once_the_key_is_written(
    cache: ValueCache, store: LatticeStore
) -> None:
    waiting = asyncio.ensure_future(cache.get("later", wait=True, timeout=5))
    await until(lambda: "later" in cache._entries and cache._entries["later"].watching.done())
    await store.put(USER, "later", value_of("arrived"))
    lattice = await waiting
    assert lattice is not None and lattice_value(lattice) == "arrived"
    assert await read(cache, "later") == "arrived"
    assert cache.stats().hits == 1


async def test_a_batch_read_takes_cached_keys_from_memory(
    cache: ValueCache, store: LatticeStore
) -> None:
    await store.put(USER, "a", value_of("A"))
    await store.put(USER, "b", value_of("B"))
    await read(cache, "a")
    found = await cache.get_many(["b", "a", "none"])
    assert list(found) == ["b", "a", "none"]
    assert [None if v is None else lattice_value(v) for v in found.values()] == ["B", "A", None]
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (1, 3)


async def test_the_number_of_keys_is_bounded_too(kvs: CountingKvs, store: LatticeStore) -> None:
    cache = ValueCache(kvs, max_bytes=1 << 20, name="few", max_entries=2)
    try:
        for key in ("a", "b", "c"):
            await store.put(USER, key, value_of(key))
            await read(cache, key)
        assert cache.keys() == ["b", "c"]
        assert cache.stats().evictions == 1
        assert len(cache._entries) == 2, "an evicted key is no longer watched"
    finally:
        await cache.close()


class ChunkedKvs(CountingKvs):
    """Gives every last-writer-wins value as a KVS client gives one too large for a message."""

    async def get_stored(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Stored | None:
        lattice = await self.get(key, keyspace, wait=wait, timeout=timeout)
        if lattice is None or lattice.WhichOneof("kind") != "lww":
            return lattice
        header = lattice_pb2.Lattice()
        header.CopyFrom(lattice)
        header.lww.value.ClearField("data")
        large = LargeValue(header)
        data = lattice.lww.value.data
        for start in range(0, len(data), 1000):
            large.add(data[start : start + 1000])
        return large


async def test_a_value_read_in_chunks_is_cached_in_them_and_sized_by_them(
    store: LatticeStore,
) -> None:
    kvs = ChunkedKvs(store, max_wait_seconds=5)
    cache = ValueCache(kvs, max_bytes=1 << 20, name="test")
    try:
        data = bytes(range(256)) * 100
        await store.put(USER, "k", value_of(data))
        first = await read_reference(cache, value_pb2.Reference(key="k"), 5)
        assert isinstance(first, LargeValue) and cache.holds("k", first)
        assert cache.bytes == len("k") + len(first) + ENTRY_OVERHEAD_BYTES
        again = await read_reference(cache, value_pb2.Reference(key="k"), 5)
        assert again is first and kvs.reads == 1, "served from memory"
        assert stored_value(first) == data
        lattice = await cache.get("k")  # a whole lattice for those that want one
        assert lattice is not None and lattice_value(lattice) == data
        await store.put(USER, "k", value_of(b"newer"))
        await until(lambda: not cache.holds("k", first))  # the watch saw the write
        newer = await read_reference(cache, value_pb2.Reference(key="k"), 5)
        assert newer is not None and stored_value(newer) == b"newer"
        small = ValueCache(kvs, max_bytes=1000, name="small")
        try:
            await store.put(USER, "big", value_of(data))
            too_large = await read_reference(small, value_pb2.Reference(key="big"), 5)
            assert isinstance(too_large, LargeValue) and stored_value(too_large) == data
            assert small.keys() == [] and small.bytes == 0, "over the budget: not cached"
        finally:
            await small.close()
    finally:
        await cache.close()
