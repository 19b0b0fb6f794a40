"""Running functions that use the user library on the event loop, as greenlets.

A function that calls ``get_object``, ``send``, ``recv`` and the like waits
on the loop for each of those calls. On a worker thread, every such wait is
two thread hand-offs (the thread wakes the loop, the loop wakes the thread),
which dominate a message round trip between two functions. Run instead in a
greenlet on the loop's own thread, user code that reaches a library call
switches back to :func:`drive` (through its :class:`GreenletBridge`), which
awaits the call on the loop and switches back in with its result: a few
microseconds, and the loop serves everything else while the function waits.

Only the stretches of user code between library calls hold the loop, so
:mod:`cloudburst_executors.inline` admits a function by the length of those stretches
rather than of whole runs. Two rules keep one function from wedging the
others:

- only one greenlet run is in progress per event loop at a time; while it
  is, every other call on that loop runs on worker threads. Two greenlets
  could otherwise deadlock the loop for good: one holding a lock of its own
  across a library call while the other waits for that lock on the loop's
  thread. (A worker thread that holds such a lock gives it up when its
  library call times out, so the loop is freed in the end.)
- every library call switches out, and the loop takes a turn between any two
  of them, even when answers are ready at once (``recv()`` without a
  timeout, a read of the in-process KVS of ``cbgrpc serve``): a function
  polling for a key or a message lets the loop run whatever will write or
  send it.
- a function that holds the loop too much of the time across many quick
  library calls (polling) loses its place there for good, and the rest of
  its run pauses briefly at each library call (see
  :mod:`cloudburst_executors.inline`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import greenlet

from cloudburst.errors import CloudburstTimeoutError
from cloudburst.v1 import messaging_service_pb2
from cloudburst_executors.library import LoopBridge
from cloudburst_grpc.messaging.mailbox import Mailbox, MailboxRouter, Message

T = TypeVar("T")

_get_running_loop = asyncio.events._get_running_loop
#: Restores the loop :func:`hide_loop` hid.
restore_loop = _set_running_loop = asyncio.events._set_running_loop


#: The deadline of an awaitable that has one of its own: none here.
_UNBOUNDED = contextlib.nullcontext()


class UserGreenlet(greenlet.greenlet):
    """User code running on an event loop's thread; library calls switch out of it."""


@dataclass(slots=True)
class Wait:
    """What user code asks :func:`drive` to await for it."""

    awaitable: Awaitable[Any]
    timeout: float | None
    """Seconds to wait for it; None when it has a deadline of its own."""
    what: str


def inside() -> bool:
    """Whether the caller is user code running in a greenlet on the loop."""
    return isinstance(greenlet.getcurrent(), UserGreenlet)


def suspend(awaitable: Awaitable[Any], timeout: float | None, what: str) -> Any:
    """Have the loop await ``awaitable`` for the user code calling this, and return its result.

    Call only when :func:`inside` is true.

    Raises:
        CloudburstTimeoutError: It did not finish within ``timeout`` seconds.
        Whatever the awaitable raised.
    """
    driver = greenlet.getcurrent().parent
    assert driver is not None, "suspend() outside a greenlet run"
    return driver.switch(Wait(awaitable, timeout, what))


class GreenletBridge(LoopBridge):
    """How the library calls of user code in a greenlet reach the loop: by switching to it.

    Each wait switches out to :func:`drive`, which awaits it on the loop. A call
    from a thread that the user code started itself waits as on a worker
    thread, and so is :attr:`LoopBridge.foreign`.
    """

    def run(
        self,
        coro: Coroutine[Any, Any, T],
        what: str,
        timeout: float | None = None,
        bounded: bool = False,
    ) -> T:
        """Have the loop await ``coro`` and return its result (see :meth:`LoopBridge.run`)."""
        if not inside():
            return super().run(coro, what, timeout, bounded)
        try:
            limit = self.left(what, self.timeout if timeout is None else timeout)
        except CloudburstTimeoutError:
            coro.close()
            raise
        result: T = suspend(coro, limit, what)
        return result

    def on_loop(self, function: Callable[[], T], what: str) -> T:
        """Call ``function`` on the loop, which gets a turn too (as at every library call)."""
        if not inside():
            return super().on_loop(function, what)
        return self.run(_called(function), what)

    def send(
        self, router: MailboxRouter, envelope: messaging_service_pb2.MessageEnvelope, limit: float
    ) -> bool:
        """Deliver a message, the loop awaiting it (see :meth:`LoopBridge.send`)."""
        if not inside():
            return super().send(router, envelope, limit)
        # Bounded: a full mailbox waits send_timeout, an answer that slack more.
        return self.run(
            router.send(envelope), f"send to {envelope.recipient_id}", limit, bounded=True
        )

    def receive(self, mailbox: Mailbox, wait: float) -> list[Message]:
        """The mailbox's messages, the loop awaiting them (see :meth:`LoopBridge.receive`)."""
        if not inside():
            return super().receive(mailbox, wait)
        # Even without a wait, let the loop run: a function polling recv()
        # must not keep it from delivering what it polls for.
        if wait:
            wait = self.left("recv()", wait)
        return self.run(
            mailbox.receive(wait) if wait else _called(mailbox.drain),
            "recv()",
            wait + 10,
            bounded=True,  # by ``wait``
        )


async def _called(function: Callable[[], T]) -> T:
    """What ``function()`` returns, awaitable."""
    return function()


class Segments:
    """Told when each stretch of user code on the loop begins and ends, and each wait."""

    pause = 0.0
    """Seconds to let the loop run without the function after each library call."""

    def begin(self) -> None:
        """A stretch begins (user code is switched in)."""

    def end(self) -> None:
        """The stretch ended (user code called the library, returned or raised)."""

    def waited(self, seconds: float, cpu_seconds: float) -> None:
        """A library call's await took ``seconds``, the loop's turn after it not counted.

        ``cpu_seconds``: the CPU time the loop's thread spent meanwhile, running
        (the rest of ``seconds`` it slept, waiting for I/O).
        """


async def drive(
    function: Callable[[], Any], context: contextvars.Context, segments: Segments
) -> Any:
    """Run ``function`` in a greenlet on this loop's thread and return what it returns.

    Each library call it makes is awaited here, with its deadline. Between two
    library calls the loop always takes a turn: if the first was answered
    without one, the loop gets it (``segments.pause`` long) before the second
    is awaited; a run's last call costs nothing more. If this task is
    cancelled while the function waits, the cancellation is raised in the
    function at its library call, and again here once it has ended.
    """
    run = UserGreenlet(function)
    run.gr_context = context
    loop = asyncio.get_running_loop()
    running = slot(loop)
    running.busy = True
    try:
        request = _step(run, segments)
        cancelled: asyncio.CancelledError | None = None
        turned = True  # the loop turned to start this run
        while not run.dead:
            result: Any = None
            error: BaseException | None = None
            # A call answered without the loop taking a turn (the in-process KVS
            # does that) is followed by one before the next call, or a function
            # polling in a loop would starve whatever it polls for.
            if segments.pause or not turned:
                try:
                    await asyncio.sleep(segments.pause)
                except asyncio.CancelledError as exc:
                    cancelled = error = cancelled or exc
            if error is None:
                turns: list[bool] = []
                loop.call_soon(turns.append, True)
                began, cpu_began = time.perf_counter(), time.thread_time()
                result, error = await _await(request)
                segments.waited(time.perf_counter() - began, time.thread_time() - cpu_began)
                turned = bool(turns)
                if isinstance(error, asyncio.CancelledError):
                    cancelled = cancelled or error
            else:
                _discard(request.awaitable)
            request = _step(run, segments, (result,), error)
        if cancelled is not None:
            raise cancelled
        return request
    finally:
        running.busy = False


async def _await(request: Wait) -> tuple[Any, BaseException | None]:
    """Await what user code asked for, with its deadline: (its result, None) or (None, error)."""
    deadline = None if request.timeout is None else asyncio.timeout(request.timeout)
    try:
        async with deadline or _UNBOUNDED:
            return await request.awaitable, None
    except TimeoutError as exc:
        if deadline is not None and deadline.expired():
            return None, CloudburstTimeoutError(
                f"{request.what} did not finish within {request.timeout:.1f}s"
            )
        return None, exc
    except BaseException as exc:  # a cancellation too: raised in the function
        return None, exc


def _discard(awaitable: Awaitable[Any]) -> None:
    """Close a coroutine that is not awaited after all (so it does not warn)."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


def _step(
    run: UserGreenlet,
    segments: Segments,
    args: tuple[Any, ...] = (),
    error: BaseException | None = None,
) -> Any:
    """Run user code until its next library call (the Wait it makes) or its end (what it returns).

    It is switched in with ``args`` (none at the start, then a call's result),
    or has ``error`` raised at its library call.
    """
    segments.begin()
    hidden = hide_loop()
    try:
        return run.throw(error) if error is not None else run.switch(*args)
    finally:
        _set_running_loop(hidden)
        segments.end()


def hide_loop() -> asyncio.AbstractEventLoop | None:
    """Make asyncio see no running loop on this thread; return the loop to restore.

    User code on the loop's thread so sees what it would on a worker thread,
    and may run event loops of its own (``asyncio.run``) just the same.
    :func:`restore_loop` puts the returned loop back.
    """
    running = _get_running_loop()
    _set_running_loop(None)
    return running


def loop_busy(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a greenlet run is in progress on ``loop`` (other calls then use threads)."""
    return slot(loop).busy


class Slot:
    """Whether a greenlet run is in progress on one event loop."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy = False


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Slot] = weakref.WeakKeyDictionary()


def slot(loop: asyncio.AbstractEventLoop) -> Slot:
    """The :class:`Slot` of ``loop``, which every executor on it shares."""
    found = _slots.get(loop)
    if found is None:
        found = _slots[loop] = Slot()
    return found
