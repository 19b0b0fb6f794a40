"""The event loop behind the synchronous API, and the two drivers that run it.

grpc.aio needs an asyncio loop; the SDK's API is synchronous. A driver runs the
loop and lets callers on any thread wait for what it computes
(:class:`LoopDriver`). There are two:

- ``"caller"`` (the default, :class:`DrivenLoop`): the threads that wait for a
  result run the loop themselves, and a helper thread runs it in between;
- ``"thread"`` (:class:`ThreadedLoop`): the loop runs on a thread of its own,
  and callers wait for it to answer.

Pick one with ``CloudburstConnection(..., loop_driver="thread")`` or the
environment variable ``CLOUDBURST_LOOP_DRIVER=thread``; the argument wins.
The caller-driven driver uses private asyncio and CPython names (all of them
in :mod:`cloudburst._loop_internals`); where one is missing, as on a loop from
an event loop policy such as uvloop's, the SDK uses the loop-thread driver.

Why callers run the loop: with the loop on a thread of its own, every call
costs two thread wake-ups: the caller wakes the loop's thread to send, and the
loop's thread wakes the caller with the answer. On a virtual machine a wake-up
costs tens of microseconds, a good part of a call's round trip. So with the
caller-driven driver the thread that waits for a result runs the loop itself
until the result is in:

- a caller that finds the loop free runs it (:meth:`DrivenLoop.wait`); a
  thread that already runs an event loop of its own (as in Jupyter), or the
  main thread while the application has a SIGINT handler of its own, never
  does: the helper thread runs the loop for it;
- a caller that finds another thread running the loop waits for its result
  while that thread runs it; when the runner leaves, a caller waiting alone
  runs the loop itself, and several waiting ones leave it to the helper,
  which runs it for them without a break until a caller waits alone again;
- when nobody has run the loop for :data:`IDLE_AFTER` seconds, the helper runs
  it, so timers and what the server sends between calls are handled; the next
  caller gets its answer from the helper and asks it to leave the loop to it.

Ctrl-C while a caller on the main thread runs the loop stops the loop between
two callbacks, then raises KeyboardInterrupt in the caller, so no callback (of
this package or of grpc) is cut off halfway. Under either driver, Ctrl-C while
a caller waits in :meth:`LoopDriver.run` cancels the coroutine it waits for.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from cloudburst import _loop_internals
from cloudburst._loop_internals import get_running_loop, getsignal, setsignal
from cloudburst.errors import CloudburstTimeoutError, InvalidArgumentError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The environment variable that picks the driver when the connection is not told.
DRIVER_ENV = "CLOUDBURST_LOOP_DRIVER"
#: The drivers' names, the default first.
DRIVERS = ("caller", "thread")
#: Seconds without a caller running the loop before the helper thread runs it.
IDLE_AFTER = 0.1
#: The longest single wait (an unbounded one is a series of these).
_LONGEST_WAIT = 3600.0
#: SIGINT handlers under which the main thread may run the loop: Python's own
#: (replaced by one that stops the loop first), the system's default (the
#: process ends) and ignoring the signal.
_SAFE_SIGINT = (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN)
#: The helper's thread ident while it runs the loop (no thread has ident -1).
_HELPER = -1
_REENTERED = "the synchronous cloudburst API cannot be called from its own loop"
_reported_fallbacks: set[tuple[str, ...]] = set()


def new_driver(choice: str | None = None, name: str = "cloudburst-sdk") -> LoopDriver:
    """A started loop driver: ``choice``, else ``$CLOUDBURST_LOOP_DRIVER``, else ``"caller"``.

    ``"caller"`` gives the loop-thread driver instead where this Python (or
    the loop its event loop policy makes) lacks a private name it needs.

    Raises:
        InvalidArgumentError: The choice (a ValueError) is not one of :data:`DRIVERS`.
    """
    if choice is None:
        choice = os.environ.get(DRIVER_ENV, "").strip().lower() or DRIVERS[0]
        source = DRIVER_ENV
    else:
        source = "loop_driver"
    if choice not in DRIVERS:
        raise InvalidArgumentError(
            f"{source}={choice!r} is not a loop driver; use one of "
            + ", ".join(repr(d) for d in DRIVERS)
        )
    loop = asyncio.new_event_loop()
    if choice == "caller":
        absent = _loop_internals.missing(loop)
        if not absent:
            return DrivenLoop(name, loop)
        if absent not in _reported_fallbacks:
            _reported_fallbacks.add(absent)
            logger.info(
                "the caller-driven loop needs %s, which this Python or its %s lacks; "
                "using the loop-thread driver",
                ", ".join(absent),
                type(loop).__name__,
            )
    return ThreadedLoop(name, loop)


class LoopDriver(abc.ABC):
    """Runs the SDK's asyncio loop and lets callers on any thread wait for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = asyncio.new_event_loop() if loop is None else loop
        self._started: set[asyncio.Task[None]] = set()

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task on the loop; from any thread.

        The loop owns ``coro`` from the call on: the caller must not close it,
        even when this raises (a Ctrl-C can land after the loop took it).

        Raises:
            RuntimeError: The loop is closed (``coro`` is closed, never started).
        """
        try:
            self._start(coro)
        except RuntimeError:  # raised before the loop took it
            coro.close()
            raise

    @abc.abstractmethod
    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Hand ``coro`` to the loop, which runs it in a task; from any thread."""

    @abc.abstractmethod
    def settled(self, future: concurrent.futures.Future[Any], timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for a future the loop settles; whether it is settled.

        This tells the wait running out from a future settled with an error of
        its own: a ``TimeoutError`` it carries (an ``asyncio.timeout`` or a
        socket's, or a ``CloudburstTimeoutError``) is no reason to say that
        the wait ran out.
        """

    def wait(self, future: concurrent.futures.Future[T], timeout: float | None) -> T:
        """Wait up to ``timeout`` seconds for a future the loop settles.

        Returns the future's result (or raises its exception). Callers that
        must tell a ``TimeoutError`` of the future's from this wait running
        out use :meth:`settled`.

        Raises:
            concurrent.futures.TimeoutError: It was not settled in time.
        """
        if not self.settled(future, timeout):
            raise concurrent.futures.TimeoutError()
        return future.result()

    @abc.abstractmethod
    def stop(self) -> None:
        """Cancel what is left on the loop, stop running it and close it; idempotent."""

    @abc.abstractmethod
    def _on_loop(self) -> bool:
        """Whether this thread is running the loop now."""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coro`` on the loop and wait for it, at most ``timeout`` seconds.

        Ctrl-C while waiting cancels ``coro`` and raises KeyboardInterrupt.

        What ``coro`` raises reaches the caller as it is, a ``TimeoutError``
        of its own too.

        Raises:
            CloudburstTimeoutError: It did not finish in time (it is cancelled).
        """
        if self._on_loop():
            coro.close()
            raise RuntimeError(_REENTERED)
        # The future exists before the coroutine is handed over: the loop may start the
        # coroutine before the handover returns here, and a Ctrl-C that lands in between
        # must find something to cancel (asyncio.run_coroutine_threadsafe returns its
        # future only after the handover).
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            try:
                self.loop.call_soon_threadsafe(_run_for, self.loop, coro, future)
            except RuntimeError:  # the loop is closed: nothing was handed over
                coro.close()
                raise
            done = self.settled(future, timeout)
        except KeyboardInterrupt:
            future.cancel()
            raise
        if done:
            return future.result()
        future.cancel()
        raise CloudburstTimeoutError(f"{what} did not finish within {timeout:.1f}s")

    def _create(self, coro: Coroutine[Any, Any, None]) -> None:
        self._keep(self.loop.create_task(coro))

    def _keep(self, task: asyncio.Task[None]) -> None:
        """Hold a started task until it ends (the loop holds tasks only weakly)."""
        self._started.add(task)
        task.add_done_callback(self._started.discard)


class ThreadedLoop(LoopDriver):
    """An asyncio loop on a daemon thread of its own; callers wait for its answers.

    It uses asyncio's public API only.
    """

    def __init__(
        self, name: str = "cloudburst-sdk", loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        super().__init__(loop)
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        self.loop.call_soon_threadsafe(self._create, coro)

    def settled(self, future: concurrent.futures.Future[Any], timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for a future the loop settles; whether it is settled."""
        if future.done():
            return True
        if self._on_loop():
            raise RuntimeError(_REENTERED)
        done, _ = concurrent.futures.wait([future], timeout)
        return bool(done)

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def stop(self) -> None:
        """Cancel what is left on the loop, stop its thread and close it; idempotent."""
        if self._on_loop():
            raise RuntimeError(_REENTERED)
        with self._lock:
            if self._stopping or self.loop.is_closed():
                return
            self._stopping = True
        with contextlib.suppress(Exception):
            self.run(_drain(self.loop), 10, "stopping")
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class DrivenLoop(LoopDriver):
    """An asyncio loop run by the threads waiting on it, and by a helper in between.

    Raises:
        RuntimeError: This Python, or ``loop``, lacks a private name it needs
            (see :mod:`cloudburst._loop_internals`); :func:`new_driver` checks first.
    """

    def __init__(
        self, name: str = "cloudburst-sdk", loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        super().__init__(loop)
        absent = _loop_internals.missing(self.loop)
        if absent:
            if loop is None:
                self.loop.close()
            raise RuntimeError(
                f"the caller-driven loop needs {', '.join(absent)}, which this Python or its "
                f"{type(self.loop).__name__} lacks; use the loop driver 'thread'"
            )
        self._lock = threading.Lock()
        self._sleeping: set[threading.Condition] = set()
        """One condition per thread waiting while another runs the loop (on ``_lock``).

        A result wakes only the thread waiting for it; the loop left free wakes them all.
        """
        self._runner = 0
        """The ident of the thread running the loop (``_HELPER`` for the helper), 0 when none."""
        self._waiters = 0
        """Threads waiting for a result while another thread runs the loop."""
        self._passive = 0
        """Those of the waiters that may not run the loop themselves (the helper must)."""
        self._yield_asked = False
        """A caller asked the helper to leave the loop to it."""
        self._last_run = time.monotonic()
        """When a caller last stopped running the loop."""
        self._wake = threading.Event()
        self._stopping = False
        self._interrupted = False
        self._helper = threading.Thread(target=self._help, name=name, daemon=True)
        self._helper.start()

    # -- the API -------------------------------------------------------------------

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Hand ``coro`` to the loop, which runs it in a task; from any thread.

        The task's first step is the loop's first callback for it, with no
        callback before it that creates the task.
        """
        with self._lock:
            if self._runner == 0:
                # Nobody waits in the loop's selector, so there is nobody to wake:
                # whoever runs the loop next (the lock orders it after this) finds
                # the task's first step ready.
                self._keep(self.loop.create_task(coro))
                return
        self.loop.call_soon_threadsafe(self._create, coro)

    def _on_loop(self) -> bool:
        return self._runner == threading.get_ident()

    def settled(self, future: concurrent.futures.Future[Any], timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for a future the loop settles, running it meanwhile.

        Returns whether it is settled.
        """
        if future.done():
            if self._runner == _HELPER and self._may_run():
                # The helper answered before this caller waited (it runs an idle loop):
                # a caller back so soon does better running the loop itself next time.
                with self._lock:
                    self._ask_helper_to_leave()
            return True
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        if self._runner == me:
            raise RuntimeError(_REENTERED)
        while not future.done():
            remaining = min(deadline - time.monotonic(), _LONGEST_WAIT)
            if remaining <= 0:
                return False
            may_run = self._may_run()
            with self._lock:
                runner = self._runner
                if runner == 0 and may_run:
                    self._runner = me
                else:
                    self._waiters += 1
                    if not may_run:
                        self._passive += 1
                        if runner == 0:
                            self._wake.set()  # this thread may not run the loop: the helper must
                    elif runner == _HELPER:
                        self._ask_helper_to_leave()
            if runner == 0 and may_run:
                try:
                    self._run_until(future, remaining)
                finally:
                    self._leave()
                continue
            self._wait_while_others_run(future, remaining, may_run)
        return True

    def _ask_helper_to_leave(self) -> None:
        """Ask the helper to leave the loop to this caller, if it waits alone (lock held)."""
        if (
            self._runner == _HELPER
            and self._waiters <= 1
            and not self._passive
            and not self._yield_asked
            and not self.loop.is_closed()
        ):
            self._yield_asked = True
            self.loop.call_soon_threadsafe(self._helper_leaves)

    def _wait_while_others_run(
        self, future: concurrent.futures.Future[Any], seconds: float, may_run: bool
    ) -> None:
        """Wait until ``future`` is settled or, if this thread may run the loop, it is free.

        (Registered as a waiter by :meth:`wait`, this unregisters.)
        """
        woken = threading.Condition(self._lock)
        future.add_done_callback(functools.partial(self._result_in, woken))
        deadline = time.monotonic() + seconds
        with self._lock:
            self._sleeping.add(woken)
            try:
                while not future.done() and not (
                    may_run and self._runner == 0 and self._waiters == 1
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    woken.wait(left)
            finally:
                self._sleeping.discard(woken)
                self._waiters -= 1
                if not may_run:
                    self._passive -= 1
                if self._runner == 0 and self._waiters:
                    # This waiter gave up while the loop was free: whoever waits on takes it.
                    self._wake_sleepers()
                    self._wake.set()

    def _result_in(self, woken: threading.Condition, _future: object) -> None:
        """A waiter's result is in: wake that waiter only."""
        with self._lock:
            woken.notify()

    def _wake_sleepers(self) -> None:
        """Wake every thread waiting while another runs the loop (lock held)."""
        for woken in self._sleeping:
            woken.notify()

    def stop(self) -> None:
        """Cancel what is left on the loop, stop the helper and close the loop; idempotent."""
        if self.loop.is_closed() or self._stopping:
            return
        with contextlib.suppress(Exception):
            self.run(_drain(self.loop), 10, "stopping")
        with self._lock:
            self._stopping = True
            if self._runner == _HELPER:
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._wake.set()
        self._helper.join(timeout=10)
        with self._lock:
            idle = self._runner == 0
        if idle and not self._helper.is_alive():
            self.loop.close()

    # -- callers running the loop --------------------------------------------------

    def _run_until(self, future: concurrent.futures.Future[Any], seconds: float) -> None:
        """Run the loop on this thread until ``future`` is settled or ``seconds`` pass."""
        loop = self.loop
        with self._interruptible():
            # One turn of the loop at a time (what run_forever does, without its
            # per-run set-up): the caller checks its future after every turn.
            deadline = loop.time() + seconds
            timer = loop.call_at(deadline, _nothing)  # wakes the selector at the deadline
            step, saved = _loop_internals.enter(loop)
            try:
                while not future.done() and not self._interrupted and loop.time() < deadline:
                    step()
            finally:
                _loop_internals.leave(loop, saved)
                timer.cancel()

    def _may_run(self) -> bool:
        """Whether this thread may run the loop now.

        Not when it runs an event loop of its own, and not on the main thread
        while the application has a SIGINT handler of its own: that handler
        could raise in the middle of a callback of the loop.
        """
        if self._stopping or get_running_loop() is not None:
            return False
        if threading.current_thread() is not threading.main_thread():
            return True
        return getsignal(signal.SIGINT) in _SAFE_SIGINT

    @contextlib.contextmanager
    def _interruptible(self) -> Any:
        """On the main thread, let Ctrl-C stop the loop between callbacks, then raise."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            yield  # Ctrl-C ends the process or is ignored: nothing raises in the loop
            return

        def interrupt(signum: int, frame: Any) -> None:
            self._interrupted = True
            self.loop.call_soon_threadsafe(_nothing)  # end the selector's wait

        setsignal(signal.SIGINT, interrupt)
        try:
            yield
        finally:
            setsignal(signal.SIGINT, previous)
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt

    def _leave(self) -> None:
        """Stop running the loop: a lone waiter that may run it takes over, else the helper.

        With several callers waiting, the helper runs the loop for all of them
        without a break, rather than each handing it to the next in turn.
        """
        with self._lock:
            self._runner = 0
            self._last_run = time.monotonic()
            if self._waiters == 1 and not self._passive:
                self._wake_sleepers()
                return
            waiting = self._waiters
        if waiting:
            self._wake.set()

    # -- the helper thread ---------------------------------------------------------

    def _help(self) -> None:
        """Run the loop for waiters nobody runs it for, and while no caller has for a while."""
        while True:
            self._wake.clear()  # before looking, so that a wake-up meanwhile is not lost
            with self._lock:
                if self._stopping:
                    return
                idle = time.monotonic() - self._last_run
                free = self._runner == 0
                # A lone waiter that may run the loop takes it itself when it is freed.
                lone = self._waiters == 1 and not self._passive
                take = free and (
                    (self._waiters > 0 and not lone) or (idle >= IDLE_AFTER and not self._waiters)
                )
                if take:
                    self._runner = _HELPER
                elif free and lone:
                    self._wake_sleepers()  # in case it was waiting for the helper meanwhile
            if not take:
                # A caller that stops running the loop wakes the helper only when
                # others wait; otherwise the helper looks again once it may be idle.
                self._wake.wait(IDLE_AFTER - idle if free else IDLE_AFTER)
                continue
            try:
                self.loop.run_forever()
            finally:
                with self._lock:
                    self._runner = 0
                    self._yield_asked = False
                    self._last_run = time.monotonic()
                    self._wake_sleepers()

    def _helper_leaves(self) -> None:
        """On the loop: the helper leaves it to the caller that asked for it."""
        with self._lock:
            if self._runner != _HELPER or not self._yield_asked:
                return
            if self._passive or self._waiters > 1:
                self._yield_asked = False  # it serves them; the next lone caller asks again
            else:
                self.loop.stop()


def _nothing() -> None:
    pass


def _run_for(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    future: concurrent.futures.Future[T],
) -> None:
    """On the loop: run ``coro`` in a task that settles ``future``, which cancels it.

    A ``future`` cancelled already (the caller gave up before the loop got
    here) closes ``coro`` without starting it.
    """
    if future.cancelled():
        coro.close()
        return
    try:
        task = loop.create_task(coro)
    except BaseException as exc:
        coro.close()
        if future.set_running_or_notify_cancel():
            future.set_exception(exc)
        raise
    task.add_done_callback(functools.partial(_settle, future))
    # Holds the task too (the loop holds tasks only weakly) until the caller drops ``future``.
    future.add_done_callback(functools.partial(_cancel_on, loop, task))


def _settle(future: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    """On the loop: pass the ended ``task``'s result, error or cancellation to ``future``."""
    if task.cancelled():
        future.cancel()
    if not future.set_running_or_notify_cancel():
        return  # cancelled
    error = task.exception()
    if error is None:
        future.set_result(task.result())
    else:
        future.set_exception(error)


def _cancel_on(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], future: concurrent.futures.Future[Any]
) -> None:
    """From any thread: ``future`` is done; cancel ``task`` if that was a cancellation."""
    if future.cancelled():
        with contextlib.suppress(RuntimeError):  # the loop is closed: the task is gone
            loop.call_soon_threadsafe(task.cancel)


async def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still on the loop and wait for them, so none is destroyed pending."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()
