"""The SDK's event loop (cloudburst._loop.DrivenLoop): who runs it, and that every wait ends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudburst import _loop
from cloudburst._loop import DrivenLoop
from cloudburst.errors import CloudburstTimeoutError

SDK = Path(__file__).resolve().parents[3] / "sdk" / "python"


@pytest.fixture
def driven() -> Iterator[DrivenLoop]:
    loop = DrivenLoop("test-sdk-loop")
    try:
        yield loop
    finally:
        loop.stop()


async def _ident() -> int:
    await asyncio.sleep(0)
    return threading.get_ident()


async def _until(condition: object, timeout: float = 10.0) -> None:
    """Yield to the loop until ``condition()`` holds (a test's own deadline bounds it)."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


def test_a_caller_runs_the_loop_on_its_own_thread(driven: DrivenLoop) -> None:
    def calls_from_a_thread() -> tuple[list[int], int]:
        return [driven.run(_ident(), 10, "test") for _ in range(10)], threading.get_ident()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ran_on, caller = pool.submit(calls_from_a_thread).result(20)
    # (A call that finds the helper running an idle loop asks it to leave; see below.)
    assert ran_on.count(caller) >= len(ran_on) // 2


def test_a_thread_running_its_own_event_loop_is_served_by_the_helper(driven: DrivenLoop) -> None:
    async def inside() -> int:
        # A blocking call from a coroutine (as in Jupyter): this thread's loop is busy.
        return driven.run(_ident(), 10, "test")

    ran_on = asyncio.run(inside())
    assert ran_on != threading.get_ident()


def test_the_main_thread_leaves_the_loop_alone_under_an_application_sigint_handler(
    driven: DrivenLoop,
) -> None:
    def handler(signum: int, frame: object) -> None:
        raise RuntimeError("the application's own Ctrl-C")

    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        ran_on = driven.run(_ident(), 10, "test")
        assert signal.getsignal(signal.SIGINT) is handler, "the handler is left as it was"
        # With Python's own handler, the main thread runs the loop again once the
        # helper, which answered meanwhile, has been asked to leave it (the next call asks).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        runners = [driven.run(_ident(), 10, "test") for _ in range(50)]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ran_on != threading.get_ident(), "the helper ran the call, not the main thread"
    # (Most, not all: a stall of the machine past IDLE_AFTER between two calls lets the
    # helper run the idle loop again, until the next call asks it to leave.)
    assert runners.count(threading.get_ident()) >= len(runners) // 2


def test_a_waiter_takes_the_loop_over_when_the_runner_leaves(driven: DrivenLoop) -> None:
    """B waits while A runs the loop; A's call ends first, and B runs the loop for its own."""
    b_result: concurrent.futures.Future[int] = concurrent.futures.Future()

    async def a_call() -> int:
        # B calls only now that A runs the loop, and A keeps it until B waits on it.
        b_thread.start()
        await _until(lambda: driven._waiters == 1)
        return threading.get_ident()

    async def b_call() -> int:
        await asyncio.sleep(0.05)  # outlasts A's call
        return threading.get_ident()

    def b() -> None:
        try:
            b_result.set_result(driven.run(b_call(), 10, "b"))
        except BaseException as exc:
            b_result.set_exception(exc)

    b_thread = threading.Thread(target=b)

    def a() -> tuple[int, int]:
        return driven.run(a_call(), 10, "a"), threading.get_ident()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        a_ran_on, a_thread = pool.submit(a).result(20)
    try:
        b_ran_on = b_result.result(10)
    finally:
        b_thread.join(10)
    assert a_ran_on == a_thread
    assert b_ran_on == b_thread.ident


def test_back_to_back_calls_take_the_loop_back_from_the_idle_helper(driven: DrivenLoop) -> None:
    deadline = time.monotonic() + _loop.IDLE_AFTER + 10
    while driven._runner != _loop._HELPER:  # the helper runs an idle loop
        assert time.monotonic() < deadline, "the helper never ran the idle loop"
        time.sleep(0.005)

    def calls() -> tuple[list[int], int]:
        return [driven.run(_ident(), 10, "call") for _ in range(20)], threading.get_ident()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        runners, caller = pool.submit(calls).result(30)
    # Most, not all: see the test above.
    assert runners.count(caller) >= len(runners) // 2, "asked, the helper leaves the loop"


def test_callers_on_many_threads_all_finish(driven: DrivenLoop) -> None:
    calls, threads = 200, 8
    runners: set[int] = set()

    async def work(n: int) -> int:
        await asyncio.sleep(0)
        runners.add(threading.get_ident())
        return n * 2

    def caller(offset: int) -> list[int]:
        return [driven.run(work(offset + i), 10, "work") for i in range(calls)]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(caller, [k * calls for k in range(threads)]))
    assert [x for batch in results for x in batch] == [2 * n for n in range(calls * threads)]
    assert runners, "somebody ran the loop"


def test_a_timeout_cancels_the_coroutine_and_the_loop_stays_usable(driven: DrivenLoop) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    began = time.monotonic()
    with pytest.raises(CloudburstTimeoutError, match=r"slow call did not finish within 0\.2s"):
        driven.run(slow(), 0.2, "slow call")
    assert time.monotonic() - began < 5
    assert driven.run(_ident(), 10, "next") > 0, "the loop still answers"
    assert cancelled.wait(10), "the timed-out coroutine was cancelled"


def test_a_wait_on_a_future_nobody_settles_times_out(driven: DrivenLoop) -> None:
    never: concurrent.futures.Future[int] = concurrent.futures.Future()
    with pytest.raises(concurrent.futures.TimeoutError):
        driven.wait(never, 0.05)


def test_timers_fire_while_no_caller_runs_the_loop(driven: DrivenLoop) -> None:
    fired = threading.Event()

    async def set_a_timer() -> None:
        asyncio.get_running_loop().call_later(0.01, fired.set)

    driven.start(set_a_timer())
    assert fired.wait(_loop.IDLE_AFTER + 10), "the helper ran the loop when it was idle"


def test_a_callback_from_another_thread_reaches_a_running_caller(driven: DrivenLoop) -> None:
    arrived = asyncio.Event()

    async def wait_for_callback() -> bool:
        async def arrive() -> None:
            arrived.set()

        threading.Thread(target=driven.start, args=(arrive(),)).start()
        await asyncio.wait_for(arrived.wait(), 10)
        return True

    assert driven.run(wait_for_callback(), 20, "callback")


def test_calling_the_api_from_the_loop_itself_is_refused(driven: DrivenLoop) -> None:
    async def reenter() -> str:
        never: concurrent.futures.Future[int] = concurrent.futures.Future()
        with pytest.raises(RuntimeError, match="cannot be called from its own loop"):
            driven.wait(never, 1)
        coro = _ident()
        with pytest.raises(RuntimeError, match="cannot be called from its own loop"):
            driven.run(coro, 1, "inner")
        return "refused"

    assert driven.run(reenter(), 10, "outer") == "refused"


def test_stop_closes_the_loop_and_ends_the_helper() -> None:
    driven = DrivenLoop("test-stop")
    driven.run(_ident(), 10, "test")
    helper = driven._helper
    driven.stop()
    assert driven.loop.is_closed()
    assert not helper.is_alive()
    driven.stop()  # idempotent


def test_ctrl_c_while_the_main_thread_runs_the_loop() -> None:
    """SIGINT stops the loop between callbacks: KeyboardInterrupt, and the loop still works."""
    script = textwrap.dedent(
        """
        import asyncio, signal, sys
        from cloudburst._loop import DrivenLoop

        driven = DrivenLoop()

        async def long_call():
            print("running", flush=True)
            await asyncio.sleep(60)

        async def answer():
            return 42

        try:
            driven.run(long_call(), 120, "long call")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print("handler restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        print("then", driven.run(answer(), 10, "next call"), flush=True)
        driven.stop()
        """
    )
    path = os.pathsep.join([str(SDK), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "running"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 0, err
    assert out.splitlines() == ["interrupted", "handler restored True", "then 42"], err
