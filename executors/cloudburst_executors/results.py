"""Delivering a DAG call's result: to the KVS and/or to the scheduler waiting for it.

The sink's result goes back to the scheduler that placed the call by the route
its schedule names (``reply_to`` and ``reply_stream_id``): the ``StreamTriggers``
stream that scheduler opened to this executor, found by its hello. That stream
and the call's triggers travel separately, so the result may come first: it is
then parked until the stream opens or the call's deadline passes. A result for
a stream that has ended is dropped (the scheduler failed the call when the
stream broke). A scheduler in this process waits with :meth:`ResultRouter.expect`
instead, before it triggers anything.

A result both stored and awaited is answered first and stored right after, as a
one-shot call's is: the scheduler learns of the store from a ``ResultStored``
frame and holds deletes of the key until then.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from cloudburst.errors import CloudburstError
from cloudburst.serialization import LwwClock, lww, serialize_as
from cloudburst.v1 import execution_pb2, value_pb2
from cloudburst_executors import runner
from cloudburst_executors.stages import LARGE_VALUE_BYTES
from cloudburst_grpc import telemetry
from cloudburst_grpc.executor_client import OutcomeWaiters
from cloudburst_grpc.failures import error_to_call_error, outcome_value
from cloudburst_grpc.kvs_access import KvsAccess
from cloudburst_grpc.schedules import epoch_seconds

logger = logging.getLogger(__name__)

#: A trigger stream as its opener named it in its hello: (peer_id, stream_id).
StreamKey = tuple[str, int]
#: How many ended streams are remembered, so that results for them are dropped, not parked.
ENDED_STREAMS_KEPT = 1024
#: Sends a result to its stream; may return a write for the result's deliverer to await (an
#: answer written on the caller's answer stream by the task that has it).
Send = Callable[["RoutedResult"], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class RoutedResult:
    """A sink's result on its way to the scheduler's stream, with the route its schedule gave."""

    call_id: str
    outcome: execution_pb2.Outcome
    answer_stream_id: str
    """The caller's answer stream here, to answer on if it is open ("" if none)."""
    answer_sequence: int
    stored_key: str
    """Where the result is being stored after it is answered ("" if it is not)."""


class ResultRouter:
    """Sends each sink's result to the scheduler waiting for it.

    A scheduler in this process registers a waiter per call (:meth:`expect`);
    otherwise the result goes to the trigger stream its schedule names, which
    the servicer attaches with :meth:`attach` when the stream's hello comes.
    """

    def __init__(self) -> None:
        self._waiters = OutcomeWaiters()
        self._stored_keys: dict[str, str] = {}
        """Response keys of results answered to a waiter before being stored, by call id."""
        self._streams: dict[StreamKey, Send] = {}
        self._parked: dict[StreamKey, dict[str, tuple[RoutedResult, asyncio.TimerHandle]]] = {}
        """Results waiting for their stream to open, each until its call's deadline."""
        self._ended: collections.OrderedDict[StreamKey, None] = collections.OrderedDict()
        self._writes: set[asyncio.Future[None]] = set()
        """Writes of results that were parked, sent as their stream opened."""

    def expect(self, call_id: str, timeout: float) -> asyncio.Future[execution_pb2.Outcome]:
        """Return a future for the call's result; it fails after ``timeout`` seconds.

        For a scheduler in this process; call it before the call's sources are triggered.
        """
        return self._waiters.expect(call_id, timeout)

    def deliver(
        self,
        schedule: execution_pb2.DagSchedule,
        outcome: execution_pb2.Outcome,
        stored_key: str = "",
    ) -> Awaitable[None] | None:
        """Hand a call's result to its waiter, or to the stream its schedule names.

        ``stored_key``: the result is being stored there (see :meth:`stored_key`).
        Returns the write of the result, if the stream leaves it to the caller to
        await (see :data:`Send`).
        """
        call_id = schedule.call_id
        future = self._waiters.pop(call_id)
        if future is not None:
            if not future.done():
                if stored_key:
                    self._stored_keys[call_id] = stored_key
                future.set_result(outcome)
            return None
        key = (schedule.reply_to, schedule.reply_stream_id)
        result = RoutedResult(
            call_id, outcome, schedule.answer_stream_id, schedule.answer_sequence, stored_key
        )
        send = self._streams.get(key)
        if send is not None:
            return send(result)
        if key in self._ended:
            logger.debug("call %s: the stream %s to answer on has ended; dropped", call_id, key)
            return None
        remaining = schedule.deadline_time.ToNanoseconds() / 1e9 - time.time()
        if remaining <= 0:
            logger.debug("call %s: past its deadline before its stream %s opened", call_id, key)
            return None
        timer = asyncio.get_running_loop().call_later(remaining, self._expire, key, call_id)
        self._parked.setdefault(key, {})[call_id] = (result, timer)
        return None

    def _expire(self, key: StreamKey, call_id: str) -> None:
        parked = self._parked.get(key)
        if parked is not None and parked.pop(call_id, None) is not None:
            logger.debug("call %s: its stream %s did not open by its deadline", call_id, key)
            if not parked:
                del self._parked[key]

    def attach(self, key: StreamKey, send: Send) -> None:
        """A stream opened: results for ``key`` go to ``send`` (those parked for it at once)."""
        self._streams[key] = send
        self._ended.pop(key, None)
        for result, timer in self._parked.pop(key, {}).values():
            timer.cancel()
            written = send(result)
            if written is not None:
                task = asyncio.ensure_future(written)
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)

    def detach(self, key: StreamKey, send: Send) -> None:
        """The stream attached with ``send`` ended: results for it are dropped from now on."""
        if self._streams.get(key) != send:
            return  # replaced by a newer stream with the same name
        del self._streams[key]
        self._ended[key] = None
        if len(self._ended) > ENDED_STREAMS_KEPT:
            self._ended.popitem(last=False)

    @property
    def parked(self) -> int:
        """How many results wait for their stream to open."""
        return sum(len(p) for p in self._parked.values())

    def stored_key(self, call_id: str) -> str:
        """Once: where the result of ``call_id``, answered to a waiter, is being stored ("" if not).

        Whoever routed the result to its waiter reports the store to it.
        """
        return self._stored_keys.pop(call_id, "")

    def __len__(self) -> int:
        return len(self._waiters) + self.parked


async def for_caller(
    outcome: execution_pb2.Outcome,
    accept: Sequence[value_pb2.Serializer.ValueType],
    name: str,
    pool: Executor,
    max_payload_bytes: int,
) -> execution_pb2.Outcome:
    """The outcome with its value in a serializer the caller accepts (``accept``; empty: any).

    A value no accepted serializer can carry becomes a SERIALIZATION_FAILED error.
    Large values are re-encoded on ``pool``, not the loop.
    """
    if not accept or outcome.WhichOneof("result") != "value":
        return outcome
    if outcome.value.serializer in accept:
        return outcome

    def encode() -> value_pb2.Value:
        obj = runner.unpickle(outcome.value)
        return serialize_as(obj, accept, what=f"the result of {name!r}", limit=max_payload_bytes)

    try:
        if len(outcome.value.data) > LARGE_VALUE_BYTES:
            value = await asyncio.get_running_loop().run_in_executor(pool, encode)
        else:
            value = encode()
    except CloudburstError as exc:
        return execution_pb2.Outcome(error=error_to_call_error(exc))
    return execution_pb2.Outcome(value=value)


async def store(kvs: KvsAccess, clock: LwwClock, key: str, outcome: execution_pb2.Outcome) -> None:
    """Store an outcome at ``key`` as its call's result (see :func:`outcome_value`)."""
    await kvs.put(key, lww(outcome_value(outcome), clock))


async def deliver(
    schedule: execution_pb2.DagSchedule,
    outcome: execution_pb2.Outcome,
    kvs: KvsAccess,
    clock: LwwClock,
    results: ResultRouter,
    store_after: Callable[[str, execution_pb2.Outcome], None] | None = None,
) -> None:
    """Deliver a DAG sink's outcome: store it and/or route it to the waiting scheduler.

    With ``store_after``, a result also awaited is routed first and handed to
    ``store_after`` to be stored (and reported stored) after.
    """
    if schedule.HasField("start_time"):
        elapsed = time.time() - epoch_seconds(schedule.start_time)
        telemetry.DAG_DURATION.record(max(elapsed, 0.0), {"dag": schedule.dag.name})
    telemetry.DAG_CALLS.add(
        1, {"dag": schedule.dag.name, "outcome": outcome.WhichOneof("result") or ""}
    )
    key = schedule.response_key
    if key and schedule.direct_response and store_after is not None:
        store_after(key, outcome)  # registered as being stored before anyone hears of it
        written = results.deliver(schedule, outcome, stored_key=key)
        if written is not None:
            await written
        return
    if key:
        try:
            await store(kvs, clock, key, outcome)
        except CloudburstError:
            logger.exception("call %s: cannot store the result", schedule.call_id)
    if schedule.direct_response:
        written = results.deliver(schedule, outcome)
        if written is not None:
            await written


__all__ = ["ResultRouter", "RoutedResult", "deliver", "outcome_value", "store"]
