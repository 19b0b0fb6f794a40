"""One placement per run: where the gate sends it, and the accounting it does around user code."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cloudburst_executors import cooperative
from cloudburst_executors.inline import (
    GREENLET,
    LOOP,
    QUICK_RUNS,
    SLOW_FACTOR,
    THREAD,
    InlineGate,
    RunRecord,
)

LIMIT = 0.05


def ignores(cloudburst: Any, a: int) -> int:
    return a


def reads(cloudburst: Any, key: str) -> Any:
    return cloudburst.get(key)


@dataclass
class Function:
    name: str
    target: Any
    runs: RunRecord = field(default_factory=RunRecord)


async def run_quickly(gate: InlineGate, function: Function, times: int) -> None:
    """Run ``function`` ``times`` times where the gate places it, its body doing nothing."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        for _ in range(times):
            placement = gate.place(function, loop)
            bridge = placement.bridge(loop, 5.0)
            await placement.run(
                pool, contextvars.copy_context(), placement.invoke, function, bridge, lambda: None
            )


async def test_a_run_goes_to_a_thread_until_the_function_earned_the_loop() -> None:
    gate, free, user = InlineGate(LIMIT), Function("free", ignores), Function("user", reads)
    loop = asyncio.get_running_loop()
    assert gate.place(free, loop).where == THREAD
    await run_quickly(gate, free, QUICK_RUNS)
    await run_quickly(gate, user, QUICK_RUNS)
    assert gate.place(free, loop).where == LOOP
    assert gate.place(user, loop).where == GREENLET
    assert isinstance(gate.place(user, loop).bridge(loop, 5.0), cooperative.GreenletBridge)
    assert not isinstance(gate.place(free, loop).bridge(loop, 5.0), cooperative.GreenletBridge)


async def test_a_placement_runs_the_call_where_it_says() -> None:
    gate, free, user = InlineGate(LIMIT), Function("free", ignores), Function("user", reads)
    await run_quickly(gate, free, QUICK_RUNS)
    await run_quickly(gate, user, QUICK_RUNS)
    loop = asyncio.get_running_loop()
    seen: dict[str, tuple[str, bool]] = {}

    def body(key: str) -> None:
        seen[key] = (threading.current_thread().name, cooperative.inside())

    with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
        for key, function in (("thread", Function("new", ignores)), ("loop", free), ("g", user)):
            placement = gate.place(function, loop)
            bridge = placement.bridge(loop, 5.0)
            context = contextvars.copy_context()
            await placement.run(pool, context, placement.invoke, function, bridge, body, key)
    here = threading.current_thread().name
    assert seen["thread"][0].startswith("worker") and not seen["thread"][1]
    assert seen["loop"] == (here, False)
    assert seen["g"] == (here, True), "in a greenlet on the loop's thread"


async def test_a_slow_run_on_the_loop_sends_the_function_back_to_threads() -> None:
    gate, free = InlineGate(LIMIT), Function("free", ignores)
    await run_quickly(gate, free, QUICK_RUNS)
    loop = asyncio.get_running_loop()
    placement = gate.place(free, loop)
    assert placement.where == LOOP
    gate.max_seconds = 0.005  # a shorter limit from now on, for a short slow run

    def slow() -> None:
        started = time.thread_time()
        while time.thread_time() - started < gate.max_seconds * SLOW_FACTOR * 2:
            pass  # computing: CPU time over the bound

    with ThreadPoolExecutor(1) as pool:
        await placement.run(
            pool,
            contextvars.copy_context(),
            placement.invoke,
            free,
            placement.bridge(loop, 5.0),
            slow,
        )
    assert gate.place(free, loop).where == THREAD and free.runs.strikes == 1


async def test_only_admitted_functions_follow_in_a_chain() -> None:
    gate, free, user = InlineGate(LIMIT), Function("free", ignores), Function("user", reads)
    await run_quickly(gate, free, QUICK_RUNS)
    await run_quickly(gate, user, QUICK_RUNS)
    loop = asyncio.get_running_loop()
    on_loop, in_greenlet = gate.place(free, loop), gate.place(user, loop)
    assert on_loop.admits(free.runs) and not on_loop.admits(user.runs)
    assert in_greenlet.admits(free.runs) and in_greenlet.admits(user.runs)
    assert not in_greenlet.admits(RunRecord()), "one that has not earned the loop"
    assert gate.place(Function("new", ignores), loop).admits(user.runs), "a thread takes any"
