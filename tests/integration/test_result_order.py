"""A call is answered before its result is stored, and nothing is read out of order.

On a cluster of separate processes: the executor (for a DAG, the sink's)
answers the waiting stream first and stores the result after. A read of the result key by the caller
still returns it, and a release of the result (its future dropped) deletes it
only after it was stored, so no result comes back after its delete.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.reference import CloudburstReference
from harness import ProcessCluster, running_process_cluster

DEADLINE = 30.0


def incr(_: Any, x: int) -> int:
    return x + 1


def echo(_: Any, x: Any) -> Any:
    return x


def square(_: Any, x: int) -> int:
    return x * x


@pytest.fixture(scope="module")
def split_cluster() -> Iterator[ProcessCluster]:
    with running_process_cluster() as cluster:
        yield cluster


def test_the_caller_reads_a_result_it_was_answered(split_cluster: ProcessCluster) -> None:
    with CloudburstConnection(split_cluster.address) as cloud:
        add_one = cloud.register(incr, "incr")
        passes = cloud.register(echo, "echo")
        for n in range(30):
            future = add_one(n)
            assert future.get(timeout=60) == n + 1
            assert cloud.get_object(future.obj_id) == n + 1
            assert cloud.get_object(future) == n + 1
        # A reference to a result answered just now: the executor waits for its store.
        for n in range(10):
            future = add_one(n)
            assert future.get(timeout=60) == n + 1
            assert passes(CloudburstReference(future.obj_id)).get(timeout=60) == n + 1


def test_released_results_are_deleted_after_they_are_stored(
    split_cluster: ProcessCluster,
) -> None:
    with CloudburstConnection(split_cluster.address) as cloud:
        add_one = cloud.register(incr, "incr_released")
        keys = []
        for n in range(100):
            future = add_one(n)
            keys.append(future.obj_id)
            assert future.get(timeout=60) == n + 1
            del future  # released at once: its delete must wait for its store
        gc.collect()
        with CloudburstConnection(split_cluster.address) as reader:
            deadline = time.monotonic() + DEADLINE
            left = list(keys)
            while left:
                left = [k for k in left if reader.get_object(k) is not None]
                assert time.monotonic() < deadline, f"{len(left)} released results stayed stored"
                if left:
                    time.sleep(0.05)


def test_the_caller_reads_a_dag_result_it_was_answered(split_cluster: ProcessCluster) -> None:
    with CloudburstConnection(split_cluster.address) as cloud:
        cloud.register(incr, "incr_dag")
        cloud.register(square, "square_dag")
        passes = cloud.register(echo, "echo_dag")
        cloud.register_dag("answered", ["incr_dag", "square_dag"], [("incr_dag", "square_dag")])
        for n in range(20):
            future = cloud.call_dag("answered", {"incr_dag": n})
            assert future.get(timeout=60) == (n + 1) ** 2
            assert cloud.get_object(future.obj_id) == (n + 1) ** 2
            assert passes(CloudburstReference(future.obj_id)).get(timeout=60) == (n + 1) ** 2


def test_released_dag_results_are_deleted_after_they_are_stored(
    split_cluster: ProcessCluster,
) -> None:
    with CloudburstConnection(split_cluster.address) as cloud:
        cloud.register(incr, "incr_dag_released")
        cloud.register(square, "square_dag_released")
        cloud.register_dag(
            "released",
            ["incr_dag_released", "square_dag_released"],
            [("incr_dag_released", "square_dag_released")],
        )
        keys = []
        for n in range(60):
            future = cloud.call_dag("released", {"incr_dag_released": n})
            keys.append(future.obj_id)
            assert future.get(timeout=60) == (n + 1) ** 2
            del future  # released at once: its delete must wait for its store
        gc.collect()
        with CloudburstConnection(split_cluster.address) as reader:
            deadline = time.monotonic() + DEADLINE
            left = list(keys)
            while left:
                left = [k for k in left if reader.get_object(k) is not None]
                assert time.monotonic() < deadline, f"{len(left)} released results stayed stored"
                if left:
                    time.sleep(0.05)
