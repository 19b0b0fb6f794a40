"""The executors' value cache on a cluster of separate processes.

A KVS, two executors and a scheduler run as `cbgrpc` processes; the tests read
each executor's cache counters (GetExecutorStatus) and what the scheduler knows
of them (ListExecutors), so every claim is about real reads, not timings.
"""

from __future__ import annotations

import array
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.reference import CloudburstReference
from cloudburst.v1 import (
    executor_service_pb2,
    executor_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from harness import ProcessCluster, running_process_cluster

DEADLINE = 20.0


def total_size(_: Any, *arrays: bytes) -> int:
    return sum(len(a) for a in arrays)


def read_ref(_: Any, value: Any) -> Any:
    return value


def write_then_read(cloudburst: Any, current: Any, key: str, value: Any) -> tuple[Any, Any]:
    cloudburst.put_object(key, value)
    return current, cloudburst.get_object(key)


def read_by_name(cloudburst: Any, _ref: Any, key: str) -> Any:
    return cloudburst.get_object(key)


def change_in_place(_: Any, first: Any, second: Any) -> tuple[bool, float, float]:
    """Change the array it was given; whether both references gave one object; before/after."""
    seen = first[0]
    first[0] += 1.0
    return first is second, seen, second[0]


@pytest.fixture(scope="module")
def cache_cluster() -> Iterator[ProcessCluster]:
    with running_process_cluster() as cluster:
        yield cluster


def status(address: str) -> executor_service_pb2.GetExecutorStatusResponse:
    with grpc.insecure_channel(address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        return stub.GetExecutorStatus(executor_service_pb2.GetExecutorStatusRequest(), timeout=10)


def statuses(cluster: ProcessCluster) -> dict[str, executor_service_pb2.GetExecutorStatusResponse]:
    return {s.executor_id: s for s in (status(e.address) for e in cluster.executors)}


def scheduler_view(cluster: ProcessCluster) -> dict[str, set[str]]:
    """The keys the scheduler believes each executor caches."""
    with grpc.insecure_channel(cluster.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        response = stub.ListExecutors(scheduler_service_pb2.ListExecutorsRequest(), timeout=10)
    return {e.executor_id: set(e.cached_keys) for e in response.executors}


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {DEADLINE:.0f}s"
        time.sleep(0.02)


def holder(cluster: ProcessCluster, key: str) -> str:
    """The id of the one executor that caches ``key``."""
    holders = [i for i, s in statuses(cluster).items() if key in s.cached_keys]
    assert len(holders) == 1, holders
    return holders[0]


def test_a_repeat_call_reads_its_references_from_the_executor_that_cached_them(
    cache_cluster: ProcessCluster,
) -> None:
    array = bytes(range(256)) * 8192  # 2 MiB
    with CloudburstConnection(cache_cluster.address) as cloud:
        cloud.put_object("cache/array", array)
        summed = cloud.register(total_size, "total_size")
        refs = [CloudburstReference("cache/array")] * 10
        assert summed(*refs).get(timeout=60) == 10 * len(array)
        first = holder(cache_cluster, "cache/array")
        until(
            lambda: "cache/array" in scheduler_view(cache_cluster).get(first, set()),
            "the scheduler learns which executor caches the array",
        )
        before = statuses(cache_cluster)
        assert before[first].cache.misses >= 1
        assert before[first].cache.bytes >= len(array)
        for _ in range(3):
            assert summed(*refs).get(timeout=60) == 10 * len(array)
        after = statuses(cache_cluster)
    # Placed where the array is, and not read from the KVS again: the ten references to
    # one key are read once per call, three hits in all, and no misses.
    assert after[first].cache.hits - before[first].cache.hits == 3
    assert after[first].cache.misses == before[first].cache.misses
    for executor_id, other in after.items():
        if executor_id != first:
            assert other.cache.misses == before[executor_id].cache.misses
            assert "cache/array" not in other.cached_keys


def test_a_client_reads_its_own_writes_through_a_cache(cache_cluster: ProcessCluster) -> None:
    key = "cache/own-client"
    with CloudburstConnection(cache_cluster.address) as cloud:
        reader = cloud.register(read_ref, "read_ref")
        cloud.put_object(key, 1)
        assert reader(CloudburstReference(key)).get(timeout=60) == 1
        cached_on = holder(cache_cluster, key)
        for value in range(2, 12):
            # Each reference carries the connection's last write of the key: never served older.
            cloud.put_object(key, value)
            assert reader(CloudburstReference(key)).get(timeout=60) == value
        assert holder(cache_cluster, key) == cached_on


def test_a_call_reads_its_own_write_of_a_cached_key(cache_cluster: ProcessCluster) -> None:
    key = "cache/own"
    with CloudburstConnection(cache_cluster.address) as cloud:
        reader = cloud.register(read_ref, "read_ref_own")
        writer = cloud.register(write_then_read, "write_then_read")
        cloud.put_object(key, "old")
        assert reader(CloudburstReference(key)).get(timeout=60) == "old"
        cached_on = holder(cache_cluster, key)
        until(
            lambda: key in scheduler_view(cache_cluster).get(cached_on, set()),
            "the scheduler learns where the key is cached",
        )
        hits = statuses(cache_cluster)[cached_on].cache.hits
        for n in range(5):
            current, read_back = writer(CloudburstReference(key), key, f"new-{n}").get(timeout=60)
            assert read_back == f"new-{n}"
            assert current == ("old" if n == 0 else f"new-{n - 1}"), "the previous call's write"
        assert statuses(cache_cluster)[cached_on].cache.hits >= hits + 10


def test_another_clients_write_reaches_the_cache_without_a_read(
    cache_cluster: ProcessCluster,
) -> None:
    key = "cache/shared"
    with (
        CloudburstConnection(cache_cluster.address) as cloud,
        CloudburstConnection(cache_cluster.address) as other,
    ):
        cloud.put_object("cache/anchor", 0)
        reader = cloud.register(read_by_name, "read_by_name")
        other.put_object(key, "before")
        anchor = CloudburstReference("cache/anchor")
        assert reader(anchor, key).get(timeout=60) == "before"
        cached_on = holder(cache_cluster, key)
        until(
            lambda: "cache/anchor" in scheduler_view(cache_cluster).get(cached_on, set()),
            "the scheduler learns where the anchor is cached",
        )
        misses = statuses(cache_cluster)[cached_on].cache.misses
        other.put_object(key, "after")
        # The change notification updates the cached value: a bounded wait, no read.
        until(
            lambda: reader(anchor, key).get(timeout=60) == "after",
            "another client's write is seen",
        )
        assert statuses(cache_cluster)[cached_on].cache.misses == misses


def test_a_large_value_read_again_is_each_calls_own_and_follows_writes(
    cache_cluster: ProcessCluster,
) -> None:
    key = "cache/large-array"
    numbers = array.array("d", [5.0]) * 65536  # 512 KiB: decoded once, then copied per call
    with CloudburstConnection(cache_cluster.address) as cloud:
        cloud.put_object(key, numbers)
        change = cloud.register(change_in_place, "change_in_place")
        refs = [CloudburstReference(key), CloudburstReference(key)]
        # Both references of a call give one object, as in the original runtime; what a
        # call changes in it is its own: every later call sees the stored value.
        for _ in range(4):
            assert change(*refs).get(timeout=60) == (True, 5.0, 6.0)
        cached_on = holder(cache_cluster, key)
        hits = statuses(cache_cluster)[cached_on].cache.hits
        numbers[0] = 7.0
        cloud.put_object(key, numbers)
        assert change(*refs).get(timeout=60) == (True, 7.0, 8.0), "the new value, not a kept one"
        assert change(*refs).get(timeout=60) == (True, 7.0, 8.0)
        assert statuses(cache_cluster)[cached_on].cache.hits > hits
