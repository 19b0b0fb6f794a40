"""Classes registered as (Class, init_args): both signatures, pinned state, one-shot freshness."""

from __future__ import annotations

from typing import Any

from cloudburst import CloudburstConnection
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node


class GuideAdder:
    """The user guide's shape: no user library in ``__init__`` or ``run``."""

    def __init__(self, base: int) -> None:
        self.base = base

    def run(self, x: int) -> int:
        return self.base + x


class Recorder:
    """A class written for the original system: the library comes first in both methods."""

    def __init__(self, cloudburst: UserLibrary, prefix: str) -> None:
        self.prefix = prefix
        cloudburst.put_object(f"{prefix}-init", "initialised")

    def run(self, cloudburst: UserLibrary, x: int) -> int:
        cloudburst.put_object(f"{self.prefix}-{x}", x * 2)
        return x + 1


class Counted:
    """Counts its ``__init__`` runs in the KVS, and its own ``run`` calls in the instance."""

    def __init__(self, cloudburst: UserLibrary, counter_key: str) -> None:
        self.calls = 0
        count = cloudburst.get_object(counter_key) or 0
        cloudburst.put_object(counter_key, count + 1)

    def run(self, cloudburst: UserLibrary, _: Any) -> int:
        self.calls += 1
        return self.calls


class TwoInitArgs:
    def __init__(self, a: int, b: str) -> None:
        self.label = f"{b}{a}"

    def run(self, *xs: int) -> str:
        return f"{self.label}:{sum(xs)}"


def test_guide_class_via_exec_func(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        handle = cloud.register((GuideAdder, 10), "adder")
        assert cloud.exec_func("adder", [5]).get(timeout=30) == 15
        assert handle(-10).get(timeout=30) == 0


def test_guide_class_in_a_dag(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register((GuideAdder, 100), "adder")
        assert cloud.register_dag("class-dag", ["incr", "adder"], [("incr", "adder")])
        assert cloud.call_dag("class-dag", {"incr": 1}, direct_response=True) == 102
        assert cloud.call_dag("class-dag", {"incr": 5}).get(timeout=30) == 106


def test_tuple_of_init_arguments(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register((TwoInitArgs, (7, "n")), "two")
        assert cloud.exec_func("two", [1, 2, 3]).get(timeout=30) == "n7:6"
        assert cloud.register_dag("two-dag", ["two"], [])
        assert cloud.call_dag("two-dag", {"two": [4, 5]}, direct_response=True) == "n7:9"


def test_original_style_class_uses_the_user_library(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register((Recorder, "rec"), "recorder")
        assert cloud.exec_func("recorder", [3]).get(timeout=30) == 4
        assert cloud.get_object("rec-init") == "initialised"
        assert cloud.get_object("rec-3") == 6
        cloud.register(lambda _, a: a * 10, "tens")
        assert cloud.register_dag("rec-dag", ["tens", "recorder"], [("tens", "recorder")])
        assert cloud.call_dag("rec-dag", {"tens": 2}, direct_response=True) == 21
        assert cloud.get_object("rec-20") == 40


def test_pinned_class_is_initialised_once_per_executor_and_keeps_state(local_node: Node) -> None:
    replicas = local_node.config.scheduler.pin_replicas
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register((Counted, "dag-inits"), "counted")
        assert cloud.register_dag("counted-dag", ["counted"], [])
        results = [
            cloud.call_dag("counted-dag", {"counted": i}, direct_response=True) for i in range(5)
        ]
        inits = cloud.get_object("dag-inits")
        assert isinstance(inits, int)
        assert 1 <= inits <= replicas
        # Every instance's first call returned 1, and there is one instance per __init__.
        assert results.count(1) == inits
        # Each instance counts up without gaps: 1, 2, 3 ... on its own executor.
        for value in range(2, max(results) + 1):
            assert results.count(value) <= results.count(value - 1)
        # Five calls over at most `replicas` instances: some instance was reused.
        assert max(results) >= -(-5 // replicas)
        assert sum(results) > 5


def test_one_shot_class_calls_get_a_fresh_instance(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register((Counted, "oneshot-inits"), "counted")
        assert [cloud.exec_func("counted", [i]).get(timeout=30) for i in range(3)] == [1, 1, 1]
        assert cloud.get_object("oneshot-inits") == 3


def test_one_shot_call_of_a_pinned_class_still_gets_a_fresh_instance(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register((Counted, "mixed-inits"), "counted")
        assert cloud.register_dag("counted-dag", ["counted"], [])
        first = [
            cloud.call_dag("counted-dag", {"counted": 0}, direct_response=True) for _ in range(4)
        ]
        assert sum(first) > 4  # the pinned instances kept state
        assert [cloud.exec_func("counted", [0]).get(timeout=30) for _ in range(3)] == [1, 1, 1]
