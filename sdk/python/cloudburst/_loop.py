"""The event loop behind the synchronous API, run by the threads that wait on it.

grpc.aio needs an asyncio loop; the SDK's API is synchronous. With the loop
on a thread of its own, every call would cost two thread wake-ups: the caller
wakes the loop's thread to send, and the loop's thread wakes the caller with
the answer. On a virtual machine a wake-up costs tens of microseconds, a good
part of a call's round trip. So the thread that waits for a result runs the
loop itself until the result is in:

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
this package or of grpc) is cut off halfway.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: no enum wrapping per call
import asyncio
import concurrent.futures
import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cloudburst.errors import CloudburstTimeoutError

T = TypeVar("T")

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


class DrivenLoop:
    """An asyncio loop run by the threads waiting on it, and by a helper in between."""

    def __init__(self, name: str = "cloudburst-sdk") -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        """Notified when a waiter's result is in, and when the loop is left free."""
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
        self._started: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._interrupted = False
        self._can_step = callable(getattr(self.loop, "_run_once", None))
        """Whether callers can run the loop a turn at a time (else the helper runs it)."""
        self._helper = threading.Thread(target=self._help, name=name, daemon=True)
        self._helper.start()

    # -- the API -------------------------------------------------------------------

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task on the loop; from any thread.

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

    def _create(self, coro: Coroutine[Any, Any, None]) -> None:
        self._keep(self.loop.create_task(coro))

    def _keep(self, task: asyncio.Task[None]) -> None:
        """Hold a started task until it ends (the loop holds tasks only weakly)."""
        self._started.add(task)
        task.add_done_callback(self._started.discard)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; :meth:`wait` for the result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coro`` on the loop and wait for it, at most ``timeout`` seconds.

        Raises:
            CloudburstTimeoutError: It did not finish in time (it is cancelled).
        """
        if self._runner == threading.get_ident():
            coro.close()
            raise RuntimeError("the synchronous cloudburst API cannot be called from its own loop")
        future = self.submit(coro)
        try:
            return self.wait(future, timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CloudburstTimeoutError(f"{what} did not finish within {timeout:.1f}s") from None

    def wait(self, future: concurrent.futures.Future[T], timeout: float | None) -> T:
        """Wait up to ``timeout`` seconds for a future the loop settles, running it meanwhile.

        Returns the future's result (or raises its exception).

        Raises:
            concurrent.futures.TimeoutError: It was not settled in time.
        """
        if future.done():
            if self._runner == _HELPER and self._may_run():
                # The helper answered before this caller waited (it runs an idle loop):
                # a caller back so soon does better running the loop itself next time.
                with self._lock:
                    self._ask_helper_to_leave()
            return future.result()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        if self._runner == me:
            raise RuntimeError("the synchronous cloudburst API cannot be called from its own loop")
        while not future.done():
            remaining = min(deadline - time.monotonic(), _LONGEST_WAIT)
            if remaining <= 0:
                raise concurrent.futures.TimeoutError()
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
        return future.result()

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
        future.add_done_callback(self._result_in)
        deadline = time.monotonic() + seconds
        with self._lock:
            try:
                while not future.done() and not (
                    may_run and self._runner == 0 and self._waiters == 1
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._freed.wait(left)
            finally:
                self._waiters -= 1
                if not may_run:
                    self._passive -= 1
                if self._runner == 0 and self._waiters:
                    # This waiter gave up while the loop was free: whoever waits on takes it.
                    self._freed.notify_all()
                    self._wake.set()

    def _result_in(self, _future: object) -> None:
        with self._lock:
            self._freed.notify_all()

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
            step: Callable[[], None] = loop._run_once  # type: ignore[attr-defined]
            deadline = loop.time() + seconds
            timer = loop.call_at(deadline, _nothing)  # wakes the selector at the deadline
            hooks = sys.get_asyncgen_hooks()
            sys.set_asyncgen_hooks(
                firstiter=loop._asyncgen_firstiter_hook,  # type: ignore[attr-defined]
                finalizer=loop._asyncgen_finalizer_hook,  # type: ignore[attr-defined]
            )
            loop._thread_id = threading.get_ident()  # type: ignore[attr-defined]
            asyncio.events._set_running_loop(loop)
            try:
                while not future.done() and not self._interrupted and loop.time() < deadline:
                    step()
            finally:
                asyncio.events._set_running_loop(None)
                loop._thread_id = None  # type: ignore[attr-defined]
                sys.set_asyncgen_hooks(*hooks)
                timer.cancel()

    def _may_run(self) -> bool:
        """Whether this thread may run the loop now.

        Not when it runs an event loop of its own, and not on the main thread
        while the application has a SIGINT handler of its own: that handler
        could raise in the middle of a callback of the loop.
        """
        if not self._can_step or self._stopping or asyncio._get_running_loop() is not None:
            return False
        if threading.current_thread() is not threading.main_thread():
            return True
        return _signal.getsignal(signal.SIGINT) in _SAFE_SIGINT

    @contextlib.contextmanager
    def _interruptible(self) -> Any:
        """On the main thread, let Ctrl-C stop the loop between callbacks, then raise."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = _signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            yield  # Ctrl-C ends the process or is ignored: nothing raises in the loop
            return

        def interrupt(signum: int, frame: Any) -> None:
            self._interrupted = True
            self.loop.call_soon_threadsafe(_nothing)  # end the selector's wait

        _signal.signal(signal.SIGINT, interrupt)
        try:
            yield
        finally:
            _signal.signal(signal.SIGINT, previous)
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
                self._freed.notify_all()
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
                    self._freed.notify_all()  # in case it was waiting for the helper meanwhile
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
                    self._freed.notify_all()

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


async def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still on the loop and wait for them, so none is destroyed pending."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()
