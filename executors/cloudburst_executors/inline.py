"""Running quick functions on the executor's event loop instead of a thread.

Handing a call to a worker thread and its result back to the loop costs two
thread wake-ups, about a hundred microseconds on a busy machine: more than a
small function itself takes. So do each of its calls into the user library
from a thread, which wait on the loop. Functions that have shown themselves
quick run on the loop instead: one that provably never touches the user
library (checked in its bytecode) runs there directly; one that may use it
runs in a greenlet there, which switches back to the loop at each library
call (see :mod:`cloudburst_executors.cooperative`).

What must be quick is each *stretch* of user code that holds the loop: the
whole run (user code and serializing its result) for a library-free
function, the code between two library calls otherwise. The loop must not
be held up for long, so the gate is earned and lost:

- a function qualifies after :data:`QUICK_RUNS` quick stretches in a row
  on threads, each within ``max_seconds``;
- a stretch on the loop that takes over :data:`SLOW_FACTOR` times
  ``max_seconds`` sends it back to threads with a strike, unless it only
  took that long because the operating system ran other processes
  meanwhile (its own CPU time was short and it never blocked; Linux tells).
  It must then earn its place again with four times as many quick stretches
  per strike, up to :data:`MAX_STRIKES` (8,192 in a row). A function that is
  slow once in a thousand runs so stays on threads, while one hit by a rare
  stall it did not cause (a garbage collection, say) soon earns its place
  back. A greenlet run struck mid-way finishes on the loop.

What a function earns or loses it earns or loses for every copy of it:
functions registered under other names with the very same stored bytes (the
same code, captured values and serializer) behave the same, so they share one
:class:`RunRecord` (see :meth:`InlineGate.record`). A chain of thousands of
copies of one function so runs on the loop after a few runs of any of them,
and a strike or a hog verdict on one sends them all back to threads. What is
kept per name stays per name: pins, class instances, metrics and log lines.
A new version of a function starts afresh, unless its stored bytes are those
of a function loaded on the executor (the version it replaces, or a copy):
the same code keeps what was learnt about it, so a client that registers its
functions again each time it starts does not send them back to threads. The
gate holds a record only while a loaded function does.

Short stretches are not enough: a function polling the KVS in a loop
(``while get_object(key) is None``) has only short ones, yet holds the loop
nearly all the time, its quick library calls included (the in-process KVS
of ``cbgrpc serve`` answers them on the loop). So a greenlet run also counts
the share of each :data:`HOG_WINDOW` during which it held the loop (its
stretches, and the loop's CPU time during its library calls that answered
within ``max_seconds`` times :data:`SLOW_FACTOR`: the time the loop spent
asleep, waiting for another process to answer, was free for other calls);
over :data:`HOG_SHARE` of a window loses the function
its place on the loop for good: it runs on threads from then on, and the
rest of the run lets the loop run for :data:`HOG_PAUSE` seconds between its
library calls.

The executor asks the gate once per run: :meth:`InlineGate.place` returns a
:class:`Placement` that runs the call where it goes, hands each function of
the run its bridge to the loop (see :mod:`cloudburst_executors.library`), and does the
gate's accounting of each function's user code.

Classes never run on the loop: a pinned instance's lock may be held by a
thread that is itself waiting on the loop. Nor does a function that called
the library from threads it started itself, for the same reason. A stretch that holds the loop for
:data:`STALL_WARNING` seconds (say, waiting for something only another call
could do) is reported in the log while it lasts, by a watchdog thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import dis
import functools
import inspect
import logging
import resource
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from cloudburst_executors import cooperative
from cloudburst_executors.library import LoopBridge
from cloudburst_executors.slots import RunSlots
from cloudburst_grpc import telemetry

logger = logging.getLogger(__name__)

#: Consecutive quick runs on threads before a function runs on the loop.
QUICK_RUNS = 8
#: A run on the loop longer than this many times the limit sends the function back to threads.
SLOW_FACTOR = 5
#: The most strikes a function carries: each one fourfolds the quick runs it needs.
MAX_STRIKES = 5
#: Seconds a run may hold the loop before the watchdog reports it (while it lasts).
STALL_WARNING = 1.0
#: Seconds over which a greenlet run's share of the loop is measured.
HOG_WINDOW = 0.25
#: The share of a window beyond which a greenlet run hogs the loop.
HOG_SHARE = 0.5
#: Seconds the rest of a hogging run lets the loop run between its library calls.
HOG_PAUSE = 0.001

#: Where a run goes: a worker thread, the event loop itself, or a greenlet on it.
Where = Literal["thread", "loop", "greenlet"]
THREAD: Where = "thread"
LOOP: Where = "loop"
GREENLET: Where = "greenlet"

T = TypeVar("T")

# Per-thread resource usage: CPU time and context switches (Linux).
_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)
# Generators and coroutines return before their code runs.
_SUSPENDS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
# Names through which code could reach a parameter without loading it by name.
_INTROSPECTION = frozenset({"locals", "vars", "eval", "exec", "_getframe", "currentframe"})


def plain_function(target: Any) -> bool:
    """Whether ``target`` is a plain function that takes the user library first.

    Generator and coroutine functions are not: they return before their code runs.
    """
    if not isinstance(target, types.FunctionType):
        return False
    code = target.__code__
    return code.co_argcount >= 1 and not code.co_flags & _SUSPENDS


def library_unused(target: Any) -> bool:
    """Whether ``target`` is a plain function that never reads its first parameter.

    The runtime passes the user library first; code that never loads that
    parameter (directly, from a nested function, or through ``locals()`` and
    the like) cannot call into the library. Anything else that is callable
    (a class, a ``functools.partial``, a builtin, ``*args`` first) is assumed
    to use it.
    """
    if not plain_function(target):
        return False
    code = target.__code__
    name = code.co_varnames[0]
    if name in code.co_cellvars or _INTROSPECTION & set(code.co_names):
        return False
    for instruction in dis.get_instructions(code):
        if instruction.opname.startswith(("LOAD_FAST", "LOAD_CLOSURE", "LOAD_DEREF")):
            loaded = instruction.argval
            if loaded == name or (isinstance(loaded, tuple) and name in loaded):
                return False
    return True


@dataclass
class RunRecord:
    """What the gate knows about one loaded function, and about its copies.

    Shared by every loaded function with the same stored bytes (see
    :meth:`InlineGate.record`).
    """

    on_loop: bool = False
    """Whether its calls run on the loop now."""
    quick_runs: int = 0
    """Consecutive quick runs on threads so far: quick stretches between library
    calls, for a function that calls the library."""
    strikes: int = 0
    """Slow runs it had on the loop (at most MAX_STRIKES)."""
    eligible: bool | None = None
    """Whether it may ever run on the loop (None until first looked at)."""
    uses_library: bool = True
    """Whether it may call the user library, and so runs on the loop as a greenlet
    (see :mod:`cloudburst_executors.cooperative`); known once ``eligible`` is."""


class Runnable(Protocol):
    """A loaded function, as the gate sees it."""

    @property
    def name(self) -> str:
        """Its registered name."""
        ...

    @property
    def target(self) -> Any:
        """What is called: the function, or the class."""
        ...

    @property
    def runs(self) -> RunRecord:
        """How its runs went."""
        ...


class InlineGate:
    """Decides, per loaded function and its copies, whether its calls run on the event loop.

    Args:
        max_seconds: The longest a run may take to count as quick; 0 turns running
            on the loop off.
        slots: The runnable slots that runs on threads take (see
            :mod:`cloudburst_executors.slots`); None: unbounded.
    """

    def __init__(self, max_seconds: float, slots: RunSlots | None = None) -> None:
        self.max_seconds = max_seconds
        self.slots = slots
        self.running: tuple[str, float] | None = None
        """The function running on the loop now and when it began (perf_counter)."""
        self._watched = False
        self._placements: tuple[asyncio.AbstractEventLoop, OnThread, OnLoop] | None = None
        self._slot_loop: asyncio.AbstractEventLoop | None = None
        self._slot = cooperative.Slot()
        """Whether a greenlet run is in progress on ``_slot_loop``."""
        self._records: weakref.WeakValueDictionary[bytes, RunRecord] = weakref.WeakValueDictionary()
        """The record of each distinct stored function, while a loaded function holds it."""

    def record(self, identity: bytes) -> RunRecord:
        """The record of the loaded functions whose stored bytes have this ``identity``.

        Functions with the same identity (a digest of their stored bytes: see
        :func:`cloudburst_executors.runner.identity`) are copies of one
        another, and share a record. The gate keeps a record only while a
        loaded function holds it, so unloading a function frees its record.
        """
        record = self._records.get(identity)
        if record is None:
            record = self._records[identity] = RunRecord()
        return record

    @property
    def records(self) -> int:
        """How many records the gate holds now: one per distinct loaded function."""
        return len(self._records)

    def started(self, name: str, began: float) -> None:
        """A run on the loop began (on the loop); the watchdog keeps an eye on it."""
        self.running = (name, began)
        if not self._watched:
            self._watched = True
            _watchdog.watch(self)

    def stopped(self) -> None:
        """The run on the loop ended."""
        self.running = None

    def place(self, function: Runnable, loop: asyncio.AbstractEventLoop) -> Placement:
        """Where the next call of ``function`` runs on ``loop``.

        The placement runs the call there and does this gate's accounting of it.
        """
        where = self.where(function.runs, loop)
        if where == GREENLET:
            return InGreenlet(self, loop, function)
        placements = self._placements
        if placements is None or placements[0] is not loop:
            placements = self._placements = (loop, OnThread(self, loop), OnLoop(self, loop))
        return placements[1] if where == THREAD else placements[2]

    def allows(self, record: RunRecord, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Whether the next call of the function runs on ``loop`` (directly or in a greenlet)."""
        return self.where(record, loop) != THREAD

    def where(self, record: RunRecord, loop: asyncio.AbstractEventLoop | None = None) -> Where:
        """Where the next call of the function runs: a thread, the loop, or a greenlet on it.

        Never the loop while a greenlet run is in progress there: see
        :mod:`cloudburst_executors.cooperative`.
        """
        if not record.on_loop:
            return THREAD
        if loop is not None:
            if loop is not self._slot_loop:
                self._slot_loop, self._slot = loop, cooperative.slot(loop)
            if self._slot.busy:
                return THREAD
        return GREENLET if record.uses_library else LOOP

    @staticmethod
    def follows(record: RunRecord, where: Where) -> bool:
        """Whether a function may run next in a chain running ``where`` (the loop or a greenlet)."""
        return record.on_loop and (where == GREENLET or not record.uses_library)

    def ran_on_thread(
        self,
        name: str,
        target: Any,
        record: RunRecord,
        streak: int,
        broken: bool,
        foreign: bool = False,
    ) -> None:
        """Account a run on a worker thread (called on that thread).

        The run's stretches of user code between calls into the user library
        (one stretch, for a function that made none) were timed against
        ``max_seconds``: ``streak`` quick ones in a row ended it, after a slow
        one if ``broken``. ``foreign``: threads the function started called
        the library (see :meth:`keep_off_loop`).
        """
        if record.eligible is None:
            record.eligible = self.max_seconds > 0 and plain_function(target)
            record.uses_library = not library_unused(target)
        if foreign:
            self.keep_off_loop(name, record)
        if not record.eligible:
            return
        record.quick_runs = streak if broken else record.quick_runs + streak
        if record.quick_runs >= _needed(record.strikes):
            record.on_loop = True
            record.quick_runs = 0
            logger.debug("function %r runs on the event loop from now on", name)

    @staticmethod
    def keep_off_loop(name: str, record: RunRecord) -> None:
        """The function called the library from threads of its own: never run it on the loop.

        On the loop it would wait for those threads while they wait for the loop.
        """
        if record.eligible is not False:
            logger.debug("function %r calls the library from its own threads: threads only", name)
        record.eligible = record.on_loop = False

    def hogged(self, name: str, record: RunRecord, held: float, window: float) -> None:
        """A greenlet run held the loop ``held`` of ``window`` seconds: threads from now on."""
        record.eligible = record.on_loop = False
        telemetry.LOOP_STALLS.add(1, {"function": name})
        logger.info(
            "function %r held the executor's event loop for %.0f ms of %.0f ms across quick "
            "library calls (polling?); it runs on worker threads from now on",
            name,
            held * 1e3,
            window * 1e3,
        )

    @staticmethod
    def usage() -> resource.struct_rusage | None:
        """This thread's resource usage, taken before a run on the loop (None if unknown)."""
        return None if _RUSAGE_THREAD is None else resource.getrusage(_RUSAGE_THREAD)

    def ran_on_loop(
        self,
        name: str,
        record: RunRecord,
        seconds: float,
        before: resource.struct_rusage | None = None,
    ) -> None:
        """Account a run on the loop; a slow one sends the function back to threads.

        ``before`` is :meth:`usage` taken when the run began: with it, a run that
        was slow only because this thread was made to wait for the CPU (short
        CPU time, no blocking) does not count against the function.
        """
        limit = self.max_seconds * SLOW_FACTOR
        if seconds <= limit:
            return
        if before is not None and _RUSAGE_THREAD is not None:
            after = resource.getrusage(_RUSAGE_THREAD)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            if cpu <= limit and after.ru_nvcsw == before.ru_nvcsw:
                logger.debug("function %r was descheduled for %.2f ms", name, seconds * 1e3)
                return
        record.on_loop = False
        record.quick_runs = 0
        record.strikes = min(record.strikes + 1, MAX_STRIKES)
        telemetry.LOOP_STALLS.add(1, {"function": name})
        logger.info(
            "function %r took %.2f ms on the executor's event loop (over %.2f ms), holding up "
            "other calls; it runs on worker threads until %d runs in a row are quick again "
            "(executor.inline_max_seconds sets the limit, 0 turns this off)",
            name,
            seconds * 1e3,
            self.max_seconds * SLOW_FACTOR * 1e3,
            _needed(record.strikes),
        )


class Placement:
    """Where one run goes (see :meth:`InlineGate.place`), and the gate's accounting of it.

    A run is one function, or a DAG stage and the chain of stages after it
    (each of which must be :meth:`admitted <admits>`). The executor calls
    :meth:`run` once, and :meth:`invoke` around each function's user code.
    """

    where: Where
    bridge: type[LoopBridge] = LoopBridge
    """The bridge to the loop for each function's user library in this run:
    ``bridge(loop, timeout)``, whose library calls time out after ``timeout``."""

    def __init__(self, gate: InlineGate, loop: asyncio.AbstractEventLoop) -> None:
        self._gate = gate
        self.loop = loop
        """The loop the run belongs to."""

    def run(
        self,
        pool: Executor,
        context: contextvars.Context,
        function: Callable[..., T],
        *args: Any,
    ) -> Awaitable[T]:
        """Call ``function(*args)`` in ``context``, here; ``pool`` has the worker threads."""
        raise NotImplementedError

    def invoke(
        self,
        function: Runnable,
        bridge: LoopBridge,
        body: Callable[..., T],
        *args: Any,
    ) -> T:
        """Call ``body(*args)``, the user code of ``function``, accounting how it went."""
        raise NotImplementedError

    def admits(self, record: RunRecord) -> bool:
        """Whether a function may run next in this run's chain."""
        return self._gate.follows(record, self.where)


class OnThread(Placement):
    """A run on a worker thread, which times the stretches of user code."""

    where = THREAD

    def run(
        self,
        pool: Executor,
        context: contextvars.Context,
        function: Callable[..., T],
        *args: Any,
    ) -> Awaitable[T]:
        """Call ``function(*args)`` on a worker thread."""
        return self.loop.run_in_executor(pool, context.run, function, *args)

    def invoke(
        self,
        function: Runnable,
        bridge: LoopBridge,
        body: Callable[..., T],
        *args: Any,
    ) -> T:
        """Run ``body`` timing its stretches of user code; they may earn a place on the loop.

        It holds a runnable slot while it runs (see :mod:`cloudburst_executors.slots`).
        """
        slots = self._gate.slots
        if slots is not None:
            slots.acquire()
            bridge.hold(slots)
        bridge.begin(self._gate.max_seconds)
        try:
            return body(*args)
        finally:
            bridge.end()
            if slots is not None:
                bridge.let_go()
                slots.release()
            self._gate.ran_on_thread(
                function.name,
                function.target,
                function.runs,
                bridge.streak,
                bridge.broken,
                bridge.foreign,
            )

    def admits(self, record: RunRecord) -> bool:
        """Any function may run next on a thread."""
        return True


class OnLoop(Placement):
    """A run on the event loop itself, of functions that never use the user library."""

    where = LOOP

    def run(
        self,
        pool: Executor,
        context: contextvars.Context,
        function: Callable[..., T],
        *args: Any,
    ) -> Awaitable[T]:
        """Call ``function(*args)`` right here, on the loop."""
        return _done(context.run(function, *args))

    def invoke(
        self,
        function: Runnable,
        bridge: LoopBridge,
        body: Callable[..., T],
        *args: Any,
    ) -> T:
        """Run ``body`` watched; a slow run sends the function back to threads."""
        gate = self._gate
        usage = gate.usage()
        began = time.perf_counter()
        gate.started(function.name, began)
        hidden = cooperative.hide_loop()  # user code sees the thread as a worker's
        try:
            return body(*args)
        finally:
            cooperative.restore_loop(hidden)
            took = time.perf_counter() - began
            gate.stopped()
            gate.ran_on_loop(function.name, function.runs, took, usage)

    def admits(self, record: RunRecord) -> bool:
        """Only a function that runs on the loop and never uses the library."""
        return record.on_loop and not record.uses_library


class InGreenlet(Placement, cooperative.Segments):
    """A run in a greenlet on the loop: each stretch between library calls is accounted.

    The watchdog watches each stretch, and a slow one is a strike (see
    :meth:`InlineGate.ran_on_loop`), as if it were a whole run on the loop.
    The run's share of the loop over each :data:`HOG_WINDOW` is counted too
    (see the module's docs).
    """

    where = GREENLET

    def __init__(
        self, gate: InlineGate, loop: asyncio.AbstractEventLoop, function: Runnable
    ) -> None:
        super().__init__(gate, loop)
        self._name = function.name
        self._record = function.runs
        """The function running now (a chain goes on to others)."""
        self._began = 0.0
        self._usage: resource.struct_rusage | None = None
        self._window = 0.0
        """When the current window began (perf_counter; 0 before the first stretch)."""
        self._held = 0.0
        """Seconds the run held the loop in the current window."""
        self.pause = 0.0

    bridge = cooperative.GreenletBridge
    """Library calls switch to the loop."""

    def run(
        self,
        pool: Executor,
        context: contextvars.Context,
        function: Callable[..., T],
        *args: Any,
    ) -> Awaitable[T]:
        """Call ``function(*args)`` in a greenlet on the loop."""
        driven: Awaitable[T] = cooperative.drive(functools.partial(function, *args), context, self)
        return driven

    def invoke(
        self,
        function: Runnable,
        bridge: LoopBridge,
        body: Callable[..., T],
        *args: Any,
    ) -> T:
        """Run ``body``; the driver accounts each stretch (see :meth:`begin`)."""
        self._name, self._record = function.name, function.runs
        bridge.own()
        try:
            return body(*args)
        finally:
            if bridge.foreign:
                self._gate.keep_off_loop(function.name, function.runs)

    def begin(self) -> None:
        """A stretch begins: note the time and this thread's CPU usage."""
        self._usage = self._gate.usage()
        self._began = time.perf_counter()
        if not self._window:
            self._window = self._began
        self._gate.started(self._name, self._began)

    def end(self) -> None:
        """The stretch ended: a slow one sends the function back to threads."""
        now = time.perf_counter()
        took = now - self._began
        self._gate.stopped()
        self._gate.ran_on_loop(self._name, self._record, took, self._usage)
        self._held += took
        self._weigh(now)

    def waited(self, seconds: float, cpu_seconds: float) -> None:
        """A library call answered: a quick answer counts as holding the loop while it ran.

        That is for the CPU time its thread spent meanwhile: an answer the loop
        worked out itself (the in-process KVS) holds it throughout; one it
        slept waiting for (a message from another process) does not.
        """
        if seconds <= self._gate.max_seconds * SLOW_FACTOR:
            self._held += min(cpu_seconds, seconds)

    def _weigh(self, now: float) -> None:
        """Judge the run's share of the loop once its window is over (or already too much)."""
        if self.pause:
            return
        span = now - self._window
        if self._held > HOG_SHARE * HOG_WINDOW or (
            span >= HOG_WINDOW and self._held > HOG_SHARE * span
        ):
            self.pause = HOG_PAUSE
            self._gate.hogged(self._name, self._record, self._held, span)
        elif span >= HOG_WINDOW:
            self._window, self._held = now, 0.0


async def _done(value: T) -> T:
    """``value``, awaitable."""
    return value


class _Watchdog:
    """One daemon thread that reports runs holding an event loop too long.

    It only reads what the loops write (the running function and its start),
    so it costs a run on the loop nothing but two attribute writes.
    """

    def __init__(self) -> None:
        self._gates: weakref.WeakSet[InlineGate] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, gate: InlineGate) -> None:
        with self._lock:
            self._gates.add(gate)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cloudburst-inline-watchdog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        reported: dict[int, float] = {}
        while True:
            time.sleep(STALL_WARNING / 4)
            now = time.perf_counter()
            for gate in list(self._gates):
                running = gate.running
                if running is None:
                    continue
                name, began = running
                if now - began < STALL_WARNING or reported.get(id(gate)) == began:
                    continue
                reported[id(gate)] = began
                logger.warning(
                    "function %r has held an executor's event loop for %.1f s: no other call "
                    "on that executor makes progress until it returns, and if it waits for "
                    "something only another call can do it never will; set "
                    "executor.inline_max_seconds = 0 to run every function on a thread",
                    name,
                    now - began,
                )


_watchdog = _Watchdog()


def _needed(strikes: int) -> int:
    """Quick runs in a row on threads that earn a place on the loop."""
    return QUICK_RUNS << (2 * strikes)
