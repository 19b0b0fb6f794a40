"""A DAG call's schedule names the way its result comes back; nothing else travels for it.

On clusters of separate `cbgrpc` processes: the scheduler sends the sink's
executor no message per DAG call (the executor's status counts what each of
its trigger streams carried); a sink that finishes before the stream its
schedule names has opened keeps its result until the stream opens, and drops
a result whose stream has ended; and a call whose scheduler loses its stream
to the sink's executor fails at once, not at its deadline. The tests that
speak the wire play the scheduler themselves, as a runtime in another
language would.
"""

from __future__ import annotations

import concurrent.futures
import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from cloudburst.future import CloudburstFuture
from cloudburst.serialization import deserialize, serialize
from cloudburst.v1 import (
    execution_pb2,
    executor_service_pb2,
    executor_service_pb2_grpc,
    function_pb2,
    value_pb2,
)
from faults import BOUND, pool_of, register_workload, wait_started
from freezing_proxy import FreezingProxy
from harness import CbgrpcProcess, LoopThread, ProcessCluster
from waiting import wait_until

DEADLINE = 60.0
#: The id this file's tests go by when they play the scheduler.
PLAYER = "test-scheduler"


def status(address: str) -> executor_service_pb2.GetExecutorStatusResponse:
    with grpc.insecure_channel(address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        return stub.GetExecutorStatus(executor_service_pb2.GetExecutorStatusRequest(), timeout=10)


def executor_id(process: CbgrpcProcess) -> str:
    return process.args[process.args.index("--id") + 1]


class TriggerStream:
    """A StreamTriggers stream opened by hand, with the hello given."""

    def __init__(self, address: str, stream_id: int) -> None:
        self._frames: queue.Queue[executor_service_pb2.StreamTriggersRequest | None] = queue.Queue()
        self._channel = grpc.insecure_channel(address)
        stub = executor_service_pb2_grpc.ExecutorServiceStub(self._channel)
        self.answers = stub.StreamTriggers(self._outgoing(), timeout=DEADLINE)
        self.send(hello=executor_service_pb2.TriggerHello(peer_id=PLAYER, stream_id=stream_id))

    def _outgoing(self) -> Iterator[executor_service_pb2.StreamTriggersRequest]:
        while (frame := self._frames.get(timeout=DEADLINE)) is not None:
            yield frame

    def send(self, **frame: Any) -> None:
        self._frames.put(executor_service_pb2.StreamTriggersRequest(**frame))

    def next_result(self) -> executor_service_pb2.DagResult:
        answer = next(a for a in self.answers if a.WhichOneof("frame") == "dag_result")
        return answer.dag_result

    def close(self) -> None:
        self._frames.put(None)
        self.answers.cancel()
        self._channel.close()

    def __enter__(self) -> TriggerStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def chain_schedule(
    cluster: ProcessCluster, call_id: str, argument: int, reply_stream_id: int
) -> execution_pb2.DagSchedule:
    """``route-incr`` on the first executor, then ``route-square`` (the sink) on the second."""
    first, second = cluster.executors
    dag = function_pb2.Dag(name="by-hand", version=1, functions=["route-incr", "route-square"])
    dag.connections.add(upstream="route-incr", downstream="route-square")
    schedule = execution_pb2.DagSchedule(
        call_id=call_id,
        dag=dag,
        direct_response=True,
        reply_to=PLAYER,
        reply_stream_id=reply_stream_id,
    )
    for function, process in (("route-incr", first), ("route-square", second)):
        schedule.placements[function] = executor_id(process)
        schedule.executor_addresses[executor_id(process)] = process.address
        schedule.function_arguments[function].SetInParent()
    schedule.function_arguments["route-incr"].arguments.append(
        value_pb2.Argument(value=serialize(argument, what="an argument", limit=1 << 20))
    )
    schedule.deadline_time.FromNanoseconds(time.time_ns() + int(DEADLINE * 1e9))
    return schedule


def start(schedule: execution_pb2.DagSchedule) -> execution_pb2.Trigger:
    return execution_pb2.Trigger(
        schedule=schedule, call_id=schedule.call_id, target_function="route-incr"
    )


def streams_of(address: str, peer_id: str) -> list[executor_service_pb2.TriggerStreamStatus]:
    return [s for s in status(address).trigger_streams if s.peer_id == peer_id]


def test_the_scheduler_sends_the_sinks_executor_nothing_per_dag_call(
    process_cluster: ProcessCluster,
) -> None:
    with CloudburstConnection(process_cluster.address, timeout=DEADLINE) as cloud:
        cloud.register(lambda _, x: x + 1, "hop-incr")
        cloud.register(lambda _, x: x * x, "hop-square")
        assert cloud.register_dag("hops", ["hop-incr", "hop-square"], [("hop-incr", "hop-square")])
        pins = pool_of(process_cluster.address, lambda pool: len(pool) == 2)
        (sink_id,) = [e for e, pinned in pins.items() if "hop-square" in pinned]
        (source_id,) = [e for e, pinned in pins.items() if "hop-incr" in pinned]
        assert sink_id != source_id, pins
        sink = next(e for e in process_cluster.executors if executor_id(e) == sink_id)
        for i in range(20):
            assert cloud.call_dag("hops", {"hop-incr": i}, direct_response=True) == (i + 1) ** 2
        streams = status(sink.address).trigger_streams
        from_scheduler = [s for s in streams if s.peer_id.startswith("scheduler-")]
        # The scheduler opened its stream to the sink's executor and sent nothing on it after
        # the hello; every result came back on it.
        assert [(s.frames_read, s.dag_results) for s in from_scheduler] == [(0, 20)], streams
        for i in range(5):
            assert cloud.call_dag("hops", {"hop-incr": i}).get(timeout=DEADLINE) == (i + 1) ** 2
    streams = status(sink.address).trigger_streams
    from_scheduler = [s for s in streams if s.peer_id.startswith("scheduler-")]
    from_source = [s for s in streams if s.peer_id == source_id]
    # Results whose callers released them (each future above) may have their held stores
    # dropped: at most one frame each, nothing else. The triggers came from the source's executor.
    assert [s.dag_results for s in from_scheduler] == [25], streams
    assert [s.frames_read <= 5 for s in from_scheduler] == [True], streams
    assert [s.frames_read for s in from_source] == [25], streams


def test_a_result_waits_for_the_stream_its_schedule_names_and_is_dropped_once_it_ended(
    process_cluster: ProcessCluster,
) -> None:
    with CloudburstConnection(process_cluster.address, timeout=DEADLINE) as cloud:
        cloud.register(lambda _, x: x + 1, "route-incr")
        cloud.register(lambda _, x: x * x, "route-square")
        source, sink = process_cluster.executors
        with TriggerStream(source.address, stream_id=1) as to_source:
            # The sink finishes before the stream the schedule names is open: it keeps the result.
            early = chain_schedule(process_cluster, "early", 1, reply_stream_id=2)
            to_source.send(
                trigger=execution_pb2.Trigger(schedule=early, target_function="route-incr")
            )
            wait_until(lambda: status(sink.address).parked_results == 1, "the result is parked")
            with TriggerStream(sink.address, stream_id=2) as to_sink:
                result = to_sink.next_result()
                assert result.call_id == "early"
                assert deserialize(result.outcome.value) == 4
                assert status(sink.address).parked_results == 0

            # Once that stream has ended, a result for it is dropped, not kept.
            wait_until(lambda: not streams_of(sink.address, PLAYER), "the stream to the sink ended")
            late = chain_schedule(process_cluster, "late", 2, reply_stream_id=2)
            late.response_key = "route-late"  # stored too, so the test sees when the sink ran
            to_source.send(
                trigger=execution_pb2.Trigger(schedule=late, target_function="route-incr")
            )
            assert CloudburstFuture("route-late", cloud).get(timeout=DEADLINE) == 9
            assert status(sink.address).parked_results == 0


@pytest.fixture
def proxied_cluster() -> Iterator[tuple[ProcessCluster, dict[str, FreezingProxy], LoopThread]]:
    """A process cluster whose scheduler (and executors) reach each executor through a proxy."""
    env = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
    loop = LoopThread()
    started: list[CbgrpcProcess] = []
    proxies: dict[str, FreezingProxy] = {}
    try:
        kvs = CbgrpcProcess("kvs", "--storage", "memory", env=env)
        started.append(kvs)
        executors = []
        for name in ("executor-a", "executor-b"):
            executor = CbgrpcProcess("executor", "--kvs", kvs.address, "--id", name, env=env)
            started.append(executor)
            executors.append(executor)
            proxy = proxies[name] = FreezingProxy(int(executor.address.rsplit(":", 1)[1]))
            loop.run(proxy.start())
        flags = [arg for p in proxies.values() for arg in ("--executor", p.address)]
        scheduler = CbgrpcProcess("scheduler", "--kvs", kvs.address, *flags, env=env)
        started.append(scheduler)
        yield ProcessCluster(kvs, executors, scheduler), proxies, loop
    finally:
        for proc in reversed(started):
            proc.kill()
        for proxy in proxies.values():
            if proxy.port:
                loop.run(proxy.close())
        loop.close()


def test_a_call_fails_at_once_when_the_schedulers_stream_to_its_sink_breaks(
    proxied_cluster: tuple[ProcessCluster, dict[str, FreezingProxy], LoopThread],
) -> None:
    cluster, proxies, loop = proxied_cluster
    with (
        CloudburstConnection(cluster.address, timeout=DEADLINE, direct_answers=False) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        register_workload(conn)
        assert conn.register_dag("to-gate", ["stage", "gated"], [("stage", "gated")])
        pins = pool_of(cluster.address, lambda pool: len(pool) == 2)
        (sink_id,) = [e for e, pinned in pins.items() if "gated" in pinned]
        direct = background.submit(
            conn.call_dag, "to-gate", {"stage": "held"}, direct_response=True, timeout=DEADLINE
        )
        via_key = conn.call_dag("to-gate", {"stage": "held-too"}, timeout=DEADLINE)
        for tag in ("held", "held-too"):
            wait_started(conn, tag)
        # The sink runs (until its gate opens); the scheduler's stream to its executor breaks.
        loop.loop.call_soon_threadsafe(proxies[sink_id].sever)
        cut_at = time.monotonic()
        with pytest.raises(UnavailableError, match=sink_id):
            direct.result(timeout=BOUND)
        with pytest.raises(UnavailableError, match=sink_id):
            via_key.get(timeout=max(BOUND - (time.monotonic() - cut_at), 0.1))
        assert time.monotonic() - cut_at < BOUND
