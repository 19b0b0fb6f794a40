"""The user library inside functions: get_object/put_object (and get/put) with Python values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from cloudburst import CloudburstConnection, RemoteFunctionError
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node


@dataclass
class Point:
    x: int
    y: int

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


VALUES: dict[str, Any] = {
    "dict": {"a": 1, "nested": {"b": [1, 2]}},
    "list": [1, "two", 3.0, None],
    "bytes": b"\x00\x01\xfe\xff",
    "str": "h\u00e9llo w\u00f6rld",
    "int": 12345,
}


def store_values(cloudburst: UserLibrary, prefix: str) -> bool:
    cloudburst.put_object(f"{prefix}-dict", {"a": 1, "nested": {"b": [1, 2]}})
    cloudburst.put(f"{prefix}-list", [1, "two", 3.0, None])
    cloudburst.put_object(f"{prefix}-bytes", b"\x00\x01\xfe\xff")
    cloudburst.put(f"{prefix}-str", "h\u00e9llo w\u00f6rld")
    cloudburst.put_object(f"{prefix}-int", 12345)
    cloudburst.put(f"{prefix}-point", Point(3, -4))
    return True


def load_values(cloudburst: UserLibrary, prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for i, kind in enumerate(["dict", "list", "bytes", "str", "int"]):
        read = cloudburst.get_object if i % 2 == 0 else cloudburst.get
        found[kind] = read(f"{prefix}-{kind}")
    point = cloudburst.get_object(f"{prefix}-point")
    found["point"] = (type(point).__name__, point.x, point.y, point.norm1())
    return found


def read_missing(cloudburst: UserLibrary, key: str) -> tuple[Any, Any]:
    return cloudburst.get_object(key), cloudburst.get(key)


def read_key(cloudburst: UserLibrary, key: str) -> Any:
    return cloudburst.get_object(key)


def increment(cloudburst: UserLibrary, key: str) -> int:
    value = (cloudburst.get(key) or 0) + 1
    cloudburst.put(key, value)
    return int(value)


def _expected_point() -> tuple[str, int, int, int]:
    return ("Point", 3, -4, 7)


def test_function_writes_and_reads_python_values(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(store_values, "store")("fn").get(timeout=30) is True
        found = cloud.register(load_values, "load")("fn").get(timeout=30)
        assert found == {**VALUES, "point": _expected_point()}
        assert type(found["bytes"]) is bytes and type(found["str"]) is str


def test_values_written_by_a_function_are_readable_by_the_client(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(store_values, "store")("fn").get(timeout=30) is True
        for kind, expected in VALUES.items():
            value = cloud.get_object(f"fn-{kind}")
            assert value == expected
            assert type(value) is type(expected)
        point = cloud.get_object("fn-point")
        assert (type(point).__name__, point.x, point.y, point.norm1()) == _expected_point()


def test_values_put_by_the_client_are_readable_inside_functions(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        for kind, value in VALUES.items():
            assert cloud.put_object(f"client-{kind}", value) is True
        assert cloud.put_object("client-point", Point(3, -4)) is True
        found = cloud.register(load_values, "load")("client").get(timeout=30)
        assert found == {**VALUES, "point": _expected_point()}


def test_missing_key_is_none_inside_functions_and_for_the_client(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(read_missing, "missing")("nothing-here").get(timeout=30) == (
            None,
            None,
        )
        assert cloud.get_object("nothing-here") is None


def test_last_write_wins_between_client_and_functions(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        inc = cloud.register(increment, "increment")
        assert [inc("counter").get(timeout=30) for _ in range(3)] == [1, 2, 3]
        cloud.put_object("counter", 100)
        assert inc("counter").get(timeout=30) == 101
        assert cloud.get_object("counter") == 101


def test_function_can_read_another_calls_result_by_obj_id(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        future = cloud.register(lambda _, x: {"doubled": x * 2}, "double")(21)
        assert future.get(timeout=30) == {"doubled": 42}
        assert cloud.get_object(future.obj_id) == {"doubled": 42}
        assert cloud.get_object(future) == {"doubled": 42}
        reader = cloud.register(read_key, "read_key")
        assert reader(future.obj_id).get(timeout=30) == {"doubled": 42}


def test_library_misuse_is_a_remote_error(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        reader = cloud.register(read_key, "read_key")
        with pytest.raises(RemoteFunctionError) as info:
            reader("").get(timeout=30)
        assert "non-empty string" in info.value.remote_message
