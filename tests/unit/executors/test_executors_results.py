"""Sending a DAG sink's result to the scheduler waiting for it (ResultRouter)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cloudburst.errors import CloudburstTimeoutError
from cloudburst.v1 import execution_pb2
from cloudburst_executors.results import ResultRouter, RoutedResult


def outcome(text: str) -> execution_pb2.Outcome:
    result = execution_pb2.Outcome()
    result.error.message = text
    return result


def schedule(call_id: str, stream_id: int = 7, seconds: float = 30.0) -> execution_pb2.DagSchedule:
    placed = execution_pb2.DagSchedule(
        call_id=call_id,
        direct_response=True,
        reply_to="scheduler-1",
        reply_stream_id=stream_id,
        answer_stream_id="a" * 32,
        answer_sequence=5,
    )
    placed.deadline_time.FromNanoseconds(time.time_ns() + int(seconds * 1e9))
    return placed


async def test_a_result_reaches_its_waiter_and_the_waiter_is_forgotten() -> None:
    router = ResultRouter()
    waiting = router.expect("call-1", timeout=30)
    router.deliver(schedule("call-1"), outcome("done"), stored_key="key-1")
    assert (await waiting).error.message == "done"
    assert router.stored_key("call-1") == "key-1"
    assert len(router) == 0, "the waiter went with the delivery"


async def test_a_result_goes_to_the_stream_its_schedule_names() -> None:
    router = ResultRouter()
    sent: list[RoutedResult] = []
    other: list[RoutedResult] = []
    router.attach(("scheduler-1", 7), sent.append)
    router.attach(("scheduler-1", 8), other.append)
    router.attach(("scheduler-2", 7), other.append)
    router.deliver(schedule("call-2"), outcome("routed"), stored_key="key-2")
    assert sent == [RoutedResult("call-2", outcome("routed"), "a" * 32, 5, "key-2")]
    assert other == []
    assert len(router) == 0


async def test_a_result_that_comes_before_its_stream_is_parked_until_the_stream_opens() -> None:
    router = ResultRouter()
    router.deliver(schedule("call-3"), outcome("early"))
    assert router.parked == 1
    sent: list[RoutedResult] = []
    router.attach(("scheduler-1", 7), sent.append)
    assert [r.outcome.error.message for r in sent] == ["early"]
    assert router.parked == 0


async def test_a_parked_result_is_forgotten_at_its_call_deadline() -> None:
    router = ResultRouter()
    router.deliver(schedule("call-4", seconds=0.02), outcome("late"))
    assert router.parked == 1
    after = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, after.set)
    await after.wait()
    assert router.parked == 0
    sent: list[RoutedResult] = []
    router.attach(("scheduler-1", 7), sent.append)
    assert sent == []


async def test_a_result_for_a_stream_that_ended_is_dropped() -> None:
    router = ResultRouter()
    sent: list[RoutedResult] = []
    router.attach(("scheduler-1", 7), sent.append)
    router.detach(("scheduler-1", 7), sent.append)
    router.deliver(schedule("call-5"), outcome("too late"))
    assert sent == []
    assert len(router) == 0, "nothing is parked for a stream that will not come back"


async def test_a_stream_replaced_under_the_same_name_keeps_its_results() -> None:
    router = ResultRouter()
    first: list[RoutedResult] = []
    second: list[RoutedResult] = []
    router.attach(("scheduler-1", 7), first.append)
    router.attach(("scheduler-1", 7), second.append)
    router.detach(("scheduler-1", 7), first.append)  # the replaced one ends later
    router.deliver(schedule("call-6"), outcome("second"))
    assert first == []
    assert [r.call_id for r in second] == ["call-6"]


async def test_a_waiter_times_out_and_is_forgotten() -> None:
    router = ResultRouter()
    with pytest.raises(CloudburstTimeoutError, match="call-7 did not finish"):
        await router.expect("call-7", timeout=0.01)
    assert len(router) == 0


async def test_a_cancelled_waiter_is_forgotten_at_its_deadline() -> None:
    router = ResultRouter()
    loop = asyncio.get_running_loop()
    waiting = router.expect("call-8", timeout=0.02)
    waiting.cancel()
    assert len(router) == 1
    # Timers fire in deadline order: this one comes after the waiter's deadline.
    after = asyncio.Event()
    loop.call_later(0.03, after.set)
    await after.wait()
    assert len(router) == 0
