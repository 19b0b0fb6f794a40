"""One-shot functions through the SDK: kinds of callables, futures, references, the registry."""

from __future__ import annotations

import time

import pytest

from cloudburst import (
    CloudburstConnection,
    CloudburstFunction,
    CloudburstFuture,
    CloudburstReference,
    CloudburstTimeoutError,
    FunctionNotFoundError,
    RemoteFunctionError,
)
from cloudburst.errors import FunctionInUseError
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node

# -- user code, defined at module level (pickled by value with the test module) ------------------


def _square(x: int) -> int:
    return x * x


def _polynomial(x: int) -> int:
    return _square(x) + 2 * x + 1


def module_add(_: UserLibrary, a: int, b: int) -> int:
    return a + b


def uses_helpers(_: UserLibrary, x: int) -> int:
    return _polynomial(x)


def sleepy(_: UserLibrary, seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def fails(_: UserLibrary, n: int) -> int:
    raise ValueError(f"boom {n}")


def describe(_: UserLibrary, value: object) -> str:
    return f"{type(value).__name__}:{value!r}"


# -- kinds of callables ------------------------------------------------------------------------


def test_lambda_call_returns_a_future_with_the_value(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        assert isinstance(incr, CloudburstFunction)
        future = incr(41)
        assert isinstance(future, CloudburstFuture)
        assert isinstance(future.obj_id, str) and future.obj_id
        assert future.get() == 42
        # A second get() returns the same value.
        assert future.get() == 42


def test_closure_over_local_variables(local_node: Node) -> None:
    factor = 7
    offsets = {"base": 100}
    with CloudburstConnection(local_node.address) as cloud:
        scale = cloud.register(lambda _, x: x * factor + offsets["base"], "scale")
        assert scale(3).get() == 121


def test_module_level_function_and_helpers(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        add = cloud.register(module_add, "module_add")
        poly = cloud.register(uses_helpers, "uses_helpers")
        assert add(2, 40).get() == 42
        assert poly(3).get() == 16  # 3*3 + 2*3 + 1, computed by the module's helpers


def test_nested_function_with_its_own_helper(local_node: Node) -> None:
    def inner_helper(words: list[str]) -> str:
        return "-".join(w.upper() for w in words)

    def shout(_: UserLibrary, *words: str) -> str:
        return inner_helper(list(words))

    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(shout, "shout")("a", "bc", "d").get() == "A-BC-D"


def test_various_argument_types_arrive_intact(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        desc = cloud.register(describe, "describe")
        assert desc(b"\x00\xff").get() == "bytes:b'\\x00\\xff'"
        assert desc("text").get() == "str:'text'"
        assert desc({"k": [1, 2]}).get() == "dict:{'k': [1, 2]}"
        assert desc(None).get() == "NoneType:None"
        assert desc((1, 2)).get() == "tuple:(1, 2)"


def test_function_without_arguments(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(lambda _: "no args", "noargs")().get() == "no args"


# -- futures -----------------------------------------------------------------------------------


def test_get_with_timeout_raises_promptly_and_future_stays_usable(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        future = cloud.register(sleepy, "sleepy")(3.0)
        start = time.monotonic()
        with pytest.raises(CloudburstTimeoutError) as info:
            future.get(timeout=0.3)
        elapsed = time.monotonic() - start
        assert elapsed < 2.5, f"get(timeout=0.3) took {elapsed:.2f}s"
        assert isinstance(info.value, TimeoutError)
        # The call keeps running; a later get() with a longer timeout receives its result.
        assert future.get(timeout=30) == "woke up"


def test_future_as_argument_is_resolved(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        double = cloud.register(lambda _, a: a * 2, "double")
        assert double(incr(1)).get() == 4
        # Chains, and futures mixed with plain values.
        add = cloud.register(module_add, "add")
        assert add(double(incr(1)), incr(10)).get() == 15


def test_future_of_slow_function_as_argument_waits_for_it(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        slow = cloud.register(sleepy, "sleepy")
        length = cloud.register(lambda _, s: len(s), "length")
        assert length(slow(0.3)).get(timeout=30) == len("woke up")


def test_failed_future_as_argument_propagates_the_failure(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        bad = cloud.register(fails, "fails")
        incr = cloud.register(lambda _, a: a + 1, "incr")
        with pytest.raises(RemoteFunctionError) as info:
            incr(bad(5)).get(timeout=30)
        assert info.value.remote_type == "ValueError"
        assert "boom 5" in info.value.remote_message


def test_reference_argument_resolves_to_stored_value(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.put_object("ref-key", {"answer": 42})
        peek = cloud.register(lambda _, v: v, "peek")
        assert peek(CloudburstReference("ref-key")).get() == {"answer": 42}
        cloud.put_object("ref-key", [1, 2])
        assert peek(CloudburstReference("ref-key")).get() == [1, 2]


def test_reference_to_missing_key_resolves_to_none(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        is_none = cloud.register(lambda _, v: v is None, "is_none")
        assert is_none(CloudburstReference("no-such-key")).get() is True


def test_exec_func_by_name(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(module_add, "add")
        future = cloud.exec_func("add", [20, 22])
        assert isinstance(future, CloudburstFuture)
        assert future.get() == 42
        assert cloud.exec_func("add", (1, 2)).get() == 3


# -- the registry ------------------------------------------------------------------------------


def test_list_and_list_with_prefix(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        for name in ("alpha-1", "alpha-2", "beta"):
            cloud.register(lambda _: None, name)
        assert sorted(cloud.list()) == ["alpha-1", "alpha-2", "beta"]
        assert sorted(cloud.list("alpha")) == ["alpha-1", "alpha-2"]
        assert cloud.list("beta") == ["beta"]
        assert cloud.list("gamma") == []


def test_get_function_returns_callable_handle_or_none(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a * 3, "triple")
        handle = cloud.get_function("triple")
        assert handle is not None
        assert handle(5).get() == 15
        assert cloud.get_function("unknown-function") is None


def test_get_function_from_another_connection(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as first:
        first.register(lambda _, a: -a, "negate")
    with CloudburstConnection(local_node.address) as second:
        handle = second.get_function("negate")
        assert handle is not None
        assert handle(9).get() == -9


def test_delete_function(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _: "here", "doomed")
        cloud.register(lambda _: "kept", "kept")
        assert cloud.exec_func("doomed").get() == "here"
        cloud.delete_function("doomed")
        assert cloud.get_function("doomed") is None
        assert cloud.list() == ["kept"]
        with pytest.raises(FunctionNotFoundError):
            cloud.exec_func("doomed", [])
        with pytest.raises(FunctionNotFoundError):
            cloud.delete_function("doomed")
        assert cloud.exec_func("kept").get() == "kept"


def test_delete_function_used_by_a_dag_is_refused(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * 2, "double")
        assert cloud.register_dag("uses", ["incr", "double"], [("incr", "double")])
        with pytest.raises(FunctionInUseError):
            cloud.delete_function("incr")
        assert cloud.delete_dag("uses")
        cloud.delete_function("incr")
        assert cloud.get_function("incr") is None
