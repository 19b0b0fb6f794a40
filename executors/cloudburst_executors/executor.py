"""The executor: loads functions, admits calls and drives DAG stages over the network.

A one-shot call resolves its arguments, runs (see :mod:`executors.invocation`)
and stores or returns its outcome. A DAG call arrives as triggers, each with
the call's schedule (carried once per stream and call, referred to after: see
:mod:`cloudburst_grpc.schedules`); :mod:`executors.stages` decides when a stage runs
and where its outcome goes, and this module does what it says: runs the
stage, triggers the downstreams directly on their executors (the scheduler is
out of the data path), and has the sink deliver the result (see
:mod:`executors.results`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cloudburst.errors import CloudburstError, FunctionNotFoundError, QueueFullError
from cloudburst.serialization import LwwClock
from cloudburst.v1 import error_pb2, execution_pb2, executor_service_pb2, function_pb2
from cloudburst_executors import results, runner
from cloudburst_executors.cache import ValueCache
from cloudburst_executors.inline import InlineGate
from cloudburst_executors.invocation import Chain, Invoker
from cloudburst_executors.results import ResultRouter
from cloudburst_executors.slots import RunSlots
from cloudburst_executors.stages import Forward, RunStage, StageState
from cloudburst_grpc import dags, telemetry
from cloudburst_grpc.config import ExecutorConfig
from cloudburst_grpc.dags import function_key
from cloudburst_grpc.executor_client import PeerDirectory
from cloudburst_grpc.failures import error_to_call_error
from cloudburst_grpc.kvs_access import SYSTEM, KvsAccess
from cloudburst_grpc.messaging.mailbox import MailboxRouter
from cloudburst_grpc.scheduler.release import HOLD_SECONDS, WANTED_REMEMBERED
from cloudburst_grpc.schedules import epoch_seconds

logger = logging.getLogger(__name__)


class Executor:
    """One executor: loads and pins functions, admits calls, and moves DAG stages along."""

    def __init__(
        self,
        executor_id: str,
        address: str,
        config: ExecutorConfig,
        kvs: KvsAccess,
        peers: PeerDirectory,
        max_payload_bytes: int,
        call_timeout: float,
        router: MailboxRouter | None = None,
    ) -> None:
        self.executor_id = executor_id
        self.cache = kvs if isinstance(kvs, ValueCache) else None
        """The cache of KVS values, when ``kvs`` is one (see :mod:`executors.cache`)."""
        self.address = address
        self.config = config
        self._router = router
        self._kvs = kvs
        self._peers = peers
        self._call_timeout = call_timeout
        self._max_payload_bytes = max_payload_bytes
        self._clock = LwwClock(f"executor-{executor_id}")
        # Threads beyond ``threads`` serve functions waiting in library calls (see slots).
        self._pool = ThreadPoolExecutor(config.max_threads, thread_name_prefix=f"cb-{executor_id}")
        self.slots = RunSlots(config.threads, executor_id)
        self._functions: dict[str, runner.LoadedFunction] = {}
        self._loading: dict[str, asyncio.Future[runner.LoadedFunction]] = {}
        self.pinned: set[str] = set()
        self._gate = InlineGate(config.inline_max_seconds, self.slots)
        self._invoker = Invoker(
            executor_id,
            self._pool,
            self._gate,
            self._function,
            self._functions,
            self.pinned,
            kvs,
            self._clock,
            max_payload_bytes,
            call_timeout,
            router,
        )
        self._stages = StageState(executor_id)
        self._expiry: tuple[float, asyncio.TimerHandle] | None = None
        """The timer for the earliest deadline of a stage waiting for upstreams."""
        self.results = ResultRouter()
        self.active_calls = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.storing: dict[str, asyncio.Future[bool]] = {}
        """Results answered already and being stored (direct calls, DAG sinks), by response key.

        Each settles once its result is stored (or its store failed), with True
        when the store was dropped instead (see :meth:`end_hold`).
        """
        self._holds: dict[str, asyncio.Future[bool]] = {}
        """Stores held for :data:`HOLD_SECONDS`, by key: True ends a hold with the store."""
        self._wanted: collections.OrderedDict[str, None] = collections.OrderedDict()
        """Keys asked to be stored at once before their results came: those are not held."""
        self._closed = False
        self._closing_holds = False
        """Set as the executor drains: nothing is held from then on."""
        telemetry.observe_executor(self)

    # -- lifecycle -----------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting work, wait for running tasks briefly, stop the threads; idempotent."""
        if self._closed:
            return
        self._closed = self._invoker.closed = True
        if self._expiry is not None:
            self._expiry[1].cancel()
        self._stages.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        self.slots.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.cache is not None:
            await self.cache.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for running calls to finish (shutdown's grace).

        Held stores start at once (and are waited for like calls).
        """
        self._closing_holds = True
        self.end_hold(store=list(self._holds))
        busy = [t for t in self._tasks if not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=max(timeout, 0))

    @property
    def running(self) -> dict[int, tuple[str, str]]:
        """(call id, function name) of each function running now, for shutdown to name."""
        return self._invoker.running

    def status(self) -> executor_service_pb2.GetExecutorStatusResponse:
        """Report pinned functions, load and the value cache."""
        status = executor_service_pb2.GetExecutorStatusResponse(
            executor_id=self.executor_id,
            pinned_functions=sorted(self.pinned),
            active_calls=self.active_calls,
            threads=self.config.threads,
        )
        if self.cache is not None:
            status.cached_keys.extend(self.cache.keys())
            status.cache.CopyFrom(self.cache.stats())
        return status

    def allow_values(self, max_value_bytes: int) -> None:
        """Let functions store values up to ``max_value_bytes`` (the KVS tier's limit)."""
        self._invoker.max_value_bytes = max(max_value_bytes, self._max_payload_bytes)

    # -- functions -----------------------------------------------------------------

    async def _function(self, name: str, version: int) -> runner.LoadedFunction:
        """Return the loaded function, reloading a cached copy older than ``version``."""
        cached = self._functions.get(name)
        if cached is not None and cached.version >= version:
            return cached
        pending = self._loading.get(name)
        if pending is not None:
            return await pending
        pending = self._loading[name] = asyncio.get_running_loop().create_future()
        try:
            lattice = await self._kvs.get(function_key(name), SYSTEM)
            if lattice is None:
                raise FunctionNotFoundError(
                    f"function {name!r} is not registered (it may have been deleted)",
                    {"function": name},
                )
            proto = function_pb2.Function.FromString(lattice.lww.value.data)
            loaded = await asyncio.get_running_loop().run_in_executor(
                self._pool, runner.load, proto
            )
            # Copies of one function (the same stored bytes) share what the gate learns.
            loaded.runs = self._gate.record(loaded.identity)
            self._functions[name] = loaded
            pending.set_result(loaded)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            self._loading.pop(name, None)
            if not pending.done():
                pending.cancel()
            # Retrieve the exception so an unawaited future does not warn.
            if pending.done() and not pending.cancelled():
                pending.exception()
        return loaded

    async def pin(self, name: str, version: int) -> None:
        """Pin a function: keep it loaded here and keep its class instance alive."""
        await self._function(name, version)
        self.pinned.add(name)

    def unpin(self, name: str) -> None:
        """Unpin a function and drop its class instance."""
        self.pinned.discard(name)
        loaded = self._functions.get(name)
        if loaded is not None:
            loaded.instance = None

    # -- calls ---------------------------------------------------------------------

    def _admit(self) -> None:
        if self._closed:
            raise CloudburstError(f"executor {self.executor_id} is shutting down")
        self._check_threads()
        # Functions waiting in library calls hold no runnable slot (see slots).
        if self.active_calls - self.slots.waiting >= self.config.threads + self.config.max_queue:
            raise QueueFullError(
                f"executor {self.executor_id} has {self.active_calls} calls in progress; "
                "retry shortly or add executors",
                {"executor": self.executor_id},
            )

    def _check_threads(self) -> None:
        """Refuse a run that would need more threads than ``executor.max_threads``."""
        if self.active_calls >= self.config.max_threads:
            raise QueueFullError(
                f"executor {self.executor_id} has {self.active_calls} calls in progress, as many "
                f"as its threads may number (executor.max_threads = {self.config.max_threads}), "
                f"{self.slots.waiting} of them waiting in library calls; retry shortly or add "
                "executors",
                {"executor": self.executor_id},
            )

    async def execute(
        self, request: executor_service_pb2.ExecuteFunctionRequest
    ) -> executor_service_pb2.ExecuteFunctionResponse:
        """Run a one-shot call; store its outcome under the response key and/or return it."""
        self._admit()
        self.active_calls += 1
        try:
            with _call_span(self.executor_id, request) as current:
                outcome = await self._invoker.call(
                    request.call_id,
                    request.function_name,
                    request.function_version,
                    request.arguments,
                    (),
                    deadline_time=(
                        epoch_seconds(request.deadline_time)
                        if request.HasField("deadline_time")
                        else None
                    ),
                )
                _annotate(current, outcome)
            if request.accept_serializers:
                outcome = await results.for_caller(
                    outcome,
                    request.accept_serializers,
                    request.function_name,
                    self._pool,
                    self._max_payload_bytes,
                )
            if request.response_key and request.direct_response:
                self._store_after(request.response_key, outcome, request.hold_store)
            elif request.response_key:
                await results.store(self._kvs, self._clock, request.response_key, outcome)
        finally:
            self.active_calls -= 1
        response = executor_service_pb2.ExecuteFunctionResponse()
        if request.direct_response:
            response.outcome.CopyFrom(outcome)
        return response

    def _store_after(self, key: str, outcome: execution_pb2.Outcome, hold: bool = False) -> None:
        """Store an outcome answered first (see :attr:`storing`).

        With ``hold`` (its caller may release it), the store waits
        :data:`HOLD_SECONDS` first, unless :meth:`end_hold` ends the wait.
        """
        wanted = self._wanted.pop(key, False) is None  # a call refers to it already
        if hold and not wanted and not self._closing_holds:
            loop = asyncio.get_running_loop()
            gate: asyncio.Future[bool] = loop.create_future()
            self._holds[key] = gate
            loop.call_later(HOLD_SECONDS, _open, gate)
            task = asyncio.ensure_future(self._held_store(key, outcome, gate))
        else:
            task = asyncio.ensure_future(self._store(key, outcome))
        self.storing[key] = task
        self._tasks.add(task)

    def end_hold(self, drop: Iterable[str] = (), store: Iterable[str] = ()) -> None:
        """End held stores: ``drop`` (released) are not stored, ``store`` are stored now.

        A key in ``store`` whose result has not come yet is not held when it
        comes (remembered for the last :data:`WANTED_REMEMBERED` such keys); a
        key that is not held (any more) is otherwise left alone.
        """
        for key in drop:
            gate = self._holds.get(key)
            if gate is not None and not gate.done():
                gate.set_result(False)
        for key in store:
            gate = self._holds.get(key)
            if gate is not None:
                if not gate.done():
                    gate.set_result(True)
            elif key not in self.storing:
                self._wanted[key] = None
                if len(self._wanted) > WANTED_REMEMBERED:
                    self._wanted.popitem(last=False)

    async def _held_store(
        self, key: str, outcome: execution_pb2.Outcome, gate: asyncio.Future[bool]
    ) -> bool:
        """Store an outcome once its hold ends; True when it was dropped instead."""
        try:
            keep = await gate
        finally:
            if self._holds.get(key) is gate:
                del self._holds[key]
        if keep:
            return await self._store(key, outcome)
        telemetry.RESULTS_DROPPED.add(1)
        self._leave_books(key)
        return True

    async def _store(self, key: str, outcome: execution_pb2.Outcome) -> bool:
        """Store an outcome: the body of a task that leaves the books itself (see _run_stage).

        Returns False: the store was not dropped (see :attr:`storing`).
        """
        try:
            await results.store(self._kvs, self._clock, key, outcome)
        except CloudburstError as exc:
            logger.warning(
                "executor %s cannot store the result at %r: %s", self.executor_id, key, exc
            )
        except Exception:
            logger.exception("executor %s task failed", self.executor_id)
        finally:
            self._leave_books(key)
        return False

    def _leave_books(self, key: str) -> None:
        """Take the running store task of ``key`` off :attr:`storing` and the tracked tasks."""
        task = asyncio.current_task()
        if task is not None:
            if self.storing.get(key) is task:
                del self.storing[key]
            self._tasks.discard(task)

    # -- DAG stages ----------------------------------------------------------------

    def trigger(
        self,
        trigger: execution_pb2.Trigger,
        schedule: execution_pb2.DagSchedule | None = None,
    ) -> None:
        """Accept a trigger of the call ``schedule`` places (by default the trigger's own).

        The stage runs once every upstream has reported.
        """
        if self._closed:
            logger.warning("executor %s dropped a trigger while shutting down", self.executor_id)
            return
        ready = self._stages.trigger(trigger, schedule)
        if ready is not None:
            # The stage's task leaves _tasks itself (see _run_stage).
            self._tasks.add(asyncio.create_task(self._run_stage(ready)))
            return
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        """Have the timer go off at the earliest deadline of a waiting stage."""
        due = self._stages.next_expiry()
        if due is None or (self._expiry is not None and self._expiry[0] <= due):
            return
        if self._expiry is not None:
            self._expiry[1].cancel()
        delay = max(due - time.time(), 0.0)
        self._expiry = (due, asyncio.get_running_loop().call_later(delay, self._expire))

    def _expire(self) -> None:
        self._expiry = None
        for expired in self._stages.expire(time.time()):
            logger.warning(
                "call %s: stage %s gave up waiting for %s",
                expired.call_id,
                expired.function,
                ", ".join(expired.missing),
            )
        self._arm_expiry()

    async def _run_stage(self, ready: RunStage) -> None:
        """Run a stage and pass its outcome on; the body of the stage's task.

        The task removes itself from ``_tasks`` and logs its own failure as it
        ends: a done callback would do the same a turn of the event loop later,
        which costs every stage a further turn (an ``epoll`` call, most often).
        """
        schedule = ready.schedule
        try:
            with _stage_span(self.executor_id, ready) as current:
                last, outcome = await self._stage_outcome(ready)
                _annotate(current, outcome)
                after = self._stages.ran(ready, last, outcome)
                if isinstance(after, list):
                    # The stage's task writes its last trigger itself (it has nothing else
                    # to do); the others are handed to the streams' writers, so that no
                    # downstream waits for a write to another executor.
                    for forward in after:
                        await self._forward(forward, written=forward is after[-1])
                else:
                    await self._deliver(schedule, outcome)
        except Exception:
            logger.exception("executor %s task failed", self.executor_id)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)

    async def _deliver(
        self, schedule: execution_pb2.DagSchedule, outcome: execution_pb2.Outcome
    ) -> None:
        """Deliver a sink's outcome, in a serializer its caller accepts."""
        if schedule.accept_serializers:
            outcome = await results.for_caller(
                outcome,
                schedule.accept_serializers,
                schedule.dag.name,
                self._pool,
                self._max_payload_bytes,
            )
        hold = schedule.hold_store

        def store_after(key: str, outcome: execution_pb2.Outcome) -> None:
            self._store_after(key, outcome, hold)

        await results.deliver(schedule, outcome, self._kvs, self._clock, self.results, store_after)

    async def _stage_outcome(self, ready: RunStage) -> tuple[str, execution_pb2.Outcome]:
        """Run a stage and the chain after it; return the function that ran last, its outcome."""
        schedule, function = ready.schedule, ready.function
        chain = Chain(schedule, ready.topology, function)
        try:
            self._check_threads()
        except QueueFullError as exc:
            return chain.last, execution_pb2.Outcome(error=error_to_call_error(exc))
        self.active_calls += 1
        try:
            extra: tuple[Any, ...] = ()
            if ready.inputs:
                values, failed = ready.upstream_values()
                upstream = []
                for received in values:
                    upstream.append(await self._invoker.deserialize(received.value))
                if failed is not None:  # not run on: the failure goes on downstream
                    return chain.last, failed
                extra = dags.join_arguments((), upstream)
            arguments = schedule.function_arguments[function].arguments
            version = schedule.function_versions[function]
            deadline_time = (
                epoch_seconds(schedule.deadline_time)
                if schedule.HasField("deadline_time")
                else None
            )
            outcome = await self._invoker.call(
                schedule.call_id, function, version, arguments, extra, chain, deadline_time
            )
        except Exception as exc:
            logger.exception("call %s: stage %s failed in the runtime", schedule.call_id, function)
            outcome = execution_pb2.Outcome(
                error=error_pb2.CallError(
                    code=13, message=f"internal error running {function!r}: {type(exc).__name__}"
                )
            )
        finally:
            self.active_calls -= 1
        return chain.last, outcome

    async def _forward(self, forward: Forward, written: bool = False) -> None:
        """Trigger a downstream stage, here or on its executor (``written``: see the peer's)."""
        schedule = forward.schedule
        trigger = forward.trigger()
        if telemetry.tracing():
            telemetry.inject(trigger.trace_context)
        if forward.local:
            self.trigger(trigger, schedule)
            return
        executor_id = forward.executor_id
        try:
            peer = self._peers.get(executor_id, schedule.executor_addresses[executor_id])
            await peer.trigger(trigger, schedule, written=written)
        except CloudburstError as exc:
            logger.warning("call %s: cannot reach %s: %s", schedule.call_id, executor_id, exc)
            outcome = execution_pb2.Outcome(error=error_to_call_error(exc))
            await self._deliver(schedule, outcome)


def _call_span(
    executor_id: str, request: executor_service_pb2.ExecuteFunctionRequest
) -> contextlib.AbstractContextManager[Any]:
    """A one-shot call's ``run`` span (built only while tracing is on)."""
    if not telemetry.tracing():
        return telemetry.span("")  # no span, and nothing built for one
    name = request.function_name
    attributes = _attributes(executor_id, name, request.call_id)
    return telemetry.span(f"run {name}", request.trace_context, attributes)


def _stage_span(executor_id: str, ready: RunStage) -> contextlib.AbstractContextManager[Any]:
    """A stage's ``run`` span (built only while tracing is on)."""
    if not telemetry.tracing():
        return telemetry.span(ready.function)  # no span, and nothing built for one
    # The first upstream (in the DAG's order) is the parent; the others of a join are links.
    links = [link for c in ready.contexts[1:] if (link := telemetry.link_to(c)) is not None]
    attributes = {
        **_attributes(executor_id, ready.function, ready.schedule.call_id),
        "cloudburst.dag": ready.schedule.dag.name,
    }
    return telemetry.span(f"run {ready.function}", ready.contexts[0], attributes, links)


def _attributes(executor_id: str, function: str, call_id: str) -> dict[str, str]:
    return {
        "cloudburst.function": function,
        "cloudburst.executor": executor_id,
        "cloudburst.call_id": call_id,
    }


def _annotate(current: Any, outcome: execution_pb2.Outcome) -> None:
    """Record a run's outcome on its span; a failure or error marks it failed."""
    if current is None:
        return
    kind = outcome.WhichOneof("result") or ""
    current.set_attribute("cloudburst.outcome", kind)
    if kind == "failure":
        failure = outcome.failure
        telemetry.record_failure(current, failure.type, failure.message, failure.traceback)
    elif kind == "error":
        telemetry.fail(current, None, outcome.error.message)


def _open(gate: asyncio.Future[bool]) -> None:
    """End a hold with the store (its time is up)."""
    if not gate.done():
        gate.set_result(True)
