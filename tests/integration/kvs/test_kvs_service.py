"""KvsService over a real grpc.aio server on 127.0.0.1:0, called through KvsClient."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cloudburst.errors import (
    InvalidArgumentError,
    LatticeTypeMismatchError,
    PayloadTooLargeError,
)
from cloudburst.rpc import call
from cloudburst.transport import channel_options
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs.client import KvsClient
from cloudburst_kvs.local import add_kvs_to_server
from cloudburst_kvs.storage import StorageEngine, open_engine
from cloudburst_kvs.store import LatticeStore, Subscription, WatchEvent

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM
LIMIT = 4096  # max_payload_bytes of the test servers
WAIT = 10.0  # seconds: the bound on every wait that should end at once
#: Seconds of a caller's deadline that must end a wait: short next to the server's wait limit
#: (30 s) that it cuts, long next to the scheduling delays of a loaded machine.
SHORT_DEADLINE = 1.0


def value(data: bytes) -> value_pb2.Value:
    return value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=data)


def lww(data: bytes, time_ns: int = 0, writer: str = "") -> lattice_pb2.Lattice:
    timestamp = lattice_pb2.LwwTimestamp(time_ns=time_ns, writer_id=writer)
    return lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(timestamp=timestamp, value=value(data)))


def set_of(*items: bytes) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value(i) for i in items]))


class ObservedStore(LatticeStore):
    """A store that tells the test when a GetValue waits and when a watch ends."""

    def __init__(self, engine: StorageEngine, max_lattice_bytes: int) -> None:
        super().__init__(engine, max_lattice_bytes=max_lattice_bytes)
        self.waiting = asyncio.Event()
        self.unwatched = asyncio.Event()
        self.wait_timeouts: list[float] = []
        """The timeout of each wait_for, as the servicer chose it."""
        self.wait_ends: list[float] = []
        """When each wait_for was to end at the latest (time.monotonic())."""
        self.waiters_after: list[int] = []
        """How many waiters were left when each wait_for returned (before the answer went out)."""

    def _unsubscribe(self, subscription: Subscription) -> None:
        super()._unsubscribe(subscription)
        self.unwatched.set()

    async def wait_for(
        self,
        keyspace: int,
        key: str,
        timeout: float,
    ) -> lattice_pb2.Lattice | None:
        # Set before the real wait registers its waiter; the test resumes only
        # after this coroutine has suspended, i.e. after the waiter is registered.
        self.waiting.set()
        self.wait_timeouts.append(timeout)
        self.wait_ends.append(time.monotonic() + timeout)
        try:
            return await super().wait_for(keyspace, key, timeout)
        finally:
            self.waiters_after.append(self.waiter_count())


@dataclass
class Kvs:
    client: KvsClient
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub
    store: ObservedStore


StartKvs = Callable[..., Awaitable[Kvs]]


@pytest.fixture
async def start_kvs(tmp_path: Path) -> AsyncIterator[StartKvs]:
    """Start KVS servers (SQLite in tmp_path) on demand; all are stopped at teardown."""
    started: list[LatticeStore] = []
    async with contextlib.AsyncExitStack() as stack:

        async def start(max_wait_seconds: float = 30.0) -> Kvs:
            config = KvsConfig(
                engine="sqlite",
                data_dir=tmp_path / f"kvs-{len(started)}",
                max_wait_seconds=max_wait_seconds,
            )
            # What cloudburst_kvs.local.open_store builds, in a store the test can observe.
            store = ObservedStore(open_engine(config.engine, config.data_dir, config.sync), LIMIT)
            started.append(store)
            await store.start()
            stack.push_async_callback(store.close)
            server, _health = create_server(LIMIT)
            add_kvs_to_server(server, store, config, LIMIT)
            port = bind(server, "127.0.0.1", 0)
            await server.start()
            stack.push_async_callback(server.stop, None)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(LIMIT))
            stack.push_async_callback(channel.close)
            client = KvsClient(channel)
            stack.push_async_callback(client.close)  # its op stream, before the channel
            return Kvs(client, kvs_service_pb2_grpc.KvsServiceStub(channel), store)

        yield start


@pytest.fixture
async def kvs(start_kvs: StartKvs) -> Kvs:
    return await start_kvs()


async def test_put_get_roundtrip(kvs: Kvs) -> None:
    assert await kvs.client.get("k") is None
    stored = await kvs.client.put("k", lww(b"hello"))
    # The server stamped the write that came without a timestamp.
    assert stored.lww.timestamp.time_ns > 0 and stored.lww.timestamp.writer_id
    assert stored.lww.value == value(b"hello")
    assert await kvs.client.get("k") == stored

    later = await kvs.client.put("k", lww(b"world"))
    assert later.lww.timestamp.time_ns > stored.lww.timestamp.time_ns
    assert (await kvs.client.get("k")) == later

    merged = await kvs.client.put("s", set_of(b"b"))
    merged = await kvs.client.put("s", set_of(b"a"))
    assert [v.data for v in merged.set.values] == [b"a", b"b"]


async def test_a_put_that_omits_the_lattice_is_answered_without_it(kvs: Kvs) -> None:
    big = b"v" * (LIMIT // 2)
    request = kvs_service_pb2.PutValueRequest(key="big", lattice=lww(big), omit_lattice=True)
    response = await kvs.stub.PutValue(request, timeout=10)
    assert not response.HasField("lattice"), "the value is not sent back"
    stored = await kvs.client.get("big")
    assert stored is not None and stored.lww.value.data == big
    # KvsClient.merge is put without reading back; a later write still wins.
    await kvs.client.merge("big", lww(b"small"))
    stored = await kvs.client.get("big")
    assert stored is not None and stored.lww.value.data == b"small"
    # Without the flag the merged lattice comes back, as before.
    echoed = await kvs.stub.PutValue(
        kvs_service_pb2.PutValueRequest(key="big", lattice=lww(b"last")), timeout=10
    )
    assert echoed.lattice.lww.value.data == b"last"


async def test_what_a_newer_client_adds_to_a_write_is_not_stored(kvs: Kvs) -> None:
    # The unary put's own lattice is normalized in place and kept; a streamed one is copied.
    unknown = b"\xf8\x07\x01"  # field 127 of Value, varint 1: unknown to this server
    for key, stub in (("unary", kvs.stub.PutValue), ("streamed", None)):
        written = lww(b"x", time_ns=time.time_ns(), writer="newer")
        written.lww.value.MergeFromString(unknown)
        request = kvs_service_pb2.PutValueRequest(key=key, lattice=written, omit_lattice=True)
        assert unknown in request.SerializeToString()
        if stub is not None:
            await stub(request, timeout=WAIT)
        else:
            await asyncio.wait_for(kvs.client.merge(key, written), WAIT)
        stored = kvs.store.get(USER, key)
        assert stored is not None and unknown not in stored.SerializeToString()
        assert stored.lww.value == value(b"x") and stored.lww.timestamp.writer_id == "newer"
        read = await kvs.stub.GetValue(kvs_service_pb2.GetValueRequest(key=key), timeout=WAIT)
        assert unknown not in read.SerializeToString()


async def test_delete_and_batch_get(kvs: Kvs) -> None:
    await kvs.client.put("a", lww(b"1"))
    await kvs.client.put("b", lww(b"2"))
    assert await kvs.client.delete("a") is True
    assert await kvs.client.delete("a") is False
    found = await kvs.client.batch_get(["b", "a", "missing"])
    assert list(found) == ["b", "a", "missing"]
    assert found["a"] is None and found["missing"] is None
    b = found["b"]
    assert b is not None and b.lww.value.data == b"2"


async def test_batch_get_splits_large_batches(kvs: Kvs) -> None:
    await kvs.client.put("k1500", lww(b"v"))
    keys = [f"k{i}" for i in range(2500)]
    found = await kvs.client.batch_get(keys)
    assert len(found) == 2500
    assert [k for k, v in found.items() if v is not None] == ["k1500"]


async def test_batch_delete_removes_existing_keys_and_splits_large_batches(kvs: Kvs) -> None:
    for key in ("k3", "k1200", "k2400"):
        await kvs.client.put(key, lww(b"v"))
    await kvs.client.put("kept", lww(b"v"))
    keys = [f"k{i}" for i in range(2500)]
    assert await kvs.client.batch_delete(keys) == 3
    assert [k for k, v in (await kvs.client.batch_get([*keys, "kept"])).items() if v] == ["kept"]


async def test_batch_delete_refuses_oversized_and_empty_keys(kvs: Kvs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await kvs.stub.BatchDeleteValues(
            kvs_service_pb2.BatchDeleteValuesRequest(keys=[f"k{i}" for i in range(1001)])
        )
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000 keys" in (too_many.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await kvs.stub.BatchDeleteValues(kvs_service_pb2.BatchDeleteValuesRequest(keys=["a", ""]))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "keys[1]" in (empty.value.details() or "")


async def test_wait_is_resolved_by_a_concurrent_put(kvs: Kvs) -> None:
    waiting = asyncio.create_task(kvs.client.get("future", wait=True, timeout=WAIT))
    async with asyncio.timeout(WAIT):
        await kvs.store.waiting.wait()
    assert kvs.store.waiter_count() == 1
    stored = await kvs.client.put("future", lww(b"result"))
    async with asyncio.timeout(WAIT):
        assert await waiting == stored
    assert kvs.store.waiter_count() == 0


async def test_wait_with_a_short_deadline_returns_not_found(kvs: Kvs) -> None:
    start = time.monotonic()
    assert await kvs.client.get("never", wait=True, timeout=SHORT_DEADLINE) is None
    elapsed = time.monotonic() - start
    # The server ended its wait before the caller's deadline (so that the caller gets
    # found=False rather than DEADLINE_EXCEEDED; test_wait_ends_at_the_server_wait_limit reads
    # that answer on the wire) and removed its waiter before answering. It ends the wait a
    # margin (10%, at most 50 ms) before its own view of the deadline, which trails the
    # caller's by the request's transit and gRPC's clock granularity (8 ms was seen on a loaded
    # machine): without the margin the wait would end after the caller's deadline. Whether the
    # answer then beats the deadline depends on scheduling within the margin, so that is not
    # asserted: the client reads either as "not found".
    (timeout,) = kvs.store.wait_timeouts
    (wait_end,) = kvs.store.wait_ends
    assert timeout > SHORT_DEADLINE / 2
    assert wait_end < start + SHORT_DEADLINE
    assert kvs.store.waiters_after == [0]
    assert kvs.store.waiter_count() == 0
    # The call waited (the server's wait began after the call did), and no longer than its
    # deadline allows; the upper bound is loose (WAIT) because a loaded machine may delay the
    # answer, which is not what this test is about.
    assert timeout <= elapsed < SHORT_DEADLINE + WAIT


async def test_wait_ends_at_the_server_wait_limit(start_kvs: StartKvs) -> None:
    kvs = await start_kvs(max_wait_seconds=0.2)
    start = time.monotonic()
    response = await kvs.stub.GetValue(kvs_service_pb2.GetValueRequest(key="never", wait=True))
    assert not response.found
    assert time.monotonic() - start < 0.2 + 2.0


async def test_errors_arrive_as_cloudburst_exceptions(kvs: Kvs) -> None:
    with pytest.raises(InvalidArgumentError, match="key must not be empty") as invalid:
        await kvs.client.put("", lww(b"v"))
    assert invalid.value.reason == "INVALID_ARGUMENT"
    assert invalid.value.metadata == {"field": "key"}
    with pytest.raises(InvalidArgumentError):
        await kvs.client.get("")
    with pytest.raises(InvalidArgumentError, match="no kind"):
        await kvs.client.put("k", lattice_pb2.Lattice())
    unspecified = lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(value=value_pb2.Value(data=b"x")))
    with pytest.raises(InvalidArgumentError, match="SERIALIZER_UNSPECIFIED"):
        await kvs.client.put("k", unspecified)

    with pytest.raises(PayloadTooLargeError, match=f"limit of {LIMIT} bytes") as too_large:
        await kvs.client.put("big", lww(b"x" * (LIMIT + 1)))
    assert too_large.value.reason == "PAYLOAD_TOO_LARGE"
    assert too_large.value.metadata["limit"] == str(LIMIT)

    await kvs.client.put("typed", lww(b"v"))
    with pytest.raises(LatticeTypeMismatchError) as mismatch:
        await kvs.client.put("typed", set_of(b"v"))
    assert mismatch.value.reason == "LATTICE_TYPE_MISMATCH"

    too_many = kvs_service_pb2.BatchGetValuesRequest(keys=[f"k{i}" for i in range(1001)])
    with pytest.raises(InvalidArgumentError, match="at most 1000 keys"):
        await call("BatchGetValues", lambda: kvs.stub.BatchGetValues(too_many))
    bad_token = kvs_service_pb2.ListKeysRequest(page_token="garbage")
    with pytest.raises(InvalidArgumentError, match="page_token"):
        await call("ListKeys", lambda: kvs.stub.ListKeys(bad_token))
    with pytest.raises(InvalidArgumentError, match="unknown keyspace"):
        await kvs.client.get("k", keyspace=lattice_pb2.Keyspace.ValueType(42))


async def test_keyspaces_are_isolated(kvs: Kvs) -> None:
    await kvs.client.put("same", lww(b"user"))
    await kvs.client.put("same", set_of(b"system"), keyspace=SYSTEM)
    user = await kvs.client.get("same")
    system = await kvs.client.get("same", keyspace=SYSTEM)
    assert user is not None and user.lww.value.data == b"user"
    assert system is not None and [v.data for v in system.set.values] == [b"system"]
    assert await kvs.client.list_keys(keyspace=SYSTEM) == ["same"]
    assert await kvs.client.delete("same", keyspace=SYSTEM) is True
    assert await kvs.client.get("same") is not None


async def test_list_keys_reads_every_page(kvs: Kvs) -> None:
    names = [f"dag/{i:02d}" for i in range(10)] + ["fn/1", "dag"]
    for name in names:
        await kvs.client.put(name, lww(b"v"))
    assert await kvs.client.list_keys("dag/", page_size=3) == sorted(names[:10])
    assert await kvs.client.list_keys() == sorted(names)
    first = await kvs.stub.ListKeys(kvs_service_pb2.ListKeysRequest(prefix="dag/", page_size=4))
    assert list(first.keys) == names[:4] and first.next_page_token


async def test_watch_streams_changes(kvs: Kvs) -> None:
    async with await kvs.client.watch(["k"], prefix="p/", timeout=60) as events:
        # watch() returned, so the server is already watching: nothing below is missed.
        put = await kvs.client.put("k", lww(b"1"))
        await kvs.client.put("unwatched", lww(b"x"))
        prefixed = await kvs.client.put("p/a", set_of(b"a"))
        await kvs.client.delete("k")
        async with asyncio.timeout(WAIT):
            assert await anext(events) == WatchEvent("k", put, False)
            assert await anext(events) == WatchEvent("p/a", prefixed, False)
            assert await anext(events) == WatchEvent("k", None, True)
    # Closing the stream cancels the call, and the server forgets the watcher.
    async with asyncio.timeout(WAIT):
        await kvs.store.unwatched.wait()
    assert kvs.store.watcher_count() == 0


async def test_watch_refusals_surface_from_watch(kvs: Kvs) -> None:
    with pytest.raises(InvalidArgumentError, match="key prefix to watch"):
        stream = await kvs.client.watch([])
        async with asyncio.timeout(WAIT):
            await anext(stream)


async def test_a_batch_answer_leaves_out_what_does_not_fit_for_chunked_reads(kvs: Kvs) -> None:
    # Each value fits in a message; two do not fit in one answer.
    for key, fill in (("b1", b"1"), ("b2", b"2"), ("b3", b"3")):
        await kvs.client.merge(key, lww(fill * (LIMIT // 2)))
    await kvs.client.merge("bs", set_of(b"x" * (LIMIT // 2)))
    await kvs.client.merge("bs", set_of(b"y" * (LIMIT // 2)))  # the set outgrows a message
    keys = ["b1", "missing", "b2", "bs", "b3"]
    request = kvs_service_pb2.BatchGetValuesRequest(keys=keys)
    response = await kvs.stub.BatchGetValues(request)
    answered = {e.key: (e.found, e.chunked, e.HasField("lattice")) for e in response.entries}
    assert answered == {
        "b1": (True, False, True),
        "missing": (False, False, False),
        "b2": (True, True, False),
        "bs": (True, True, False),
        "b3": (True, True, False),
    }
    found = await kvs.client.batch_get(keys)
    assert found["missing"] is None
    for key, fill in (("b1", b"1"), ("b2", b"2"), ("b3", b"3")):
        lattice = found[key]
        assert lattice is not None and lattice.lww.value.data == fill * (LIMIT // 2)
    stored_set = found["bs"]
    assert stored_set is not None
    assert [v.data for v in stored_set.set.values] == [b"x" * (LIMIT // 2), b"y" * (LIMIT // 2)]
    assert await kvs.client.get("bs") == stored_set  # alone: GetValue says chunked too


async def test_a_reader_with_a_smaller_message_limit_is_answered_in_chunks(kvs: Kvs) -> None:
    data = b"r" * (LIMIT // 2)  # fits in one of the server's messages, not in the reader's
    await kvs.client.merge("r", lww(data))
    reader_limit = LIMIT // 4
    whole = await kvs.stub.GetValue(kvs_service_pb2.GetValueRequest(key="r"))
    assert whole.found and not whole.chunked
    assert (
        await kvs.stub.GetValue(kvs_service_pb2.GetValueRequest(key="r", max_message_bytes=LIMIT))
    ) == whole
    asked = kvs_service_pb2.GetValueRequest(key="r", max_message_bytes=reader_limit)
    answer = await kvs.stub.GetValue(asked)
    assert answer.found and answer.chunked and not answer.HasField("lattice")
    batch = await kvs.stub.BatchGetValues(
        kvs_service_pb2.BatchGetValuesRequest(keys=["r"], max_message_bytes=reader_limit)
    )
    assert [(e.key, e.found, e.chunked) for e in batch.entries] == [("r", True, True)]
    # On an op stream, as in a unary call.
    frame = kvs_service_pb2.StreamOpsRequest(sequence=1, get=asked)
    async with asyncio.timeout(WAIT):
        stream = kvs.stub.StreamOps(iter([frame]))
        streamed = await anext(aiter(stream))
        stream.cancel()
    assert streamed.sequence == 1 and streamed.get == answer
    frames = [
        f
        async for f in kvs.stub.GetValueChunks(
            kvs_service_pb2.GetValueChunksRequest(key="r", max_message_bytes=reader_limit)
        )
    ]
    assert b"".join(f.chunk for f in frames) == data
