"""Which functions may run on the executor's event loop, and when they earn and lose it."""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import time
from typing import Any

import pytest

from cloudburst_executors.inline import (
    GREENLET,
    LOOP,
    MAX_STRIKES,
    QUICK_RUNS,
    SLOW_FACTOR,
    THREAD,
    InlineGate,
    RunRecord,
)
from cloudburst_executors.inline import library_unused as unused
from cloudburst_executors.library import LoopBridge

# -- the static check: does the code ever read the user library? ----------------------------------


def ignores(cloudburst: Any, a: int) -> int:
    return a + 1


def reads(cloudburst: Any, key: str) -> Any:
    return cloudburst.get(key)


def reads_on_a_rare_branch(cloudburst: Any, a: int) -> int:
    if a < 0:
        cloudburst.put("negative", a)
    return a


def passes_it_on(cloudburst: Any, a: int) -> int:
    return helper(cloudburst, a)


def helper(library: Any, a: int) -> int:
    return a


def closes_over_it(cloudburst: Any, a: int) -> Any:
    return (lambda: cloudburst)()


def rebinds_it(cloudburst: Any, a: int) -> Any:
    cloudburst = a  # stored, then read: it is the library no longer, but we do not track that
    return cloudburst


def looks_at_locals(cloudburst: Any, a: int) -> Any:
    return locals()["cloudburst"]


def star_args(*args: Any) -> Any:
    return args[1]


def generator(cloudburst: Any, a: int) -> Any:
    yield a


async def coroutine(cloudburst: Any, a: int) -> int:
    return a


class CallableObject:
    def __call__(self, cloudburst: Any, a: int) -> int:
        return a


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (ignores, True),
        (lambda _, a: a * a, True),
        (reads, False),
        (reads_on_a_rare_branch, False),
        (passes_it_on, False),
        (closes_over_it, False),
        (rebinds_it, False),
        (looks_at_locals, False),
        (star_args, False),
        (generator, False),
        (coroutine, False),
        (CallableObject(), False),
        (CallableObject, False),
        (functools.partial(ignores, None), False),
        (len, False),
    ],
    ids=lambda v: getattr(v, "__name__", type(v).__name__) if not isinstance(v, bool) else "",
)
def test_only_plain_functions_that_never_read_the_library_qualify(
    target: Any, expected: bool
) -> None:
    assert unused(target) is expected


# -- the gate: earned by quick runs on threads, lost by a slow run on the loop ------------------

LIMIT = 0.001


def earn(gate: InlineGate, record: RunRecord, runs: int, target: Any = ignores) -> None:
    for _ in range(runs):
        gate.ran_on_thread("f", target, record, 1, False)


def test_a_function_runs_on_the_loop_after_enough_quick_runs_in_a_row() -> None:
    gate, record = InlineGate(LIMIT), RunRecord()
    earn(gate, record, QUICK_RUNS - 1)
    assert not gate.allows(record)
    gate.ran_on_thread("f", ignores, record, 0, True)  # one slow run starts the count again
    earn(gate, record, QUICK_RUNS - 1)
    assert not gate.allows(record)
    earn(gate, record, 1)
    assert gate.allows(record)


def test_a_function_that_reads_the_library_runs_on_the_loop_as_a_greenlet() -> None:
    gate, record = InlineGate(LIMIT), RunRecord()
    earn(gate, record, QUICK_RUNS - 1, target=reads)
    assert gate.where(record) == THREAD
    earn(gate, record, 1, target=reads)
    assert gate.where(record) == GREENLET
    assert record.uses_library


def test_a_library_free_function_runs_on_the_loop_itself() -> None:
    gate, record = InlineGate(LIMIT), RunRecord()
    earn(gate, record, QUICK_RUNS)
    assert gate.where(record) == LOOP and not record.uses_library


def test_stretches_between_library_calls_count_as_quick_runs() -> None:
    """One run of a function that calls the library often shows enough quick stretches."""
    gate, record = InlineGate(LIMIT), RunRecord()
    gate.ran_on_thread("f", reads, record, QUICK_RUNS, False)
    assert gate.where(record) == GREENLET
    other = RunRecord()
    earn(gate, other, QUICK_RUNS - 1, target=reads)
    gate.ran_on_thread("f", reads, other, 2, True)
    assert gate.where(other) == THREAD, "a slow stretch restarts the count after it"
    gate.ran_on_thread("f", reads, other, QUICK_RUNS - 2, False)
    assert gate.where(other) == GREENLET


def test_the_bridge_times_user_code_between_library_calls_not_the_waits() -> None:
    loop = asyncio.new_event_loop()
    loop.close()  # never used: the bridge only times here
    bridge = LoopBridge(loop, 1.0)
    bridge.begin(0.05)
    with bridge.blocking():
        time.sleep(0.1)  # waiting for the library is not user code
    bridge.end()
    assert (bridge.streak, bridge.broken) == (2, False)
    bridge.begin(0.01)
    time.sleep(0.05)  # user code over the limit
    with bridge.blocking():
        pass
    bridge.end()
    assert (bridge.streak, bridge.broken) == (1, True)


@pytest.mark.parametrize(
    "target",
    [generator, coroutine, CallableObject(), CallableObject, functools.partial(reads, None)],
)
def test_only_plain_functions_ever_run_on_the_loop(target: Any) -> None:
    gate, record = InlineGate(LIMIT), RunRecord()
    earn(gate, record, QUICK_RUNS * 10, target=target)
    assert gate.where(record) == THREAD
    assert record.eligible is False


def test_chains_go_on_in_greenlets_with_any_function_and_on_the_loop_without_the_library() -> None:
    gate, free, user = InlineGate(LIMIT), RunRecord(), RunRecord()
    earn(gate, free, QUICK_RUNS)
    earn(gate, user, QUICK_RUNS, target=reads)
    assert gate.follows(free, LOOP) and gate.follows(free, GREENLET)
    assert not gate.follows(user, LOOP), "no library calls on the loop outside a greenlet"
    assert gate.follows(user, GREENLET)
    assert not gate.follows(RunRecord(), GREENLET)


def test_a_limit_of_zero_turns_running_on_the_loop_off() -> None:
    gate, record = InlineGate(0.0), RunRecord()
    for _ in range(QUICK_RUNS * 10):
        gate.ran_on_thread("f", ignores, record, 1, False)
    assert not gate.allows(record)


def test_a_slow_run_on_the_loop_sends_it_back_and_it_must_earn_its_place_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate, record = InlineGate(LIMIT), RunRecord()
    earn(gate, record, QUICK_RUNS)
    gate.ran_on_loop("f", record, LIMIT * SLOW_FACTOR)  # at the bound: still fine
    assert gate.allows(record)
    with caplog.at_level(logging.INFO, logger="cloudburst_executors.inline"):
        gate.ran_on_loop("f", record, LIMIT * SLOW_FACTOR * 2)
    assert not gate.allows(record)
    assert "'f' took" in caplog.text and "inline_max_seconds" in caplog.text
    earn(gate, record, QUICK_RUNS)
    assert not gate.allows(record), "after a strike, more quick runs are needed"
    earn(gate, record, QUICK_RUNS * 3)
    assert gate.allows(record)


def test_each_strike_fourfolds_the_runs_needed_up_to_a_cap() -> None:
    gate, record = InlineGate(LIMIT), RunRecord()
    for strike in range(MAX_STRIKES + 3):
        needed = QUICK_RUNS << (2 * min(strike, MAX_STRIKES))
        earn(gate, record, needed - 1)
        assert not gate.allows(record), f"{needed - 1} quick runs after {strike} strikes"
        earn(gate, record, 1)
        assert gate.allows(record), f"{needed} quick runs after {strike} strikes"
        gate.ran_on_loop("f", record, 1.0)
    assert record.strikes == MAX_STRIKES


def on_the_loop() -> tuple[InlineGate, RunRecord]:
    gate, record = InlineGate(LIMIT), RunRecord()
    earn(gate, record, QUICK_RUNS)
    assert gate.allows(record)
    return gate, record


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="per-thread usage is Linux's")
def test_a_run_slow_only_because_the_thread_waited_for_the_cpu_is_no_strike() -> None:
    gate, record = on_the_loop()
    # Far over the limit by the clock, but no CPU time spent and no blocking since `before`.
    gate.ran_on_loop("f", record, LIMIT * SLOW_FACTOR * 10, gate.usage())
    assert gate.allows(record) and record.strikes == 0


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="per-thread usage is Linux's")
def test_a_run_that_blocked_or_computed_too_long_is_a_strike() -> None:
    gate, record = on_the_loop()
    before = gate.usage()
    time.sleep(LIMIT)  # blocking: a voluntary context switch
    gate.ran_on_loop("f", record, LIMIT * SLOW_FACTOR * 2, before)
    assert not gate.allows(record) and record.strikes == 1

    gate, record = on_the_loop()
    before = gate.usage()
    started = time.thread_time()
    while time.thread_time() - started < LIMIT * SLOW_FACTOR * 2:
        pass  # computing: CPU time over the bound
    gate.ran_on_loop("f", record, LIMIT * SLOW_FACTOR * 2, before)
    assert not gate.allows(record) and record.strikes == 1
