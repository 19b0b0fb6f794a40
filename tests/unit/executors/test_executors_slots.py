"""Runnable slots: a function waiting in a library call gives its slot up; deadlines end waits."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from cloudburst.errors import CloudburstTimeoutError, UnavailableError
from cloudburst_executors.library import LoopBridge
from cloudburst_executors.slots import RunSlots

WAIT = 10.0  # a deadline for the threads of these tests, never reached when they pass


def started(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_call_waits_for_a_busy_slot_and_the_wait_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    slots = RunSlots(1, "executor-x")
    slots.acquire()
    got = threading.Event()

    def second() -> None:
        slots.acquire()
        got.set()

    with caplog.at_level(logging.WARNING):
        thread = started(second)
        deadline = time.monotonic() + WAIT
        while slots.queued != 1:  # the second call queues behind the busy slot
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert not got.is_set()
        slots.release()
        assert got.wait(WAIT)
        thread.join(WAIT)
    assert (slots.running, slots.queued) == (1, 0)
    warnings = [r.getMessage() for r in caplog.records if "wait for a free thread" in r.message]
    assert warnings == [
        "executor executor-x: calls wait for a free thread: 1 queued, 1 running, 0 waiting in "
        "library calls (executor.threads = 1); add executors or threads if this persists (the "
        "metric cloudburst.executor.queued_calls counts such waits; this is logged once)"
    ]


def test_a_function_waiting_in_the_library_frees_its_slot_for_another() -> None:
    slots = RunSlots(1, "executor-x")
    loop = asyncio.new_event_loop()
    loop.close()  # never used here
    bridge = LoopBridge(loop, WAIT)
    slots.acquire()
    bridge.own()
    bridge.hold(slots)
    with bridge.blocking():  # a library wait
        assert (slots.running, slots.waiting) == (0, 1)
        slots.acquire()  # another function runs meanwhile, without waiting
        slots.release()
    assert (slots.running, slots.waiting) == (1, 0)


def test_closing_wakes_whoever_waits_for_a_slot() -> None:
    slots = RunSlots(1, "executor-x")
    slots.acquire()
    failures: list[BaseException] = []

    def second() -> None:
        try:
            slots.acquire()
        except UnavailableError as exc:
            failures.append(exc)

    thread = started(second)
    deadline = time.monotonic() + WAIT
    while slots.queued != 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    slots.close()
    thread.join(WAIT)
    assert [str(f) for f in failures] == ["executor executor-x is shutting down"]


def test_library_calls_past_the_deadline_raise() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    bridge = LoopBridge(loop, WAIT, deadline=time.monotonic() + 60)
    assert bridge.left("get_object('k')", 5.0) == 5.0
    assert bridge.left("get_object('k')", 1e9) <= 60
    overdue = LoopBridge(loop, WAIT, deadline=time.monotonic() - 1)
    with pytest.raises(CloudburstTimeoutError, match=r"get_object\('k'\): the call's deadline"):
        overdue.left("get_object('k')", 5.0)


def test_a_library_call_raises_a_timeout_error_of_its_own_as_it_is() -> None:
    """TimeoutError is concurrent.futures.TimeoutError: only the bridge's own wait may say so."""
    loop = asyncio.new_event_loop()
    thread = started(loop.run_forever)
    try:
        bridge = LoopBridge(loop, WAIT)

        async def own_timeout() -> None:
            await asyncio.wait_for(asyncio.sleep(WAIT * 3), 0.01)

        with pytest.raises(TimeoutError) as raised:
            bridge.run(own_timeout(), "get_object('k')")
        assert not isinstance(raised.value, CloudburstTimeoutError), raised.value

        async def slow() -> None:
            await asyncio.sleep(WAIT * 3)

        with pytest.raises(CloudburstTimeoutError, match=r"did not finish within 0\.1s"):
            bridge.run(slow(), "get_object('k')", timeout=0.1)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()
