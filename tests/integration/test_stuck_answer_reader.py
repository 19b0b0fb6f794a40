"""A caller that stops reading its answer streams holds up no executor work.

gRPC flow control stops an executor's writes on an answer stream whose caller
does not read it once the stream's window is full (a few large results). The
results are stored and reported stored all the same, so that releases of them
proceed; once such a stream has taken no answer for a while, the executor
answers that caller through the scheduler instead; other callers are answered
as ever; and a caller that reads again gets every answer exactly once, one way
or the other, in messages its limit takes however many answers waited.

A cluster of separate gRPC servers (KVS, two executors, scheduler) in this
process; the stuck caller speaks the wire itself and reads only its call stream.
"""

from __future__ import annotations

import queue
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.future import CloudburstFuture
from cloudburst.serialization import DEFAULT_MAX_PAYLOAD_BYTES, deserialize, serialize
from cloudburst.transport import channel_options
from cloudburst.v1 import (
    executor_service_pb2,
    executor_service_pb2_grpc,
    lattice_pb2,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_executors import servicer
from cloudburst_executors.servicer import ExecutorServicer
from cloudburst_kvs.store import LatticeStore
from faults import register_workload, wait_started
from harness import CbgrpcProcess, Cluster, wait_deleted

DEADLINE = 60.0
#: Results this large fill a stream's flow-control window after a few of them.
RESULT_BYTES = 1 << 20
#: Large results called at first, spread over both executors.
LARGE_CALLS = 24
USER = lattice_pb2.KEYSPACE_USER
#: Seconds an answer stream may take no answer before the next ones go through the scheduler.
STALL_SECONDS = 0.5
#: Small calls made at most until one is answered through the scheduler: far fewer than the
#: answers an executor queues for a caller before it stops using that caller's stream.
MAX_PROBES = servicer.MAX_QUEUED_ANSWERS // 4
#: Results whose answers, queued together on one stream, pass the SDK's message limit.
QUEUED_RESULT_BYTES = 4 << 20
QUEUED_CALLS = 24
#: The stuck caller takes messages of any size (answers may share one).
UNLIMITED = [("grpc.max_receive_message_length", -1)]


def sized(_: Any, n: int) -> bytes:
    return b"x" * n


class StuckCaller:
    """Holds answer streams at every executor and never reads them; reads its call stream."""

    def __init__(
        self,
        scheduler: str,
        executors: dict[str, str],
        options: list[tuple[str, int]] = UNLIMITED,
    ) -> None:
        """Call at ``scheduler``; hold answer streams at ``executors`` (address by id)."""
        self._options = options
        self.stream_id = secrets.token_hex(16)
        self._frames: queue.Queue[scheduler_service_pb2.StreamCallsRequest | None] = queue.Queue()
        self._channels: list[grpc.Channel] = []
        self.answer_streams = [self._open_answers(address) for address in executors.values()]
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(self._channel(scheduler))
        self._calls = stub.StreamCalls(self._iterate(), timeout=4 * DEADLINE)
        self.keys: dict[int, str] = {}
        """Response keys by sequence, as the scheduler accepted each call."""
        self.relayed: dict[int, bytes] = {}
        """Outcomes that came through the scheduler, by sequence."""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        frame = scheduler_service_pb2.StreamCallsRequest()
        frame.answer_streams.answer_stream_id = self.stream_id
        frame.answer_streams.executor_ids.extend(executors)
        self._frames.put(frame)

    @classmethod
    def at(cls, cluster: Cluster, options: list[tuple[str, int]] = UNLIMITED) -> StuckCaller:
        """A stuck caller of ``cluster``, with answer streams at all its executors."""
        executors = {node.executors[0].executor_id: node.address for node in cluster.executors}
        return cls(cluster.address, executors, options)

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address, options=self._options)
        self._channels.append(channel)
        return channel

    def _open_answers(self, address: str) -> Any:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(self._channel(address))
        request = executor_service_pb2.StreamAnswersRequest(answer_stream_id=self.stream_id)
        stream = stub.StreamAnswers(request, timeout=4 * DEADLINE)
        assert next(stream).registered
        return stream

    def _iterate(self) -> Iterator[scheduler_service_pb2.StreamCallsRequest]:
        while (frame := self._frames.get()) is not None:
            yield frame

    def _read(self) -> None:
        try:
            for answer in self._calls:
                assert answer.WhichOneof("answer") == "call_function", answer
                body = answer.call_function
                with self._changed:
                    self.keys[answer.sequence] = body.response_key
                    if body.HasField("outcome"):
                        self.relayed[answer.sequence] = deserialize(body.outcome.value)
                    self._changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # the test's end cancels it
                raise

    def call(self, sequence: int, size: int) -> None:
        frame = scheduler_service_pb2.StreamCallsRequest(
            sequence=sequence, stream_outcome=True, releasable=True
        )
        frame.call_function.name = "sized"
        frame.call_function.arguments.add(value=serialize(size))
        self._frames.put(frame)

    def release(self, keys: list[str]) -> None:
        self._frames.put(scheduler_service_pb2.StreamCallsRequest(release_keys=keys))

    def wait(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{what} within {DEADLINE}s"
                self._changed.wait(remaining)

    def read_answer_streams(self, calls: int) -> dict[int, bytes]:
        """Read the answer streams at last, until calls 1 to ``calls`` were answered one way.

        Returns the answers read there; each must come once.
        """
        got: queue.Queue[tuple[int, bytes] | grpc.RpcError] = queue.Queue()

        def drain(stream: Any) -> None:
            try:
                for message in stream:
                    for answer in message.answers:
                        value = deserialize(answer.call_function.outcome.value)
                        got.put((answer.sequence, value))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:  # the test's end cancels it
                    got.put(exc)

        for stream in self.answer_streams:
            threading.Thread(target=drain, args=(stream,), daemon=True).start()
        direct: dict[int, bytes] = {}
        deadline = time.monotonic() + DEADLINE
        while True:
            with self._changed:
                if len(direct.keys() | self.relayed.keys()) == calls:
                    return direct
            assert time.monotonic() < deadline, f"answers missing: {calls} calls, {len(direct)}"
            try:
                item = got.get(timeout=0.05)  # or a relayed answer came meanwhile
            except queue.Empty:
                continue
            if isinstance(item, grpc.RpcError):
                raise AssertionError(f"an answer stream broke: {item.code()} {item.details()}")
            sequence, value = item
            assert sequence not in direct, f"call {sequence} was answered twice"
            direct[sequence] = value

    def close(self) -> None:
        self._frames.put(None)
        for stream in self.answer_streams:
            stream.cancel()
        self._calls.cancel()
        for channel in self._channels:
            channel.close()


@pytest.fixture(params=["written", "generator"])
def handler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which StreamAnswers handler the executors use (request it before ``cluster``): each
    call's task writes its answer (the default), or a response generator (with tracing on)."""
    if request.param == "generator":
        monkeypatch.setattr(
            ExecutorServicer, "_stream_answers_written", ExecutorServicer.StreamAnswers
        )


@pytest.fixture
def stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shorter stall than the default, so that the test needs fewer calls to see one."""
    monkeypatch.setattr(servicer, "STALLED_ANSWER_SECONDS", STALL_SECONDS)


@pytest.fixture
def stuck(cluster: Cluster) -> Iterator[StuckCaller]:
    with CloudburstConnection(cluster.address, timeout=DEADLINE, direct_answers=False) as conn:
        conn.register(sized, "sized")
    caller = StuckCaller.at(cluster)
    try:
        yield caller
    finally:
        caller.close()


def stored_everywhere(cluster: Cluster, keys: list[str]) -> None:
    """Wait until every key is stored in the KVS."""
    store = cluster.kvs.store
    assert isinstance(store, LatticeStore)

    async def wait() -> None:
        for key in keys:
            assert await store.wait_for(USER, key, DEADLINE) is not None, key

    cluster.loop.run(wait())


def probe_until_relayed(stuck: StuckCaller, calls: int, limit: int = MAX_PROBES) -> int:
    """Make small calls after the first ``calls`` until one is answered through the scheduler
    (an answer stream took none for a while), at most ``limit``; returns the calls made in all.
    """
    sequence = calls
    while not stuck.relayed:
        sequence += 1
        assert sequence - calls <= limit, "no answer came through the scheduler"
        stuck.call(sequence, 1)  # small results: cheap to wait for
        stuck.wait(lambda s=sequence: s in stuck.keys, f"call {sequence} accepted")
    return sequence


def test_a_caller_that_stops_reading_its_answers_holds_up_nothing(
    handler: None, stall: None, cluster: Cluster, stuck: StuckCaller
) -> None:
    for sequence in range(1, LARGE_CALLS + 1):
        stuck.call(sequence, RESULT_BYTES)
    stuck.wait(lambda: len(stuck.keys) == LARGE_CALLS, "every call accepted")
    # Every result is stored, and reported stored: released, each is deleted.
    keys = list(stuck.keys.values())
    stored_everywhere(cluster, keys)
    stuck.release(keys)
    wait_deleted(cluster.kvs, cluster.loop, keys, DEADLINE)

    # Other callers are answered as ever, on their own answer streams.
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as other:
        assert len(other.answer_executors) == 2
        for n in range(8):
            assert other.exec_func("sized", [n]).get(timeout=DEADLINE) == b"x" * n

    # The stuck caller's answers come through the scheduler once its stream has taken none for
    # a while (not once thousands wait).
    calls = probe_until_relayed(stuck, LARGE_CALLS)

    # Read at last, the answer streams hold every other answer, each once.
    direct = stuck.read_answer_streams(calls)
    assert set(direct).isdisjoint(stuck.relayed)
    answers = {**direct, **stuck.relayed}
    assert sorted(answers) == list(range(1, calls + 1))
    for sequence, value in answers.items():
        assert value == b"x" * (RESULT_BYTES if sequence <= LARGE_CALLS else 1), sequence


def test_answers_queued_for_a_slow_reader_come_within_its_message_limit(
    handler: None, monkeypatch: pytest.MonkeyPatch, cluster: Cluster
) -> None:
    # Answers that waited for the reader go out merged, but never in a message larger than
    # the SDK's own limit takes (twice the payload limit): it would break the stream.
    monkeypatch.setattr(servicer, "STALLED_ANSWER_SECONDS", DEADLINE)  # all stay queued
    with CloudburstConnection(cluster.address, timeout=DEADLINE, direct_answers=False) as conn:
        conn.register(sized, "sized")
    caller = StuckCaller.at(cluster, channel_options(DEFAULT_MAX_PAYLOAD_BYTES))
    try:
        for sequence in range(1, QUEUED_CALLS + 1):
            caller.call(sequence, QUEUED_RESULT_BYTES)
        caller.wait(lambda: len(caller.keys) == QUEUED_CALLS, "every call accepted")
        # Stored once answered: every answer waits on its stream by now.
        stored_everywhere(cluster, list(caller.keys.values()))
        direct = caller.read_answer_streams(QUEUED_CALLS)
        answers = {**direct, **caller.relayed}
        assert sorted(answers) == list(range(1, QUEUED_CALLS + 1))
        assert all(value == b"x" * QUEUED_RESULT_BYTES for value in answers.values())
    finally:
        caller.close()


def test_an_executor_shuts_down_without_waiting_for_a_caller_that_does_not_read() -> None:
    """On SIGTERM a running call gets the grace period and its result is stored; answer
    streams whose writes wait on a caller that does not read are cancelled, not waited for."""
    processes = [CbgrpcProcess("kvs", "--storage", "memory")]
    try:
        kvs = processes[0].address
        executor = CbgrpcProcess("executor", "--kvs", kvs, "--id", "executor-a", "--grace", "20")
        processes.append(executor)
        scheduler = CbgrpcProcess("scheduler", "--kvs", kvs, "--executor", executor.address)
        processes.append(scheduler)
        with CloudburstConnection(
            scheduler.address, timeout=DEADLINE, direct_answers=False
        ) as conn:
            conn.register(sized, "sized")
            register_workload(conn)
            stuck = StuckCaller(scheduler.address, {"executor-a": executor.address})
            try:
                for sequence in range(1, LARGE_CALLS + 1):
                    stuck.call(sequence, RESULT_BYTES)
                stuck.wait(lambda: len(stuck.keys) == LARGE_CALLS, "every call accepted")
                # The stream's writes are stalled once this returns. The executor's stall time
                # is its default (2 s), longer than MAX_PROBES calls take: allow more.
                probe_until_relayed(stuck, LARGE_CALLS, servicer.MAX_QUEUED_ANSWERS - 100)
                running = conn.exec_func("gated", ["last"])
                wait_started(conn, "last")
                began = time.monotonic()
                executor.proc.send_signal(signal.SIGTERM)
                executor.wait_for_log("signal received; shutting down")
                conn.put_object("go-last", True)  # the running call ends in the grace period
                assert executor.proc.wait(DEADLINE) == 0, executor.stderr()
                took = time.monotonic() - began
            finally:
                stuck.close()
            # Waiting for the stalled stream held the executor for its whole grace period (20 s).
            assert took < 10, f"the executor took {took:.1f}s to shut down"
            # The running call ended in the grace period: it is not named as abandoned.
            assert "abandoning call" not in executor.stderr()
            assert running.get(timeout=DEADLINE) == "gated-last"
            stored = CloudburstFuture(running.obj_id, conn)
            assert stored.get(timeout=DEADLINE) == "gated-last"
    finally:
        for process in reversed(processes):
            process.kill()
