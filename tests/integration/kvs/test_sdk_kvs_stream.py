"""The SDK's objects at the KVS itself travel over one StreamOps stream.

A cluster in this process (KVS, executor, scheduler, each its own gRPC server
on 127.0.0.1:0) whose scheduler names to clients a KVS whose interceptors count
what it receives: small reads, writes and deletes of a connection go as frames
of one stream (large values keep their chunks), every error comes as the same
exception as from the unary calls (``CLOUDBURST_KVS_STREAM=0``), and a KVS that
goes away mid-op sends the op through the scheduler and is used again once it
answers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection, _core
from cloudburst.errors import CloudburstError
from cloudburst.opstream import MAX_STREAMED_GET_BYTES, MAX_STREAMED_PUT_BYTES, STREAM_ENV
from cloudburst.serialization import lattice_value
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2
from cloudburst_grpc.local import Node, start_local
from cloudburst_grpc.security.identity import INVOKER, INVOKER_RESTRICTED
from cloudburst_kvs.servicer import KvsServicer
from harness import CbgrpcProcess, LoopThread, make_config
from kvs_interceptors import LIMIT, UNARY, CountedKvs

WAIT = 30.0
#: Larger than the scheduler's KVS's inline limit: written and read in chunks.
LARGE = 5 << 20


@dataclass
class Setup:
    scheduler: Node
    kvs: CountedKvs


@pytest.fixture
def setup(
    start_kvs_server: Callable[[CountedKvs], CountedKvs],
    naming_scheduler: Callable[..., Node],
    server_loop: LoopThread,
) -> Callable[..., Setup]:
    """Start a cluster whose scheduler names a counted KVS to its clients.

    ``shared``: the scheduler and the executor use the counted KVS too (else
    a KVS of their own, which clients reach through the scheduler's proxy); the
    other options are the counted KVS's.
    """

    def start(shared: bool = False, **kvs_options: Any) -> Setup:
        options = {"wait_limit": WAIT, "max_lattice_bytes": 2 * LARGE, **kvs_options}
        kvs = start_kvs_server(CountedKvs(server_loop, **options))
        return Setup(naming_scheduler(kvs.address, shared), kvs)

    return start


def connect(address: str, **options: Any) -> CloudburstConnection:
    return CloudburstConnection(address, connect_timeout=WAIT, timeout=WAIT, **options)


@contextlib.contextmanager
def unary_switch(monkeypatch: pytest.MonkeyPatch, off: bool) -> Iterator[None]:
    """Connections made inside keep their KVS ops unary when ``off``."""
    with monkeypatch.context() as patch:
        if off:
            patch.setenv(STREAM_ENV, "0")
        yield


def test_gets_puts_and_deletes_go_over_one_stream(setup: Callable[..., Setup]) -> None:
    cluster = setup()
    kvs = cluster.kvs
    with connect(cluster.scheduler.address) as conn:
        assert conn.kvs_address == kvs.address
        for index in range(20):
            conn.put_object(f"small/{index}", {"index": index})
        assert [conn.get_object(f"small/{i}") for i in range(20)] == [
            {"index": i} for i in range(20)
        ]
        assert conn.get_object("small/none") is None
        assert conn.delete_object("small/3") is True
        assert conn.delete_object("small/3") is False
        assert conn.get_object("small/3") is None
        assert kvs.recorder.calls("StreamOps") == 1
        assert kvs.unary_calls() == 0
        assert kvs.counter.ops == 20 + 21 + 3  # every op a frame of that stream
        # A value too large for one message keeps its chunks, both ways.
        conn.put_object("large", b"x" * LARGE)
        assert conn.get_object("large") == b"x" * LARGE
        assert kvs.recorder.calls("PutValueChunks") == 1
        assert kvs.recorder.calls("GetValueChunks") >= 1
        # get_object of several keys stays one BatchGetValues.
        assert conn.get_object(["small/1", "small/2"]) == {
            "small/1": {"index": 1},
            "small/2": {"index": 2},
        }
        assert kvs.recorder.calls("BatchGetValues") == 1
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.unary_calls() == 0


def test_larger_writes_go_on_a_stream_of_their_own(setup: Callable[..., Setup]) -> None:
    """Writes over MAX_STREAMED_PUT_BYTES hold up no small op: their stream is another."""
    cluster = setup(limit=1 << 20)
    kvs = cluster.kvs
    larger = MAX_STREAMED_PUT_BYTES + 1
    with connect(cluster.scheduler.address) as conn:
        conn.put_object("small", b"s")
        conn.put_object("larger", b"l" * larger)
        conn.put_object("largest", b"x" * (512 << 10))  # still within one message
        assert conn.get_object("larger") == b"l" * larger
        assert conn.get_object("largest") == b"x" * (512 << 10)
        assert conn.delete_object("larger") is True
    assert kvs.unary_calls() == 0
    assert kvs.recorder.calls("PutValueChunks") == 0
    small, large = kvs.counter.streams
    assert [op for op, _ in small] == ["put", "get", "get", "delete"]
    assert small[0][1] <= MAX_STREAMED_PUT_BYTES
    assert [op for op, _ in large] == ["put", "put"]
    assert all(size > MAX_STREAMED_PUT_BYTES for _, size in large)


def test_a_read_of_a_larger_value_leaves_the_stream_of_small_ops(
    setup: Callable[..., Setup],
) -> None:
    """A value over MAX_STREAMED_GET_BYTES comes in chunks, on a stream of its own."""
    cluster = setup(limit=16 << 20)  # the KVS would send either value in one message
    kvs = cluster.kvs
    under = b"u" * (MAX_STREAMED_GET_BYTES - (64 << 10))
    over = b"o" * (MAX_STREAMED_GET_BYTES + 1)
    with connect(cluster.scheduler.address) as conn:
        assert conn.kvs_address == kvs.address
        conn.put_object("under", under)
        conn.put_object("over", over)
        assert conn.get_object("under") == under
        assert kvs.recorder.calls("GetValueChunks") == 0
        assert conn.get_object("over") == over
        assert kvs.recorder.calls("GetValueChunks") == 1
    assert kvs.recorder.calls("GetValue") == 0  # both asked on the stream first


def test_a_value_over_the_kvs_message_limit_goes_to_it_in_chunks(
    setup: Callable[..., Setup],
) -> None:
    """The KVS takes smaller messages than the scheduler: its own limit sizes direct writes."""
    cluster = setup()
    kvs = cluster.kvs
    value = b"v" * (4 * LIMIT)  # over the KVS's message limit, within the scheduler's
    with connect(cluster.scheduler.address) as conn:
        assert conn.kvs_address == kvs.address
        assert conn.put_object("between", value) is True
        assert conn.get_object("between") == value
        assert conn.kvs_address == kvs.address
    assert kvs.recorder.calls("PutValueChunks") == 1
    assert kvs.recorder.calls("PutValue") == 0
    assert kvs.recorder.calls("GetValueChunks") == 1


def test_a_kvs_back_with_a_smaller_message_limit_gets_writes_sized_for_it(
    setup: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "DIRECT_RETRY_SECONDS", 0.2)
    cluster = setup(limit=1 << 20)
    kvs = cluster.kvs
    value = b"v" * (4 * LIMIT)
    with connect(cluster.scheduler.address) as conn:
        conn.put_object("before", value)  # in one message
        assert kvs.recorder.calls("PutValueChunks") == 0
        kvs.stop()
        conn.put_object("meanwhile", 1)  # through the scheduler
        kvs.limit = LIMIT
        kvs.recorder.methods.clear()
        kvs.start()  # on the same port, taking smaller messages
        deadline = time.monotonic() + WAIT
        while conn.kvs_address is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polled: until the SDK found the KVS again
        assert conn.kvs_address == kvs.address
        conn.put_object("after", value)
        assert conn.get_object("after") == value
    assert kvs.recorder.calls("PutValueChunks") == 1


def test_the_switch_keeps_the_sdk_on_unary_calls(
    setup: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = setup()
    kvs = cluster.kvs
    with unary_switch(monkeypatch, off=True), connect(cluster.scheduler.address) as conn:
        assert conn.kvs_address == kvs.address
        conn.put_object("k", 1)
        assert conn.get_object("k") == 1
        assert conn.delete_object("k") is True
    assert kvs.recorder.calls("StreamOps") == 0
    assert [kvs.recorder.calls(name) for name in UNARY] == [1, 1, 1]


def test_only_a_kvs_itself_says_that_it_serves_op_streams(setup: Callable[..., Setup]) -> None:
    """The scheduler passes on its KVS's limits, but not that word: its proxy has no StreamOps."""
    cluster = setup()
    request = kvs_service_pb2.GetLimitsRequest()
    with grpc.insecure_channel(cluster.kvs.address) as at_kvs:
        kvs_limits = kvs_service_pb2_grpc.KvsServiceStub(at_kvs).GetLimits(request, timeout=WAIT)
    with grpc.insecure_channel(cluster.scheduler.address) as at_scheduler:
        stub = kvs_service_pb2_grpc.KvsServiceStub(at_scheduler)
        scheduler_limits = stub.GetLimits(request, timeout=WAIT)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.StreamOps(iter([kvs_service_pb2.StreamOpsRequest()]), timeout=WAIT))
    assert kvs_limits.serves_op_streams and not kvs_limits.kvs_addresses
    assert not scheduler_limits.serves_op_streams
    assert list(scheduler_limits.kvs_addresses) == [cluster.kvs.address]
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "switched-off"])
def test_cbgrpc_serve_takes_small_ops_on_a_stream_at_its_own_address(
    start_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    """`cbgrpc serve` names no KVS address (the KVS is at its own), but serves StreamOps there."""
    unary: collections.Counter[str] = collections.Counter()
    for name in UNARY:  # before the server starts: it serves the methods it finds then
        original = getattr(KvsServicer, name)

        async def counted(
            self: KvsServicer, request: Any, context: Any, _name: str = name, _f: Any = original
        ) -> Any:
            if request.key.startswith("serve/"):  # not the runtime's own keys
                unary[_name] += 1
            return await _f(self, request, context)

        monkeypatch.setattr(KvsServicer, name, counted)
    node = start_node(start_local(make_config()))
    with unary_switch(monkeypatch, off=not streamed), connect(node.address) as conn:
        assert conn.kvs_address is None  # no other address to go to
        conn.put_object("serve/small", {"a": 1})
        assert conn.get_object("serve/small") == {"a": 1}
        assert conn.delete_object("serve/small") is True
        assert conn.get_object("serve/small") is None
        # A larger value goes on the stream for large writes.
        conn.put_object("serve/medium", b"m" * (MAX_STREAMED_PUT_BYTES + 1))
        assert conn.get_object("serve/medium") == b"m" * (MAX_STREAMED_PUT_BYTES + 1)
    if streamed:
        assert unary == {}
    else:
        assert unary == {"PutValue": 2, "GetValue": 3, "DeleteValue": 1}


def test_eight_threads_share_the_stream_and_each_op_gets_its_answer(
    setup: Callable[..., Setup],
) -> None:
    cluster = setup()
    kvs = cluster.kvs
    threads, rounds = 8, 100

    def work(thread: int) -> list[Any]:
        seen = []
        for index in range(rounds):
            key = f"t{thread}/{index}"
            conn.put_object(key, [thread, index])
            seen.append(conn.get_object(key))
        return seen

    with connect(cluster.scheduler.address) as conn:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(work, range(threads)))
    assert results == [[[t, i] for i in range(rounds)] for t in range(threads)]
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.unary_calls() == 0
    assert kvs.counter.ops == threads * rounds * 2
    assert kvs.counter.answers == kvs.counter.ops
    # Ops that queued up while another was being written shared its message.
    assert kvs.counter.read < kvs.counter.ops


class Pickled:
    """A value only cloudpickle serializes (so a restricted invoker may not store it)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pickled)

    __hash__ = object.__hash__


def _set_lattice(kvs: CountedKvs, key: str) -> None:
    """Store a set lattice at ``key``: a last-writer-wins write there is a type mismatch."""
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"a")
    lattice = lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value]))
    with grpc.insecure_channel(kvs.address) as channel:
        kvs_service_pb2_grpc.KvsServiceStub(channel).PutValue(
            kvs_service_pb2.PutValueRequest(key=key, lattice=lattice), timeout=WAIT
        )


def _core_put(conn: CloudburstConnection, key: str, size: int, timeout: float = WAIT) -> None:
    """A write of one message, as put_object sends it, at the SDK's core (no client checks).

    Sent in one message whatever the KVS's message limit: as a client that sized it by
    a larger limit would.
    """
    write = _core.Write(
        key,
        lattice_pb2.LwwTimestamp(time_ns=time.time_ns(), writer_id="test"),
        value_pb2.SERIALIZER_BYTES,
        b"x" * size,
        "",
    )
    write.frame = _core.Core.put_frame(write)
    conn._core._direct_inline = size
    conn._run(conn._core.put(write, timeout), "put")


#: Each error a KVS op can answer: the role the KVS grants (None: no authorization), what
#: to prepare, the op, and the exception class expected.
ERRORS: dict[str, tuple[str | None, Callable[..., None], Callable[..., Any], str]] = {
    "payload too large": (
        None,
        lambda kvs, conn: None,
        lambda conn: _core_put(conn, "big", LIMIT + 1),
        "PayloadTooLargeError",
    ),
    "empty key on get": (
        None,
        lambda kvs, conn: None,
        lambda conn: conn._run(conn._core.get("", timeout=WAIT), "get"),
        "InvalidArgumentError",
    ),
    "empty key on put": (
        None,
        lambda kvs, conn: None,
        lambda conn: _core_put(conn, "", 1),
        "InvalidArgumentError",
    ),
    "empty key on delete": (
        None,
        lambda kvs, conn: None,
        lambda conn: conn._run(conn._core.delete("", "", WAIT), "delete"),
        "InvalidArgumentError",
    ),
    "deadline": (  # the store holds the write past it
        None,
        lambda kvs, conn: None,
        lambda conn: _core_put(conn, "held", 1, timeout=0.5),
        "CloudburstTimeoutError",
    ),
    "lattice type mismatch": (
        None,
        lambda kvs, conn: _set_lattice(kvs, "typed"),
        lambda conn: conn.put_object("typed", 1),
        "LatticeTypeMismatchError",
    ),
    "permission denied": (
        INVOKER_RESTRICTED,
        lambda kvs, conn: None,
        lambda conn: conn.put_object("pickled", Pickled()),
        "PermissionDeniedError",
    ),
    "unauthenticated": (
        INVOKER,
        lambda kvs, conn: setattr(kvs.gate, "refusing", True),
        lambda conn: conn.get_object("anything"),
        "UnauthenticatedError",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_each_error_is_the_one_the_unary_call_raises(
    case: str, setup: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    role, prepare, operation, expected = ERRORS[case]
    cluster = setup(role=role)
    kvs = cluster.kvs
    raised: list[tuple[str, str]] = []
    for off in (False, True):
        if kvs.gate is not None:
            kvs.gate.refusing = False
        with unary_switch(monkeypatch, off), connect(cluster.scheduler.address) as conn:
            assert conn.kvs_address == kvs.address
            prepare(kvs, conn)
            streams, unary = kvs.recorder.calls("StreamOps"), kvs.unary_calls()
            with pytest.raises(CloudburstError) as error:
                operation(conn)
            raised.append((type(error.value).__name__, str(error.value)))
            # The stream carried the op (or the switch kept it unary); no failover.
            if off:
                assert kvs.recorder.calls("StreamOps") == streams
                assert kvs.unary_calls() == unary + 1
            else:
                assert kvs.recorder.calls("StreamOps") == streams + 1
                # A refused stream whose status gRPC lost (the refusal raced the frame's
                # write) gets its op sent again as a unary call, which tells the refusal.
                retried = (0, 1) if case == "unauthenticated" else (0,)
                assert kvs.unary_calls() - unary in retried
            assert conn.kvs_address == kvs.address
    assert raised[0] == raised[1]
    assert raised[0][0] == expected


def test_a_waiting_read_keeps_both_wait_limits(
    setup: Callable[..., Setup],
) -> None:
    # The KVS ends a wait after 0.3 s: the SDK keeps waiting, up to its own deadline.
    cluster = setup(wait_limit=0.3)
    kvs = cluster.kvs
    with connect(cluster.scheduler.address) as conn:
        started = time.monotonic()
        assert conn._run(conn._core.get("never", wait=True, timeout=1.5), "wait") is None
        waited = time.monotonic() - started
        assert 1.4 <= waited < 10
        frames = kvs.counter.ops
        assert frames >= 3  # the KVS answered "not yet" at its limit, and the SDK asked again

        # A read that waits for a key stored a moment later returns it.
        def read() -> Any:
            return conn._run(conn._core.get("later", wait=True, timeout=WAIT), "wait")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(read)
            deadline = time.monotonic() + WAIT
            while kvs.counter.ops == frames and time.monotonic() < deadline:
                time.sleep(0.01)  # polled: until the KVS holds the waiting read
            assert kvs.counter.ops > frames
            conn.put_object("later", "here")
            lattice = waiting.result(WAIT)
        assert lattice is not None and lattice_value(lattice) == "here"
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.unary_calls() == 0


def incr(_: Any, x: int) -> int:
    return x + 1


def test_a_result_answered_directly_is_read_with_a_streamed_waiting_read(
    setup: Callable[..., Setup],
) -> None:
    cluster = setup(shared=True, limit=1 << 20)  # room for the function's definition
    kvs = cluster.kvs
    with connect(cluster.scheduler.address) as conn:
        function = conn.register(incr, "incr")
        futures = [function(i) for i in range(5)]
        assert [f.get(timeout=WAIT) for f in futures] == [1, 2, 3, 4, 5]
        assert [conn.get_object(f) for f in futures] == [1, 2, 3, 4, 5]
        streams = kvs.recorder.calls("StreamOps")
    # The executor and the scheduler have streams of their own; the SDK read on its one.
    assert streams >= 1
    assert kvs.recorder.calls("GetValue") == 0


def test_a_kvs_lost_mid_op_sends_it_through_the_scheduler_and_is_used_again(
    setup: Callable[..., Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "DIRECT_RETRY_SECONDS", 0.2)
    cluster = setup()
    kvs = cluster.kvs
    with connect(cluster.scheduler.address) as conn:
        conn.put_object("before", 1)
        assert kvs.store is not None
        holding = kvs.store.holding
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            held = pool.submit(conn.put_object, "held", "through the scheduler")
            assert holding.wait(WAIT)  # the KVS holds the write: it is mid-op
            kvs.stop()
            assert held.result(WAIT) is True
        assert time.monotonic() - started < WAIT
        assert conn.kvs_address is None
        # It went to the scheduler's KVS, as does everything until the KVS answers again.
        assert conn.get_object("held") == "through the scheduler"
        assert conn.get_object("before") is None

        kvs.recorder.methods.clear()
        kvs.start()  # on the same port
        deadline = time.monotonic() + WAIT
        while conn.kvs_address is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polled: until the SDK found the KVS again
        assert conn.kvs_address == kvs.address
        conn.put_object("after", 2)
        assert conn.get_object("after") == 2
        assert conn.delete_object("after") is True
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.unary_calls() == 0


def test_a_killed_kvs_process_fails_ops_over_mid_run_and_is_used_again(
    naming_scheduler: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_core, "DIRECT_RETRY_SECONDS", 0.2)
    kvs = CbgrpcProcess("kvs", "--storage", "memory")
    port = kvs.address.rsplit(":", 1)[1]
    try:
        scheduler = naming_scheduler(kvs.address)
        with connect(scheduler.address) as conn:
            assert conn.kvs_address == kvs.address
            done = 0
            failures: list[BaseException] = []
            stop = threading.Event()

            def work() -> None:
                # Ops, one after another, while the KVS is killed and comes back.
                nonlocal done
                while not stop.is_set():
                    key = f"run/{done % 10}"
                    started = time.monotonic()
                    try:
                        address = conn.kvs_address
                        conn.put_object(key, done)
                        got = conn.get_object(key)
                        # Both at one KVS (the killed one, or the scheduler's meanwhile).
                        if conn.kvs_address == address:
                            assert got == done
                        assert time.monotonic() - started < WAIT
                    except BaseException as exc:  # reported by the test's thread
                        failures.append(exc)
                        return
                    done += 1

            worker = threading.Thread(target=work)
            worker.start()
            try:
                deadline = time.monotonic() + WAIT

                def ran(count: int) -> None:
                    while done < count and not failures and time.monotonic() < deadline:
                        time.sleep(0.01)  # polled: until the worker got that far
                    assert not failures and done >= count

                ran(50)
                kvs.kill()  # SIGKILL: the stream breaks mid-run, perhaps mid-op
                ran(done + 50)
                assert conn.kvs_address is None  # through the scheduler meanwhile
                kvs = CbgrpcProcess("kvs", "--storage", "memory", "--port", port)
                while conn.kvs_address is None and time.monotonic() < deadline:
                    time.sleep(0.05)  # polled: until the SDK found the KVS again
                assert conn.kvs_address == kvs.address
                ran(done + 50)
            finally:
                stop.set()
                worker.join(WAIT)
            assert not failures, failures
            assert not worker.is_alive()
    finally:
        kvs.kill()
