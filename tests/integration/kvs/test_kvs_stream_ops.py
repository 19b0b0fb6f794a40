"""Small KVS ops over one StreamOps stream, against real servers on 127.0.0.1:0.

A client that streams its reads and merges gets the same results and the same
errors as one that makes unary calls; ops on one stream do not wait for each
other; a KVS that dies fails the ops in flight at once, and the client
recovers once a KVS is back; a KVS without the method gets unary calls; every
frame is authorized as its unary call would be. Ops that queue up travel in
batches, in both directions, between peers that both read them, and one at a
time otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once

from cloudburst.errors import CloudburstError, UnavailableError
from cloudburst.opstream import MAX_STREAMED_PUT_BYTES
from cloudburst.streams import BATCHES_ENV
from cloudburst.transport import channel_options
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.security.authz import Authenticator, AuthInterceptor
from cloudburst_grpc.security.identity import EXECUTOR, INVOKER_RESTRICTED, Identity
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs import servicer as servicer_module
from cloudburst_kvs.client import STREAM_ENV, KvsClient, stream_enabled
from cloudburst_kvs.local import add_kvs_to_server, open_store
from cloudburst_kvs.servicer import KvsServicer
from cloudburst_kvs.store import LatticeStore
from harness import CbgrpcProcess
from kvs_interceptors import Chain, HeldStore, MessageCounter, Recorder

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM
LIMIT = 4096  # max_payload_bytes of the test servers
WAIT = 30.0  # seconds: the bound on every wait that should end at once


def value(data: bytes, serializer: int = value_pb2.SERIALIZER_BYTES) -> value_pb2.Value:
    return value_pb2.Value(serializer=serializer, data=data)  # type: ignore[arg-type]


def lww(data: bytes, serializer: int = value_pb2.SERIALIZER_BYTES) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(value=value(data, serializer)))


def set_of(*items: bytes) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value(i) for i in items]))


@dataclass
class FixedRole(Authenticator):
    """Every caller has ``role`` (the tests here are about what a role may do, not who it is)."""

    role: str = EXECUTOR

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        return Identity(self.role, "token", "test")


@dataclass
class Kvs:
    address: str
    recorder: Recorder
    store: LatticeStore
    servicer: KvsServicer
    counter: MessageCounter
    clients: list[KvsClient] = field(default_factory=list)


StartKvs = Callable[..., Awaitable[Kvs]]
Connect = Callable[..., Awaitable[KvsClient]]


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
def start_kvs(stack: contextlib.AsyncExitStack) -> StartKvs:
    """Start in-memory KVS servers on demand (optionally authorizing by role)."""

    async def start(role: str | None = None, limit: int = LIMIT) -> Kvs:
        config = KvsConfig(engine="memory", max_wait_seconds=WAIT)
        store = open_store(config, limit)
        await store.start()
        stack.push_async_callback(store.close)
        recorder = Recorder()
        counter = MessageCounter()  # the first: it sees the messages as they travel
        interceptors: list[grpc.aio.ServerInterceptor] = [counter, recorder]
        if role is not None:
            interceptors.append(AuthInterceptor(FixedRole(None, role=role)))
        server, _health = create_server(limit, Chain(*interceptors))
        servicer = add_kvs_to_server(server, store, config, limit)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop, None)
        return Kvs(f"127.0.0.1:{port}", recorder, store, servicer, counter)

    return start


@pytest.fixture
def connect(stack: contextlib.AsyncExitStack) -> Connect:
    """Open a channel and a client on it; both are closed at teardown."""

    async def open_client(address: str, stream: bool | None = True) -> KvsClient:
        channel = grpc.aio.insecure_channel(address, options=channel_options(LIMIT))
        stack.push_async_callback(channel.close)
        client = KvsClient(channel, stream=stream, name=f"the KVS at {address}")
        stack.push_async_callback(client.close)
        return client

    return open_client


async def outcome(operation: Awaitable[Any]) -> Any:
    """The result of an operation, or its error as (class, message) for comparing."""
    try:
        return await asyncio.wait_for(operation, WAIT)
    except CloudburstError as exc:
        return (type(exc), str(exc), dict(exc.metadata))


async def test_streamed_ops_give_the_unary_results_and_errors(
    start_kvs: StartKvs, connect: Connect
) -> None:
    kvs = await start_kvs()
    streamed = await connect(kvs.address, stream=True)
    unary = await connect(kvs.address, stream=False)

    unary_ops = 0

    async def both(make: Callable[[KvsClient], Awaitable[Any]]) -> Any:
        nonlocal unary_ops
        via_stream = await outcome(make(streamed))
        via_unary = await outcome(make(unary))
        unary_ops += 1
        assert via_stream == via_unary
        return via_stream

    # Results: a missing key, a value written one way and read the other, a merge.
    assert await both(lambda c: c.get("missing")) is None
    stored = await streamed.put("k", lww(b"one"))
    assert stored.lww.value == value(b"one") and stored.lww.timestamp.time_ns > 0
    assert await unary.get("k") == stored
    await unary.put("s", set_of(b"a"))
    unary_ops += 2
    merged = await streamed.put("s", set_of(b"b"))
    assert sorted(v.data for v in merged.set.values) == [b"a", b"b"]
    assert await both(lambda c: c.get("s")) == merged
    await streamed.merge("m", lww(b"merged"))
    assert (await both(lambda c: c.get("m"))).lww.value == value(b"merged")
    assert await both(lambda c: c.get("m", SYSTEM)) is None
    # Deletes: one that found its key (read back as gone both ways), and one that did not.
    assert await streamed.delete("m") is True
    assert await both(lambda c: c.get("m")) is None
    assert await both(lambda c: c.delete("m")) is False

    # Errors, with the same class, message and metadata.
    errors = [
        await both(lambda c: c.put("big", lww(b"x" * (LIMIT + 1)))),  # payload too large
        await both(lambda c: c.put("", lww(b"x"))),  # no key
        await both(lambda c: c.get("")),
        await both(lambda c: c.put("k", lww(b"x"), 77)),  # type: ignore[arg-type]  # keyspace
        await both(lambda c: c.get("k", 77)),  # type: ignore[arg-type]
        await both(lambda c: c.put("k", set_of(b"x"))),  # lattice type mismatch
        await both(lambda c: c.delete("")),
        await both(lambda c: c.delete("k", 77)),  # type: ignore[arg-type]
    ]
    for error in errors:
        assert isinstance(error, tuple) and issubclass(error[0], CloudburstError), error
    assert "over the limit" in errors[0][1]

    # A waiting read that ends at its deadline reads "not found" both ways.
    assert await both(lambda c: c.get("never", wait=True, timeout=1.0)) is None

    # Everything the streaming client did went over one stream; the other made unary calls.
    assert kvs.recorder.calls("StreamOps") == 1
    unary_calls = sum(kvs.recorder.calls(m) for m in ("GetValue", "PutValue", "DeleteValue"))
    assert unary_calls == unary_ops
    assert len(kvs.recorder.methods) == unary_ops + 1


async def test_a_waiting_read_holds_up_no_later_op_on_the_stream(
    start_kvs: StartKvs, connect: Connect
) -> None:
    kvs = await start_kvs()
    client = await connect(kvs.address)
    waiting = asyncio.create_task(client.get("later", wait=True, timeout=WAIT * 2))
    try:
        # Ops sent after the waiting read are answered while it waits.
        for index in range(5):
            await asyncio.wait_for(client.merge(f"other-{index}", lww(b"v")), WAIT)
            assert await asyncio.wait_for(client.get(f"other-{index}"), WAIT) is not None
        assert not waiting.done()
        await asyncio.wait_for(client.merge("later", lww(b"here")), WAIT)
        found = await asyncio.wait_for(waiting, WAIT)
        assert found is not None and found.lww.value == value(b"here")
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.recorder.calls("GetValue") == kvs.recorder.calls("PutValue") == 0


async def test_many_concurrent_ops_are_each_answered(start_kvs: StartKvs, connect: Connect) -> None:
    kvs = await start_kvs()
    client = await connect(kvs.address)
    count = 300
    await asyncio.wait_for(
        asyncio.gather(*(client.merge(f"key-{i}", lww(str(i).encode())) for i in range(count))),
        WAIT,
    )
    found = await asyncio.wait_for(
        asyncio.gather(*(client.get(f"key-{i}") for i in range(count))), WAIT
    )
    assert [f.lww.value.data if f else None for f in found] == [
        str(i).encode() for i in range(count)
    ]
    assert kvs.recorder.calls("StreamOps") == 1


async def test_flow_control_holds_back_ops_but_not_behind_waiting_reads(
    start_kvs: StartKvs, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer_module, "MAX_UNANSWERED_OPS", 4)
    kvs = await start_kvs()
    client = await connect(kvs.address)
    # More ops at once than the stream may have unanswered: all are answered.
    count = 100
    await asyncio.wait_for(
        asyncio.gather(*(client.merge(f"key-{i}", lww(b"v")) for i in range(count))), WAIT
    )
    found = await asyncio.wait_for(
        asyncio.gather(*(client.get(f"key-{i}") for i in range(count))), WAIT
    )
    assert all(f is not None for f in found)
    # More waiting reads than that: the merge they wait for, sent behind them, is still read.
    waiting = [
        asyncio.create_task(client.get("awaited", wait=True, timeout=WAIT * 2)) for _ in range(8)
    ]
    try:
        # Every read waits at the KVS before the merge is sent.
        deadline = asyncio.get_running_loop().time() + WAIT
        while kvs.store.waiter_count() < len(waiting):
            assert asyncio.get_running_loop().time() < deadline, kvs.store.waiter_count()
            await asyncio.sleep(0.01)
        await asyncio.wait_for(client.merge("awaited", lww(b"here")), WAIT)
        results = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
        assert all(r is not None and r.lww.value == value(b"here") for r in results)
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    assert kvs.recorder.calls("StreamOps") == 1


async def test_a_retired_client_ends_its_stream_once_its_ops_are_answered(
    start_kvs: StartKvs, connect: Connect
) -> None:
    kvs = await start_kvs()
    retired = await connect(kvs.address)
    other = await connect(kvs.address, stream=False)
    waiting = asyncio.create_task(retired.get("awaited", wait=True, timeout=WAIT * 2))
    try:
        deadline = asyncio.get_running_loop().time() + WAIT
        while kvs.store.waiter_count() < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        retired.retire()
        # The op in flight goes on to its answer; later ones are unary calls.
        await asyncio.wait_for(retired.merge("awaited", lww(b"here")), WAIT)
        found = await asyncio.wait_for(waiting, WAIT)
        assert found is not None and found.lww.value == value(b"here")
        assert await asyncio.wait_for(other.get("awaited"), WAIT) is not None
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.recorder.calls("PutValue") == 1
    # The stream ended by itself: the server's side of it is gone.
    assert retired._ops is not None and retired._ops.small._closing is not None
    await asyncio.wait_for(retired._ops.small._closing, WAIT)
    servicer = kvs.servicer
    assert not servicer._streams


async def test_an_op_past_its_deadline_fails_as_its_unary_call(
    stack: contextlib.AsyncExitStack, connect: Connect, tmp_path: Path
) -> None:
    store = HeldStore(max_lattice_bytes=LIMIT)
    await store.start()
    stack.push_async_callback(store.close)
    stack.callback(store.release.set)
    server, _health = create_server(LIMIT)
    add_kvs_to_server(server, store, KvsConfig(engine="memory"), LIMIT)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    stack.push_async_callback(server.stop, None)
    address = f"127.0.0.1:{port}"
    streamed = await connect(address, stream=True)
    unary = await connect(address, stream=False)

    late = [await outcome(c.merge("held", lww(b"x"), timeout=1.0)) for c in (streamed, unary)]
    assert late[0][:2] == late[1][:2]
    assert late[0][0].__name__ == "CloudburstTimeoutError"
    assert "PutValue of key 'held' did not finish before its deadline" in late[0][1]
    # The stream serves the next ops as before.
    await asyncio.wait_for(streamed.merge("free", lww(b"y")), WAIT)
    assert await asyncio.wait_for(streamed.get("free"), WAIT) is not None


async def test_a_killed_kvs_fails_the_ops_in_flight_and_the_client_recovers(
    connect: Connect,
) -> None:
    process = CbgrpcProcess("kvs", "--storage", "memory")
    try:
        client = await connect(process.address)
        await asyncio.wait_for(client.merge("k", lww(b"before")), WAIT)
        # In flight: a read that would wait far longer than the test allows.
        waiting = asyncio.create_task(client.get("never", wait=True, timeout=WAIT * 4))
        await asyncio.wait_for(client.get("k"), WAIT)  # the read above was sent before this
        process.kill()
        with pytest.raises(UnavailableError) as failed:
            await asyncio.wait_for(waiting, WAIT)
        assert "GetValue of key 'never' failed: the service is unavailable" in str(failed.value)

        # A KVS is back at the address: the next ops open a new stream there.
        port = process.address.rsplit(":", 1)[1]
        process = CbgrpcProcess("kvs", "--storage", "memory", "--port", port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            try:
                await asyncio.wait_for(client.merge("k", lww(b"after")), WAIT)
                break
            except UnavailableError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)  # the channel reconnects with backoff
        found = await asyncio.wait_for(client.get("k"), WAIT)
        assert found is not None and found.lww.value == value(b"after")
    finally:
        process.kill()


async def test_a_kvs_without_stream_ops_gets_unary_calls(
    stack: contextlib.AsyncExitStack, connect: Connect
) -> None:
    # A KVS of an older version: GetValue and PutValue only.
    config = KvsConfig(engine="memory")
    store = open_store(config, LIMIT)
    await store.start()
    stack.push_async_callback(store.close)
    servicer = KvsServicer(store, config, LIMIT)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GetValue": grpc.unary_unary_rpc_method_handler(
            servicer.GetValue,
            request_deserializer=kvs_service_pb2.GetValueRequest.FromString,
            response_serializer=kvs_service_pb2.GetValueResponse.SerializeToString,
        ),
        "PutValue": grpc.unary_unary_rpc_method_handler(
            servicer.PutValue,
            request_deserializer=kvs_service_pb2.PutValueRequest.FromString,
            response_serializer=kvs_service_pb2.PutValueResponse.SerializeToString,
        ),
    }
    recorder = Recorder()
    server = grpc.aio.server(interceptors=[recorder])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cloudburst.v1.KvsService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stack.push_async_callback(server.stop, None)

    client = await connect(f"127.0.0.1:{port}")
    # The first op finds out (and is made again as a unary call); later ones are unary calls.
    await asyncio.wait_for(client.merge("a", lww(b"1")), WAIT)
    assert recorder.calls("StreamOps") == 1
    assert recorder.calls("PutValue") == 1
    found = await asyncio.wait_for(
        asyncio.gather(client.get("a"), client.get("b"), client.merge("b", lww(b"2"))), WAIT
    )
    assert found[0] is not None and found[0].lww.value == value(b"1")
    found_b = await asyncio.wait_for(client.get("b"), WAIT)
    assert found_b is not None and found_b.lww.value == value(b"2")
    assert recorder.calls("StreamOps") == 1  # tried once, never again
    assert recorder.calls("GetValue") == 3 and recorder.calls("PutValue") == 2
    # Nor for a larger write, which would have a stream of its own (over LIMIT: refused).
    error = await outcome(client.merge("c", lww(b"x" * (MAX_STREAMED_PUT_BYTES + 1))))
    assert isinstance(error, tuple) and "over the limit" in error[1]
    assert recorder.calls("StreamOps") == 1 and recorder.calls("PutValue") == 3


async def test_every_frame_is_authorized_as_its_unary_call(
    start_kvs: StartKvs, connect: Connect
) -> None:
    executor_kvs = await start_kvs(role=EXECUTOR)
    streamed = await connect(executor_kvs.address, stream=True)
    unary = await connect(executor_kvs.address, stream=False)
    # An executor reads the system keyspace but may not write it.
    refused = [await outcome(c.put("fn", lww(b"x"), SYSTEM)) for c in (streamed, unary)]
    assert refused[0] == refused[1]
    assert refused[0][0].__name__ == "PermissionDeniedError"
    assert "writing the system keyspace needs role" in refused[0][1]
    refused = [await outcome(c.delete("fn", SYSTEM)) for c in (streamed, unary)]
    assert refused[0] == refused[1]
    assert refused[0][0].__name__ == "PermissionDeniedError"
    # The stream goes on: the same client's next ops are served on it.
    assert await asyncio.wait_for(streamed.get("fn", SYSTEM), WAIT) is None
    await asyncio.wait_for(streamed.merge("k", lww(b"x")), WAIT)
    assert executor_kvs.recorder.calls("StreamOps") == 1

    restricted_kvs = await start_kvs(role=INVOKER_RESTRICTED)
    streamed = await connect(restricted_kvs.address, stream=True)
    unary = await connect(restricted_kvs.address, stream=False)
    pickled = lww(b"\x80\x04K\x01.", value_pb2.SERIALIZER_CLOUDPICKLE)
    refused = [await outcome(c.put("p", pickled)) for c in (streamed, unary)]
    assert refused[0] == refused[1]
    assert "may send only JSON, string or bytes values" in refused[0][1]
    refused = [await outcome(c.get("fn", SYSTEM)) for c in (streamed, unary)]
    assert refused[0] == refused[1] and "reading the system keyspace" in refused[0][1]
    await asyncio.wait_for(streamed.merge("p", lww(b"1", value_pb2.SERIALIZER_JSON)), WAIT)
    assert restricted_kvs.recorder.calls("StreamOps") == 1


async def test_the_switch_keeps_ops_unary(
    start_kvs: StartKvs, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert stream_enabled({})
    assert stream_enabled({STREAM_ENV: "1"})
    for off in ("0", "false", "No", " off "):
        assert not stream_enabled({STREAM_ENV: off})
    kvs = await start_kvs()
    monkeypatch.setenv(STREAM_ENV, "0")
    client = await connect(kvs.address, stream=None)
    await asyncio.wait_for(client.merge("k", lww(b"x")), WAIT)
    assert await asyncio.wait_for(client.get("k"), WAIT) is not None
    assert kvs.recorder.calls("StreamOps") == 0
    assert kvs.recorder.calls("GetValue") == kvs.recorder.calls("PutValue") == 1


async def test_a_large_merge_goes_on_a_stream_of_its_own(
    start_kvs: StartKvs, connect: Connect
) -> None:
    """A merge over MAX_STREAMED_PUT_BYTES holds up no small op: it takes a second stream."""
    kvs = await start_kvs(limit=1 << 20)
    client = await connect(kvs.address)
    large = lww(b"y" * (MAX_STREAMED_PUT_BYTES + 1))
    await asyncio.wait_for(client.merge("small", lww(b"x")), WAIT)
    await asyncio.wait_for(client.merge("large", large), WAIT)
    stored = await asyncio.wait_for(client.get("large"), WAIT)
    assert stored is not None and stored.lww.value == large.lww.value
    assert kvs.recorder.calls("PutValue") == 0
    assert kvs.recorder.calls("StreamOps") == 2
    small, big = kvs.counter.streams
    assert [op for op, _ in small] == ["put", "get"]
    assert big == [("put", MAX_STREAMED_PUT_BYTES + 1)]


async def test_a_large_merge_over_the_limit_fails_as_its_unary_call(
    start_kvs: StartKvs, connect: Connect
) -> None:
    kvs = await start_kvs()
    streamed, unary = await connect(kvs.address), await connect(kvs.address, stream=False)
    big_set = set_of(*(bytes([i % 256]) * 300 + str(i).encode() for i in range(300)))
    # A last-writer-wins value is judged by its own bytes, measured once.
    big_lww = lww(b"x" * (MAX_STREAMED_PUT_BYTES + 1))
    for big in (big_set, big_lww):  # each over the test's payload limit
        errors = [await outcome(client.merge("big", big)) for client in (streamed, unary)]
        assert errors[0] == errors[1]
        assert isinstance(errors[0], tuple) and "over the limit" in errors[0][1]
    assert kvs.recorder.calls("PutValue") == 2  # the unary client's


async def test_a_kvs_shutting_down_ends_its_streams(connect: Connect) -> None:
    # A grace period far beyond the wait below: waiting it out would fail the test.
    grace = {"CBGRPC_SERVER_GRACE_SECONDS": str(WAIT * 10)}
    process = CbgrpcProcess("kvs", "--storage", "memory", env=grace)
    try:
        client = await connect(process.address)
        await asyncio.wait_for(client.merge("k", lww(b"x")), WAIT)
        # The client keeps its stream open; the KVS ends it once its ops are answered.
        assert await asyncio.to_thread(process.stop, signal.SIGTERM, WAIT) == 0
    finally:
        process.kill()


Op = kvs_service_pb2.StreamOpsRequest
OpAnswer = kvs_service_pb2.StreamOpsResponse


async def exchange(address: str, messages: list[Op], answers: int) -> list[OpAnswer]:
    """Send ``messages`` on a StreamOps stream of a plain stub; return the messages that answer.

    Reads until ``answers`` answers came (a batch counts each of its answers).
    """
    async with grpc.aio.insecure_channel(address, options=channel_options(LIMIT)) as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        call = stub.StreamOps(timeout=WAIT)
        for message in messages:
            await call.write(message)
        received: list[OpAnswer] = []
        count = 0
        while count < answers:
            answer = await call.read()
            assert isinstance(answer, OpAnswer), answer
            received.append(answer)
            count += len(answer.batch) or 1
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF  # every op is answered: the KVS ends the stream
        assert await call.code() == grpc.StatusCode.OK
    return received


def by_sequence(received: list[OpAnswer]) -> dict[int, OpAnswer]:
    """Every answer by its sequence; each sequence is answered once, by a frame with no batch."""
    answers: dict[int, OpAnswer] = {}
    for message in received:
        for answer in message.batch or (message,):
            assert not answer.batch and answer.WhichOneof("result") is not None, answer
            assert answer.sequence not in answers, f"op {answer.sequence} answered twice"
            answers[answer.sequence] = answer
    return answers


def merge_op(sequence: int, key: str, data: bytes, reads_batches: bool) -> Op:
    op = Op(sequence=sequence, reads_batches=reads_batches)
    op.put.key = key
    op.put.lattice.CopyFrom(lww(data))
    return op


async def test_ops_that_queue_up_travel_in_batches_both_ways(
    start_kvs: StartKvs, connect: Connect
) -> None:
    kvs = await start_kvs()
    client = await connect(kvs.address)
    count = 300
    await asyncio.wait_for(
        asyncio.gather(*(client.merge(f"key-{i}", lww(str(i).encode())) for i in range(count))),
        WAIT,
    )
    read_before = kvs.counter.read
    # Every read is sent before the first is written: the KVS said it reads batches by now,
    # so they go in a few messages of at most 64 frames each.
    found = await asyncio.wait_for(
        asyncio.gather(*(client.get(f"key-{i}") for i in range(count))), WAIT
    )
    assert [f.lww.value.data if f else None for f in found] == [
        str(i).encode() for i in range(count)
    ]
    assert kvs.counter.ops == 2 * count
    assert kvs.counter.read - read_before <= count // 32
    # Each op is answered once; answers that came while one was written went together.
    assert kvs.counter.answers == 2 * count
    assert kvs.counter.written < kvs.counter.answers
    assert kvs.recorder.calls("StreamOps") == 1


async def test_a_caller_that_does_not_read_batches_gets_every_answer_alone(
    start_kvs: StartKvs,
) -> None:
    kvs = await start_kvs()
    count = 100
    # A caller of an older version: one op per message, and no word of batches.
    ops = [merge_op(n, f"key-{n}", b"v", reads_batches=False) for n in range(1, count + 1)]
    received = await exchange(kvs.address, ops, count)
    assert received[0].reads_batches  # the KVS offers to read batched ops
    assert not any(message.batch for message in received)
    answers = by_sequence(received)
    assert sorted(answers) == list(range(1, count + 1))
    assert all(answer.WhichOneof("result") == "put" for answer in answers.values())
    assert kvs.counter.written == kvs.counter.answers == count


@pytest.mark.parametrize("switched_off", ["client", "kvs"])
async def test_without_batches_at_either_end_every_op_travels_alone(
    start_kvs: StartKvs, connect: Connect, monkeypatch: pytest.MonkeyPatch, switched_off: str
) -> None:
    if switched_off == "kvs":
        monkeypatch.setenv(BATCHES_ENV, "0")
    kvs = await start_kvs()
    if switched_off == "client":
        monkeypatch.setenv(BATCHES_ENV, "0")
    else:
        monkeypatch.delenv(BATCHES_ENV)
    client = await connect(kvs.address)
    count = 200
    await asyncio.wait_for(
        asyncio.gather(*(client.merge(f"key-{i}", lww(str(i).encode())) for i in range(count))),
        WAIT,
    )
    found = await asyncio.wait_for(
        asyncio.gather(*(client.get(f"key-{i}") for i in range(count))), WAIT
    )
    assert [f.lww.value.data if f else None for f in found] == [
        str(i).encode() for i in range(count)
    ]
    assert kvs.counter.read == kvs.counter.ops == 2 * count
    assert kvs.counter.written == kvs.counter.answers == 2 * count


def _reset_global_provider() -> None:
    # The API lets a process set its tracer provider once; a test needs a fresh one.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture(params=["untraced", "traced"])
def tracing(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Tracing off or on while servers are built (the KVS then serves streams its own way)."""
    if request.param == "untraced":
        yield False
        return
    provider = TracerProvider()
    _reset_global_provider()
    telemetry.use_tracer_provider(provider)
    try:
        yield True
    finally:
        telemetry.stop_tracing()
        provider.shutdown()
        _reset_global_provider()


async def test_each_op_of_a_batch_gets_its_own_answer_or_error(
    tracing: bool, start_kvs: StartKvs, connect: Connect
) -> None:
    kvs = await start_kvs()
    assert telemetry.tracing() == tracing
    client = await connect(kvs.address, stream=False)
    await client.merge("present", lww(b"here"))
    await client.merge("a-set", set_of(b"x"))

    frames = [
        Op(get=kvs_service_pb2.GetValueRequest(key="present")),
        Op(put=kvs_service_pb2.PutValueRequest(key="", lattice=lww(b"x"))),
        Op(put=kvs_service_pb2.PutValueRequest(key="big", lattice=lww(b"x" * (LIMIT + 1)))),
        Op(put=kvs_service_pb2.PutValueRequest(key="a-set", lattice=lww(b"x"))),
        Op(get=kvs_service_pb2.GetValueRequest(key="absent")),
        Op(get=kvs_service_pb2.GetValueRequest(key="never", wait=True)),
        Op(),  # neither a read nor a merge
        Op(put=kvs_service_pb2.PutValueRequest(key="fresh", lattice=lww(b"new"))),
    ]
    for sequence, frame in enumerate(frames, 1):
        frame.sequence = sequence
        frame.reads_batches = True
    frames[5].timeout.FromMilliseconds(500)  # the waiting read ends before its own deadline
    batch = Op()
    batch.batch.extend(frames)
    received = await exchange(kvs.address, [batch], len(frames))
    assert kvs.counter.read == 1 and kvs.counter.ops == len(frames)
    answers = by_sequence(received)
    assert sorted(answers) == list(range(1, len(frames) + 1))

    assert answers[1].get.found and answers[1].get.lattice.lww.value == value(b"here")
    codes = {n: answers[n].error.code for n in answers if answers[n].HasField("error")}
    assert codes == {
        2: grpc.StatusCode.INVALID_ARGUMENT.value[0],
        3: grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        4: grpc.StatusCode.FAILED_PRECONDITION.value[0],
        7: grpc.StatusCode.INVALID_ARGUMENT.value[0],
    }
    assert "over the limit" in answers[3].error.message
    assert "must carry get, put or delete" in answers[7].error.message
    assert answers[5].WhichOneof("result") == "get" and not answers[5].get.found
    assert answers[6].WhichOneof("result") == "get" and not answers[6].get.found
    assert answers[8].put.lattice.lww.value == value(b"new")
    assert await client.get("fresh") == answers[8].put.lattice


async def test_each_frame_of_a_batch_is_authorized_on_its_own(start_kvs: StartKvs) -> None:
    kvs = await start_kvs(role=EXECUTOR)
    # An executor reads the system keyspace but may not write it.
    frames = [
        Op(put=kvs_service_pb2.PutValueRequest(key="fn", keyspace=SYSTEM, lattice=lww(b"x"))),
        Op(get=kvs_service_pb2.GetValueRequest(key="fn", keyspace=SYSTEM)),
        Op(put=kvs_service_pb2.PutValueRequest(key="k", lattice=lww(b"x"))),
    ]
    for sequence, frame in enumerate(frames, 1):
        frame.sequence = sequence
        frame.reads_batches = True
    batch = Op()
    batch.batch.extend(frames)
    answers = by_sequence(await exchange(kvs.address, [batch], len(frames)))
    assert answers[1].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "writing the system keyspace needs role" in answers[1].error.message
    assert answers[2].WhichOneof("result") == "get" and not answers[2].get.found
    assert answers[3].put.lattice.lww.value == value(b"x")
