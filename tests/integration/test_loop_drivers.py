"""The whole SDK under each loop driver: a function call, a DAG call, a get_object."""

from __future__ import annotations

import pytest

from cloudburst import CloudburstConnection
from cloudburst._loop import DRIVER_ENV, DrivenLoop, ThreadedLoop
from cloudburst.errors import InvalidArgumentError
from cloudburst_grpc.local import Node


def _exercise(cloud: CloudburstConnection) -> None:
    incr = cloud.register(lambda _, x: x + 1, "incr")
    cloud.register(lambda _, x: x * 2, "double")
    assert [incr(n).get(timeout=30) for n in range(20)] == list(range(1, 21))
    assert cloud.register_dag("incr_double", ["incr", "double"], [("incr", "double")])
    assert cloud.call_dag("incr_double", {"incr": 4}).get(timeout=30) == 10
    assert cloud.call_dag("incr_double", {"incr": 1}, direct_response=True) == 4
    assert cloud.put_object("k", "v")
    assert cloud.get_object("k") == "v"


@pytest.mark.parametrize(("choice", "expected"), [("caller", DrivenLoop), ("thread", ThreadedLoop)])
def test_calls_and_dags_under_a_driver_chosen_by_argument(
    local_node: Node, monkeypatch: pytest.MonkeyPatch, choice: str, expected: type
) -> None:
    monkeypatch.delenv(DRIVER_ENV, raising=False)
    with CloudburstConnection(local_node.address, loop_driver=choice) as cloud:
        assert type(cloud._loop) is expected
        _exercise(cloud)
    assert cloud._loop.loop.is_closed()


@pytest.mark.parametrize(("choice", "expected"), [("caller", DrivenLoop), ("thread", ThreadedLoop)])
def test_calls_and_dags_under_a_driver_chosen_by_the_environment(
    local_node: Node, monkeypatch: pytest.MonkeyPatch, choice: str, expected: type
) -> None:
    monkeypatch.setenv(DRIVER_ENV, choice)
    with CloudburstConnection(local_node.address) as cloud:
        assert type(cloud._loop) is expected
        _exercise(cloud)


def test_an_unknown_driver_is_refused(local_node: Node) -> None:
    with pytest.raises(InvalidArgumentError, match="'caller', 'thread'"):
        CloudburstConnection(local_node.address, loop_driver="fastest")
