"""The sink of a direct_response DAG call answers its caller on the caller's answer stream.

A cluster of separate gRPC servers (KVS, two executors, scheduler) in this
process; the scheduler's counters show which way each answer went. The
protocol tests speak the wire directly, as a client in another language would.
"""

from __future__ import annotations

import concurrent.futures
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import AnswerLostError, RemoteFunctionError
from cloudburst.serialization import deserialize, serialize
from cloudburst.v1 import (
    error_pb2,
    executor_service_pb2,
    executor_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_executors.servicer import ExecutorServicer
from cloudburst_grpc.local import Node, start_scheduler_node
from cloudburst_grpc.scheduler.core import Scheduler
from harness import Cluster, make_config

DEADLINE = 60.0

_started = threading.Semaphore(0)
_release = threading.Event()
#: The SDK ships functions by value: ``hold`` finds this module's objects by its name.
MODULE = __name__


def hold(_: Any, n: int) -> int:
    """Counts itself started, then waits until the test lets it finish."""
    here = sys.modules[MODULE]
    here._started.release()
    here._release.wait(DEADLINE)
    return n


def fail(_: Any, x: int) -> int:
    raise ValueError(f"no {x}")


def unpicklable(_: Any, x: int) -> Any:
    return threading.Lock()


@pytest.fixture(params=["written", "generator"])
def handler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which StreamAnswers handler the executors use (request it before ``cluster``): each
    call's task writes its answer (the default), or a response generator (with tracing on)."""
    if request.param == "generator":
        monkeypatch.setattr(
            ExecutorServicer, "_stream_answers_written", ExecutorServicer.StreamAnswers
        )


def scheduler_of(cluster: Cluster) -> Scheduler:
    assert cluster.scheduler.scheduler is not None
    return cluster.scheduler.scheduler


def executor_ids(cluster: Cluster) -> set[str]:
    return {e.executors[0].executor_id for e in cluster.executors}


def register(conn: CloudburstConnection) -> None:
    conn.register(lambda _, x: x + 1, "incr")
    conn.register(lambda _, x: x * x, "square")
    conn.register(fail, "fail")
    conn.register(unpicklable, "unpicklable")
    conn.register(hold, "hold")
    assert conn.register_dag("chain", ["incr", "square"], [("incr", "square")])
    assert conn.register_dag("failing", ["incr", "fail"], [("incr", "fail")])
    assert conn.register_dag("unpicklable", ["unpicklable"], [])
    assert conn.register_dag("held", ["hold"], [])


def test_calls_are_answered_directly_and_the_scheduler_forwards_nothing(
    handler: None, cluster: Cluster
) -> None:
    scheduler = scheduler_of(cluster)
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        assert conn.answer_executors == executor_ids(cluster)
        register(conn)
        for i in range(20):
            assert conn.call_dag("chain", {"incr": i}, direct_response=True) == (i + 1) ** 2
    # Closing waits for every call to end at the scheduler: the sinks' notes have come.
    assert scheduler.answered_directly == 20
    assert scheduler.relayed_outcomes == 0
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        # One-shot calls too, their results stored as well.
        incr = conn.get_function("incr")
        assert incr is not None
        futures = [incr(i) for i in range(10)]
        assert [f.get(timeout=DEADLINE) for f in futures] == list(range(1, 11))
        assert conn.get_object(futures[3].obj_id) == 4
        # And DAG calls read with get(), their results stored as well.
        dag_future = conn.call_dag("chain", {"incr": 2})
        assert dag_future.get(timeout=DEADLINE) == 9
        assert conn.get_object(dag_future.obj_id) == 9
    assert scheduler.answered_directly == 31
    assert scheduler.relayed_outcomes == 0


def errors(conn: CloudburstConnection) -> list[tuple[type[BaseException], str]]:
    caught: list[tuple[type[BaseException], str]] = []
    for dag, argument in (("failing", {"incr": 1}), ("unpicklable", {"unpicklable": 1})):
        with pytest.raises(Exception) as raised:
            conn.call_dag(dag, argument, direct_response=True)
        caught.append((type(raised.value), str(raised.value)))
    for function in ("fail", "unpicklable"):
        with pytest.raises(Exception) as raised:
            conn.exec_func(function, [2]).get(timeout=DEADLINE)
        caught.append((type(raised.value), str(raised.value)))
    return caught


def test_results_and_errors_are_the_same_either_way(cluster: Cluster) -> None:
    scheduler = scheduler_of(cluster)
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as direct:
        register(direct)
        assert direct.call_dag("chain", {"incr": [3]}, direct_response=True) == 16
        direct_errors = errors(direct)
    # Closing waits for every call to end at the scheduler: the sinks' notes have come.
    assert scheduler.answered_directly == 5
    assert scheduler.relayed_outcomes == 0
    with CloudburstConnection(cluster.address, timeout=DEADLINE, direct_answers=False) as relayed:
        assert relayed.answer_executors == frozenset()
        assert relayed.call_dag("chain", {"incr": [3]}, direct_response=True) == 16
        relayed_errors = errors(relayed)
    assert scheduler.answered_directly == 5
    assert scheduler.relayed_outcomes == 5
    assert direct_errors == relayed_errors
    for user, runtime in (direct_errors[0:2], direct_errors[2:4]):
        assert user[0] is RemoteFunctionError
        assert "ValueError: no 2" in user[1]
        assert runtime[0] is not RemoteFunctionError  # a runtime error, not the user's


def test_the_environment_turns_answer_streams_off(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBURST_DIRECT_ANSWERS", "0")
    scheduler = scheduler_of(cluster)
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        assert conn.answer_executors == frozenset()
        register(conn)
        assert conn.call_dag("chain", {"incr": 1}, direct_response=True) == 4
    assert scheduler.answered_directly == 0
    assert scheduler.relayed_outcomes == 1


def test_serve_offers_no_answer_streams(local_node: Node) -> None:
    with grpc.insecure_channel(local_node.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        listed = stub.ListExecutors(scheduler_service_pb2.ListExecutorsRequest(), timeout=10)
    assert listed.executors and not listed.direct_answers
    with CloudburstConnection(local_node.address, timeout=DEADLINE) as conn:
        assert conn.answer_executors == frozenset()
        register(conn)
        assert conn.call_dag("chain", {"incr": 1}, direct_response=True) == 4


class RawCaller:
    """A StreamCalls stream and answer streams, spoken on the wire."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.stream_id = secrets.token_hex(16)
        self._frames: queue.Queue[scheduler_service_pb2.StreamCallsRequest | None] = queue.Queue()
        self._channels: list[grpc.Channel] = []
        channel = self._channel(cluster.address)
        self.answers = scheduler_service_pb2_grpc.SchedulerServiceStub(channel).StreamCalls(
            self._iterate(), timeout=DEADLINE
        )

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        self._channels.append(channel)
        return channel

    def _iterate(self) -> Iterator[scheduler_service_pb2.StreamCallsRequest]:
        while (frame := self._frames.get()) is not None:
            yield frame

    def send(self, frame: scheduler_service_pb2.StreamCallsRequest) -> None:
        self._frames.put(frame)

    def half_close(self) -> None:
        self._frames.put(None)

    def open_answers(self, node: Node, stream_id: str = "") -> Any:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(self._channel(node.address))
        request = executor_service_pb2.StreamAnswersRequest(
            answer_stream_id=stream_id or self.stream_id
        )
        stream = stub.StreamAnswers(request, timeout=DEADLINE)
        assert next(stream).registered
        return stream

    def name(self, *nodes: Node) -> None:
        frame = scheduler_service_pb2.StreamCallsRequest()
        frame.answer_streams.answer_stream_id = self.stream_id
        frame.answer_streams.executor_ids.extend(n.executors[0].executor_id for n in nodes)
        self.send(frame)

    def call(self, sequence: int, dag: str, function: str, argument: int) -> None:
        frame = scheduler_service_pb2.StreamCallsRequest(sequence=sequence)
        frame.call_dag.name = dag
        frame.call_dag.direct_response = True
        frame.call_dag.function_arguments[function].arguments.add(value=serialize(argument))
        self.send(frame)

    def close(self) -> None:
        self.half_close()
        self.answers.cancel()
        for channel in self._channels:
            channel.close()


def value_of(answer: scheduler_service_pb2.StreamCallsResponse) -> Any:
    assert answer.WhichOneof("answer") == "call_dag", answer
    return deserialize(answer.call_dag.outcome.value)


def sink_of(cluster: Cluster, function: str) -> tuple[Node, Node]:
    """The executor ``function`` is pinned on (a one-function DAG's sink), and the other."""
    (pinned,) = scheduler_of(cluster).pool.pinned_on(function)
    sink = next(e for e in cluster.executors if e.executors[0].executor_id == pinned)
    other = next(e for e in cluster.executors if e is not sink)
    return sink, other


@pytest.fixture
def raw(cluster: Cluster) -> Iterator[RawCaller]:
    with CloudburstConnection(cluster.address, timeout=DEADLINE, direct_answers=False) as conn:
        register(conn)
        conn.register(lambda _, x: x * 10, "tenfold")
        assert conn.register_dag("tenfold", ["tenfold"], [])
    caller = RawCaller(cluster)
    try:
        yield caller
    finally:
        _release.set()
        caller.close()


def test_an_answer_goes_to_the_stream_named_or_else_to_the_scheduler(
    cluster: Cluster, raw: RawCaller
) -> None:
    scheduler = scheduler_of(cluster)
    sink, other = sink_of(cluster, "tenfold")
    answers = raw.open_answers(sink)
    raw.open_answers(other)
    raw.name(sink, other)
    raw.call(1, "tenfold", "tenfold", 4)
    (direct,) = next(answers).answers
    assert direct.sequence == 1 and value_of(direct) == 40
    # Named, but not held at the sink under this id: the sink answers through the scheduler.
    raw.stream_id = secrets.token_hex(16)
    raw.name(sink)
    raw.call(2, "tenfold", "tenfold", 5)
    relayed = next(raw.answers)
    assert relayed.sequence == 2 and value_of(relayed) == 50
    # Held there, but named no more: through the scheduler.
    raw.name()
    raw.call(3, "tenfold", "tenfold", 6)
    relayed = next(raw.answers)
    assert relayed.sequence == 3 and value_of(relayed) == 60
    raw.half_close()
    assert list(raw.answers) == []  # once every call ended: the sink's note has come
    assert (scheduler.answered_directly, scheduler.relayed_outcomes) == (1, 2)


def test_a_lost_answer_stream_gets_each_call_its_answer_or_a_clear_error(
    handler: None, cluster: Cluster, raw: RawCaller
) -> None:
    sink, _ = sink_of(cluster, "tenfold")
    held_sink, _ = sink_of(cluster, "hold")
    answers = raw.open_answers(sink)
    held_answers = raw.open_answers(held_sink) if held_sink is not sink else answers
    raw.name(sink, held_sink)
    raw.call(1, "tenfold", "tenfold", 1)
    (delivered,) = next(answers).answers
    assert delivered.sequence == 1
    _release.clear()
    raw.call(2, "held", "hold", 7)
    assert _started.acquire(timeout=DEADLINE)
    # Both streams break; the caller says it still waits for 1 (whose answer it "lost")
    # and 2, which is still running at the sink.
    answers.cancel()
    held_answers.cancel()
    for node in {sink.address: sink, held_sink.address: held_sink}.values():
        frame = scheduler_service_pb2.StreamCallsRequest()
        frame.answer_stream_lost.executor_id = node.executors[0].executor_id
        frame.answer_stream_lost.sequences.extend([1, 2])
        raw.send(frame)
    lost = next(raw.answers)
    assert lost.sequence == 1 and lost.WhichOneof("answer") == "error"
    assert lost.error.reason == error_pb2.ERROR_REASON_ANSWER_LOST
    assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "answer was lost with the connection to executor" in lost.error.message
    assert "the call ran" in lost.error.message
    _release.set()
    # The sink finds the stream gone and answers through the scheduler.
    finished = next(raw.answers)
    assert finished.sequence == 2 and value_of(finished) == 7


def test_half_close_answers_every_call_before_the_stream_ends(
    handler: None, cluster: Cluster, raw: RawCaller
) -> None:
    scheduler = scheduler_of(cluster)
    sink, _ = sink_of(cluster, "tenfold")
    answers = raw.open_answers(sink)
    raw.name(sink)
    for sequence in range(1, 11):
        raw.call(sequence, "tenfold", "tenfold", sequence)
    raw.half_close()
    relayed = list(raw.answers)  # ends once every call was answered, one way or the other
    assert relayed == []
    received: dict[int, Any] = {}
    while len(received) < 10:
        for answer in next(answers).answers:
            received[answer.sequence] = value_of(answer)
    assert received == {s: s * 10 for s in range(1, 11)}
    assert scheduler.answered_directly == 10


def test_an_answer_lost_with_its_stream_is_a_clear_error_or_the_stored_result(
    cluster: Cluster,
) -> None:
    with (
        CloudburstConnection(cluster.address, timeout=DEADLINE) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        register(conn)
        sink, _ = sink_of(cluster, "hold")
        sink_id = sink.executors[0].executor_id
        assert sink_id in conn.answer_executors
        _release.clear()
        try:
            direct = background.submit(conn.call_dag, "held", {"hold": 1}, direct_response=True)
            stored = conn.call_dag("held", {"hold": 2})
            for _ in range(2):
                assert _started.acquire(timeout=DEADLINE)
            # Another stream under the connection's id takes the place of its stream at the
            # sink: the connection sees its stream end, and the answers go elsewhere.
            assert conn._core.answers is not None
            request = executor_service_pb2.StreamAnswersRequest(
                answer_stream_id=conn._core.answers.stream_id
            )
            with grpc.insecure_channel(sink.address) as channel:
                stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
                taken = stub.StreamAnswers(request, timeout=DEADLINE)
                assert next(taken).registered
                deadline = time.monotonic() + DEADLINE
                while sink_id in conn.answer_executors:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                _release.set()
                elsewhere: set[int] = set()
                while len(elsewhere) < 2:
                    elsewhere.update(a.sequence for a in next(taken).answers)
                taken.cancel()
            with pytest.raises(AnswerLostError, match="the call ran, but its answer was lost"):
                direct.result(timeout=DEADLINE)
            # A result that is also stored is read from the KVS instead.
            assert stored.get(timeout=DEADLINE) == 2
        finally:
            _release.set()


def test_a_scheduler_told_not_to_answers_every_call_itself(
    start_node: Callable[..., Node], cluster: Cluster
) -> None:
    config = make_config(scheduler={"pin_replicas": 1, "direct_answers": False})
    node = start_node(
        start_scheduler_node(config, cluster.kvs.address, [e.address for e in cluster.executors])
    )
    assert node.scheduler is not None
    with CloudburstConnection(node.address, timeout=DEADLINE) as conn:
        assert conn.answer_executors == frozenset()
        register(conn)
        assert conn.call_dag("chain", {"incr": 1}, direct_response=True) == 4
        assert conn.exec_func("incr", [1]).get(timeout=DEADLINE) == 2
    assert (node.scheduler.answered_directly, node.scheduler.relayed_outcomes) == (0, 2)
