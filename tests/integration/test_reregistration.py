"""Registering again under the same name replaces the function, also inside existing DAGs."""

from __future__ import annotations

from cloudburst import CloudburstConnection
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node


class Version1:
    def __init__(self) -> None:
        self.calls = 0

    def run(self, _: int) -> str:
        self.calls += 1
        return f"v1 call {self.calls}"


class Version2:
    def __init__(self) -> None:
        self.calls = 0

    def run(self, _: int) -> str:
        self.calls += 1
        return f"v2 call {self.calls}"


def returns_one(_: UserLibrary) -> int:
    return 1


def returns_two(_: UserLibrary) -> int:
    return 2


def test_reregistered_function_is_used_by_the_next_call(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        handle = cloud.register(returns_one, "f")
        assert handle().get(timeout=30) == 1
        assert handle().get(timeout=30) == 1  # warm on an executor now
        cloud.register(returns_two, "f")
        assert handle().get(timeout=30) == 2
        assert cloud.exec_func("f").get(timeout=30) == 2
        # Any number of later calls, on any executor, see the new code.
        assert {cloud.exec_func("f").get(timeout=30) for _ in range(6)} == {2}
        assert cloud.list() == ["f"]


def test_reregistered_lambda_replaces_the_old_one(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(lambda _: 1, "f")().get(timeout=30) == 1
        assert cloud.register(lambda _: 2, "f")().get(timeout=30) == 2


def test_reregistered_function_inside_an_existing_dag(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(returns_one, "f")
        cloud.register(lambda _, x: x * 10, "g")
        assert cloud.register_dag("fg", ["f", "g"], [("f", "g")])
        assert cloud.call_dag("fg", {}, direct_response=True) == 10
        assert cloud.call_dag("fg", {}).get(timeout=30) == 10
        cloud.register(returns_two, "f")
        assert cloud.call_dag("fg", {}, direct_response=True) == 20
        assert {cloud.call_dag("fg", {}, direct_response=True) for _ in range(6)} == {20}
        # The sink can be replaced too.
        cloud.register(lambda _, x: x * 100, "g")
        assert cloud.call_dag("fg", {}).get(timeout=30) == 200


def test_reregistered_pinned_class_gets_a_new_instance(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(Version1, "cls")
        assert cloud.register_dag("cls-dag", ["cls"], [])
        before = {cloud.call_dag("cls-dag", {"cls": 0}, direct_response=True) for _ in range(4)}
        assert before <= {"v1 call 1", "v1 call 2", "v1 call 3", "v1 call 4"}
        cloud.register(Version2, "cls")
        after = cloud.call_dag("cls-dag", {"cls": 0}, direct_response=True)
        assert after == "v2 call 1"
