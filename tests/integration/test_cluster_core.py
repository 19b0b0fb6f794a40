"""Core scenarios on a split cluster: every trigger and result crosses real gRPC executors."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cloudburst import CloudburstConnection, RemoteFunctionError
from cloudburst_executors.library import UserLibrary
from harness import Cluster


def slow_upstream(_: UserLibrary, x: int) -> dict[str, Any]:
    time.sleep(0.3)
    return {"name": "slow", "x": x, "done": time.time()}


def fast_upstream(_: UserLibrary, x: int) -> dict[str, Any]:
    return {"name": "fast", "x": x, "done": time.time()}


def collect(_: UserLibrary, *args: Any) -> list[Any]:
    return list(args)


def explode(_: UserLibrary, n: int) -> int:
    if n > 0:
        raise ValueError(f"boom {n}")
    return n


def mark_and_return(cloudburst: UserLibrary, value: int) -> int:
    cloudburst.put_object("downstream-ran", True)
    return value


class Counted:
    """Counts its ``__init__`` runs in the KVS, and its own ``run`` calls in the instance."""

    def __init__(self, cloudburst: UserLibrary, counter_key: str) -> None:
        self.calls = 0
        count = cloudburst.get_object(counter_key) or 0
        cloudburst.put_object(counter_key, count + 1)

    def run(self, cloudburst: UserLibrary, x: int) -> tuple[int, int]:
        self.calls += 1
        return self.calls, x


class GuideAdder:
    def __init__(self, base: int) -> None:
        self.base = base

    def run(self, x: int) -> int:
        return self.base + x


def _pinned(cluster: Cluster) -> list[set[str]]:
    return [set(node.executors[0].pinned) for node in cluster.executors]


def _assert_boom(error: RemoteFunctionError, n: int) -> None:
    assert error.remote_type == "ValueError"
    assert f"boom {n}" in error.remote_message
    assert "in explode" in error.remote_traceback
    assert 'raise ValueError(f"boom {n}")' in error.remote_traceback
    assert error.function_name == "explode"


@pytest.mark.parametrize("direct", [False, True])
def test_join_order_across_executors(cluster: Cluster, direct: bool) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        cloud.register(slow_upstream, "slow")
        cloud.register(fast_upstream, "fast")
        cloud.register(collect, "join")
        assert cloud.register_dag(
            "join-order", ["slow", "fast", "join"], [("fast", "join"), ("slow", "join")]
        )
        pinned = _pinned(cluster)
        # One replica each over two executors: the functions are spread over both.
        assert pinned[0] and pinned[1]
        assert pinned[0] | pinned[1] == {"slow", "fast", "join"}
        for i in range(3):
            args = {"slow": i, "fast": i + 10, "join": "static"}
            if direct:
                result = cloud.call_dag("join-order", args, direct_response=True)
            else:
                result = cloud.call_dag("join-order", args).get(timeout=30)
            assert result[0] == "static"
            assert [(r["name"], r["x"]) for r in result[1:]] == [("slow", i), ("fast", i + 10)]
            assert result[1]["done"] > result[2]["done"]


def test_fan_out_fan_in_across_executors(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        cloud.register(lambda _, x: x, "source")
        branches = [f"p{k}" for k in range(1, 5)]
        for k, name in enumerate(branches, start=1):
            cloud.register(lambda _, x, k=k: x * k, name)
        cloud.register(lambda _, *xs: sum(xs), "sink")
        assert cloud.register_dag(
            "fan",
            ["source", *branches, "sink"],
            [("source", p) for p in branches] + [(p, "sink") for p in branches],
        )
        assert [cloud.call_dag("fan", {"source": i}, direct_response=True) for i in range(5)] == [
            10 * i for i in range(5)
        ]


def test_failing_function_on_a_remote_executor(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        boom = cloud.register(explode, "explode")
        with pytest.raises(RemoteFunctionError) as info:
            boom(3).get(timeout=30)
        _assert_boom(info.value, 3)
        assert boom(0).get(timeout=30) == 0
        assert cloud.register(lambda _, a: a + 1, "incr")(1).get(timeout=30) == 2


@pytest.mark.parametrize("direct", [False, True])
def test_failing_upstream_across_executors(cluster: Cluster, direct: bool) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        cloud.register(explode, "explode")
        cloud.register(mark_and_return, "mark")
        assert cloud.register_dag("chain", ["explode", "mark"], [("explode", "mark")])
        with pytest.raises(RemoteFunctionError) as info:
            if direct:
                cloud.call_dag("chain", {"explode": 5}, direct_response=True)
            else:
                cloud.call_dag("chain", {"explode": 5}).get(timeout=30)
        _assert_boom(info.value, 5)
        assert cloud.get_object("downstream-ran") is None
        assert cloud.call_dag("chain", {"explode": 0}, direct_response=True) == 0
        assert cloud.get_object("downstream-ran") is True


def test_pinned_class_in_a_dag_on_the_cluster(cluster: Cluster) -> None:
    replicas = cluster.scheduler.config.scheduler.pin_replicas
    assert replicas == 1
    with CloudburstConnection(cluster.address) as cloud:
        cloud.register(lambda _, x: x * 2, "double")
        cloud.register((Counted, "cluster-inits"), "counted")
        assert cloud.register_dag("counted-dag", ["double", "counted"], [("double", "counted")])
        results = [
            cloud.call_dag("counted-dag", {"double": i}, direct_response=True) for i in range(5)
        ]
        # One pinned instance: initialised once, and its state grows call after call.
        assert results == [(n + 1, 2 * n) for n in range(5)]
        assert cloud.get_object("cluster-inits") == 1
        # One-shot calls build a fresh instance each time.
        assert [cloud.exec_func("counted", [7]).get(timeout=30) for _ in range(2)] == [
            (1, 7),
            (1, 7),
        ]
        assert cloud.get_object("cluster-inits") == 3


def test_guide_class_in_a_dag_on_the_cluster(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register((GuideAdder, 1000), "adder")
        assert cloud.register_dag("class-dag", ["incr", "adder"], [("incr", "adder")])
        assert cloud.call_dag("class-dag", {"incr": 1}, direct_response=True) == 1002
        assert cloud.call_dag("class-dag", {"incr": 2}).get(timeout=30) == 1003
        assert cloud.exec_func("adder", [5]).get(timeout=30) == 1005


def test_user_library_on_the_cluster(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        cloud.put_object("from-client", {"n": 1})
        swap = cloud.register(
            lambda cb, k: cb.put("from-function", [cb.get_object(k), b"raw"]) and "ok", "swap"
        )
        assert swap("from-client").get(timeout=30) == "ok"
        assert cloud.get_object("from-function") == [{"n": 1}, b"raw"]
