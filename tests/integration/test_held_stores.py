"""Whoever stores a result its caller may release holds the store, and drops it on release.

In a cluster (separate gRPC servers in this process: KVS, two executors,
scheduler) the executor that ran the call holds it. In `cbgrpc serve` with an
executor process, the scheduler stores the results itself (its KVS is in its
process, the executors are not), and holds them the same way. The tests of
what both promise run on both (``system``). The store records every user key
written or deleted, so a test sees that a released result cost it nothing.
Most tests make the hold long (``HOLD_SECONDS``), so that only the runtime's
own signals can end it: a release, a call that refers to the result, a read
of it, or a shutdown.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst_executors import executor as executor_module
from cloudburst_grpc.local import Node, start_local
from cloudburst_grpc.scheduler import release
from cloudburst_grpc.scheduler.core import Scheduler
from cloudburst_grpc.scheduler.servicer import SchedulerServicer
from harness import (
    Cluster,
    LoopThread,
    Writes,
    make_config,
    recorded_writes,
    stored,
    wait_for_pool,
)
from waiting import wait_until

DEADLINE = 20.0

#: Long enough that no test passes by waiting a hold out.
LONG_HOLD = 60.0


@dataclass
class System:
    """Where the tests call (``address``) and where results are stored (``store``)."""

    address: str
    store: Node
    scheduler: Scheduler
    executors: list[Any]
    """The executors that hold stores (none in `cbgrpc serve`, whose scheduler does)."""

    def settled(self) -> None:
        """Wait until nothing holds, stores or deletes a result."""
        releaser = self.scheduler.releaser
        deadline = time.monotonic() + DEADLINE
        while (
            any(e.storing for e in self.executors)
            or len(self.scheduler._holds)
            or self.scheduler._stores
            or releaser._storing
            or releaser._held
            or releaser.backlog
            or releaser._task is not None
        ):
            assert time.monotonic() < deadline, "results were still held or stored"
            time.sleep(0.01)


def start_serve(start_node: Callable[..., Node], tmp_path: Path | None = None) -> Node:
    """`cbgrpc serve` with one executor process, its pool ready."""
    node = start_node(
        start_local(make_config(tmp_path, executor={"isolation": "process", "count": 1}))
    )
    wait_for_pool(node.address, lambda response: len(response.executors) == 1)
    return node


@pytest.fixture(params=["cluster", "serve"])
def system(request: pytest.FixtureRequest, start_node: Callable[..., Node]) -> System:
    if request.param == "cluster":
        cluster: Cluster = request.getfixturevalue("cluster")
        executors = [e for node in cluster.executors for e in node.executors]
        return System(cluster.address, cluster.kvs, scheduler_of(cluster), executors)
    node = start_serve(start_node)
    assert node.scheduler is not None and node.scheduler.stores_results
    return System(node.address, node, node.scheduler, [])


@pytest.fixture
def writes(system: System) -> Iterator[Writes]:
    """Record the user keys written to and deleted from the system's store."""
    with recorded_writes(system.store) as seen:
        yield seen


@pytest.fixture
def long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_module, "HOLD_SECONDS", LONG_HOLD)
    monkeypatch.setattr(release, "HOLD_SECONDS", LONG_HOLD)


def scheduler_of(cluster: Cluster) -> Scheduler:
    assert cluster.scheduler.scheduler is not None
    return cluster.scheduler.scheduler


def register(cloud: CloudburstConnection) -> Any:
    """Register incr, square and the DAG chain (incr, then square); return incr's handle."""
    incr = cloud.register(lambda _, a: a + 1, "incr")
    cloud.register(lambda _, a: a * a, "square")
    assert cloud.register_dag("chain", ["incr", "square"], [("incr", "square")])
    return incr


def test_released_results_are_never_stored_nor_deleted(
    system: System, writes: Writes, long_hold: None
) -> None:
    keys = []
    with CloudburstConnection(system.address) as cloud:
        incr = register(cloud)
        for n in range(20):
            future = incr(n)
            keys.append(future.obj_id)
            assert future.get(timeout=DEADLINE) == n + 1
            future = cloud.call_dag("chain", {"incr": n})
            keys.append(future.obj_id)
            assert future.get(timeout=DEADLINE) == (n + 1) ** 2
        del future
        gc.collect()
        system.settled()
    assert not set(keys) & set(writes.put), "a released result was stored"
    assert not set(keys) & set(writes.deleted), "a delete was sent for a dropped store"


def test_a_result_whose_future_lives_is_readable_after_get(system: System) -> None:
    with CloudburstConnection(system.address) as cloud:
        incr = register(cloud)
        future = incr(1)
        assert future.get(timeout=DEADLINE) == 2
        assert cloud.get_object(future.obj_id) == 2
        dag = cloud.call_dag("chain", {"incr": 2})
        assert dag.get(timeout=DEADLINE) == 9
        assert cloud.get_object(dag.obj_id) == 9
        assert cloud.get_object([future.obj_id, dag.obj_id]) == {future.obj_id: 2, dag.obj_id: 9}


def test_a_read_after_get_has_the_held_store_start_at_once(
    system: System, writes: Writes, long_hold: None
) -> None:
    with CloudburstConnection(system.address) as cloud:
        incr = register(cloud)
        future = incr(1)
        assert future.get(timeout=DEADLINE) == 2
        # Not the hold's end (LONG_HOLD is longer than the SDK's wait for a store to follow
        # an answer, which would give up and return None): the SDK asks for the store now.
        assert cloud.get_object(future.obj_id) == 2
        dag = cloud.call_dag("chain", {"incr": 2})
        assert dag.get(timeout=DEADLINE) == 9
        assert cloud.get_object(dag.obj_id) == 9
        several = [incr(3), cloud.call_dag("chain", {"incr": 3})]
        assert [f.get(timeout=DEADLINE) for f in several] == [4, 16]
        keys = [f.obj_id for f in several]
        assert cloud.get_object(keys) == dict(zip(keys, [4, 16], strict=True))
        # A result released meanwhile is still dropped, not stored.
        released = incr(4)
        assert released.get(timeout=DEADLINE) == 5
        dropped = released.obj_id
        del released
        gc.collect()
        read = [future.obj_id, dag.obj_id, *keys]
        system.settled()
        assert set(read) <= set(writes.put)
        assert not set(read) & set(writes.deleted), "a result whose future lives was deleted"
    assert dropped not in writes.put, "a released result was stored"
    assert dropped not in writes.deleted


def test_only_the_caller_can_have_a_held_store_start_at_once(
    cluster: Cluster, long_hold: None
) -> None:
    with (
        CloudburstConnection(cluster.address) as cloud,
        CloudburstConnection(cluster.address) as other,
    ):
        incr = register(cloud)
        mine = incr(1)
        assert mine.get(timeout=DEADLINE) == 2
        theirs = other.exec_func("incr", [5])
        assert theirs.get(timeout=DEADLINE) == 6
        # Another stream names this stream's held result, then its own: read in that order, the
        # first is ignored (the scheduler still knows who holds it), the second is stored now.
        other._core.store_now([mine.obj_id])
        assert other.get_object(theirs.obj_id) == 6
        assert mine.obj_id in scheduler_of(cluster).releaser._holders
        assert any(mine.obj_id in e._holds for node in cluster.executors for e in node.executors)
        assert cloud.get_object(mine.obj_id) == 2


def test_a_scheduler_that_does_not_know_store_keys_still_serves_the_read(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier release does not say it reads ``store_keys``: it is sent none."""
    read_calls = SchedulerServicer._read_calls
    named: list[str] = []

    async def earlier(self: SchedulerServicer, request_iterator: Any, *args: Any) -> None:
        async def without_store_keys() -> Any:
            async for message in request_iterator:
                for frame in message.batch or (message,):
                    named.extend(frame.store_keys)
                    frame.ClearField("store_keys")
                yield message

        await read_calls(self, without_store_keys(), *args)

    monkeypatch.setattr(SchedulerServicer, "_read_calls", earlier)
    monkeypatch.setattr(SchedulerServicer, "takes_store_keys", False)
    with CloudburstConnection(cluster.address) as cloud:
        incr = register(cloud)
        first, second = incr(1), incr(2)
        assert [first.get(timeout=DEADLINE), second.get(timeout=DEADLINE)] == [2, 3]
        # Read once the hold ends.
        assert cloud.get_object(first.obj_id) == 2
        assert cloud.get_object([second.obj_id]) == {second.obj_id: 3}
        assert incr(first).get(timeout=DEADLINE) == 3
        # The word comes on the call stream, maybe after an outcome on an answer stream.
        wait_until(lambda: cloud._core.takes_chosen_keys, "the scheduler's word", DEADLINE)
    assert named == []


def test_keys_named_before_the_scheduler_says_it_reads_them_wait_for_its_word(
    cluster: Cluster, long_hold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome on an answer stream may come before the scheduler's first answer."""
    with CloudburstConnection(cluster.address) as cloud:
        core = type(cloud._core)
        told = core._told

        def later(self: Any, answer: Any) -> None:
            # The scheduler's word on the call stream comes after the read has started.
            self.loop.call_later(1.0, told, self, answer)

        monkeypatch.setattr(core, "_told", later)
        incr = register(cloud)
        future = incr(1)
        assert future.get(timeout=DEADLINE) == 2
        assert not cloud._core._store_keys_stream, "the word came before the read"
        assert cloud.get_object(future.obj_id) == 2  # neither the 60 s hold nor None


def test_a_result_kept_past_its_hold_is_stored(system: System, writes: Writes) -> None:
    with CloudburstConnection(system.address) as cloud:
        incr = register(cloud)
        future = incr(1)
        assert future.get(timeout=DEADLINE) == 2
        system.settled()
        assert stored(system.store, future.obj_id)
        assert future.obj_id in writes.put


def test_a_call_that_refers_to_a_held_result_has_it_stored_at_once(
    system: System, long_hold: None
) -> None:
    with CloudburstConnection(system.address) as cloud:
        incr = register(cloud)
        first = incr(1)
        assert first.get(timeout=DEADLINE) == 2
        # Not the hold's end: the scheduler has the held store start when the call refers to it.
        assert incr(first).get(timeout=DEADLINE) == 3
        assert cloud.call_dag("chain", {"incr": first}).get(timeout=DEADLINE) == 9
        assert stored(system.store, first.obj_id)


def pause_then_pass(_: Any, value: int) -> int:
    time.sleep(0.3)
    return value


def test_a_call_that_refers_to_a_result_still_running_has_it_stored_at_once(
    system: System, long_hold: None
) -> None:
    with CloudburstConnection(system.address) as cloud:
        incr = register(cloud)
        pause = cloud.register(pause_then_pass, "pause")
        assert pause(0).get(timeout=DEADLINE) == 0  # called once: the next call is not waited for
        first = pause(5)
        # Sent before its argument's result exists: that result is then not held at all.
        assert incr(first).get(timeout=DEADLINE) == 6
        assert first.get(timeout=DEADLINE) == 5


def test_an_executor_that_shuts_down_stores_the_results_it_holds(
    cluster: Cluster, long_hold: None
) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        incr = register(cloud)
        futures = [incr(n) for n in range(4)]
        assert [f.get(timeout=DEADLINE) for f in futures] == [1, 2, 3, 4]
        held = [e for node in cluster.executors for e in node.executors if e._holds]
        assert held, "the results were not held"
        for node in cluster.executors:
            cluster.loop.run(node.stop(5.0))
        assert all(stored(cluster.kvs, f.obj_id) for f in futures)


def test_a_serve_that_stops_stores_the_results_it_holds(
    start_node: Callable[..., Node], server_loop: LoopThread, tmp_path: Path, long_hold: None
) -> None:
    node = start_serve(start_node, tmp_path)
    assert node.scheduler is not None
    with CloudburstConnection(node.address) as cloud:
        incr = register(cloud)
        futures = [incr(n) for n in range(4)]
        assert [f.get(timeout=DEADLINE) for f in futures] == [1, 2, 3, 4]
        keys = [f.obj_id for f in futures]
        assert len(node.scheduler._holds) == 4, "the results were not held"
        server_loop.run(node.stop(5.0))
    # The results outlive the server: a new one on its data directory has them.
    again = start_serve(start_node, tmp_path)
    assert all(stored(again, key) for key in keys)
