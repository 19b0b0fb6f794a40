"""Results under keys the runtime chose are deleted once their futures are gone.

Deletion is observed with a watch on the node's store, never by sleeping.
Where a test shows that a result is *kept*, it releases a later result on the
same connection and waits for that one to go: releases travel and are applied
in order, so a wrong release of the earlier key would have happened first.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from cloudburst import CloudburstConnection
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node
from harness import Cluster, LoopThread, stored, wait_deleted, wait_unstored


def pause_then_pass(_: UserLibrary, seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def add(_: UserLibrary, a: int, b: float) -> float:
    return a + b


def test_a_result_is_deleted_once_its_future_is_gone(
    local_node: Node, server_loop: LoopThread
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        future = incr(1)
        key = future.obj_id
        assert future.get(timeout=30) == 2
        # Readable by key while the future lives (the read waits for the store that
        # follows the answer).
        assert cloud.get_object(key) == 2
        assert stored(local_node, key)
        del future
        gc.collect()
        wait_deleted(local_node, server_loop, [key])
        assert cloud.get_object(key) is None


def test_many_dropped_futures_leave_no_results(local_node: Node, server_loop: LoopThread) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        keys = []
        for n in range(300):
            future = incr(n)
            keys.append(future.obj_id)
            assert future.get(timeout=30) == n + 1
        del future
        # Under load a hold may end before its release comes: that result is stored, then
        # deleted. Wait for every store and delete to settle, not just for the stored keys.
        wait_unstored(local_node, keys)


def test_a_live_future_keeps_its_result(local_node: Node, server_loop: LoopThread) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        kept = incr(1)
        assert kept.get(timeout=30) == 2
        dropped = incr(2)
        dropped_key = dropped.obj_id
        assert dropped.get(timeout=30) == 3
        del dropped
        wait_deleted(local_node, server_loop, [dropped_key])
        assert cloud.get_object(kept.obj_id) == 2
        assert stored(local_node, kept.obj_id)


def test_keep_results_keeps_results_after_their_futures(
    local_node: Node, server_loop: LoopThread
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        cloud.keep_results = True
        first = incr(1)
        first_key = first.obj_id
        assert first.get(timeout=30) == 2
        cloud.keep_results = False
        second = incr(2)
        second_key = second.obj_id
        assert second.get(timeout=30) == 3
        del first, second
        wait_deleted(local_node, server_loop, [second_key])
        assert cloud.get_object(first_key) == 2


def test_keep_results_connection_never_releases(local_node: Node, server_loop: LoopThread) -> None:
    with CloudburstConnection(local_node.address, keep_results=True) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        keys = []
        for n in range(5):
            future = incr(n)
            keys.append(future.obj_id)
            future.get(timeout=30)
        del future
        # Anything released rides on the next call frame: make one and wait for it.
        assert incr(10).get(timeout=30) == 11
    with CloudburstConnection(local_node.address) as reader:
        assert [reader.get_object(k) for k in keys] == [1, 2, 3, 4, 5]


def test_output_key_results_are_never_released(local_node: Node, server_loop: LoopThread) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("chain", ["incr", "square"], [("incr", "square")], strict=True)
        named = cloud.call_dag("chain", {"incr": 1}, output_key="chain-result")
        assert named.get(timeout=30) == 4
        chosen = cloud.call_dag("chain", {"incr": 2})
        chosen_key = chosen.obj_id
        assert chosen.get(timeout=30) == 9
        del named, chosen
        wait_deleted(local_node, server_loop, [chosen_key])
        assert cloud.get_object("chain-result") == 4


def test_a_future_passed_as_an_argument_lives_until_that_call_ran(
    local_node: Node, server_loop: LoopThread
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(pause_then_pass, "pause")
        cloud.register(add, "add")
        assert cloud.register_dag("later", ["pause", "add"], [("pause", "add")], strict=True)
        argument = incr(1)
        argument_key = argument.obj_id
        assert argument.get(timeout=30) == 2
        # `add` reads the argument only after `pause` slept; the caller drops its future now.
        result = cloud.call_dag("later", {"pause": 0.3, "add": argument})
        del argument
        gc.collect()
        assert result.get(timeout=30) == 2.3
        del result
        wait_deleted(local_node, server_loop, [argument_key])


def test_a_caller_cannot_release_keys_it_was_not_given(
    local_node: Node, server_loop: LoopThread
) -> None:
    with (
        CloudburstConnection(local_node.address) as cloud,
        CloudburstConnection(local_node.address) as other,
    ):
        incr = cloud.register(lambda _, a: a + 1, "incr")
        assert cloud.put_object("user-data", "precious")
        foreign = other.exec_func("incr", [5])
        assert foreign.get(timeout=30) == 6
        mine = incr(1)
        mine_key = mine.obj_id
        assert mine.get(timeout=30) == 2
        # Ask the scheduler to delete a user key and another stream's result, then our own.
        cloud._core._queue_release("user-data", None)
        cloud._core._queue_release(foreign.obj_id, None)
        del mine
        wait_deleted(local_node, server_loop, [mine_key])
        assert cloud.get_object("user-data") == "precious"
        # Read by its own caller, which waits for the store that follows the answer (held a
        # moment: the result was releasable, but not by this stream).
        assert other.get_object(foreign.obj_id) == 6


def test_results_are_released_in_a_cluster_of_servers(cluster: Cluster) -> None:
    """The scheduler deletes released results in the KVS server over BatchDeleteValues."""
    with CloudburstConnection(cluster.scheduler.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        kept = incr(0)
        assert kept.get(timeout=30) == 1
        keys = []
        for n in range(20):
            future = incr(n)
            keys.append(future.obj_id)
            assert future.get(timeout=30) == n + 1
        del future
        wait_deleted(cluster.kvs, cluster.loop, keys)
        assert cloud.get_object(kept.obj_id) == 1


def test_a_dag_result_released_before_it_is_stored_is_deleted_after_the_store(
    cluster: Cluster,
) -> None:
    """The sink answers first; a release that overtakes the store waits for it."""
    scheduler = cluster.scheduler.scheduler
    assert scheduler is not None
    gate = asyncio.Event()

    def slow_stores(executor: Any) -> None:
        store = executor._store

        async def after_the_gate(key: str, outcome: Any) -> None:
            await gate.wait()
            await store(key, outcome)

        executor._store = after_the_gate

    for node in cluster.executors:
        for executor in node.executors:
            slow_stores(executor)
    with CloudburstConnection(cluster.scheduler.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        cloud.register_dag("chain", ["incr", "square"], [("incr", "square")])
        future = cloud.call_dag("chain", {"incr": 1})
        key = future.obj_id
        assert future.get(timeout=30) == 4, "answered while its store waits"
        del future
        gc.collect()
        deadline = time.monotonic() + 20
        while key not in scheduler.releaser._held:
            assert time.monotonic() < deadline, "the release was not held for the store"
            time.sleep(0.01)
        assert not stored(cluster.kvs, key)
        cluster.loop.loop.call_soon_threadsafe(gate.set)

        def storing() -> bool:
            return any(e.storing for node in cluster.executors for e in node.executors)

        deadline = time.monotonic() + 20
        while storing() or stored(cluster.kvs, key):  # stored, then deleted
            assert time.monotonic() < deadline, "the result was not deleted after its store"
            time.sleep(0.01)
