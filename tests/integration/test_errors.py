"""Errors a user meets: unknown names, bad arguments, payload limits, and functions that raise."""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cloudburst import (
    CloudburstConnection,
    DagNotFoundError,
    FunctionNotFoundError,
    PayloadTooLargeError,
    RemoteFunctionError,
    SerializationError,
)
from cloudburst.errors import InvalidArgumentError, NotSupportedError
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node, start_local
from harness import make_config, running_process_cluster

#: A small payload limit for the limit tests (smaller than this file, whose text the SDK
#: would ship with registered functions if it fit).
LIMIT = 4096
TOO_BIG = 2 * LIMIT


def explode(_: UserLibrary, n: int) -> int:
    if n > 0:
        raise ValueError(f"boom {n}")
    return n


def mark_and_return(cloudburst: UserLibrary, value: int) -> int:
    cloudburst.put_object("downstream-ran", True)
    return value


def _small_limit_node(start_node: Callable[..., Node], limit: int = LIMIT) -> Node:
    node: Node = start_node(start_local(make_config(server={"max_payload_bytes": limit})))
    return node


def _raise_line() -> int:
    """The line number of ``explode``'s raise statement in this file."""
    lines, start = inspect.getsourcelines(explode)
    return start + next(i for i, text in enumerate(lines) if "raise ValueError" in text)


def _assert_boom(error: RemoteFunctionError, n: int, function: str) -> None:
    assert error.remote_type == "ValueError"
    assert f"boom {n}" in error.remote_message
    # The remote traceback points at the function's own line, source text included.
    assert f"line {_raise_line()}, in explode" in error.remote_traceback
    assert 'raise ValueError(f"boom {n}")' in error.remote_traceback
    assert error.remote_traceback.rstrip().endswith(f"ValueError: boom {n}")
    assert error.function_name == function
    assert f"boom {n}" in str(error)


# -- unknown names -----------------------------------------------------------------------------


def test_exec_func_of_unknown_function_raises_at_call_time(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        with pytest.raises(FunctionNotFoundError) as info:
            cloud.exec_func("never-registered", [1])
        assert "never-registered" in str(info.value)
        # The connection keeps working.
        assert cloud.register(lambda _: 1, "one")().get() == 1


def test_call_dag_of_unknown_dag_raises(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        with pytest.raises(DagNotFoundError) as info:
            cloud.call_dag("never-registered-dag", {})
        assert "never-registered-dag" in str(info.value)
        with pytest.raises(DagNotFoundError):
            cloud.call_dag("never-registered-dag", {}, direct_response=True)


def test_call_dag_with_arguments_for_a_function_not_in_it(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a, "ident")
        assert cloud.register_dag("solo", ["ident"], [])
        with pytest.raises(InvalidArgumentError) as info:
            cloud.call_dag("solo", {"ident": 1, "stranger": 2})
        assert "stranger" in str(info.value)


# -- arguments ---------------------------------------------------------------------------------


def test_unpicklable_argument_raises_serialization_error_naming_it(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        f = cloud.register(lambda _, *args: len(args), "f")
        with pytest.raises(SerializationError) as info:
            f(threading.Lock())
        assert "argument 1 of 'f'" in str(info.value)
        with pytest.raises(SerializationError) as info:
            cloud.exec_func("f", [1, threading.Lock()])
        assert "argument 2 of 'f'" in str(info.value)
        # Still an ordinary TypeError for code that catches those.
        assert isinstance(info.value, TypeError)
        assert f(1, 2).get() == 2


def test_unpicklable_dag_argument_names_the_function(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a, "ident")
        assert cloud.register_dag("solo", ["ident"], [])
        with pytest.raises(SerializationError) as info:
            cloud.call_dag("solo", {"ident": threading.Lock()})
        assert "argument 1 of 'ident'" in str(info.value)


def test_function_capturing_a_lock_cannot_be_registered(local_node: Node) -> None:
    lock = threading.Lock()
    with CloudburstConnection(local_node.address) as cloud:
        with pytest.raises(SerializationError) as info:
            cloud.register(lambda _: lock.locked(), "locked")
        assert "locked" in str(info.value)
        assert cloud.get_function("locked") is None


def test_argument_over_the_limit_raises_payload_too_large(
    start_node: Callable[..., Node],
) -> None:
    node = _small_limit_node(start_node)
    with CloudburstConnection(node.address, max_payload_bytes=LIMIT) as cloud:
        length = cloud.register(lambda _, s: len(s), "length")
        with pytest.raises(PayloadTooLargeError) as info:
            length("x" * TOO_BIG)
        assert str(LIMIT) in str(info.value)
        assert "argument 1 of 'length'" in str(info.value)
        with pytest.raises(PayloadTooLargeError, match=str(LIMIT)):
            cloud.exec_func("length", ["ok", b"y" * TOO_BIG])
        # Under the limit still works on the same connection.
        assert length("x" * 100).get() == 100


def test_result_over_the_server_limit_raises_payload_too_large_at_get(
    start_node: Callable[..., Node],
) -> None:
    node = _small_limit_node(start_node)
    with CloudburstConnection(node.address) as cloud:
        big = cloud.register(lambda _, n: "x" * n, "big")
        future = big(TOO_BIG)  # accepted: the size is known only once the function returns
        with pytest.raises(PayloadTooLargeError) as info:
            future.get(timeout=30)
        assert str(LIMIT) in str(info.value)
        assert "the result of 'big'" in str(info.value)
        # The executor keeps serving.
        assert big(10).get(timeout=30) == "x" * 10


@pytest.mark.parametrize("direct", [False, True])
def test_dag_result_over_the_server_limit_raises_payload_too_large(
    start_node: Callable[..., Node], direct: bool
) -> None:
    node = _small_limit_node(start_node)
    with CloudburstConnection(node.address) as cloud:
        cloud.register(lambda _, n: n, "ident")
        cloud.register(lambda _, n: b"x" * n, "big")
        assert cloud.register_dag("big-dag", ["ident", "big"], [("ident", "big")])
        with pytest.raises(PayloadTooLargeError, match=str(LIMIT)):
            if direct:
                cloud.call_dag("big-dag", {"ident": TOO_BIG}, direct_response=True)
            else:
                cloud.call_dag("big-dag", {"ident": TOO_BIG}).get(timeout=30)
        assert cloud.call_dag("big-dag", {"ident": 3}, direct_response=True) == b"xxx"


def test_argument_over_the_server_limit_is_refused_by_the_server(
    start_node: Callable[..., Node],
) -> None:
    node = _small_limit_node(start_node)
    with CloudburstConnection(node.address) as cloud:  # the client's own limit is 16 MiB
        length = cloud.register(lambda _, s: len(s), "length")
        with pytest.raises(PayloadTooLargeError, match=str(LIMIT)):
            length("y" * TOO_BIG).get(timeout=30)
        assert cloud.register_dag("len-dag", ["length"], [])
        with pytest.raises(PayloadTooLargeError, match=str(LIMIT)):
            cloud.call_dag("len-dag", {"length": "y" * TOO_BIG}, direct_response=True)
        assert length("y" * 10).get(timeout=30) == 10


def test_small_function_from_a_large_file_registers_under_a_small_limit(
    start_node: Callable[..., Node],
) -> None:
    node = _small_limit_node(start_node, 4096)
    with CloudburstConnection(node.address, max_payload_bytes=4096) as cloud:
        length = cloud.register(lambda _, s: len(s), "length")
        assert length("abc").get(timeout=30) == 3
        with pytest.raises(PayloadTooLargeError, match="4096"):
            length("x" * 10_000)


def test_many_failures_do_not_exhaust_the_executors(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        boom = cloud.register(explode, "explode")
        futures = [boom(i + 1) for i in range(30)]
        for i, future in enumerate(futures):
            with pytest.raises(RemoteFunctionError) as info:
                future.get(timeout=30)
            assert info.value.remote_message == f"boom {i + 1}"
        assert boom(0).get(timeout=30) == 0


def test_failing_dag_with_direct_response_raises_remote_function_error(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(explode, "explode")
        assert cloud.register_dag("explode-dag", ["explode"], [])
        with pytest.raises(RemoteFunctionError) as info:
            cloud.call_dag("explode-dag", {"explode": 3}, direct_response=True)
        _assert_boom(info.value, 3, "explode")
        assert cloud.call_dag("explode-dag", {"explode": 0}, direct_response=True) == 0
        with pytest.raises(RemoteFunctionError) as stored:
            cloud.call_dag("explode-dag", {"explode": 7}).get(timeout=30)
        _assert_boom(stored.value, 7, "explode")


@pytest.mark.parametrize("direct", [False, True])
def test_failing_upstream_fails_the_dag_and_skips_downstream(
    local_node: Node, direct: bool
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(explode, "explode")
        cloud.register(mark_and_return, "mark")
        assert cloud.register_dag("chain", ["explode", "mark"], [("explode", "mark")])
        with pytest.raises(RemoteFunctionError) as info:
            if direct:
                cloud.call_dag("chain", {"explode": 2}, direct_response=True)
            else:
                cloud.call_dag("chain", {"explode": 2}).get(timeout=30)
        _assert_boom(info.value, 2, "explode")
        assert cloud.get_object("downstream-ran") is None
        # The same DAG still works when the upstream succeeds.
        result = cloud.call_dag("chain", {"explode": 0}, direct_response=True)
        assert result == 0
        assert cloud.get_object("downstream-ran") is True


def test_failing_branch_of_a_join_fails_the_dag(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a * 10, "fine")
        cloud.register(explode, "explode")
        cloud.register(lambda cb, *xs: cb.put_object("join-ran", True) and sum(xs), "join")
        assert cloud.register_dag(
            "join-dag",
            ["fine", "explode", "join"],
            [("fine", "join"), ("explode", "join")],
        )
        with pytest.raises(RemoteFunctionError) as info:
            cloud.call_dag("join-dag", {"fine": 1, "explode": 9}).get(timeout=30)
        _assert_boom(info.value, 9, "explode")
        assert cloud.get_object("join-ran") is None
        assert cloud.call_dag("join-dag", {"fine": 1, "explode": 0}, direct_response=True) == 10


# -- user code that tries to stop the process -----------------------------------------------


def quits(_: UserLibrary, code: int) -> int:
    sys.exit(code)


def interrupts(_: UserLibrary) -> int:
    raise KeyboardInterrupt


class ExitsWhenRead:
    """An argument whose unpickling, on the executor, calls sys.exit()."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[int]]:
        return (sys.exit, (4,))


def test_sys_exit_or_keyboard_interrupt_in_a_function_fails_only_its_call(
    local_node: Node,
) -> None:
    with CloudburstConnection(local_node.address, timeout=30) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        fn = cloud.register(quits, "quits")
        cloud.register_dag("quits_dag", ["quits"], [])
        for _ in range(10):  # on threads, then (library-free and quick) on the loop
            with pytest.raises(RemoteFunctionError, match="SystemExit"):
                fn(3).get()
        with pytest.raises(RemoteFunctionError, match="SystemExit"):
            cloud.call_dag("quits_dag", {"quits": 5}, direct_response=True)
        with pytest.raises(RemoteFunctionError, match="KeyboardInterrupt"):
            cloud.register(interrupts, "interrupts")().get()
        assert incr(1).get() == 2, "the server still serves"


def test_an_argument_that_exits_when_read_fails_only_its_call(local_node: Node) -> None:
    with CloudburstConnection(local_node.address, timeout=30) as cloud:
        ident = cloud.register(lambda _, a: a, "ident")
        cloud.register_dag("ident_dag", ["ident"], [])
        # Refused as a bad argument (the executor could not read it), naming what happened.
        with pytest.raises(InvalidArgumentError, match="SystemExit"):
            ident(ExitsWhenRead()).get()
        with pytest.raises(InvalidArgumentError, match="SystemExit"):
            cloud.call_dag("ident_dag", {"ident": ExitsWhenRead()}, direct_response=True)
        assert ident(7).get() == 7, "the server still serves"


def test_a_kvs_or_executor_address_given_for_the_scheduler_says_where_to_connect() -> None:
    with running_process_cluster() as cluster:
        # (A call, on the call stream, may instead fail as unavailable: gRPC can lose the
        # status of a stream the server ends as it is written to; see docs/protocol.md.)
        kvs, executor = cluster.kvs.address, cluster.executors[0].address
        with (
            CloudburstConnection(kvs, connect_timeout=30, timeout=30) as at_kvs,
            CloudburstConnection(executor, connect_timeout=30, timeout=30) as at_executor,
        ):
            for attempt in (
                lambda: at_kvs.register(explode, "explode"),
                lambda: at_executor.register(explode, "explode"),
                lambda: at_executor.put_object("key", 1),
            ):
                with pytest.raises(NotSupportedError) as raised:
                    attempt()
                assert "the server does not serve it" in raised.value.message
                assert "a cloudburst scheduler or `cbgrpc serve`" in raised.value.message
