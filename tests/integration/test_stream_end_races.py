"""Streams whose client ends them while answers are in flight end cleanly on both sides.

A caller may half-close or cancel ``StreamCalls`` (at a scheduler) or
``StreamTriggers`` (at an executor) at any moment, also while the server is
writing answers. Then: a half-closed stream still ends with OK (a call stream
after answering every call), the server raises nothing into its event loop
(no "Task exception was never retrieved", no error from gRPC's handler), and
no task of the stream outlives it.

The other way round, a stream that its server ends while the client writes to
it ends, on the client, as the end of the stream (UNAVAILABLE), never as the
INTERNAL error gRPC's asyncio client makes of it.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import queue
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.serialization import deserialize, serialize
from cloudburst.streams import OutboxStream
from cloudburst.v1 import (
    executor_service_pb2,
    executor_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_grpc.scheduler.servicer import SchedulerServicer
from harness import Cluster, LoopThread

DEADLINE = 60.0
#: Calls sent on each stream before it is ended.
CALLS = 64
#: Streams ended each way.
ROUNDS = 12


class LoopProblems:
    """What reaches the server loop's exception handler, and the stream tasks still alive."""

    def __init__(self, loop: LoopThread) -> None:
        self._loop = loop
        self.reported: list[dict[str, Any]] = []
        loop.loop.call_soon_threadsafe(loop.loop.set_exception_handler, self._report)

    def _report(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.reported.append(context)
        loop.default_exception_handler(context)

    def stream_tasks(self, servicer: str) -> list[str]:
        """The server loop's tasks of ``servicer``'s stream handlers and the calls they started."""

        async def names() -> list[str]:
            found = []
            for task in asyncio.all_tasks():
                code = getattr(task.get_coro(), "cr_code", None)
                name = getattr(code, "co_qualname", "")
                if name.startswith(f"{servicer}."):
                    found.append(name)
            return found

        return self._loop.run(names())

    def wait_for_stream_tasks(self, servicer: str, before: collections.Counter[str]) -> None:
        """Wait (each check a turn of the server loop) until no more stream tasks than ``before``.

        (The scheduler's own trigger streams to the executors stay open all along.)
        """
        deadline = time.monotonic() + DEADLINE
        while left := collections.Counter(self.stream_tasks(servicer)) - before:
            assert time.monotonic() < deadline, f"tasks outlive their streams: {left}"


@pytest.fixture(params=["written", "generator"])
def handler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which StreamCalls handler the scheduler uses: each call's task writes its answers
    (the default), or a response generator (with tracing on)."""
    if request.param == "generator":
        monkeypatch.setattr(
            SchedulerServicer, "_stream_calls_written", SchedulerServicer.StreamCalls
        )


@pytest.fixture
def problems(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> Iterator[LoopProblems]:
    caplog.set_level(logging.WARNING)
    watcher = LoopProblems(cluster.loop)
    yield watcher
    gc.collect()  # a task whose exception nobody retrieved says so when it is collected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not watcher.reported, watcher.reported
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def registered(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE, direct_answers=False) as conn:
        conn.register(lambda _, x: x + 1, "incr")
        assert conn.register_dag("incr", ["incr"], [])
        assert conn.call_dag("incr", {"incr": 1}, direct_response=True) == 2


def frames(requests: queue.Queue[Any]) -> Iterator[Any]:
    while (frame := requests.get()) is not None:
        yield frame


def call_frame(sequence: int) -> scheduler_service_pb2.StreamCallsRequest:
    frame = scheduler_service_pb2.StreamCallsRequest(sequence=sequence)
    if sequence % 2:
        frame.call_function.name = "incr"
        frame.call_function.arguments.add(value=serialize(sequence))
        frame.stream_outcome = True
    else:
        frame.call_dag.name = "incr"
        frame.call_dag.direct_response = True
        frame.call_dag.function_arguments["incr"].arguments.add(value=serialize(sequence))
    return frame


def outcome_of(answer: scheduler_service_pb2.StreamCallsResponse) -> Any:
    body = getattr(answer, answer.WhichOneof("answer") or "error")
    if not body.HasField("outcome"):
        return None  # an accept answer; the outcome follows
    assert body.outcome.WhichOneof("result") == "value", answer
    return deserialize(body.outcome.value)


def test_a_call_stream_half_closed_with_answers_in_flight_answers_all_and_ends_ok(
    handler: None, cluster: Cluster, registered: None, problems: LoopProblems
) -> None:
    before = collections.Counter(problems.stream_tasks("SchedulerServicer"))
    with grpc.insecure_channel(cluster.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        for _ in range(ROUNDS):
            requests: queue.Queue[Any] = queue.Queue()
            for sequence in range(1, CALLS + 1):
                requests.put(call_frame(sequence))
            requests.put(None)  # half-close right behind the calls
            answers = stub.StreamCalls(frames(requests), timeout=DEADLINE)
            outcomes: dict[int, Any] = {}
            for message in answers:
                for answer in message.batch or (message,):
                    outcome = outcome_of(answer)
                    if outcome is not None:
                        outcomes[answer.sequence] = outcome
            assert answers.code() == grpc.StatusCode.OK, answers.details()
            assert outcomes == {s: s + 1 for s in range(1, CALLS + 1)}
    problems.wait_for_stream_tasks("SchedulerServicer", before)


def test_a_call_stream_cancelled_with_answers_in_flight_leaves_nothing_behind(
    handler: None, cluster: Cluster, registered: None, problems: LoopProblems
) -> None:
    before = collections.Counter(problems.stream_tasks("SchedulerServicer"))
    with grpc.insecure_channel(cluster.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        for round_ in range(ROUNDS):
            requests: queue.Queue[Any] = queue.Queue()
            for sequence in range(1, CALLS + 1):
                requests.put(call_frame(sequence))
            answers = stub.StreamCalls(frames(requests), timeout=DEADLINE)
            for _ in range(round_ % 4):  # cancelled after 0-3 answers
                next(answers)
            answers.cancel()
            requests.put(None)
            assert answers.code() == grpc.StatusCode.CANCELLED
    problems.wait_for_stream_tasks("SchedulerServicer", before)


def execute_frame(sequence: int) -> executor_service_pb2.StreamTriggersRequest:
    frame = executor_service_pb2.StreamTriggersRequest(sequence=sequence)
    call = frame.execute_function
    call.call_id = f"race-{sequence}"
    call.function_name = "incr"
    call.arguments.add(value=serialize(sequence))
    call.direct_response = True
    return frame


@pytest.mark.parametrize("end", ["half-close", "cancel"])
def test_a_trigger_stream_ended_with_answers_in_flight_ends_cleanly(
    cluster: Cluster, registered: None, problems: LoopProblems, end: str
) -> None:
    before = collections.Counter(problems.stream_tasks("ExecutorServicer"))
    executor = cluster.executors[0]
    with grpc.insecure_channel(executor.address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        for round_ in range(ROUNDS):
            requests: queue.Queue[Any] = queue.Queue()
            requests.put(
                executor_service_pb2.StreamTriggersRequest(
                    hello=executor_service_pb2.TriggerHello()
                )
            )
            for sequence in range(1, CALLS + 1):
                requests.put(execute_frame(sequence))
            answers = stub.StreamTriggers(frames(requests), timeout=DEADLINE)
            seen = 0
            while seen < round_ % 4:  # ended after 0-3 answers to calls
                message = next(answers)
                seen += sum(
                    f.WhichOneof("frame") == "execute_function"
                    for f in (message.batch or (message,))
                )
            if end == "half-close":
                requests.put(None)
                for message in answers:
                    for answer in message.batch or (message,):
                        if answer.WhichOneof("frame") == "execute_function":
                            outcome = answer.execute_function.outcome
                            assert outcome.WhichOneof("result") == "value", answer
                            assert deserialize(outcome.value) == answer.sequence + 1
                assert answers.code() == grpc.StatusCode.OK, answers.details()
            else:
                answers.cancel()
                requests.put(None)
                assert answers.code() == grpc.StatusCode.CANCELLED
    problems.wait_for_stream_tasks("ExecutorServicer", before)


class _EndsAfterOneFrame(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    """A call stream that answers the first frame and then ends, whatever the caller sends."""

    async def StreamCalls(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[scheduler_service_pb2.StreamCallsResponse]:
        async for frame in request_iterator:
            yield scheduler_service_pb2.StreamCallsResponse(sequence=frame.sequence)
            return


async def test_a_stream_the_server_ends_while_frames_are_written_is_not_an_internal_error() -> None:
    """gRPC's client reports INTERNAL "Internal error from Core" for a stream the server ended
    while the client wrote to it (grpc/grpc#36066); the stream says it ended instead."""
    server = grpc.aio.server()
    scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
        _EndsAfterOneFrame(),  # type: ignore[abstract]  # only StreamCalls is served
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endings: collections.Counter[str] = collections.Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
            for _ in range(ROUNDS * 10):
                ended: asyncio.Future[grpc.RpcError | None] = asyncio.Future()
                stream: OutboxStream[Any, Any] = OutboxStream(
                    "a test server", stub.StreamCalls, lambda _: None, ended.set_result
                )
                async with asyncio.timeout(DEADLINE):
                    sequence = 1
                    while not ended.done():  # frames written as the server ends the stream
                        await stream.write(
                            scheduler_service_pb2.StreamCallsRequest(sequence=sequence)
                        )
                        sequence += 1
                        await asyncio.sleep(0)  # a write into an ended stream does not yield
                    error = await ended
                endings["ok" if error is None else str(error.code())] += 1
                await stream.close()
    finally:
        await server.stop(None)
    assert set(endings) <= {"ok", "StatusCode.UNAVAILABLE"}, endings
