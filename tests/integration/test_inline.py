"""Quick, library-free functions run on the executor's event loop; others stay on threads.

(Functions that use the user library run on the loop as greenlets: test_cooperative.py.)

Each function reports the thread it ran on: executor worker threads are named
``cb-<executor id>_<n>``, anything else is the executor's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.serialization import deserialize, serialize
from cloudburst.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc, value_pb2
from cloudburst_executors.inline import QUICK_RUNS, STALL_WARNING
from cloudburst_grpc.local import Node, start_local
from harness import make_config

# A generous limit, so that no run of these tiny functions on a busy machine counts as slow;
# SLOW_FACTOR times it (0.25 s) is what a run on the loop may take before it is sent back.
LIMIT = 0.05


def where(_: Any, delay: float = 0.0) -> str:
    if delay:
        time.sleep(delay)
    return threading.current_thread().name


def where_slowly(_: Any, delay: float) -> str:
    """Like ``where``, but other code: it does not share what ``where`` earned."""
    time.sleep(delay)
    return threading.current_thread().name


def hop(_: Any, trail: list[str]) -> list[str]:
    return [*trail, threading.current_thread().name]


def runs_its_own_loop(_: Any, a: int) -> tuple[str, int]:
    async def double() -> int:
        await asyncio.sleep(0)
        return a * 2

    return threading.current_thread().name, asyncio.run(double())


def on_a_worker(thread_name: str) -> bool:
    return thread_name.startswith("cb-")


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return start_node(start_local(make_config(executor={"inline_max_seconds": LIMIT, "count": 1})))


def test_a_quick_library_free_function_moves_to_the_loop_and_back_after_a_slow_run(
    node: Node,
) -> None:
    with CloudburstConnection(node.address) as cloud:
        fn = cloud.register(where, "where")
        first = [fn().get() for _ in range(QUICK_RUNS)]
        assert all(map(on_a_worker, first)), first
        assert not on_a_worker(fn().get()), "after enough quick runs it runs on the loop"
        # A run far over the limit still finishes (on the loop), then sends it back to threads.
        assert not on_a_worker(fn(0.3).get())
        assert on_a_worker(fn().get())


def test_a_chain_runs_on_the_loop_only_as_far_as_its_functions_may(node: Node) -> None:
    with CloudburstConnection(node.address) as cloud:
        cloud.register(lambda _, a: (a + 1, threading.current_thread().name), "incr")
        cloud.register(
            lambda cloudburst, a, incr_thread: (
                a * a,
                incr_thread,
                cloudburst.get_id() and threading.current_thread().name,
            ),
            "square",
        )
        cloud.register_dag("chain", ["incr", "square"], [("incr", "square")])
        # A library call made on the loop outside a greenlet would wait out the timeout.
        results = [
            cloud.call_dag("chain", {"incr": 3}, direct_response=True, timeout=20)
            for _ in range(QUICK_RUNS + 2)
        ]
    assert {value for value, _, _ in results} == {16}
    assert not on_a_worker(results[-1][1]), "incr earned the loop"
    # square reads the library: the chain on the loop stops before it, and it runs in a
    # greenlet of its own once its stretches between library calls were quick.
    assert on_a_worker(results[0][2]) and not on_a_worker(results[-1][2])


def test_copies_of_a_function_earn_and_lose_the_loop_together(node: Node) -> None:
    """The same function under two names shares what the executor learned about it."""
    with CloudburstConnection(node.address) as cloud:
        first = cloud.register(where, "where_1")
        second = cloud.register(where, "where_2")
        other = cloud.register(where_slowly, "where_slowly")
        assert all(on_a_worker(first().get()) for _ in range(QUICK_RUNS))
        assert not on_a_worker(second().get()), "its copy earned the loop for it"
        assert on_a_worker(other(0.0).get()), "other code earned nothing"
        # A run of one copy far over the limit (on the loop) sends both back to threads.
        assert not on_a_worker(second(0.3).get())
        assert on_a_worker(first().get())
        assert on_a_worker(second().get())


def test_a_chain_of_copies_runs_on_the_loop_from_its_second_call(node: Node) -> None:
    """Each copy runs once per call, yet together they earn the loop in the first call."""
    names = [f"hop_{i}" for i in range(QUICK_RUNS)]
    with CloudburstConnection(node.address) as cloud:
        for name in names:
            cloud.register(hop, name)
        assert cloud.register_dag("hops", names, list(itertools.pairwise(names)))
        first, second = (
            cloud.call_dag("hops", {names[0]: [[]]}, direct_response=True, timeout=20)
            for _ in range(2)
        )
    assert len(first) == len(second) == len(names)
    assert all(map(on_a_worker, first)), first
    assert not any(map(on_a_worker, second)), second


def test_code_on_the_loop_may_run_an_event_loop_of_its_own(node: Node) -> None:
    """asyncio.run() works on a worker thread; it must on the executor's loop too."""
    with CloudburstConnection(node.address) as cloud:
        fn = cloud.register(runs_its_own_loop, "runs_its_own_loop")
        results = [fn(i).get() for i in range(QUICK_RUNS + 2)]
    assert [value for _, value in results] == [i * 2 for i in range(QUICK_RUNS + 2)]
    assert not on_a_worker(results[-1][0]), "the last runs were on the loop"


def test_a_limit_of_zero_keeps_every_function_on_a_worker(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(start_local(make_config(executor={"inline_max_seconds": 0.0})))
    with CloudburstConnection(node.address) as cloud:
        fn = cloud.register(where, "where")
        names = [fn().get() for _ in range(QUICK_RUNS * 3)]
    assert all(map(on_a_worker, names)), names


def test_a_call_that_finishes_at_once_is_answered_once_on_the_call_stream(node: Node) -> None:
    """A streamed call is accepted, then answered with its outcome; when its function ran
    on the loop, the one answer carries both."""
    with CloudburstConnection(node.address) as cloud:
        quick = cloud.register(where, "quick")
        cloud.register(where_slowly, "slow")
        for _ in range(QUICK_RUNS):
            quick().get()

    def call(sequence: int, name: str, *args: Any) -> scheduler_service_pb2.StreamCallsRequest:
        request = scheduler_service_pb2.CallFunctionRequest(
            name=name,
            arguments=[
                value_pb2.Argument(value=serialize(a, what="argument", limit=1 << 20)) for a in args
            ],
        )
        return scheduler_service_pb2.StreamCallsRequest(
            sequence=sequence, call_function=request, stream_outcome=True
        )

    with grpc.insecure_channel(node.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        # The slow call's outcome comes last, so every answer to the quick one is in by then.
        answers = list(stub.StreamCalls(iter([call(1, "quick"), call(2, "slow", 0.2)]), timeout=60))
    by_call: dict[int, list[bool]] = {}
    for answer in answers:
        body = answer.call_function
        assert body.response_key
        by_call.setdefault(answer.sequence, []).append(body.HasField("outcome"))
    assert by_call == {1: [True], 2: [False, True]}, by_call
    (first,) = [a.call_function for a in answers if a.sequence == 1]
    assert not on_a_worker(deserialize(first.outcome.value)), "quick ran on the loop"


def test_a_run_holding_the_loop_is_reported_while_it_lasts(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with CloudburstConnection(node.address) as cloud:
        fn = cloud.register(where, "where")
        for _ in range(QUICK_RUNS):
            fn().get()
        with caplog.at_level(logging.WARNING, logger="cloudburst_executors.inline"):
            # On the loop, and long enough for the watchdog (it looks every STALL_WARNING / 4).
            assert not on_a_worker(fn(STALL_WARNING * 1.6).get())
    assert "'where' has held an executor's event loop" in caplog.text
