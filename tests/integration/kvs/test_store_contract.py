"""One contract, every back end: memory, SQLite and Valkey (inline and staged values).

The Valkey back ends run against the test run's real cluster (3 primaries x 2
replicas on loopback); it is emptied before each test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloudburst.errors import InvalidArgumentError, LatticeTypeMismatchError, UnavailableError
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs import lattices
from cloudburst_kvs.backend import LatticeBackend
from cloudburst_kvs.storage import MemoryEngine, SqliteEngine
from cloudburst_kvs.store import LatticeStore
from cloudburst_kvs.valkey_store import ValkeyStore
from valkey_cluster import ValkeyCluster

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM
WAIT = 10.0  # seconds: the bound on every wait that should end at once

BACKENDS = ["memory", "sqlite", "valkey", "valkey-staged"]


def value(data: bytes, serializer: int = value_pb2.SERIALIZER_BYTES) -> value_pb2.Value:
    return value_pb2.Value(serializer=serializer, data=data)  # type: ignore[arg-type]


def lww(
    data: bytes, time_ns: int = 1, writer: str = "w", serializer: int = value_pb2.SERIALIZER_BYTES
) -> lattice_pb2.Lattice:
    timestamp = lattice_pb2.LwwTimestamp(time_ns=time_ns, writer_id=writer)
    return lattice_pb2.Lattice(
        lww=lattice_pb2.LwwLattice(timestamp=timestamp, value=value(data, serializer))
    )


def set_of(*items: bytes) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value(i) for i in items]))


def flush(cluster: ValkeyCluster) -> None:
    for node in cluster.primaries():
        cluster.command(node, "FLUSHALL")


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LatticeBackend]:
    store: LatticeBackend
    if request.param == "memory":
        store = LatticeStore(MemoryEngine())
    elif request.param == "sqlite":
        store = LatticeStore(SqliteEngine(tmp_path / "kvs.sqlite3"))
    else:
        cluster: ValkeyCluster = request.getfixturevalue("valkey_cluster")
        flush(cluster)
        inline = 0 if request.param == "valkey-staged" else 64 * 1024
        store = ValkeyStore(cluster.url, inline_limit=inline, operation_timeout=5.0)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_missing_key_reads_none(backend: LatticeBackend) -> None:
    assert await backend.read(USER, "nope") is None
    assert await backend.read_many(USER, ["nope", "nada"]) == [None, None]


async def test_last_writer_wins_in_the_order_of_the_lattice_code(backend: LatticeBackend) -> None:
    writes = [
        lww(b"first", 10, "a"),
        lww(b"older", 5, "z"),  # earlier time loses whatever its writer
        lww(b"tie-writer", 10, "b"),  # same time: the larger writer id wins
        lww(b"tie-bytes-a", 10, "b", value_pb2.SERIALIZER_STRING),  # then the serializer
        lww(b"tie-bytes-b", 10, "b", value_pb2.SERIALIZER_STRING),  # then the bytes
        lww(b"tie-bytes-", 10, "b", value_pb2.SERIALIZER_STRING),  # a prefix orders first
    ]
    expected = lattices.normalize(writes[0])
    for write in writes:
        merged = await backend.put(USER, "k", write)
        expected = lattices.merge(expected, write)
        assert merged == expected
    assert await backend.read(USER, "k") == expected
    assert expected.lww.value.data == b"tie-bytes-b"


async def test_set_union_is_normalized(backend: LatticeBackend) -> None:
    assert await backend.put(USER, "s", set_of(b"b", b"a", b"b")) == set_of(b"a", b"b")
    assert await backend.put(USER, "s", set_of(b"c", b"a")) == set_of(b"a", b"b", b"c")
    assert await backend.read(USER, "s") == set_of(b"a", b"b", b"c")


async def test_an_empty_set_creates_the_key(backend: LatticeBackend) -> None:
    assert await backend.put(USER, "empty", set_of()) == set_of()
    assert await backend.read(USER, "empty") == set_of()


async def test_a_key_keeps_its_kind(backend: LatticeBackend) -> None:
    await backend.put(USER, "k", lww(b"x"))
    with pytest.raises(LatticeTypeMismatchError):
        await backend.put(USER, "k", set_of(b"x"))
    await backend.put(USER, "s", set_of(b"x"))
    with pytest.raises(LatticeTypeMismatchError):
        await backend.put(USER, "s", lww(b"x"))
    assert await backend.read(USER, "k") == lww(b"x")
    assert await backend.read(USER, "s") == set_of(b"x")


async def test_large_values_round_trip(backend: LatticeBackend) -> None:
    big = bytes(range(256)) * 4096 + b"end"  # 1 MiB and a bit
    assert (await backend.put(USER, "big", lww(big, 2))).lww.value.data == big
    assert (await backend.put(USER, "big", lww(b"small", 1))).lww.value.data == big
    got = await backend.read(USER, "big")
    assert got is not None and got.lww.value.data == big
    # A tie on time and writer is broken by the bytes, large or not.
    assert (await backend.put(USER, "big", lww(big + b"!", 2))).lww.value.data == big + b"!"


async def test_a_known_size_is_the_exact_size_of_the_value_read(backend: LatticeBackend) -> None:
    # Every engine may not know a size; one it gives is what the servicer measures instead.
    sizes = {"big": 300 * 1024, "small": 5, "empty": 0}
    for key, size in sizes.items():
        await backend.put(USER, key, lww(b"v" * size, writer="a-writer"), size=size)
    await backend.put(USER, "set", set_of(b"m"))

    def check(key: str, lattice: lattice_pb2.Lattice | None) -> None:
        assert lattice is not None
        known = backend.known_size(USER, key, lattice)
        if known is not None:
            assert known == lattices.lattice_size(lattice) == sizes[key]
        if isinstance(backend, ValkeyStore):  # asked at once: every read's size is known
            assert known == sizes[key]

    for key in sizes:
        check(key, await backend.read(USER, key))
        async with asyncio.timeout(WAIT):
            check(key, await backend.wait_for(USER, key, 60.0))
    found = await backend.read_many(USER, [*sizes, "missing", "set"])
    for key, lattice in zip(sizes, found, strict=False):
        check(key, lattice)
    members = found[-1]
    assert members is not None and backend.known_size(USER, "set", members) is None
    # Not a lattice the store returned: unknown, whatever it holds.
    assert backend.known_size(USER, "big", lww(b"v" * sizes["big"])) is None
    if isinstance(backend, ValkeyStore):
        # The store lets go of what it read once the loop has turned (it keeps no values).
        kept = await backend.read(USER, "big")
        turned = asyncio.Event()
        asyncio.get_running_loop().call_soon(turned.set)
        await turned.wait()
        assert kept is not None and backend.known_size(USER, "big", kept) is None


async def test_keys_with_braces_percent_and_unicode(backend: LatticeBackend) -> None:
    keys = ["{a}", "a}b{", "%7B", "%", "ünï/cødé", "}", "{}"]
    for index, key in enumerate(keys):
        await backend.put(USER, key, lww(str(index).encode()))
    for index, key in enumerate(keys):
        assert await backend.read(USER, key) == lww(str(index).encode())
    page, token = await backend.list_page(USER)
    assert page == sorted(keys) and token == ""


async def test_keyspaces_are_separate(backend: LatticeBackend) -> None:
    await backend.put(USER, "k", lww(b"user"))
    await backend.put(SYSTEM, "k", lww(b"system"))
    assert await backend.read(USER, "k") == lww(b"user")
    assert await backend.read(SYSTEM, "k") == lww(b"system")
    assert (await backend.list_page(SYSTEM))[0] == ["k"]


async def test_delete(backend: LatticeBackend) -> None:
    await backend.put(USER, "k", lww(b"x"))
    assert await backend.delete(USER, "k") is True
    assert await backend.delete(USER, "k") is False
    assert await backend.read(USER, "k") is None
    # A deleted key may come back with another kind.
    await backend.put(USER, "k", set_of(b"x"))
    assert await backend.read(USER, "k") == set_of(b"x")


async def test_batch_read_and_delete(backend: LatticeBackend) -> None:
    for key in ("a", "b", "c"):
        await backend.put(USER, key, lww(key.encode()))
    assert await backend.read_many(USER, ["c", "missing", "a"]) == [lww(b"c"), None, lww(b"a")]
    assert await backend.delete_many(USER, ["a", "b", "missing"]) == 2
    assert await backend.read_many(USER, ["a", "b", "c"]) == [None, None, lww(b"c")]


async def test_list_pages_by_prefix(backend: LatticeBackend) -> None:
    keys = [f"p/{i:02d}" for i in range(7)] + ["q/1", "p"]
    for key in keys:
        await backend.put(USER, key, lww(b"x"))
    seen: list[str] = []
    token = ""
    while True:
        page, token = await backend.list_page(USER, "p/", 3, token)
        seen.extend(page)
        if not token:
            break
    assert seen == [f"p/{i:02d}" for i in range(7)]
    with pytest.raises(InvalidArgumentError):
        await backend.list_page(USER, "q/", 3, "bogus")
    with pytest.raises(InvalidArgumentError):
        await backend.list_page(USER, "", -1)


async def test_empty_keys_are_refused(backend: LatticeBackend) -> None:
    with pytest.raises(InvalidArgumentError):
        await backend.put(USER, "", lww(b"x"))
    with pytest.raises(InvalidArgumentError):
        await backend.read(USER, "")
    with pytest.raises(InvalidArgumentError):
        await backend.delete(USER, "")


async def test_wait_for_an_existing_key_returns_at_once(backend: LatticeBackend) -> None:
    await backend.put(USER, "k", lww(b"x"))
    async with asyncio.timeout(WAIT):
        assert await backend.wait_for(USER, "k", 60.0) == lww(b"x")
    assert await backend.wait_for(USER, "missing", 0) is None


async def test_wait_for_wakes_on_a_later_put(backend: LatticeBackend) -> None:
    big = b"B" * (200 * 1024)
    for key, written in (("small", lww(b"x")), ("large", lww(big)), ("set", set_of(b"m"))):
        waiter = asyncio.ensure_future(backend.wait_for(USER, key, 30.0))
        # Written from another task once the waiter had its chance to subscribe and read.
        for _ in range(20):
            await asyncio.sleep(0)
        await backend.put(USER, key, written)
        async with asyncio.timeout(WAIT):
            assert await waiter == written


async def test_wait_for_times_out_with_none(backend: LatticeBackend) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await backend.wait_for(USER, "never", 0.3) is None
    assert 0.25 <= loop.time() - started < WAIT


async def test_many_waiters_on_one_key(backend: LatticeBackend) -> None:
    waiters = [asyncio.ensure_future(backend.wait_for(USER, "k", 30.0)) for _ in range(20)]
    for _ in range(20):
        await asyncio.sleep(0)
    await backend.put(USER, "k", lww(b"x"))
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*waiters) == [lww(b"x")] * 20


async def test_watch_keys_sees_puts_and_deletes(backend: LatticeBackend) -> None:
    big = b"L" * (100 * 1024)
    async with await backend.subscribe(USER, keys=["a", "b"]) as watch:
        for key, change in (("a", lww(b"1")), ("b", lww(big)), ("a", None), ("b", set_of())):
            await backend.put(USER, "other", lww(b"ignored"))
            if change is None:
                await backend.delete(USER, key)
            else:
                if key == "b" and change.HasField("set"):
                    await backend.delete(USER, "b")
                    async with asyncio.timeout(WAIT):
                        assert await watch.__anext__() == ("b", None, True)
                await backend.put(USER, key, change)
            async with asyncio.timeout(WAIT):
                event = await watch.__anext__()
            assert (event.key, event.lattice, event.deleted) == (key, change, change is None)


async def test_system_prefix_watch_keeps_order(backend: LatticeBackend) -> None:
    async with await backend.subscribe(SYSTEM, prefix="functions/") as watch:
        expected: list[tuple[str, bool]] = []
        present: set[str] = set()
        for index in range(12):
            key = f"functions/f{index % 3}"
            if index % 4 == 3:
                if await backend.delete(SYSTEM, key):
                    expected.append((key, True))
                    present.discard(key)
            else:
                await backend.put(SYSTEM, key, lww(str(index).encode(), index + 1))
                expected.append((key, False))
                present.add(key)
            await backend.put(SYSTEM, "dags/d", lww(b"not watched", index + 1))
        seen: list[tuple[str, bool]] = []
        async with asyncio.timeout(WAIT):
            async for event in watch:
                seen.append((event.key, event.deleted))
                if len(seen) == len(expected):
                    break
    assert seen == expected


async def test_a_watch_needs_something_to_watch(backend: LatticeBackend) -> None:
    with pytest.raises(InvalidArgumentError):
        await backend.subscribe(USER)


async def test_closing_ends_watches_and_waiters(backend: LatticeBackend) -> None:
    watch = await backend.subscribe(USER, keys=["k"])
    backend.end_watches()
    with pytest.raises(UnavailableError):
        async with asyncio.timeout(WAIT):
            await watch.__anext__()
