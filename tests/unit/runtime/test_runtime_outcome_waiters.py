"""Waiters for DAG results (OutcomeWaiters): each ends with its result or at its deadline."""

from __future__ import annotations

import asyncio

import pytest

from cloudburst.errors import CloudburstTimeoutError, UnavailableError
from cloudburst.v1 import execution_pb2
from cloudburst_grpc.executor_client import OutcomeWaiters

# How long past the latest deadline of a test its checks run: the sweep that fails a waiter
# fires at the waiter's deadline, so a check set later always comes after it.
LATER = 0.05


async def at(seconds: float) -> None:
    """Return once a timer set now for ``seconds`` has fired (after every earlier timer)."""
    fired = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, fired.set)
    await asyncio.wait_for(fired.wait(), timeout=seconds + 60)


async def test_a_result_reaches_its_waiter_and_it_is_forgotten() -> None:
    waiters = OutcomeWaiters()
    waiting = waiters.expect("call-1", timeout=0.02)
    future = waiters.pop("call-1")
    assert future is waiting and len(waiters) == 0
    assert waiters.pop("call-1") is None
    future.set_result(execution_pb2.Outcome())
    await at(0.02 + LATER)  # its deadline passed: the result stays
    assert waiting.exception() is None


async def test_a_waiter_fails_at_its_deadline_and_not_before() -> None:
    waiters = OutcomeWaiters()
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(CloudburstTimeoutError, match=r"call call-2 did not finish within 0\.1s"):
        await waiters.expect("call-2", timeout=0.1)
    assert loop.time() - start >= 0.1
    assert len(waiters) == 0


async def test_every_waiter_fails_by_its_own_deadline_whatever_the_order_they_came_in() -> None:
    # The sweep is set for the earliest deadline it knows: a shorter one that comes later
    # moves it earlier, and each sweep sets the next for the earliest deadline left.
    waiters = OutcomeWaiters()
    late = waiters.expect("late", timeout=30)
    second = waiters.expect("second", timeout=0.06)
    first = waiters.expect("first", timeout=0.03)
    answered = waiters.expect("answered", timeout=0.03)
    waiters.pop("answered")
    await at(0.03 + LATER / 10)
    assert first.done() and isinstance(first.exception(), CloudburstTimeoutError)
    assert not second.done() and not answered.done()
    await at(0.06 - 0.03)
    assert isinstance(second.exception(), CloudburstTimeoutError)
    assert not late.done() and not answered.done()
    assert len(waiters) == 1
    waiters.fail_all(UnavailableError("gone"))  # ends the last one, and the sweep with it
    assert isinstance(late.exception(), UnavailableError)


async def test_a_cancelled_waiter_is_forgotten_by_its_deadline() -> None:
    waiters = OutcomeWaiters()
    waiters.expect("call-3", timeout=0.02).cancel()
    assert len(waiters) == 1
    await at(0.02 + LATER)
    assert len(waiters) == 0


async def test_fail_all_fails_every_waiter_and_forgets_them() -> None:
    waiters = OutcomeWaiters()
    waiting = [waiters.expect(f"call-{n}", timeout=0.02) for n in range(3)]
    waiters.fail_all(UnavailableError("the stream broke"))
    assert len(waiters) == 0
    for future in waiting:
        with pytest.raises(UnavailableError, match="the stream broke"):
            await future
    # Waiters that come later have a sweep of their own.
    again = waiters.expect("call-9", timeout=0.02)
    with pytest.raises(CloudburstTimeoutError):
        await asyncio.wait_for(again, timeout=60)
