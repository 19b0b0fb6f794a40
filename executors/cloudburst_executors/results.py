"""Delivering a DAG call's result: to the KVS and/or to the scheduler waiting for it.

A result both stored and awaited is answered first and stored right after, as a
one-shot call's is: the scheduler learns of the store from a ``ResultStored``
frame (see :meth:`ResultRouter.stored_key`) and holds deletes of the key until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from cloudburst.errors import CloudburstError, CloudburstTimeoutError
from cloudburst.serialization import LwwClock, lww, serialize_as
from cloudburst.v1 import execution_pb2, value_pb2
from cloudburst_executors import runner
from cloudburst_executors.stages import LARGE_VALUE_BYTES
from cloudburst_grpc import telemetry
from cloudburst_grpc.failures import error_to_call_error, outcome_value
from cloudburst_grpc.kvs_access import KvsAccess

logger = logging.getLogger(__name__)


class ResultRouter:
    """Meets a sink's direct-response result with the scheduler waiting for it.

    The two can arrive in either order across streams: a result that comes
    first is parked until its waiter registers or its call's deadline passes.
    """

    def __init__(self) -> None:
        self._waiters: dict[
            str, tuple[asyncio.Future[execution_pb2.Outcome], asyncio.TimerHandle]
        ] = {}
        self._parked: dict[str, execution_pb2.Outcome] = {}
        self._stored_keys: dict[str, str] = {}
        """Response keys of results answered before being stored, by call id."""

    def expect(self, call_id: str, timeout: float) -> asyncio.Future[execution_pb2.Outcome]:
        """Return a future for the call's result; it fails after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[execution_pb2.Outcome] = loop.create_future()
        parked = self._parked.pop(call_id, None)
        if parked is not None:
            future.set_result(parked)
            return future

        def expire() -> None:
            # Also forgets a waiter that was cancelled meanwhile.
            waiting = self._waiters.get(call_id)
            if waiting is not None and waiting[0] is future:
                del self._waiters[call_id]
            if not future.done():
                future.set_exception(
                    CloudburstTimeoutError(f"call {call_id} did not finish within {timeout:.1f}s")
                )

        self._waiters[call_id] = (future, loop.call_later(timeout, expire))
        return future

    def deliver(
        self,
        call_id: str,
        outcome: execution_pb2.Outcome,
        keep_for: float,
        stored_key: str = "",
    ) -> None:
        """Hand a result to its waiter, or park it for up to ``keep_for`` seconds.

        ``stored_key``: the result is being stored there (see :meth:`stored_key`).
        """
        waiting = self._waiters.pop(call_id, None)
        if waiting is not None:
            future, expiry = waiting
            expiry.cancel()
            if not future.done():
                if stored_key:
                    self._stored_keys[call_id] = stored_key
                future.set_result(outcome)
            return
        if stored_key:
            self._stored_keys[call_id] = stored_key
        self._parked[call_id] = outcome
        asyncio.get_running_loop().call_later(max(keep_for, 0.0), self._forget, call_id)

    def _forget(self, call_id: str) -> None:
        self._parked.pop(call_id, None)
        self._stored_keys.pop(call_id, None)

    def stored_key(self, call_id: str) -> str:
        """Once: where the result of ``call_id``, answered first, is being stored ("" if not).

        Whoever routed the result to its waiter reports the store to it.
        """
        return self._stored_keys.pop(call_id, "")

    def __len__(self) -> int:
        return len(self._waiters) + len(self._parked)


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
        elapsed = time.time() - schedule.start_time.ToNanoseconds() / 1e9
        telemetry.DAG_DURATION.record(max(elapsed, 0.0), {"dag": schedule.dag.name})
    telemetry.DAG_CALLS.add(
        1, {"dag": schedule.dag.name, "outcome": outcome.WhichOneof("result") or ""}
    )
    key = schedule.response_key
    if key and schedule.direct_response and store_after is not None:
        remaining = schedule.deadline_time.ToNanoseconds() / 1e9 - time.time()
        store_after(key, outcome)  # registered as being stored before anyone hears of it
        results.deliver(schedule.call_id, outcome, keep_for=remaining, stored_key=key)
        return
    if key:
        try:
            await store(kvs, clock, key, outcome)
        except CloudburstError:
            logger.exception("call %s: cannot store the result", schedule.call_id)
    if schedule.direct_response:
        remaining = schedule.deadline_time.ToNanoseconds() / 1e9 - time.time()
        results.deliver(schedule.call_id, outcome, keep_for=remaining)


__all__ = ["ResultRouter", "deliver", "outcome_value", "store"]
