"""Running a call: its function loaded, its arguments resolved, its code where the gate says.

A run goes where :meth:`InlineGate.place <cloudburst_executors.inline.InlineGate.place>`
says: a worker thread, the event loop, or a greenlet on it. A DAG stage's run
goes on to each downstream stage that :func:`executors.stages.chain_next`
allows, in the same place (a worker thread, or the loop while each function
may run there), sparing a return to the loop, a trigger and a thread hand-off
per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cloudburst.chunks import LargeValue, Stored, stored_bytes, stored_value
from cloudburst.errors import CloudburstError, CloudburstTimeoutError, RemoteFunctionError
from cloudburst.serialization import LwwClock, decode, lattice_bytes, lattice_value, serialize
from cloudburst.v1 import execution_pb2, value_pb2
from cloudburst_executors import runner, stages
from cloudburst_executors.cache import ValueCache, handout, read_reference
from cloudburst_executors.inline import InlineGate, Placement
from cloudburst_executors.library import UserLibrary
from cloudburst_executors.stages import LARGE_VALUE_BYTES
from cloudburst_grpc import dags, telemetry
from cloudburst_grpc.failures import error_to_call_error, failure_from_exception
from cloudburst_grpc.kvs_access import KvsAccess
from cloudburst_grpc.messaging.mailbox import MailboxRouter


@dataclass
class Chain:
    """A DAG stage about to run, and the chain of stages its run goes on to."""

    schedule: execution_pb2.DagSchedule
    topology: dags.Topology
    last: str
    """The function that ran last (the stage's own until the chain goes on)."""
    started: float = 0.0
    """When the stage started (monotonic), for its duration metric."""


class Invoker:
    """Runs the calls of one executor, each where its gate places it.

    Args:
        executor_id: The executor's id (where a chained stage must be placed).
        pool: The worker threads.
        gate: Decides where each run goes.
        load: Returns a function loaded at a version at least the one given.
        functions: The executor's loaded functions, by name.
        pinned: The names of the functions pinned there.
        kvs: The KVS, for the user library.
        clock: The executor's clock for last-writer-wins writes.
        max_payload_bytes: The largest value a function may return or store.
        timeout: Seconds a library call may wait.
        router: The mailboxes, when messaging is on.
    """

    def __init__(
        self,
        executor_id: str,
        pool: ThreadPoolExecutor,
        gate: InlineGate,
        load: Callable[[str, int], Awaitable[runner.LoadedFunction]],
        functions: Mapping[str, runner.LoadedFunction],
        pinned: Container[str],
        kvs: KvsAccess,
        clock: LwwClock,
        max_payload_bytes: int,
        timeout: float,
        router: MailboxRouter | None,
    ) -> None:
        self._here = executor_id
        self._pool = pool
        self._gate = gate
        self._load = load
        self._functions = functions
        self._pinned = pinned
        self._kvs = kvs
        self._clock = clock
        self._max_payload_bytes = max_payload_bytes
        self._timeout = timeout
        self._router = router
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        """Set when the executor shuts down: chains stop going on."""
        self.max_value_bytes: int | None = None
        """The largest value ``put_object`` stores, when the KVS tier allows more than a message."""
        self.running: dict[int, tuple[str, str]] = {}
        """(call id, function name) of each function running now, for shutdown to name."""

    async def call(
        self,
        call_id: str,
        name: str,
        version: int,
        arguments: Sequence[value_pb2.Argument],
        extra: tuple[Any, ...],
        chain: Chain | None = None,
        deadline_time: float | None = None,
    ) -> execution_pb2.Outcome:
        """Load the function, resolve its arguments, run it where the gate places it.

        A DAG stage's run goes on along its ``chain``: ``chain.last`` then names
        the function whose outcome is returned, and each function's duration
        was measured. Whatever goes wrong before the function runs becomes the
        outcome. ``deadline_time`` (seconds since the epoch) is when the caller
        stops waiting; none: the executor's timeout from now. Past it, the
        function's library calls raise.
        """
        started = time.monotonic()
        deadline = started + self._timeout
        if deadline_time is not None:
            deadline = started + (deadline_time - time.time())
        try:
            loaded = self._functions.get(name)  # loaded already, most calls: no load to await
            if loaded is None or loaded.version < version:
                loaded = await self._load(name, version)
            resolved = []
            # References repeated in one call read and deserialize their key once and
            # pass the same object, as the original runtime does.
            references: dict[tuple[str, bool, bool, int], Any] = {}
            for argument in arguments:
                kind = argument.WhichOneof("kind")
                # A small value (most arguments) needs no turn of the loop, unless
                # user data must stay off it (inline runs off).
                if kind == "value":
                    value = argument.value
                    if len(value.data) <= LARGE_VALUE_BYTES and self._on_loop:
                        resolved.append(runner.unpickle(value))
                        continue
                elif kind == "reference":
                    ref = argument.reference
                    same = (ref.key, ref.raw, ref.wait, ref.not_before_ns)
                    if same not in references:
                        references[same] = await self._resolve(
                            argument, deadline - time.monotonic()
                        )
                    resolved.append(references[same])
                    continue
                resolved.append(await self._resolve(argument, deadline - time.monotonic()))
            args = (*resolved, *extra)
        except RemoteFunctionError as exc:  # a future argument whose function failed
            return measured(name, started, _failure_outcome_of(exc))
        except CloudburstError as exc:
            return measured(name, started, execution_pb2.Outcome(error=error_to_call_error(exc)))
        loop = self._loop = asyncio.get_running_loop()
        placement = self._gate.place(loaded, loop)
        library = self._library(call_id, placement, deadline)
        # The copied context carries the current span into the thread, so the user
        # library's spans are children of this run.
        context = contextvars.copy_context()
        self.running[id(library)] = (call_id, name)
        try:
            if chain is None:  # a one-shot call: a class gets a fresh instance
                outcome = await placement.run(
                    self._pool, context, self._invoke, placement, loaded, library, args, False
                )
                return measured(name, started, outcome)
            chain.started = started  # the chain measures each of its functions itself
            return await placement.run(
                self._pool, context, self._invoke_chain, placement, chain, loaded, library, args
            )
        finally:
            del self.running[id(library)]
            library.close()

    async def _resolve(self, argument: value_pb2.Argument, timeout: float) -> Any:
        kind = argument.WhichOneof("kind")
        if kind == "value":
            return await self.deserialize(argument.value)
        if kind == "reference":
            ref = argument.reference
            lattice = await read_reference(self._kvs, ref, timeout)
            if lattice is None:
                if ref.wait:
                    raise CloudburstTimeoutError(
                        f"the result at {ref.key!r} passed as an argument was not ready within "
                        f"{timeout:.1f}s",
                        {"key": ref.key},
                    )
                return None
            if ref.raw:
                if isinstance(lattice, LargeValue):  # its bytes joined off the event loop
                    return await asyncio.get_running_loop().run_in_executor(
                        self._pool, stored_bytes, lattice
                    )
                return lattice_bytes(lattice)
            # The lattice goes with the decoding, which lets it go as soon as it can.
            decoding = self._value_of(ref.key, lattice)
            del lattice
            return await decoding
        return None

    async def _value_of(self, key: str, lattice: Stored) -> Any:
        """The value of a reference argument: a large one decoded on a worker thread.

        Through a cache, a large value decoded once is handed out again to later
        calls (each its own copy) while it stays the key's cached value.
        """
        cache = self._kvs if isinstance(self._kvs, ValueCache) else None
        if cache is not None and (kept := cache.kept(key, lattice)) is not None:
            return await asyncio.get_running_loop().run_in_executor(self._pool, kept)
        if isinstance(lattice, LargeValue):
            # Read in chunks: its size is theirs, and its bytes are joined (the GIL
            # released) and decoded on the worker thread, never on the event loop.
            large = True
            value_of: Callable[[], Any] = functools.partial(stored_value, lattice)
        # A last-writer-wins value's bytes are read out of the message once, to size and
        # to decode them (bytes decode to themselves): each read is a copy of the whole.
        elif lattice.WhichOneof("kind") == "lww":
            data = lattice.lww.value.data
            large = len(data) > LARGE_VALUE_BYTES
            value_of = functools.partial(decode, data, lattice.lww.value.serializer)
            del data
        else:
            large = lattice.ByteSize() > LARGE_VALUE_BYTES
            value_of = functools.partial(lattice_value, lattice)
        if not large and self._on_loop:
            return value_of()
        if cache is None or not large or not cache.holds(key, lattice):
            # Not cached (a large value over the cache's budget, say): its lattice goes
            # before the value is decoded, and no copy is made to hand out later.
            del lattice
            return await asyncio.get_running_loop().run_in_executor(self._pool, value_of)
        value, kept_value = await asyncio.get_running_loop().run_in_executor(
            self._pool, _decode_and_keep, value_of
        )
        if kept_value is not None:
            cache.keep(key, lattice, *kept_value)
        return value

    @property
    def _on_loop(self) -> bool:
        """Whether small user values may be unpickled on the event loop.

        Only when functions may run there too (``executor.inline_max_seconds`` > 0):
        with inline runs off, nothing from a user runs on the loop, so a value
        whose unpickling blocks holds up only its own call.
        """
        return self._gate.max_seconds > 0

    async def deserialize(self, value: value_pb2.Value) -> Any:
        """Deserialize a value: a large one (any, with inline runs off) on a worker thread."""
        if len(value.data) > LARGE_VALUE_BYTES or not self._on_loop:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, runner.unpickle, value
            )
        return runner.unpickle(value)

    def _invoke(
        self,
        placement: Placement,
        loaded: runner.LoadedFunction,
        library: UserLibrary,
        args: tuple[Any, ...],
        pinned: bool,
    ) -> execution_pb2.Outcome:
        return placement.invoke(
            loaded, library.bridge, self._outcome, loaded, library, args, pinned
        )

    def _outcome(
        self,
        loaded: runner.LoadedFunction,
        library: UserLibrary,
        args: tuple[Any, ...],
        pinned: bool,
    ) -> execution_pb2.Outcome:
        """Run user code and serialize its result."""
        try:
            result = runner.invoke(loaded, library, args, pinned)
        except BaseException as exc:  # even sys.exit() in user code only fails its call
            return execution_pb2.Outcome(failure=failure_from_exception(exc, loaded.name))
        try:
            value = serialize(
                result, what=f"the result of {loaded.name!r}", limit=self._max_payload_bytes
            )
        except CloudburstError as exc:
            # The runtime's own error (too large, unpicklable), not the function's.
            return execution_pb2.Outcome(error=error_to_call_error(exc))
        except BaseException as exc:  # the result's own pickling hook exiting
            return execution_pb2.Outcome(failure=failure_from_exception(exc, loaded.name))
        return execution_pb2.Outcome(value=value)

    def _invoke_chain(
        self,
        placement: Placement,
        chain: Chain,
        loaded: runner.LoadedFunction,
        library: UserLibrary,
        args: tuple[Any, ...],
    ) -> execution_pb2.Outcome:
        """Run a DAG stage, then each downstream stage it can run at once."""
        pinned = chain.last in self._pinned
        outcome = placement.invoke(
            loaded, library.bridge, self._outcome, loaded, library, args, pinned
        )
        measured(chain.last, chain.started, outcome)
        while (ready := self._next_in_chain(chain, outcome, placement)) is not None:
            loaded, args = ready
            library = self._library(chain.schedule.call_id, placement, library.bridge.deadline)
            started = time.monotonic()
            try:
                pinned = chain.last in self._pinned
                outcome = placement.invoke(
                    loaded, library.bridge, self._outcome, loaded, library, args, pinned
                )
            finally:
                # Only a mailbox needs ending, on the loop; waking the loop for
                # nothing would cost every chained stage a thread hand-off.
                if library.has_mailbox:
                    assert self._loop is not None
                    with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                        self._loop.call_soon_threadsafe(library.close)
            measured(chain.last, started, outcome)
        return outcome

    def _next_in_chain(
        self, chain: Chain, outcome: execution_pb2.Outcome, placement: Placement
    ) -> tuple[runner.LoadedFunction, tuple[Any, ...]] | None:
        """The downstream stage to run next in this run, with its arguments, if any.

        Besides what :func:`stages.chain_next` asks, tracing must be off (its
        spans are opened on the loop) and the function must be one the
        placement admits. Sets ``chain.last`` to the function chosen.
        """
        if telemetry.tracing() or self.closed:
            return None
        schedule = chain.schedule
        target = stages.chain_next(
            schedule, chain.topology, chain.last, outcome, self._here, self._functions
        )
        if target is None:
            return None
        loaded = self._functions[target]
        if not placement.admits(loaded.runs):
            return None
        try:
            static = [
                runner.unpickle(a.value) for a in schedule.function_arguments[target].arguments
            ]
            value = runner.unpickle(outcome.value)
        except Exception:
            return None  # the trigger path reports it, naming the stage
        chain.last = target
        return loaded, dags.join_arguments(static, (value,))

    def _library(self, call_id: str, placement: Placement, deadline: float) -> UserLibrary:
        return UserLibrary(
            placement.bridge(placement.loop, self._timeout, deadline),
            self._kvs,
            self._clock,
            self._max_payload_bytes,
            call_id,
            self._router,
            max_value_bytes=self.max_value_bytes,
        )


def _decode_and_keep(
    value_of: Callable[[], Any],
) -> tuple[Any, tuple[Callable[[], Any], int] | None]:
    """Decode a stored value, and say how to hand it out again (on a worker thread)."""
    value = value_of()
    return value, handout(value)


def _failure_outcome_of(exc: RemoteFunctionError) -> execution_pb2.Outcome:
    failure = value_pb2.Failure(
        type=exc.remote_type,
        message=exc.remote_message,
        traceback=exc.remote_traceback,
        function_name=exc.function_name,
    )
    return execution_pb2.Outcome(failure=failure)


def measured(name: str, started: float, outcome: execution_pb2.Outcome) -> execution_pb2.Outcome:
    """Record a run's duration and outcome in the metrics; return the outcome."""
    labels = {"function": name}
    telemetry.FUNCTION_DURATION.record(time.monotonic() - started, labels)
    telemetry.FUNCTION_CALLS.add(1, {**labels, "outcome": outcome.WhichOneof("result") or ""})
    return outcome
