"""The SDK's event loop drivers (cloudburst._loop): who runs the loop, and that every wait ends.

Tests taking ``driver`` run under both drivers; those taking ``driven``, under
the caller-driven one only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cloudburst import _loop, _loop_internals
from cloudburst._core import PendingCall
from cloudburst._loop import DrivenLoop, LoopDriver, ThreadedLoop, new_driver
from cloudburst.errors import CloudburstTimeoutError, InvalidArgumentError

SDK = Path(__file__).resolve().parents[3] / "sdk" / "python"
DRIVER_CLASSES: dict[str, type[LoopDriver]] = {"caller": DrivenLoop, "thread": ThreadedLoop}


@pytest.fixture
def driven() -> Iterator[DrivenLoop]:
    loop = DrivenLoop("test-sdk-loop")
    try:
        yield loop
    finally:
        loop.stop()


@pytest.fixture(params=_loop.DRIVERS)
def driver(request: pytest.FixtureRequest) -> Iterator[LoopDriver]:
    loop = new_driver(request.param, "test-sdk-loop")
    assert isinstance(loop, DRIVER_CLASSES[request.param])
    try:
        yield loop
    finally:
        loop.stop()


@pytest.fixture
def no_driver_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_loop.DRIVER_ENV, raising=False)


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


def test_a_thread_running_its_own_event_loop_is_served_by_another(driver: LoopDriver) -> None:
    async def inside() -> int:
        # A blocking call from a coroutine (as in Jupyter): this thread's loop is busy.
        return driver.run(_ident(), 10, "test")

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


def test_a_result_wakes_only_the_caller_waiting_for_it(
    driven: DrivenLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three callers wait while another runs the loop; the first's result wakes it alone."""
    wakes: dict[int, int] = {}

    class CountingCondition(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            woken = super().wait(timeout)
            if self._lock is driven._lock:  # type: ignore[attr-defined]
                me = threading.get_ident()
                wakes[me] = wakes.get(me, 0) + 1
            return woken

    monkeypatch.setattr(threading, "Condition", CountingCondition)
    futures: list[concurrent.futures.Future[int]] = [concurrent.futures.Future() for _ in range(3)]
    results: dict[int, int] = {}

    def waiter(index: int) -> None:
        results[index] = driven.wait(futures[index], 20)

    waiters = [threading.Thread(target=waiter, args=(i,)) for i in range(3)]

    async def hold_the_loop() -> None:
        for thread in waiters:
            thread.start()
        await _until(lambda: len(driven._sleeping) == 3)
        futures[0].set_result(10)
        await _until(lambda: not waiters[0].is_alive())
        others = [t.ident or 0 for t in waiters[1:]]
        assert all(wakes.get(ident, 0) == 0 for ident in others), wakes
        futures[1].set_result(11)
        futures[2].set_result(12)

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(driven.run, hold_the_loop(), 20, "hold").result(30)
    finally:
        for future in futures:
            if not future.done():
                future.set_result(-1)
        for thread in waiters:
            if thread.ident is not None:
                thread.join(10)
    assert results == {0: 10, 1: 11, 2: 12}
    assert wakes.get(waiters[0].ident or 0) == 1


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


def test_callers_on_many_threads_all_finish(driver: LoopDriver) -> None:
    calls, threads = 200, 8
    runners: set[int] = set()

    async def work(n: int) -> int:
        await asyncio.sleep(0)
        runners.add(threading.get_ident())
        return n * 2

    def caller(offset: int) -> list[int]:
        return [driver.run(work(offset + i), 10, "work") for i in range(calls)]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(caller, [k * calls for k in range(threads)]))
    assert [x for batch in results for x in batch] == [2 * n for n in range(calls * threads)]
    assert runners, "somebody ran the loop"


def test_a_timeout_cancels_the_coroutine_and_the_loop_stays_usable(driver: LoopDriver) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    began = time.monotonic()
    with pytest.raises(CloudburstTimeoutError, match=r"slow call did not finish within 0\.2s"):
        driver.run(slow(), 0.2, "slow call")
    assert time.monotonic() - began < 5
    assert driver.run(_ident(), 10, "next") > 0, "the loop still answers"
    assert cancelled.wait(10), "the timed-out coroutine was cancelled"


def test_a_wait_on_a_future_nobody_settles_times_out(driver: LoopDriver) -> None:
    never: concurrent.futures.Future[int] = concurrent.futures.Future()
    with pytest.raises(concurrent.futures.TimeoutError):
        driver.wait(never, 0.05)


def test_timers_fire_while_no_caller_runs_the_loop(driver: LoopDriver) -> None:
    fired = threading.Event()

    async def set_a_timer() -> None:
        asyncio.get_running_loop().call_later(0.01, fired.set)

    driver.start(set_a_timer())
    assert fired.wait(_loop.IDLE_AFTER + 10), "the loop ran while no caller waited"


def test_a_callback_from_another_thread_reaches_a_running_caller(driver: LoopDriver) -> None:
    arrived = asyncio.Event()

    async def wait_for_callback() -> bool:
        async def arrive() -> None:
            arrived.set()

        threading.Thread(target=driver.start, args=(arrive(),)).start()
        await asyncio.wait_for(arrived.wait(), 10)
        return True

    assert driver.run(wait_for_callback(), 20, "callback")


def test_calling_the_api_from_the_loop_itself_is_refused(driver: LoopDriver) -> None:
    async def reenter() -> str:
        never: concurrent.futures.Future[int] = concurrent.futures.Future()
        with pytest.raises(RuntimeError, match="cannot be called from its own loop"):
            driver.wait(never, 1)
        coro = _ident()
        with pytest.raises(RuntimeError, match="cannot be called from its own loop"):
            driver.run(coro, 1, "inner")
        return "refused"

    assert driver.run(reenter(), 10, "outer") == "refused"


def test_errors_of_the_coroutine_reach_the_caller(driver: LoopDriver) -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("from the loop")

    with pytest.raises(LookupError, match="from the loop"):
        driver.run(fails(), 10, "failing call")
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(KeyError("settled"))
    with pytest.raises(KeyError, match="settled"):
        driver.wait(failed, 1)
    assert driver.run(_ident(), 10, "next") > 0, "the loop still answers"


def test_a_timeout_error_of_the_coroutine_is_not_taken_for_the_wait_running_out(
    driver: LoopDriver,
) -> None:
    """TimeoutError is concurrent.futures.TimeoutError: only the driver's own wait may say so."""

    async def own_timeout() -> None:
        await asyncio.wait_for(asyncio.sleep(30), 0.01)

    with pytest.raises(TimeoutError) as raised:
        driver.run(own_timeout(), 30, "timing out call")
    assert not isinstance(raised.value, CloudburstTimeoutError), raised.value

    async def deadline() -> None:
        await asyncio.sleep(0)
        raise CloudburstTimeoutError("get('k') did not finish before its deadline")

    with pytest.raises(CloudburstTimeoutError, match=r"^get\('k'\) did not finish before its"):
        driver.run(deadline(), 30, "reading")

    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    failed.set_exception(CloudburstTimeoutError("its own"))
    assert driver.settled(failed, 1)
    with pytest.raises(CloudburstTimeoutError, match=r"^its own$"):
        driver.wait(failed, 1)
    never: concurrent.futures.Future[int] = concurrent.futures.Future()
    assert not driver.settled(never, 0.05)
    assert driver.run(_ident(), 10, "next") > 0, "the loop still answers"


def test_a_pending_call_settled_with_a_timeout_error_raises_it_as_it_is(
    driver: LoopDriver,
) -> None:
    error = CloudburstTimeoutError("the call's deadline passed at the scheduler")
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
    outcome.set_exception(error)
    direct = PendingCall(driver, None, outcome)
    with pytest.raises(CloudburstTimeoutError) as raised:
        direct.wait_accepted(10)
    assert raised.value is error
    with pytest.raises(CloudburstTimeoutError) as raised:
        direct.wait_outcome(10)
    assert raised.value is error

    accepted: concurrent.futures.Future[str] = concurrent.futures.Future()
    accepted.set_exception(error)
    with pytest.raises(CloudburstTimeoutError) as raised:
        PendingCall(driver, accepted, None).wait_accepted(10)
    assert raised.value is error

    unanswered = PendingCall(driver, concurrent.futures.Future(), concurrent.futures.Future())
    with pytest.raises(CloudburstTimeoutError, match=r"not accepted within 0\.1s"):
        unanswered.wait_accepted(0.1)
    unanswered.response_key = "k"
    with pytest.raises(CloudburstTimeoutError, match=r"the result at 'k' was not ready within"):
        unanswered.wait_outcome(0.05)


def test_a_wait_returns_once_another_thread_settles_the_future(driver: LoopDriver) -> None:
    future: concurrent.futures.Future[str] = concurrent.futures.Future()

    async def settle_soon() -> None:
        await asyncio.sleep(0.01)
        future.set_result("settled")

    driver.start(settle_soon())
    assert driver.wait(future, 10) == "settled"


@pytest.mark.parametrize("choice", _loop.DRIVERS)
def test_stop_closes_the_loop_and_ends_its_threads(choice: str) -> None:
    name = f"test-stop-{choice}"
    driver = new_driver(choice, name)
    assert driver.run(_ident(), 10, "test") > 0
    assert any(t.name == name for t in threading.enumerate())
    driver.stop()
    assert driver.loop.is_closed()
    assert not any(t.name == name for t in threading.enumerate()), "its thread ended"
    driver.stop()  # idempotent


@pytest.mark.parametrize("choice", _loop.DRIVERS)
def test_a_coroutine_for_a_closed_loop_is_closed_with_the_error(choice: str) -> None:
    """The caller of start or run never closes the coroutine (the loop may have taken it)."""
    driver = new_driver(choice, f"test-closed-{choice}")
    driver.stop()
    started, ran = _ident(), _ident()
    with pytest.raises(RuntimeError, match="closed"):
        driver.start(started)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="closed"):
        driver.run(ran, 10, "test")
    assert inspect.getcoroutinestate(started) == inspect.CORO_CLOSED
    assert inspect.getcoroutinestate(ran) == inspect.CORO_CLOSED


@pytest.mark.parametrize("choice", _loop.DRIVERS)
def test_ctrl_c_while_the_main_thread_waits(choice: str) -> None:
    """SIGINT: KeyboardInterrupt in the caller, the coroutine is cancelled, the loop still works.

    With the caller-driven driver the main thread runs the loop and stops it
    between two callbacks; with the loop-thread driver it waits for the loop's
    thread.
    """
    script = textwrap.dedent(
        """
        import asyncio, signal, sys, threading
        from cloudburst._loop import new_driver

        # As in an interactive process, whatever this one inherited: a shell that starts
        # jobs in the background without job control has them ignore SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        driver = new_driver()
        print(type(driver).__name__, flush=True)
        cancelled = threading.Event()

        async def long_call():
            print("running", flush=True)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def answer():
            return 42

        try:
            driver.run(long_call(), 120, "long call")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print("handler restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        print("then", driver.run(answer(), 10, "next call"), flush=True)
        print("cancelled", cancelled.wait(10), flush=True)
        driver.stop()
        """
    )
    path = os.pathsep.join([str(SDK), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, _loop.DRIVER_ENV: choice}
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == DRIVER_CLASSES[choice].__name__
        assert child.stdout.readline().strip() == "running"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 0, err
    assert out.splitlines() == [
        "interrupted",
        "handler restored True",
        "then 42",
        "cancelled True",
    ], err


def _interrupt_the_handover(
    monkeypatch: pytest.MonkeyPatch, driver: LoopDriver, before_raising: Any
) -> None:
    """Make the next handover to ``driver``'s loop end in a Ctrl-C, once it was handed over.

    A SIGINT handled in the main thread raises KeyboardInterrupt wherever that
    thread is; this puts it in the window where the loop already has the
    coroutine but the caller has not yet begun to wait for it. The handover's
    callback runs after ``before_raising(run)``, where ``run`` runs it on the loop.
    """
    handover = driver.loop.call_soon_threadsafe

    def handed_over_then_interrupted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(driver.loop, "call_soon_threadsafe", handover)  # this once only
        before_raising(lambda run: handover(run, callback, *args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(driver.loop, "call_soon_threadsafe", handed_over_then_interrupted)


def test_ctrl_c_after_the_loop_started_the_coroutine_but_before_the_wait_cancels_it(
    driver: LoopDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def long_call() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def hand_over_and_let_it_start(hand_over: Any) -> None:
        hand_over(lambda callback, *args, **kwargs: callback(*args, **kwargs))
        assert started.wait(10), "the loop did not start the coroutine"

    _interrupt_the_handover(monkeypatch, driver, hand_over_and_let_it_start)
    with pytest.raises(KeyboardInterrupt):
        driver.run(long_call(), 60, "long call")
    assert cancelled.wait(10), "the coroutine the loop was running was not cancelled"
    assert driver.run(_answer(), 10, "next call") == 42


def test_a_coroutine_given_up_before_the_loop_took_it_is_closed_without_starting(
    driver: LoopDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    taken = threading.Event()
    started = threading.Event()

    async def never() -> None:
        started.set()

    def take_after_the_gate(callback: Any, *args: Any, **kwargs: Any) -> None:
        try:
            assert gate.wait(10)
            callback(*args, **kwargs)
        finally:
            taken.set()

    _interrupt_the_handover(monkeypatch, driver, lambda hand_over: hand_over(take_after_the_gate))
    coro = never()
    with pytest.raises(KeyboardInterrupt):
        driver.run(coro, 60, "call")
    gate.set()  # the caller gave up: now the loop takes the coroutine over
    assert taken.wait(10), "the loop did not take the coroutine"
    assert driver.run(_answer(), 10, "next call") == 42  # a loop turn after the take
    assert not started.is_set()
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


async def _answer() -> int:
    return 42


# -- choosing a driver -------------------------------------------------------------------------


def _drivers_made(*args: str | None) -> list[type[LoopDriver]]:
    made = [new_driver(arg) for arg in args]
    for driver in made:
        driver.stop()
    return [type(driver) for driver in made]


@pytest.mark.usefixtures("no_driver_env")
def test_the_caller_driven_loop_is_the_default_and_an_argument_picks_a_driver() -> None:
    assert _drivers_made(None, "caller", "thread") == [DrivenLoop, DrivenLoop, ThreadedLoop]


def test_the_environment_picks_a_driver_and_the_argument_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_loop.DRIVER_ENV, " Thread ")
    assert _drivers_made(None, "caller") == [ThreadedLoop, DrivenLoop]
    monkeypatch.setenv(_loop.DRIVER_ENV, "caller")
    assert _drivers_made(None, "thread") == [DrivenLoop, ThreadedLoop]
    monkeypatch.setenv(_loop.DRIVER_ENV, "")
    assert _drivers_made(None) == [DrivenLoop]


def test_an_unknown_driver_is_refused_naming_the_valid_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = set(threading.enumerate())
    with pytest.raises(ValueError, match=r"loop_driver='fast' is not a loop driver") as raised:
        new_driver("fast")
    assert isinstance(raised.value, InvalidArgumentError)
    assert "'caller', 'thread'" in str(raised.value)
    monkeypatch.setenv(_loop.DRIVER_ENV, "uv")
    with pytest.raises(InvalidArgumentError, match=r"CLOUDBURST_LOOP_DRIVER='uv' .*'thread'"):
        new_driver()
    assert set(threading.enumerate()) <= threads, "nothing was started"


@pytest.mark.usefixtures("no_driver_env")
def test_a_missing_private_name_makes_the_loop_thread_driver_the_choice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_loop_internals, "missing", lambda loop: ("loop._run_once",))
    monkeypatch.setattr(_loop, "_reported_fallbacks", set())
    with caplog.at_level(logging.INFO, logger=_loop.__name__):
        assert _drivers_made(None, "caller", None) == [ThreadedLoop] * 3
    said = [r.getMessage() for r in caplog.records if r.name == _loop.__name__]
    assert len(said) == 1, "said once"
    assert "loop._run_once" in said[0] and "loop-thread driver" in said[0]
    with pytest.raises(RuntimeError, match=r"needs loop\._run_once"):
        DrivenLoop("test-no-step")


def test_the_internals_resolver_names_what_a_loop_lacks() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert _loop_internals.missing(loop) == (), "CPython's own loop has all of them"
    finally:
        loop.close()
    assert _loop_internals.missing(SimpleNamespace()) == (  # type: ignore[arg-type]
        "loop._run_once",
        "loop._asyncgen_firstiter_hook",
        "loop._asyncgen_finalizer_hook",
        "loop._thread_id",
    )


def test_the_loop_thread_driver_uses_no_private_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def private(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a private name was used")

    for name in ("getsignal", "setsignal", "get_running_loop"):
        monkeypatch.setattr(_loop, name, private)
    for name in ("enter", "leave", "missing"):
        monkeypatch.setattr(_loop_internals, name, private)
    driver = new_driver("thread")
    try:
        assert [driver.run(_ident(), 10, "call") for _ in range(3)]
        with pytest.raises(CloudburstTimeoutError):
            driver.run(asyncio.sleep(30), 0.05, "slow call")
    finally:
        driver.stop()
