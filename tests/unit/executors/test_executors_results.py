"""Meeting a DAG sink's result with the scheduler waiting for it (ResultRouter)."""

from __future__ import annotations

import asyncio

import pytest

from cloudburst.errors import CloudburstTimeoutError
from cloudburst.v1 import execution_pb2
from cloudburst_executors.results import ResultRouter


def outcome(text: str) -> execution_pb2.Outcome:
    result = execution_pb2.Outcome()
    result.error.message = text
    return result


async def test_a_result_reaches_its_waiter_and_its_deadline_is_dropped() -> None:
    router = ResultRouter()
    waiting = router.expect("call-1", timeout=30)
    (_, deadline) = router._waiters["call-1"]
    router.deliver("call-1", outcome("done"), keep_for=10)
    assert (await waiting).error.message == "done"
    assert len(router) == 0
    assert deadline.cancelled(), "the deadline went with the delivery"


async def test_a_result_that_comes_first_is_parked_for_its_waiter() -> None:
    router = ResultRouter()
    router.deliver("call-2", outcome("early"), keep_for=10)
    assert len(router) == 1
    assert (await router.expect("call-2", timeout=10)).error.message == "early"
    assert len(router) == 0


async def test_a_waiter_times_out_and_is_forgotten() -> None:
    router = ResultRouter()
    with pytest.raises(CloudburstTimeoutError, match="call-3 did not finish"):
        await router.expect("call-3", timeout=0.01)
    assert len(router) == 0


async def test_a_cancelled_waiter_is_forgotten_at_its_deadline() -> None:
    router = ResultRouter()
    loop = asyncio.get_running_loop()
    waiting = router.expect("call-4", timeout=0.02)
    waiting.cancel()
    assert len(router) == 1
    # Timers fire in deadline order: this one comes after the waiter's deadline.
    after = asyncio.Event()
    loop.call_later(0.03, after.set)
    await after.wait()
    assert len(router) == 0
