"""Programs written for the original Cloudburst: list get, deserialize=False, refused arguments."""

from __future__ import annotations

from typing import Any

import cloudpickle
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import NotSupportedError
from cloudburst.reference import CloudburstReference
from cloudburst_grpc.local import Node
from harness import ProcessCluster

STORED = {"weights": [0.25, 0.5, 0.25]}


def get_many(cloudburst: Any, keys: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = cloudburst.get(keys)
    return found


def get_raw(cloudburst: Any, key: str) -> bytes:
    raw: bytes = cloudburst.get_object(key, deserialize=False)
    return raw


def passed(_: Any, argument: Any) -> Any:
    return argument


def check_original_forms(address: str) -> None:
    with CloudburstConnection(address) as cloud:
        assert cloud.put_object("porting/a", STORED)
        assert cloud.put_object("porting/b", "text")
        keys = ["porting/a", "porting/missing", "porting/b"]
        expected = {"porting/a": STORED, "porting/missing": None, "porting/b": "text"}

        assert cloud.get_object(keys) == expected
        assert cloud.get(keys) == expected
        assert cloud.register(get_many, "get_many")(keys).get(timeout=30) == expected

        raw = cloud.get_object("porting/a", deserialize=False)
        assert isinstance(raw, bytes) and cloudpickle.loads(raw) == STORED
        assert cloud.get_object(["porting/a"], deserialize=False) == {"porting/a": raw}
        assert cloud.register(get_raw, "get_raw")("porting/a").get(timeout=30) == raw
        fn = cloud.register(passed, "passed")
        assert fn(CloudburstReference("porting/a", deserialize=False)).get(timeout=30) == raw
        assert fn(CloudburstReference("porting/a")).get(timeout=30) == STORED


def test_list_get_and_stored_bytes_on_serve(local_node: Node) -> None:
    check_original_forms(local_node.address)


def test_list_get_and_stored_bytes_on_a_process_cluster(process_cluster: ProcessCluster) -> None:
    check_original_forms(process_cluster.address)


@pytest.mark.parametrize("argument", ["gpu_functions", "batching_functions", "colocated"])
def test_register_dag_names_an_argument_it_does_not_implement(
    local_node: Node, argument: str
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(passed, "passed")
        with pytest.raises(NotSupportedError, match=argument) as info:
            given: dict[str, Any] = {argument: ["passed"]}
            cloud.register_dag("one", ["passed"], [], **given)
        assert isinstance(info.value, NotImplementedError)
        assert cloud.list_dags() == []  # nothing was registered
        empty: dict[str, Any] = {argument: []}
        assert cloud.register_dag("one", ["passed"], [], **empty)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"dry_run": True}, "dry_run"),
        ({"continuation": object()}, "continuation"),
        ({"consistency": 1}, "consistency"),
        ({"consistency": "MULTI"}, "consistency"),
    ],
)
def test_call_dag_names_an_argument_it_does_not_implement(
    local_node: Node, arguments: dict[str, Any], named: str
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(passed, "passed")
        assert cloud.register_dag("one", ["passed"], [])
        with pytest.raises(NotSupportedError, match=named):
            cloud.call_dag("one", {"passed": 1}, **arguments)
        # The original's defaults still work.
        assert cloud.call_dag("one", {"passed": 2}, direct_response=True, consistency=0) == 2
        assert (
            cloud.call_dag("one", {"passed": 3}, False, 0, None, None, False, None).get(timeout=30)
            == 3
        )
