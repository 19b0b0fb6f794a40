"""Copies of one function (the same stored bytes under other names) share the gate's record."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cloudburst.serialization import serialize
from cloudburst.v1 import function_pb2, value_pb2
from cloudburst_executors import runner
from cloudburst_executors.inline import LOOP, QUICK_RUNS, SLOW_FACTOR, THREAD, InlineGate

LIMIT = 0.05


def incr(cloudburst: Any, a: int) -> int:
    return a + 1


def decr(cloudburst: Any, a: int) -> int:
    return a - 1


def stored(
    name: str,
    body: object,
    version: int = 1,
    kind: function_pb2.FunctionKind.ValueType = function_pb2.FUNCTION_KIND_FUNCTION,
    init: tuple[Any, ...] = (),
) -> function_pb2.Function:
    """A function as the scheduler stores it."""
    return function_pb2.Function(
        name=name,
        body=serialize(body),
        kind=kind,
        init_arguments=[serialize(a) for a in init],
        version=version,
    )


def load(gate: InlineGate, function: function_pb2.Function) -> runner.LoadedFunction:
    """Load ``function`` as the executor does: with the record of its copies."""
    loaded = runner.load(function)
    loaded.runs = gate.record(loaded.identity)
    return loaded


async def run(
    gate: InlineGate,
    function: runner.LoadedFunction,
    body: Callable[[], None] = lambda: None,
    times: int = 1,
) -> None:
    """Run ``body`` as ``function``'s user code ``times`` times, where the gate places it."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        for _ in range(times):
            placement = gate.place(function, loop)
            bridge = placement.bridge(loop, 5.0)
            context = contextvars.copy_context()
            await placement.run(pool, context, placement.invoke, function, bridge, body)


def slow() -> None:
    """Compute for twice what a run on the loop may take (CPU time: never excused)."""
    started = time.thread_time()
    while time.thread_time() - started < LIMIT * SLOW_FACTOR * 2:
        pass


def test_the_identity_is_the_stored_bytes_without_name_version_or_retries() -> None:
    a = runner.identity(stored("a", incr, version=1))
    renamed = stored("b", incr, version=7)
    renamed.retries = 3
    assert runner.identity(renamed) == a
    assert runner.identity(stored("a", decr)) != a, "other code"
    other_serializer = stored("a", incr)
    other_serializer.body.serializer = value_pb2.SERIALIZER_JSON
    assert runner.identity(other_serializer) != a
    assert runner.identity(stored("a", incr, kind=function_pb2.FUNCTION_KIND_CLASS)) != a
    with_sources = stored("a", incr)
    with_sources.sources.add(path="f.py", text="x = 1\n")
    assert runner.identity(with_sources) != a


def test_captured_values_and_init_arguments_are_part_of_the_identity() -> None:
    def adder(n: int) -> Callable[[Any, int], int]:
        return lambda cloudburst, a: a + n

    assert runner.identity(stored("a", adder(1))) == runner.identity(stored("b", adder(1)))
    assert runner.identity(stored("a", adder(1))) != runner.identity(stored("b", adder(2)))

    class Counter:
        def __init__(self, start: int) -> None:
            self.start = start

        def run(self, a: int) -> int:
            return self.start + a

    kind = function_pb2.FUNCTION_KIND_CLASS
    one = runner.identity(stored("a", Counter, kind=kind, init=(1,)))
    assert one == runner.identity(stored("b", Counter, kind=kind, init=(1,)))
    assert one != runner.identity(stored("b", Counter, kind=kind, init=(2,)))


async def test_a_copy_runs_on_the_loop_once_another_earned_it() -> None:
    gate = InlineGate(LIMIT)
    first, second = load(gate, stored("incr_1", incr)), load(gate, stored("incr_2", incr))
    loop = asyncio.get_running_loop()
    assert gate.place(second, loop).where == THREAD
    await run(gate, first, times=QUICK_RUNS)
    assert gate.place(second, loop).where == LOOP, "never run, yet it earned the loop"
    assert gate.place(first, loop).where == LOOP


async def test_quick_runs_of_the_copies_add_up() -> None:
    gate = InlineGate(LIMIT)
    copies = [load(gate, stored(f"incr_{i}", incr)) for i in range(QUICK_RUNS)]
    loop = asyncio.get_running_loop()
    for copy in copies:
        assert gate.place(copy, loop).where == THREAD
        await run(gate, copy)
    assert all(gate.place(copy, loop).where == LOOP for copy in copies)


async def test_a_strike_on_one_copy_sends_every_copy_back_to_threads() -> None:
    gate = InlineGate(LIMIT)
    first, second = load(gate, stored("incr_1", incr)), load(gate, stored("incr_2", incr))
    loop = asyncio.get_running_loop()
    await run(gate, first, times=QUICK_RUNS)
    await run(gate, second, slow)  # on the loop, and slow there
    assert gate.place(first, loop).where == THREAD
    assert gate.place(second, loop).where == THREAD
    assert first.runs.strikes == 1
    # Earned back together: QUICK_RUNS << 2 quick runs in a row, by either copy.
    await run(gate, first, times=(QUICK_RUNS << 2) - 1)
    assert gate.place(second, loop).where == THREAD
    await run(gate, second)
    assert gate.place(first, loop).where == LOOP


async def test_different_bytes_do_not_share() -> None:
    gate = InlineGate(LIMIT)
    up, down = load(gate, stored("up", incr)), load(gate, stored("down", decr))
    await run(gate, up, times=QUICK_RUNS)
    loop = asyncio.get_running_loop()
    assert gate.place(up, loop).where == LOOP
    assert gate.place(down, loop).where == THREAD
    assert up.runs is not down.runs


async def test_a_new_version_with_the_same_bytes_keeps_the_record() -> None:
    gate = InlineGate(LIMIT)
    old = load(gate, stored("incr", incr, version=1))
    await run(gate, old, times=QUICK_RUNS)
    new = load(gate, stored("incr", incr, version=2))
    assert gate.place(new, asyncio.get_running_loop()).where == LOOP
    changed = load(gate, stored("incr", decr, version=3))
    assert gate.place(changed, asyncio.get_running_loop()).where == THREAD, "starts afresh"


def test_the_gate_holds_a_record_only_while_a_loaded_function_does() -> None:
    gate = InlineGate(LIMIT)
    loaded = {f"incr_{i}": load(gate, stored(f"incr_{i}", incr)) for i in range(100)}
    loaded["decr"] = load(gate, stored("decr", decr))
    assert gate.records == 2, "one per distinct function"
    loaded["decr"] = load(gate, stored("decr", incr, version=2))  # a new version: incr's code
    gc.collect()
    assert gate.records == 1, "decr's old record went with its old version"
    loaded.clear()
    gc.collect()
    assert gate.records == 0
