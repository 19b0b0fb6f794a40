"""A DAG call's schedule crosses each trigger stream once; the call's other triggers refer to it.

On real gRPC servers: a long chain whose functions alternate between two
executors sends its schedule once per stream and call, whatever its length; a
trigger that refers to a schedule sent earlier on its stream runs; one that
refers to a schedule its stream never carried ends the stream with a clear
error, and the next stream starts afresh at both ends. A chain of thousands
of functions on a cluster of separate processes returns the right result, and
a DAG of 4,000 functions registers and runs.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from cloudburst.serialization import deserialize, serialize
from cloudburst.v1 import (
    execution_pb2,
    executor_service_pb2,
    executor_service_pb2_grpc,
    function_pb2,
    value_pb2,
)
from cloudburst_grpc.executor_client import RemoteExecutorPeer
from cloudburst_grpc.local import Node
from harness import Cluster, ProcessCluster

DEADLINE = 120.0


def incr(_: Any, x: int) -> int:
    return x + 1


def collect(_: Any, *args: Any) -> list[Any]:
    return list(args)


def register_chain(cloud: CloudburstConnection, name: str, length: int) -> list[str]:
    """Register a chain of ``length`` functions that each add one; return their names."""
    names = [f"{name}-{i:05d}" for i in range(length)]
    for function in names:
        cloud.register(incr, function)
    assert cloud.register_dag(name, names, list(itertools.pairwise(names))), cloud.last_error
    return names


def sent_schedules(cluster: Cluster) -> tuple[int, int]:
    """(carried, referred): triggers between the executors that carried their schedule or not."""
    carried = referred = 0
    for node, other in (cluster.executors, reversed(cluster.executors)):
        peer = node.executors[0]._peers.remote(other.executors[0].executor_id)
        if peer is None:  # nothing was sent that way yet
            continue
        assert isinstance(peer, RemoteExecutorPeer)
        carried += peer.schedules.carried
        referred += peer.schedules.referred
    return carried, referred


def test_a_chain_sends_its_schedule_once_per_stream_whatever_its_length(
    cluster: Cluster,
) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        for length in (40, 400):
            names = register_chain(cloud, f"chain{length}", length)
            placed = {
                node.executors[0].executor_id: len(set(names) & node.executors[0].pinned)
                for node in cluster.executors
            }
            assert all(placed.values()), f"the chain does not spread over both: {placed}"
            before = sent_schedules(cluster)
            for call in range(3):
                result = cloud.call_dag(f"chain{length}", {names[0]: call}, direct_response=True)
                assert result == call + length
            after = sent_schedules(cluster)
            carried, referred = after[0] - before[0], after[1] - before[1]
            # Each call's schedule crossed each direction between the executors once.
            assert carried == 3 * 2, (length, carried, referred)
            assert referred > 0


def join_by_hand(cluster: Cluster, call_id: str) -> execution_pb2.DagSchedule:
    """A schedule placed by hand on the first executor: ``left(1)`` and ``right(10)`` join."""
    with CloudburstConnection(cluster.address) as cloud:
        if "both" not in cloud.list():
            cloud.register(incr, "left")
            cloud.register(incr, "right")
            cloud.register(collect, "both")
    executor = cluster.executors[0]
    executor_id = executor.executors[0].executor_id
    dag = function_pb2.Dag(name="by-hand", version=1, functions=["left", "right", "both"])
    dag.connections.add(upstream="left", downstream="both")
    dag.connections.add(upstream="right", downstream="both")
    # The result comes back on the test's stream: hello(peer_id="test", stream_id=1).
    schedule = execution_pb2.DagSchedule(
        call_id=call_id, dag=dag, direct_response=True, reply_to="test", reply_stream_id=1
    )
    for function, argument in (("left", 1), ("right", 10), ("both", None)):
        schedule.placements[function] = executor_id
        schedule.function_arguments[function].SetInParent()
        if argument is not None:
            schedule.function_arguments[function].arguments.append(
                value_pb2.Argument(value=serialize(argument, what="an argument", limit=1 << 20))
            )
    schedule.executor_addresses[executor_id] = executor.address
    schedule.deadline_time.FromNanoseconds(time.time_ns() + int(DEADLINE * 1e9))
    return schedule


def test_a_trigger_refers_to_the_schedule_its_stream_carried(cluster: Cluster) -> None:
    executor = cluster.executors[0]
    schedule = join_by_hand(cluster, "by-hand-1")

    frames: queue.Queue[executor_service_pb2.StreamTriggersRequest | None] = queue.Queue()

    def outgoing() -> Iterator[executor_service_pb2.StreamTriggersRequest]:
        while (frame := frames.get(timeout=DEADLINE)) is not None:
            yield frame

    def send(**frame: Any) -> None:
        frames.put(executor_service_pb2.StreamTriggersRequest(**frame))

    with grpc.insecure_channel(executor.address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        answers = stub.StreamTriggers(outgoing(), timeout=DEADLINE)
        try:
            send(hello=executor_service_pb2.TriggerHello(peer_id="test", stream_id=1))
            send(trigger=execution_pb2.Trigger(schedule=schedule, target_function="left"))
            send(trigger=execution_pb2.Trigger(call_id="by-hand-1", target_function="right"))
            result = next(a for a in answers if a.WhichOneof("frame") == "dag_result")
            assert result.dag_result.call_id == "by-hand-1"
            assert deserialize(result.dag_result.outcome.value) == [2, 11]

            send(trigger=execution_pb2.Trigger(call_id="never-sent", target_function="left"))
            with pytest.raises(grpc.RpcError) as ended:
                for _ in answers:
                    pass
        finally:
            frames.put(None)
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'never-sent'" in (ended.value.details() or "")
    assert "did not carry" in (ended.value.details() or "")


def test_a_chain_of_thousands_of_functions_on_separate_processes(
    process_cluster: ProcessCluster,
) -> None:
    length = 2000
    with CloudburstConnection(process_cluster.address) as cloud:
        names = register_chain(cloud, "long", length)
        for start in (0, 5):
            first = {names[0]: start}
            direct = cloud.call_dag("long", first, direct_response=True, timeout=DEADLINE)
            assert direct == start + length
            stored = cloud.call_dag("long", {names[0]: start + 1}).get(timeout=DEADLINE)
            assert stored == start + 1 + length


def test_a_new_stream_carries_the_schedule_again(cluster: Cluster) -> None:
    """After a stream ends, the peer's next trigger of a call opens one that starts afresh."""
    executor = cluster.executors[0]
    first, second = join_by_hand(cluster, "first"), join_by_hand(cluster, "second")

    async def run(peer: RemoteExecutorPeer, schedule: execution_pb2.DagSchedule) -> Any:
        result = peer.expect_result(schedule, DEADLINE)
        for source in ("left", "right"):
            trigger = execution_pb2.Trigger(target_function=source, call_id=schedule.call_id)
            await peer.trigger(trigger, schedule)
        return deserialize((await result).value)

    async def scenario() -> None:
        peer = RemoteExecutorPeer(
            executor.executors[0].executor_id, executor.address, "test", 1 << 22
        )
        try:
            assert await run(peer, first) == [2, 11]
            assert (peer.schedules.carried, peer.schedules.referred) == (1, 1)
            # A frame that breaks the protocol ends the stream (and fails what waits on it).
            doomed = peer.expect_result(execution_pb2.DagSchedule(call_id="doomed"), DEADLINE)
            peer._stream.send(
                executor_service_pb2.StreamTriggersRequest(
                    trigger=execution_pb2.Trigger(call_id="never-sent", target_function="left")
                )
            )
            with pytest.raises(UnavailableError):
                await doomed
            assert await run(peer, second) == [2, 11]
            assert peer._stream.opened == 2
            assert (peer.schedules.carried, peer.schedules.referred) == (2, 2)
        finally:
            await peer.close()

    cluster.loop.run(scenario(), timeout=DEADLINE)


def test_a_dag_of_four_thousand_functions_registers_and_runs(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        names = register_chain(cloud, "registered", 4000)
        assert cloud.call_dag("registered", {names[0]: 0}, direct_response=True) == 4000
        assert cloud.delete_dag("registered"), cloud.last_error


def test_triggers_sent_in_one_batch_run_as_if_sent_one_by_one(cluster: Cluster) -> None:
    executor = cluster.executors[0]
    schedule = join_by_hand(cluster, "by-hand-batch")

    frames: queue.Queue[executor_service_pb2.StreamTriggersRequest | None] = queue.Queue()

    def outgoing() -> Iterator[executor_service_pb2.StreamTriggersRequest]:
        while (frame := frames.get(timeout=DEADLINE)) is not None:
            yield frame

    batch = executor_service_pb2.StreamTriggersRequest()
    batch.batch.add(trigger=execution_pb2.Trigger(schedule=schedule, target_function="left"))
    batch.batch.add(trigger=execution_pb2.Trigger(call_id="by-hand-batch", target_function="right"))
    with grpc.insecure_channel(executor.address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        answers = stub.StreamTriggers(outgoing(), timeout=DEADLINE)
        try:
            # An opener that does not read batches (this one) gets frames one by one.
            frames.put(
                executor_service_pb2.StreamTriggersRequest(
                    hello=executor_service_pb2.TriggerHello(peer_id="test", stream_id=1)
                )
            )
            offer = next(answers)
            assert offer.reads_batches and offer.WhichOneof("frame") is None
            frames.put(batch)
            for answer in answers:
                assert not answer.batch
                if answer.WhichOneof("frame") == "dag_result":
                    break
        finally:
            frames.put(None)
            answers.cancel()
    assert answer.dag_result.call_id == "by-hand-batch"
    assert deserialize(answer.dag_result.outcome.value) == [2, 11]
