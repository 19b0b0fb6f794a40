"""An executor holds the store of a result its caller may release, and drops it on release.

A cluster of separate gRPC servers (KVS, two executors, scheduler) in this
process. The KVS's store records every user key written or deleted, so a test
sees that a released result cost the KVS nothing. Most tests make the hold
long (``HOLD_SECONDS``), so that only the runtime's own signals can end it: a
release, a call that refers to the result, or the executor's shutdown.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.v1 import lattice_pb2
from cloudburst_executors import executor as executor_module
from cloudburst_grpc.scheduler.core import Scheduler
from cloudburst_grpc.scheduler.servicer import SchedulerServicer
from harness import Cluster, stored
from waiting import wait_until

DEADLINE = 20.0

#: Long enough that no test passes by waiting a hold out.
LONG_HOLD = 60.0


class Writes:
    """The user keys the KVS stored and deleted."""

    def __init__(self) -> None:
        self.put: list[str] = []
        self.deleted: list[str] = []


@pytest.fixture
def writes(cluster: Cluster) -> Iterator[Writes]:
    """Record the user keys written to and deleted from the cluster's KVS."""
    store: Any = cluster.kvs.store
    seen = Writes()
    put, delete, delete_many = store.put, store.delete, store.delete_many
    user = lattice_pb2.KEYSPACE_USER

    async def recorded_put(keyspace: int, key: str, *args: Any, **kwargs: Any) -> Any:
        if keyspace == user:
            seen.put.append(key)
        return await put(keyspace, key, *args, **kwargs)

    async def recorded_delete(keyspace: int, key: str, *args: Any, **kwargs: Any) -> Any:
        if keyspace == user:
            seen.deleted.append(key)
        return await delete(keyspace, key, *args, **kwargs)

    async def recorded_delete_many(keyspace: int, keys: Any) -> Any:
        keys = list(keys)
        if keyspace == user:
            seen.deleted.extend(keys)
        return await delete_many(keyspace, keys)

    store.put, store.delete, store.delete_many = recorded_put, recorded_delete, recorded_delete_many
    try:
        yield seen
    finally:
        store.put, store.delete, store.delete_many = put, delete, delete_many


@pytest.fixture
def long_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_module, "HOLD_SECONDS", LONG_HOLD)


def scheduler_of(cluster: Cluster) -> Scheduler:
    assert cluster.scheduler.scheduler is not None
    return cluster.scheduler.scheduler


def wait_settled(cluster: Cluster) -> None:
    """Wait until no executor stores or holds a result and the scheduler deletes nothing."""
    releaser = scheduler_of(cluster).releaser
    executors = [e for node in cluster.executors for e in node.executors]
    deadline = time.monotonic() + DEADLINE
    while (
        any(e.storing for e in executors)
        or releaser._storing
        or releaser._held
        or releaser.backlog
        or releaser._task is not None
    ):
        assert time.monotonic() < deadline, "results were still held or stored"
        time.sleep(0.01)


def register(cloud: CloudburstConnection) -> Any:
    """Register incr, square and the DAG chain (incr, then square); return incr's handle."""
    incr = cloud.register(lambda _, a: a + 1, "incr")
    cloud.register(lambda _, a: a * a, "square")
    assert cloud.register_dag("chain", ["incr", "square"], [("incr", "square")])
    return incr


def test_released_results_are_never_stored_nor_deleted(
    cluster: Cluster, writes: Writes, long_hold: None
) -> None:
    keys = []
    with CloudburstConnection(cluster.address) as cloud:
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
        wait_settled(cluster)
    assert not set(keys) & set(writes.put), "a released result was stored"
    assert not set(keys) & set(writes.deleted), "a delete was sent for a dropped store"


def test_a_result_whose_future_lives_is_readable_after_get(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        incr = register(cloud)
        future = incr(1)
        assert future.get(timeout=DEADLINE) == 2
        assert cloud.get_object(future.obj_id) == 2
        dag = cloud.call_dag("chain", {"incr": 2})
        assert dag.get(timeout=DEADLINE) == 9
        assert cloud.get_object(dag.obj_id) == 9
        assert cloud.get_object([future.obj_id, dag.obj_id]) == {future.obj_id: 2, dag.obj_id: 9}


def test_a_read_after_get_has_the_held_store_start_at_once(
    cluster: Cluster, writes: Writes, long_hold: None
) -> None:
    with CloudburstConnection(cluster.address) as cloud:
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
        wait_settled(cluster)
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


def test_a_result_kept_past_its_hold_is_stored(cluster: Cluster, writes: Writes) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        incr = register(cloud)
        future = incr(1)
        assert future.get(timeout=DEADLINE) == 2
        wait_settled(cluster)
        assert stored(cluster.kvs, future.obj_id)
        assert future.obj_id in writes.put


def test_a_call_that_refers_to_a_held_result_has_it_stored_at_once(
    cluster: Cluster, long_hold: None
) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        incr = register(cloud)
        first = incr(1)
        assert first.get(timeout=DEADLINE) == 2
        # Not the hold's end: the scheduler has the held store start when the call refers to it.
        assert incr(first).get(timeout=DEADLINE) == 3
        assert cloud.call_dag("chain", {"incr": first}).get(timeout=DEADLINE) == 9
        assert stored(cluster.kvs, first.obj_id)


def pause_then_pass(_: Any, value: int) -> int:
    time.sleep(0.3)
    return value


def test_a_call_that_refers_to_a_result_still_running_has_it_stored_at_once(
    cluster: Cluster, long_hold: None
) -> None:
    with CloudburstConnection(cluster.address) as cloud:
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
