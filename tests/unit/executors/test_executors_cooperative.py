"""The greenlet driver: user code on the loop's thread whose waits the loop awaits."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from cloudburst.errors import CloudburstTimeoutError
from cloudburst_executors import cooperative

REQUEST = contextvars.ContextVar("REQUEST", default="none")


class Counted(cooperative.Segments):
    def __init__(self) -> None:
        self.begun = self.ended = 0

    def begin(self) -> None:
        self.begun += 1

    def end(self) -> None:
        self.ended += 1


async def value_later(value: Any) -> Any:
    await asyncio.sleep(0)
    return value


async def fail_later() -> None:
    await asyncio.sleep(0)
    raise ValueError("from the loop")


async def drive(function: Any, segments: cooperative.Segments | None = None) -> Any:
    return await cooperative.drive(
        function, contextvars.copy_context(), segments or cooperative.Segments()
    )


async def test_each_wait_is_awaited_by_the_loop_and_its_result_returned() -> None:
    segments = Counted()

    def function() -> int:
        assert cooperative.inside()
        first = cooperative.suspend(value_later(1), 5.0, "first")
        second = cooperative.suspend(value_later(2), None, "second")  # a deadline of its own
        return int(first + second)

    assert not cooperative.inside()
    assert await drive(function, segments) == 3
    assert (segments.begun, segments.ended) == (3, 3), "three stretches around two waits"


async def test_a_wait_past_its_deadline_raises_in_the_function() -> None:
    def function() -> str:
        try:
            cooperative.suspend(asyncio.sleep(30), 0.05, "waiting for nothing")
        except CloudburstTimeoutError as exc:
            return str(exc)
        return "no timeout"

    assert await drive(function) == "waiting for nothing did not finish within 0.1s"


async def test_what_the_awaitable_raises_is_raised_in_the_function() -> None:
    def function() -> str:
        with pytest.raises(ValueError, match="from the loop"):
            cooperative.suspend(fail_later(), 5.0, "failing")
        return "caught"

    assert await drive(function) == "caught"


async def test_a_cancelled_run_sees_the_cancellation_at_its_wait_then_the_driver_raises_it() -> (
    None
):
    seen: list[str] = []
    waiting = asyncio.Event()

    async def long_wait() -> None:
        waiting.set()
        await asyncio.sleep(30)

    def function() -> None:
        try:
            cooperative.suspend(long_wait(), 60.0, "a long wait")
        except asyncio.CancelledError:
            seen.append("cancelled at its wait")
            raise

    task = asyncio.create_task(drive(function))
    await asyncio.wait_for(waiting.wait(), 10)
    assert cooperative.loop_busy(asyncio.get_running_loop())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled at its wait"]
    assert not cooperative.loop_busy(asyncio.get_running_loop())


async def test_the_loop_is_busy_while_a_run_is_in_progress_and_free_after() -> None:
    loop = asyncio.get_running_loop()

    def function() -> bool:
        return bool(cooperative.suspend(value_later(cooperative.loop_busy(loop)), 5.0, "x"))

    assert not cooperative.loop_busy(loop)
    assert await drive(function) is True
    assert not cooperative.loop_busy(loop)


async def test_user_code_sees_no_running_loop_and_its_context_goes_with_it() -> None:
    loop = asyncio.get_running_loop()
    REQUEST.set("the caller's")

    def function() -> tuple[Any, str, Any]:
        before = asyncio.events._get_running_loop()
        cooperative.suspend(value_later(None), 5.0, "x")
        return before, REQUEST.get(), asyncio.events._get_running_loop()

    hidden_before, request, hidden_after = await drive(function)
    assert hidden_before is None and hidden_after is None
    assert request == "the caller's"
    assert asyncio.get_running_loop() is loop, "restored for the loop's own code"


async def answered_at_once(value: Any) -> Any:
    return value  # never suspends, like the in-process KVS


async def test_the_loop_turns_between_two_calls_answered_at_once() -> None:
    flag = asyncio.Event()

    def poll() -> int:
        polls = 0
        while not cooperative.suspend(answered_at_once(flag.is_set()), 5.0, "poll"):
            polls += 1
            assert polls < 1000, "the loop never ran the task that sets the flag"
        return polls

    async def setter() -> None:
        flag.set()

    task = asyncio.get_running_loop().create_task(setter())
    assert await drive(poll) >= 1
    await task


async def test_a_run_with_one_call_answered_at_once_takes_no_extra_turn() -> None:
    ran: list[str] = []

    def function() -> Any:
        value = cooperative.suspend(answered_at_once(7), 5.0, "get")
        ran.append("function")
        return value

    asyncio.get_running_loop().call_soon(ran.append, "other")
    assert await drive(function) == 7
    assert ran == ["function"]  # finished before the loop's next turn
