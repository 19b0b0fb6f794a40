"""LatticeStore and the storage engines, without sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from cloudburst.errors import (
    InvalidArgumentError,
    LatticeTypeMismatchError,
    PayloadTooLargeError,
    QueueFullError,
    UnavailableError,
)
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs.storage import (
    SQLITE_FILE_NAME,
    MemoryEngine,
    Row,
    SqliteEngine,
    StorageEngine,
    StorageError,
    open_engine,
)
from cloudburst_kvs.store import LatticeStore, WatchEvent

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM
WAIT = 10.0  # seconds: the bound on every wait that should end at once


def value(data: bytes) -> value_pb2.Value:
    return value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=data)


def lww(data: bytes, time_ns: int = 1, writer: str = "w") -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(
        lww=lattice_pb2.LwwLattice(
            timestamp=lattice_pb2.LwwTimestamp(time_ns=time_ns, writer_id=writer),
            value=value(data),
        )
    )


def set_of(*items: bytes) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value(i) for i in items]))


def set_items(lattice: lattice_pb2.Lattice | None) -> list[bytes]:
    assert lattice is not None
    return [v.data for v in lattice.set.values]


async def run_ready_tasks() -> None:
    """Let every task that is ready run up to its next await.

    A single yield to the loop, not a timed sleep: tasks created just before
    run their first step (registering a waiter, queueing a write) before this
    returns, and the tests assert that they did.
    """
    await asyncio.sleep(0)


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    async with asyncio.timeout(WAIT):
        return await anext(events)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LatticeStore]:
    engine: StorageEngine = (
        MemoryEngine() if request.param == "memory" else SqliteEngine(tmp_path / "kvs.sqlite3")
    )
    store = LatticeStore(engine, max_lattice_bytes=64)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


# Reads, writes and merges


async def test_put_then_get_returns_the_merged_lattice(store: LatticeStore) -> None:
    assert store.get(USER, "k") is None
    assert await store.put(USER, "k", lww(b"old", time_ns=1)) == lww(b"old", time_ns=1)
    merged = await store.put(USER, "k", lww(b"new", time_ns=2))
    assert merged.lww.value.data == b"new"
    assert await store.put(USER, "k", lww(b"stale", time_ns=1)) == merged
    assert store.get(USER, "k") == merged


async def test_sets_merge_by_union(store: LatticeStore) -> None:
    await store.put(USER, "s", set_of(b"b", b"a"))
    merged = await store.put(USER, "s", set_of(b"c", b"a"))
    assert set_items(merged) == [b"a", b"b", b"c"]
    assert set_items(store.get(USER, "s")) == [b"a", b"b", b"c"]


async def test_type_mismatch_leaves_the_stored_lattice(store: LatticeStore) -> None:
    await store.put(USER, "k", lww(b"v"))
    with pytest.raises(LatticeTypeMismatchError):
        await store.put(USER, "k", set_of(b"x"))
    assert store.get(USER, "k") == lww(b"v")


async def test_invalid_requests_are_refused(store: LatticeStore) -> None:
    with pytest.raises(InvalidArgumentError, match="key must not be empty"):
        await store.put(USER, "", lww(b"v"))
    with pytest.raises(InvalidArgumentError, match="no kind"):
        await store.put(USER, "k", lattice_pb2.Lattice())
    with pytest.raises(InvalidArgumentError, match="unknown keyspace 99"):
        await store.put(99, "k", lww(b"v"))
    with pytest.raises(InvalidArgumentError):
        store.get(USER, "")
    assert len(store) == 0


async def test_keyspaces_are_separate_and_unspecified_means_user(store: LatticeStore) -> None:
    await store.put(USER, "k", lww(b"user"))
    await store.put(SYSTEM, "k", lww(b"system"))
    assert store.get(lattice_pb2.KEYSPACE_UNSPECIFIED, "k") == lww(b"user")
    assert store.get(SYSTEM, "k") == lww(b"system")
    assert await store.delete(SYSTEM, "k") is True
    assert store.get(USER, "k") == lww(b"user")


async def test_delete(store: LatticeStore) -> None:
    await store.put(USER, "k", lww(b"v"))
    assert await store.delete(USER, "k") is True
    assert store.get(USER, "k") is None
    assert await store.delete(USER, "k") is False
    # A deleted key may come back with another kind.
    await store.put(USER, "k", set_of(b"x"))
    assert set_items(store.get(USER, "k")) == [b"x"]


async def test_merged_size_limit(store: LatticeStore) -> None:
    await store.put(USER, "s", set_of(b"a" * 40))
    with pytest.raises(PayloadTooLargeError, match="limit of 64 bytes") as info:
        await store.put(USER, "s", set_of(b"b" * 40))
    assert info.value.metadata["limit"] == "64"
    assert set_items(store.get(USER, "s")) == [b"a" * 40]


async def test_retried_request_ids_are_answered_once(store: LatticeStore) -> None:
    first = await store.put(USER, "k", lww(b"first", time_ns=1), request_id="r1")
    again = await store.put(USER, "k", lww(b"retry", time_ns=2), request_id="r1")
    assert again == first
    assert store.get(USER, "k") == first
    assert await store.delete(USER, "k", request_id="d1") is True
    assert await store.delete(USER, "k", request_id="d1") is True
    assert await store.delete(USER, "k", request_id="d2") is False


async def test_a_retried_write_is_answered_with_the_key_now_and_not_merged_again(
    store: LatticeStore,
) -> None:
    """The store keeps no lattice per request id: it answers from what the key holds."""
    await store.put(USER, "k", lww(b"first", time_ns=1), request_id="r1")
    newer = await store.put(USER, "k", lww(b"newer", time_ns=5))
    assert await store.put(USER, "k", lww(b"first", time_ns=1), request_id="r1") == newer
    assert await store.delete(USER, "k") is True
    # Deleted since: answered with the write itself, and the key stays deleted.
    again = await store.put(USER, "k", lww(b"first", time_ns=1), request_id="r1")
    assert again == lww(b"first", time_ns=1)
    assert store.get(USER, "k") is None


# Waiting for keys


async def test_wait_for_returns_a_present_key_at_once(store: LatticeStore) -> None:
    await store.put(USER, "k", lww(b"v"))
    assert await store.wait_for(USER, "k", timeout=WAIT) == lww(b"v")


async def test_wait_for_is_resolved_by_a_concurrent_put(store: LatticeStore) -> None:
    waiter = asyncio.create_task(store.wait_for(USER, "k", timeout=WAIT))
    await run_ready_tasks()
    assert store.waiter_count() == 1 and not waiter.done()
    put = await store.put(USER, "k", lww(b"v"))
    async with asyncio.timeout(WAIT):
        assert await waiter == put
    assert store.waiter_count() == 0


async def test_several_waiters_on_one_key(store: LatticeStore) -> None:
    waiters = [asyncio.create_task(store.wait_for(USER, "k", timeout=WAIT)) for _ in range(3)]
    other = asyncio.create_task(store.wait_for(USER, "other", timeout=WAIT))
    await run_ready_tasks()
    assert store.waiter_count() == 4
    await store.put(USER, "k", set_of(b"x"))
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(*waiters)
    assert all(set_items(r) == [b"x"] for r in results)
    assert store.waiter_count() == 1 and not other.done()
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other


async def test_wait_for_timeout_returns_none_and_leaves_no_waiter(store: LatticeStore) -> None:
    assert await store.wait_for(USER, "missing", timeout=0.05) is None
    assert store.waiter_count() == 0
    assert await store.wait_for(USER, "missing", timeout=0) is None


async def test_cancelled_wait_for_leaves_no_waiter(store: LatticeStore) -> None:
    waiter = asyncio.create_task(store.wait_for(USER, "k", timeout=WAIT))
    await run_ready_tasks()
    assert store.waiter_count() == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert store.waiter_count() == 0
    await store.put(USER, "k", lww(b"v"))  # resolving nobody must not fail


async def test_close_ends_waiters(tmp_path: Path) -> None:
    store = LatticeStore(MemoryEngine())
    await store.start()
    waiter = asyncio.create_task(store.wait_for(USER, "k", timeout=WAIT))
    await run_ready_tasks()
    await store.close()
    with pytest.raises(UnavailableError):
        await waiter


# Listing keys


async def test_list_keys_pages_in_ascending_order(store: LatticeStore) -> None:
    names = [f"p/{i:02d}" for i in range(25)] + ["a", "q/1", "p"]
    for name in reversed(names):
        await store.put(USER, name, lww(b"v"))
    await store.put(SYSTEM, "p/system", lww(b"v"))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        keys, token = store.list_keys(USER, "p/", page_size=10, page_token=token)
        seen.extend(keys)
        pages += 1
        if not token:
            break
    assert seen == sorted(n for n in names if n.startswith("p/"))
    assert pages == 3

    assert store.list_keys(USER, "p/", page_size=25) == (seen, "")
    everything, token = store.list_keys(USER)
    assert everything == sorted(names) and token == ""
    assert store.list_keys(SYSTEM) == (["p/system"], "")
    assert store.list_keys(USER, "zzz") == ([], "")


async def test_list_keys_sees_new_and_deleted_keys(store: LatticeStore) -> None:
    for name in ["a", "b", "c", "d"]:
        await store.put(USER, name, lww(b"v"))
    first, token = store.list_keys(USER, page_size=2)
    assert first == ["a", "b"]
    await store.delete(USER, "c")
    await store.put(USER, "bb", lww(b"v"))
    assert store.list_keys(USER, page_size=2, page_token=token) == (["bb", "d"], "")


async def test_list_keys_caps_the_page_size(store: LatticeStore) -> None:
    for i in range(1001):
        await store.put(USER, f"k{i:04d}", lww(b"v"))
    keys, token = store.list_keys(USER, page_size=5000)
    assert len(keys) == 1000 and token
    assert store.list_keys(USER, page_token=token) == (["k1000"], "")


async def test_list_keys_refuses_bad_arguments(store: LatticeStore) -> None:
    for name in ["p/1", "p/2", "q/1", "q/2"]:
        await store.put(USER, name, lww(b"v"))
    _, token = store.list_keys(USER, "p/", page_size=1)
    assert token
    with pytest.raises(InvalidArgumentError, match="page_size"):
        store.list_keys(USER, page_size=-1)
    for bad in ["not a token", "p/1", "e30=", token[:-2]]:
        with pytest.raises(InvalidArgumentError, match="page_token"):
            store.list_keys(USER, "p/", page_token=bad)
    with pytest.raises(InvalidArgumentError, match="page_token"):
        store.list_keys(USER, "q/", page_token=token)  # another prefix
    with pytest.raises(InvalidArgumentError, match="page_token"):
        store.list_keys(SYSTEM, "p/", page_token=token)  # another keyspace


# Watching


async def test_watch_receives_changes_in_order(store: LatticeStore) -> None:
    async with store.watch(USER, ["a"], prefix="p/") as events:
        assert store.watcher_count() == 1
        put_a = await store.put(USER, "a", lww(b"1"))
        await store.put(USER, "b", lww(b"ignored"))
        await store.put(SYSTEM, "a", lww(b"other keyspace"))
        put_p = await store.put(USER, "p/x", set_of(b"x"))
        await store.put(USER, "p/x", set_of(b"x"))  # no change, no event
        await store.delete(USER, "a")
        await store.delete(USER, "a")  # nothing deleted, no event
        assert await next_event(events) == WatchEvent("a", put_a, False)
        assert await next_event(events) == WatchEvent("p/x", put_p, False)
        assert await next_event(events) == WatchEvent("a", None, True)
    assert store.watcher_count() == 0


async def test_watch_needs_a_key_or_prefix(store: LatticeStore) -> None:
    with pytest.raises(InvalidArgumentError):
        store.watch(USER)
    with pytest.raises(InvalidArgumentError):
        store.watch(USER, [""])


async def test_a_watcher_that_falls_behind_is_ended(tmp_path: Path) -> None:
    async with LatticeStore(MemoryEngine(), watch_queue_limit=3) as store:
        events = store.watch(USER, prefix="k")
        for i in range(5):
            await store.put(USER, f"k{i}", lww(b"v"))
        assert store.watcher_count() == 0  # unsubscribed as soon as it overflowed
        with pytest.raises(QueueFullError, match="more than 3 changes behind"):
            await next_event(events)
        with pytest.raises(StopAsyncIteration):
            await next_event(events)


async def test_close_ends_watch_streams(tmp_path: Path) -> None:
    store = LatticeStore(MemoryEngine())
    await store.start()
    events = store.watch(USER, ["k"])
    await store.put(USER, "k", lww(b"v"))
    await store.close()
    assert (await next_event(events)).key == "k"  # what was queued is still delivered
    with pytest.raises(UnavailableError):
        await next_event(events)


async def test_end_watches_ends_streams_but_not_the_store(store: LatticeStore) -> None:
    events = store.watch(USER, ["k"], prefix="p")
    await store.put(USER, "k", lww(b"v"))
    store.end_watches()
    assert store.watcher_count() == 0
    assert (await next_event(events)).key == "k"
    with pytest.raises(UnavailableError, match="shutting down"):
        await next_event(events)
    await store.put(USER, "k", lww(b"w", time_ns=2))  # still serving reads and writes


# Lifecycle


async def test_lifecycle_errors_and_idempotent_close() -> None:
    store = LatticeStore(MemoryEngine())
    with pytest.raises(RuntimeError, match="start"):
        await store.put(USER, "k", lww(b"v"))
    await store.start()
    await store.start()
    await asyncio.gather(store.close(), store.close())
    await store.close()
    with pytest.raises(UnavailableError):
        await store.put(USER, "k", lww(b"v"))
    with pytest.raises(UnavailableError):
        await store.start()


async def test_close_during_start_leaves_nothing_running(tmp_path: Path) -> None:
    store = LatticeStore(SqliteEngine(tmp_path / "kvs.sqlite3"))
    async with asyncio.timeout(WAIT):
        await asyncio.gather(store.start(), store.start(), store.close())
    assert not [t for t in threading.enumerate() if t.name == "kvs-writer"]
    with pytest.raises(UnavailableError):
        await store.put(USER, "k", lww(b"v"))


# Durability (SQLite)


async def test_sqlite_values_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "kvs.sqlite3"
    async with LatticeStore(SqliteEngine(path)) as store:
        await store.put(USER, "k", lww(b"v"))
        await store.put(SYSTEM, "k", set_of(b"b", b"a"))
        await store.put(USER, "gone", lww(b"v"))
        await store.delete(USER, "gone")
    async with LatticeStore(SqliteEngine(path, sync="full")) as store:
        assert store.get(USER, "k") == lww(b"v")
        assert set_items(store.get(SYSTEM, "k")) == [b"a", b"b"]
        assert store.get(USER, "gone") is None
        assert len(store) == 2


async def test_closing_without_the_loop_keeps_what_was_stored(tmp_path: Path) -> None:
    """The forced exit of a process whose loop is held up closes the store from a thread."""
    path = tmp_path / "kvs.sqlite3"
    store = LatticeStore(SqliteEngine(path))
    await store.start()
    await store.put(USER, "k", lww(b"v"))
    await asyncio.to_thread(store.close_blocking, 10.0)
    with pytest.raises(UnavailableError):
        await store.put(USER, "after", lww(b"v"))
    async with LatticeStore(SqliteEngine(path)) as reopened:
        assert reopened.get(USER, "k") == lww(b"v")


class GatedEngine(SqliteEngine):
    """A SQLite engine whose first write blocks until the test opens the gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.batches: list[int] = []

    def write(self, puts: Sequence[Row], deletes: Sequence[tuple[int, str]]) -> None:
        self.entered.set()
        if not self.gate.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        self.batches.append(len(puts) + len(deletes))
        super().write(puts, deletes)


async def test_group_commit_acknowledges_puts_only_after_their_commit(tmp_path: Path) -> None:
    path = tmp_path / "kvs.sqlite3"
    engine = GatedEngine(path)
    count = 200
    async with LatticeStore(engine) as store:
        first = asyncio.create_task(store.put(USER, "k0", lww(b"v")))
        assert await asyncio.to_thread(engine.entered.wait, WAIT)
        rest = [asyncio.create_task(store.put(USER, f"k{i}", lww(b"v"))) for i in range(1, count)]
        await run_ready_tasks()
        # Every write is queued and visible to reads, but none is acknowledged:
        # the writer thread is still inside the first commit.
        assert store.get(USER, f"k{count - 1}") is not None
        assert not first.done() and not any(task.done() for task in rest)
        engine.gate.set()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(first, *rest)
        # The first write was committed alone; all the others queued behind it
        # went into one transaction.
        assert engine.batches == [1, count - 1]
    async with LatticeStore(SqliteEngine(path)) as reopened:
        assert len(reopened) == count


async def test_concurrent_puts_are_all_durable(tmp_path: Path) -> None:
    path = tmp_path / "kvs.sqlite3"
    async with LatticeStore(SqliteEngine(path)) as store:
        await asyncio.gather(
            *(store.put(USER, f"k{i % 50}", set_of(str(i).encode())) for i in range(500))
        )
    async with LatticeStore(SqliteEngine(path)) as store:
        assert len(store) == 50
        for k in range(50):
            expected = sorted(str(i).encode() for i in range(k, 500, 50))
            assert set_items(store.get(USER, f"k{k}")) == expected


CRASH_SCRIPT = """
import asyncio, os, signal, sys
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs.storage import SqliteEngine
from cloudburst_kvs.store import LatticeStore

async def main(path, count):
    store = LatticeStore(SqliteEngine(path))
    await store.start()
    def lattice(i):
        value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=str(i).encode())
        return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value]))
    await asyncio.gather(
        *(store.put(lattice_pb2.KEYSPACE_USER, f"k{i}", lattice(i)) for i in range(count))
    )
    print("done", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(): the process just dies

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_acknowledged_puts_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "kvs.sqlite3"
    count = 300
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASH_SCRIPT,
        str(path),
        str(count),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert stdout.decode().strip() == "done", stderr.decode()
    assert process.returncode == -signal.SIGKILL
    async with LatticeStore(SqliteEngine(path)) as store:
        assert len(store) == count
        assert set_items(store.get(USER, f"k{count - 1}")) == [str(count - 1).encode()]


class FailingEngine(MemoryEngine):
    durable = True

    def write(self, puts: Sequence[Row], deletes: Sequence[tuple[int, str]]) -> None:
        raise StorageError("disk full")


async def test_a_failed_commit_fails_the_put() -> None:
    async with LatticeStore(FailingEngine()) as store:
        with pytest.raises(UnavailableError, match="durable"):
            await store.put(USER, "k", lww(b"v"))


# Engines


def test_sqlite_engine_roundtrip(tmp_path: Path) -> None:
    engine = SqliteEngine(tmp_path / "nested" / "dir" / "kvs.sqlite3")
    try:
        engine.write([(1, "a", b"1"), (2, "a", b"2")], [])
        engine.write([(1, "a", b"3")], [(2, "a"), (1, "missing")])
        rows: Iterator[Row] = engine.load()
        assert sorted(rows) == [(1, "a", b"3")]
    finally:
        engine.close()
        engine.close()
    with pytest.raises(StorageError, match="closed"):
        engine.write([], [])


def test_sqlite_engine_reports_an_unusable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=r"kvs\.data_dir") as info:
        SqliteEngine(blocker / "sub" / "kvs.sqlite3")
    assert isinstance(info.value, OSError)
    with pytest.raises(StorageError, match="cannot open"):
        SqliteEngine(tmp_path)  # a directory is not a database file


def test_open_engine(tmp_path: Path) -> None:
    assert isinstance(open_engine("memory", tmp_path), MemoryEngine)
    engine = open_engine("sqlite", tmp_path / "data", "full")
    try:
        assert isinstance(engine, SqliteEngine)
        assert engine.path == tmp_path / "data" / SQLITE_FILE_NAME
    finally:
        engine.close()
    with pytest.raises(ValueError, match="unknown KVS engine"):
        open_engine("rocksdb", tmp_path)
    with pytest.raises(ValueError, match="sync"):
        SqliteEngine(tmp_path / "x.sqlite3", sync="sometimes")
    assert list(MemoryEngine().load()) == []


async def test_the_size_a_put_gives_is_known_for_what_reads_return(store: LatticeStore) -> None:
    await store.put(USER, "k", lww(b"x" * 50, time_ns=1), size=50)
    first = await store.read(USER, "k")
    assert first is not None and store.known_size(USER, "k", first) == 50
    await store.put(USER, "k", lww(b"y" * 7, time_ns=2), size=7)
    second = await store.read(USER, "k")
    assert second is not None and store.known_size(USER, "k", second) == 7
    assert store.known_size(USER, "k", first) is None, "no longer the key's lattice"
    await store.put(USER, "k", lww(b"z" * 9, time_ns=1), size=9)  # an older write: loses
    assert store.known_size(USER, "k", second) == 7
    await store.delete(USER, "k")
    assert store.known_size(USER, "k", second) is None
    await store.put(USER, "s", set_of(b"a"))
    members = await store.read(USER, "s")
    assert members is not None and store.known_size(USER, "s", members) is None
