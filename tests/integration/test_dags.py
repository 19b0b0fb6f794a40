"""DAGs through the SDK: registration rules, shapes, argument order at joins, results."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection, CloudburstFuture, InvalidDagError
from cloudburst.errors import DagAlreadyExistsError, DagNotFoundError, RemoteFunctionError
from cloudburst.serialization import serialize
from cloudburst.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.local import Node


def slow_upstream(_: UserLibrary, x: int) -> dict[str, Any]:
    time.sleep(0.3)
    return {"name": "slow", "x": x, "done": time.monotonic()}


def fast_upstream(_: UserLibrary, x: int) -> dict[str, Any]:
    return {"name": "fast", "x": x, "done": time.monotonic()}


def collect(_: UserLibrary, *args: Any) -> list[Any]:
    return list(args)


def timed_branch(_: UserLibrary, k: int, x: int) -> dict[str, float]:
    start = time.monotonic()
    time.sleep(0.3)
    return {"value": x * k, "start": start, "end": time.monotonic()}


def sum_values(_: UserLibrary, *parts: dict[str, float]) -> dict[str, Any]:
    return {
        "total": sum(p["value"] for p in parts),
        "starts": [p["start"] for p in parts],
        "ends": [p["end"] for p in parts],
    }


def _register_abc(cloud: CloudburstConnection) -> None:
    cloud.register(lambda _, a: a + 1, "a")
    cloud.register(lambda _, a: a * 2, "b")
    cloud.register(lambda _, a: a - 3, "c")


# -- registration ------------------------------------------------------------------------------


def test_register_dag_returns_true_and_the_dag_runs(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert cloud.register_dag("abc", ["a", "b", "c"], [("a", "b"), ("b", "c")]) is True
        assert cloud.last_error is None
        assert "abc" in cloud.list_dags()
        future = cloud.call_dag("abc", {"a": 4})
        assert isinstance(future, CloudburstFuture)
        assert future.get(timeout=30) == 7  # ((4 + 1) * 2) - 3


@pytest.mark.parametrize(
    ("functions", "connections", "why"),
    [
        (["a", "ghost"], [("a", "ghost")], "not registered"),
        (["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "b")], "cycle"),
        (["a", "b", "c"], [("a", "b"), ("a", "c")], "exactly one sink"),
        (["a", "b", "c"], [("a", "b")], "no connection"),
        (["a", "b"], [("a", "b"), ("b", "a")], "cycle"),
        (["a", "b"], [("a", "c")], "not in the DAG's function list"),
    ],
    ids=["unknown-function", "cycle", "two-sinks", "unconnected", "two-cycle", "edge-outside"],
)
def test_invalid_dag_returns_false_with_the_reason(
    local_node: Node, functions: list[str], connections: list[tuple[str, str]], why: str
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert cloud.register_dag("bad", functions, connections) is False
        error = cloud.last_error
        assert isinstance(error, InvalidDagError)
        assert why in str(error)
        with pytest.raises(InvalidDagError, match=why):
            cloud.register_dag("bad", functions, connections, strict=True)
        # Nothing was registered, so the DAG cannot be called.
        assert "bad" not in cloud.list_dags()
        with pytest.raises(DagNotFoundError):
            cloud.call_dag("bad", {})
        # A following successful registration clears last_error.
        assert cloud.register_dag("good", ["a", "b"], [("a", "b")]) is True
        assert cloud.last_error is None


def test_invalid_dag_error_names_the_offenders(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert not cloud.register_dag("x", ["a", "ghost", "phantom"], [("a", "ghost")])
        assert "'ghost'" in str(cloud.last_error) and "'phantom'" in str(cloud.last_error)
        assert not cloud.register_dag("x", ["a", "b", "c"], [("a", "b"), ("a", "c")])
        assert "'b'" in str(cloud.last_error) and "'c'" in str(cloud.last_error)
        assert not cloud.register_dag("x", ["a", "b", "c"], [("a", "b")])
        assert "'c'" in str(cloud.last_error)


def test_register_existing_dag_name_returns_false(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert cloud.register_dag("taken", ["a", "b"], [("a", "b")]) is True
        assert cloud.register_dag("taken", ["a", "c"], [("a", "c")]) is False
        assert isinstance(cloud.last_error, DagAlreadyExistsError)
        assert "taken" in str(cloud.last_error)
        with pytest.raises(DagAlreadyExistsError):
            cloud.register_dag("taken", ["a", "c"], [("a", "c")], strict=True)
        # The original definition is unchanged.
        assert cloud.call_dag("taken", {"a": 1}, direct_response=True) == 4


def test_delete_dag_then_register_again(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert cloud.register_dag("d", ["a", "b"], [("a", "b")])
        assert cloud.call_dag("d", {"a": 1}, direct_response=True) == 4
        assert cloud.delete_dag("d") is True
        assert cloud.last_error is None
        assert "d" not in cloud.list_dags()
        with pytest.raises(DagNotFoundError):
            cloud.call_dag("d", {"a": 1})
        assert cloud.register_dag("d", ["a", "c"], [("a", "c")]) is True
        assert cloud.call_dag("d", {"a": 1}, direct_response=True) == -1


def test_delete_unknown_dag_returns_false(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.delete_dag("no-such-dag") is False
        assert isinstance(cloud.last_error, DagNotFoundError)
        with pytest.raises(DagNotFoundError):
            cloud.delete_dag("no-such-dag", strict=True)


# -- shapes ------------------------------------------------------------------------------------


def test_single_function_dag(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a * 5, "five")
        assert cloud.register_dag("solo", ["five"], [])
        assert cloud.call_dag("solo", {"five": 3}, direct_response=True) == 15


def test_diamond_branch_and_join(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: x + 1, "top")
        cloud.register(lambda _, x: x * 10, "left")
        cloud.register(lambda _, x: x * 100, "right")
        cloud.register(lambda _, left, right: (left, right, left + right), "bottom")
        assert cloud.register_dag(
            "diamond",
            ["top", "left", "right", "bottom"],
            [("top", "left"), ("top", "right"), ("left", "bottom"), ("right", "bottom")],
        )
        assert cloud.call_dag("diamond", {"top": 1}).get(timeout=30) == (20, 200, 220)


def test_fan_out_fan_in_runs_branches_in_parallel(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: x, "source")
        for k in range(1, 5):
            cloud.register(timed_branch, f"p{k}")
        cloud.register(sum_values, "sink")
        branches = [f"p{k}" for k in range(1, 5)]
        assert cloud.register_dag(
            "fan",
            ["source", *branches, "sink"],
            [("source", p) for p in branches] + [(p, "sink") for p in branches],
        )
        # Each branch gets its own static k, then the source's result.
        args: dict[str, Any] = {"source": 3, **{f"p{k}": k for k in range(1, 5)}}
        result = cloud.call_dag("fan", args, direct_response=True, timeout=30)
        assert result["total"] == 3 * (1 + 2 + 3 + 4)
        # All four branches were sleeping at the same moment.
        assert max(result["starts"]) < min(result["ends"])


def test_several_sources_with_their_own_arguments(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, a: a * 2, "s1")
        cloud.register(lambda _, b, c: f"{b}+{c}", "s2")
        cloud.register(lambda _: "constant", "s3")
        cloud.register(collect, "join")
        assert cloud.register_dag(
            "sources",
            ["s1", "s2", "s3", "join"],
            [("s1", "join"), ("s2", "join"), ("s3", "join")],
        )
        result = cloud.call_dag("sources", {"s1": 5, "s2": ["x", "y"]}, direct_response=True)
        assert result == [10, "x+y", "constant"]


@pytest.mark.parametrize("direct", [False, True])
def test_join_order_is_the_functions_list_order_not_arrival(local_node: Node, direct: bool) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(slow_upstream, "slow")
        cloud.register(fast_upstream, "fast")
        cloud.register(collect, "join")
        # Edges listed in the opposite order, so neither edge order nor arrival order
        # can pass for the functions-list order.
        assert cloud.register_dag(
            "join-order", ["slow", "fast", "join"], [("fast", "join"), ("slow", "join")]
        )
        args = {"slow": 1, "fast": 2, "join": ["static-1", "static-2"]}
        if direct:
            result = cloud.call_dag("join-order", args, direct_response=True)
        else:
            result = cloud.call_dag("join-order", args).get(timeout=30)
        assert result[:2] == ["static-1", "static-2"]
        slow, fast = result[2], result[3]
        assert (slow["name"], slow["x"]) == ("slow", 1)
        assert (fast["name"], fast["x"]) == ("fast", 2)
        assert len(result) == 4
        # The first-listed upstream really finished last.
        assert slow["done"] > fast["done"]


def test_tuple_result_spreads_into_downstream_arguments(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: (x, x + 1, x + 2), "split")
        cloud.register(lambda _, p, q, r: p * 100 + q * 10 + r, "combine")
        assert cloud.register_dag("spread", ["split", "combine"], [("split", "combine")])
        assert cloud.call_dag("spread", {"split": 1}, direct_response=True) == 123


def test_tuple_results_spread_in_order_at_a_join(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _: ("a1", "a2"), "first")
        cloud.register(lambda _: ["b-list"], "second")  # a list is one argument
        cloud.register(collect, "join")
        assert cloud.register_dag(
            "spread-join", ["first", "second", "join"], [("first", "join"), ("second", "join")]
        )
        assert cloud.call_dag("spread-join", {"join": 0}, direct_response=True) == [
            0,
            "a1",
            "a2",
            ["b-list"],
        ]


def test_arg_map_single_value_or_list(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(collect, "collect")
        assert cloud.register_dag("args", ["collect"], [])
        assert cloud.call_dag("args", {"collect": 5}, direct_response=True) == [5]
        assert cloud.call_dag("args", {"collect": [5, 6, 7]}, direct_response=True) == [5, 6, 7]
        # A list is spread; to pass one list, wrap it.
        assert cloud.call_dag("args", {"collect": [[5, 6]]}, direct_response=True) == [[5, 6]]
        assert cloud.call_dag("args", {"collect": (5, 6)}, direct_response=True) == [(5, 6)]
        assert cloud.call_dag("args", {}, direct_response=True) == []


def test_output_key_stores_the_result_there(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert cloud.register_dag("ab", ["a", "b"], [("a", "b")])
        future = cloud.call_dag("ab", {"a": 20}, output_key="my-out")
        assert future.obj_id == "my-out"
        assert future.get(timeout=30) == 42
        assert cloud.get_object("my-out") == 42
        # A second call overwrites it.
        assert cloud.call_dag("ab", {"a": 0}, output_key="my-out").get(timeout=30) == 2
        assert cloud.get_object("my-out") == 2


def test_call_without_output_key_stores_under_the_future_id(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _register_abc(cloud)
        assert cloud.register_dag("ab", ["a", "b"], [("a", "b")])
        future = cloud.call_dag("ab", {"a": 1})
        assert future.get(timeout=30) == 4
        assert cloud.get_object(future.obj_id) == 4


def test_direct_response_returns_each_calls_own_result(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: x * 3, "triple")
        cloud.register(lambda _, x: (x, x + 1), "pair")
        assert cloud.register_dag("direct", ["triple", "pair"], [("triple", "pair")])
        for i in range(20):
            result = cloud.call_dag("direct", {"triple": i}, direct_response=True)
            assert not isinstance(result, CloudburstFuture)
            assert result == (i * 3, i * 3 + 1)


def test_concurrent_direct_responses_are_not_mixed_up(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(slow_upstream, "slow")
        cloud.register(lambda _, d: d["x"], "unwrap")
        assert cloud.register_dag("slow-direct", ["slow", "unwrap"], [("slow", "unwrap")])

        def call(i: int) -> tuple[int, Any]:
            return i, cloud.call_dag("slow-direct", {"slow": i}, direct_response=True, timeout=30)

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(call, range(20)))
        assert all(result == i for i, result in results)


# -- chains of stages on one executor ------------------------------------------------------------


class Counter:
    """A class whose instance counts the calls it served."""

    def __init__(self, start: int) -> None:
        self.calls = start

    def run(self, x: int) -> tuple[int, int]:
        self.calls += 1
        return x, self.calls


def test_a_chain_keeps_its_static_arguments_spreads_tuples_and_reuses_class_instances(
    local_node: Node,
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: x + 1, "first")
        cloud.register((Counter, 100), "count")
        cloud.register(lambda _, label, x, calls: f"{label}:{x}:{calls}", "label")
        assert cloud.register_dag(
            "counted", ["first", "count", "label"], [("first", "count"), ("count", "label")]
        )
        results = [
            cloud.call_dag("counted", {"first": 1, "label": "n"}, direct_response=True)
            for _ in range(6)
        ]
    # The pinned instance persists (its count grows), whichever executor ran it.
    assert all(r.startswith("n:2:") for r in results)
    counts = [int(r.rsplit(":", 1)[1]) for r in results]
    assert all(c > 100 for c in counts) and max(counts) >= 103


def test_a_failure_in_the_middle_of_a_chain_stops_it(local_node: Node) -> None:
    def middle(cloudburst: UserLibrary, x: int) -> int:
        if x > 10:
            raise ValueError(f"too big: {x}")
        return x

    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: x * 10, "grow")
        cloud.register(middle, "middle")
        cloud.register(lambda cb, x: cb.put_object("chain-end-ran", x) and x, "end")
        assert cloud.register_dag(
            "stops", ["grow", "middle", "end"], [("grow", "middle"), ("middle", "end")]
        )
        with pytest.raises(RemoteFunctionError, match="too big: 20"):
            cloud.call_dag("stops", {"grow": 2}, direct_response=True)
        assert cloud.get_object("chain-end-ran") is None
        assert cloud.call_dag("stops", {"grow": 1}, direct_response=True) == 10
        assert cloud.get_object("chain-end-ran") == 10


def test_a_chained_stage_that_opened_a_mailbox_closes_it_when_it_ends(local_node: Node) -> None:
    def send_to(cloudburst: UserLibrary, peer: str) -> bool:
        return cloudburst.send(peer, "late")

    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(lambda _, x: x, "start")
        cloud.register(lambda cb, x: str(cb.get_id()), "take_id")
        cloud.register(lambda _, mailbox: mailbox, "pass_on")
        assert cloud.register_dag(
            "ids", ["start", "take_id", "pass_on"], [("start", "take_id"), ("take_id", "pass_on")]
        )
        mailbox = cloud.call_dag("ids", {"start": 1}, direct_response=True)
        # Closed, not merely unknown: the late message is dropped.
        assert cloud.register(send_to, "send_to")(mailbox).get(timeout=30) is False
    assert local_node.router is not None and len(local_node.router) == 0


def test_a_caller_that_leaves_mid_call_leaves_the_stream_server_healthy(
    local_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A call stream cancelled with calls in flight: no failure logged, other callers go on."""
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(slow_upstream, "slow")
        cloud.register(lambda _, d: d["x"], "unwrap")
        assert cloud.register_dag("left-behind", ["slow", "unwrap"], [("slow", "unwrap")])

    async def leave_mid_call() -> None:
        async with grpc.aio.insecure_channel(local_node.address) as channel:
            call = scheduler_service_pb2_grpc.SchedulerServiceStub(channel).StreamCalls()
            for i in range(4):
                request = scheduler_service_pb2.CallDagRequest(
                    name="left-behind", direct_response=True
                )
                request.function_arguments["slow"].arguments.add(
                    value=serialize(i, what="argument", limit=1 << 20)
                )
                await call.write(scheduler_service_pb2.StreamCallsRequest(
                    sequence=i + 1, call_dag=request
                ))  # fmt: skip
            call.cancel()

    asyncio.run(leave_mid_call())
    executors = local_node.executors
    deadline = time.monotonic() + 30
    while any(e.active_calls for e in executors):  # the four calls run on without a reader
        assert time.monotonic() < deadline, "the abandoned calls never finished"
        time.sleep(0.01)
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.call_dag("left-behind", {"slow": 7}, direct_response=True, timeout=30) == 7
    # (asyncio may log grpc's events for the leaver's loop, closed by then: not the server's.)
    ours = ("cloudburst",)  # the SDK, the runtime, its executors and its KVS
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(ours)
    ]
    assert not failures
