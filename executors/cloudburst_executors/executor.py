"""The executor core: resolves arguments, runs user code on threads, drives DAG stages.

A DAG call arrives as triggers that each carry the whole schedule, so a stage
never waits for the schedule separately. A stage runs once every upstream's
trigger has arrived; it then triggers its downstreams directly on their
executors (the scheduler is out of the data path), and the sink stores the
result in the KVS and/or hands it to the scheduler waiting for a direct
response. A failure upstream skips the stages below it and becomes the call's
result.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    FunctionNotFoundError,
    QueueFullError,
    RemoteFunctionError,
)
from cloudburst.rpc import reason_name
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize
from cloudburst.v1 import (
    error_pb2,
    execution_pb2,
    executor_service_pb2,
    function_pb2,
    value_pb2,
)
from cloudburst_executors import cooperative, runner
from cloudburst_executors.inline import GREENLET, LOOP, THREAD, InlineGate, Where
from cloudburst_executors.library import LoopBridge, UserLibrary
from cloudburst_grpc import telemetry
from cloudburst_grpc.config import ExecutorConfig
from cloudburst_grpc.executor_client import PeerDirectory
from cloudburst_grpc.failures import (
    error_to_call_error,
    failure_from_exception,
    failure_value,
    runtime_failure,
)
from cloudburst_grpc.kvs_access import SYSTEM, KvsAccess
from cloudburst_grpc.messaging.mailbox import MailboxRouter
from cloudburst_grpc.scheduler.dag import Topology, topology
from cloudburst_grpc.scheduler.registry import function_key

logger = logging.getLogger(__name__)

#: Values larger than this are (de)serialized on a worker thread, not the event loop.
LARGE_VALUE_BYTES = 64 * 1024


@dataclass
class _Stage:
    """Inputs collected so far for one function of one DAG call."""

    schedule: execution_pb2.DagSchedule
    outcomes: dict[str, execution_pb2.Outcome] = field(default_factory=dict)
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    """The trace context each upstream's trigger carried."""
    expiry: asyncio.TimerHandle | None = None


@dataclass
class _Chain:
    """A DAG stage about to run, and the chain of stages its thread runs after it."""

    schedule: execution_pb2.DagSchedule
    topology: Topology
    last: str
    """The function that ran last (the stage's own until the chain goes on)."""
    started: float = 0.0
    """When the stage started (monotonic), for its duration metric."""


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

    def deliver(self, call_id: str, outcome: execution_pb2.Outcome, keep_for: float) -> None:
        """Hand a result to its waiter, or park it for up to ``keep_for`` seconds."""
        waiting = self._waiters.pop(call_id, None)
        if waiting is not None:
            future, expiry = waiting
            expiry.cancel()
            if not future.done():
                future.set_result(outcome)
            return
        self._parked[call_id] = outcome
        asyncio.get_running_loop().call_later(max(keep_for, 0.0), self._parked.pop, call_id, None)

    def __len__(self) -> int:
        return len(self._waiters) + len(self._parked)


class Executor:
    """One executor: a thread pool for user code plus the state of pinned functions and stages."""

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
        self._router = router
        self.address = address
        self.config = config
        self._kvs = kvs
        self._peers = peers
        self._limit = max_payload_bytes
        self._call_timeout = call_timeout
        self._clock = LwwClock(f"executor-{executor_id}")
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop the executor runs on, known from its first call."""
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix=f"cb-{executor_id}")
        self._inline = InlineGate(config.inline_max_seconds)
        self._functions: dict[str, runner.LoadedFunction] = {}
        self._loading: dict[str, asyncio.Future[runner.LoadedFunction]] = {}
        self.pinned: set[str] = set()
        self._stages: dict[tuple[str, str], _Stage] = {}
        self._topologies: dict[tuple[str, int], Topology] = {}
        self.results = ResultRouter()
        self.active_calls = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        telemetry.observe_executor(self)

    # -- lifecycle -----------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting work, wait for running tasks briefly, stop the threads; idempotent."""
        if self._closed:
            return
        self._closed = True
        for stage in self._stages.values():
            if stage.expiry:
                stage.expiry.cancel()
        self._stages.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for running calls to finish (shutdown's grace)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        busy = [t for t in self._tasks if not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=max(deadline - loop.time(), 0))

    def status(self) -> executor_service_pb2.GetExecutorStatusResponse:
        """Report pinned functions and load."""
        return executor_service_pb2.GetExecutorStatusResponse(
            executor_id=self.executor_id,
            pinned_functions=sorted(self.pinned),
            active_calls=self.active_calls,
            threads=self.config.threads,
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("executor %s task failed", self.executor_id, exc_info=task.exception())

    # -- functions -----------------------------------------------------------------

    async def _function(self, name: str, version: int) -> runner.LoadedFunction:
        """Return the loaded function, reloading a cached copy older than ``version``."""
        cached = self._functions.get(name)
        if cached is not None and cached.version >= version:
            return cached
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[name] = pending
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
        return await pending

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
        if self.active_calls >= self.config.threads + self.config.max_queue:
            raise QueueFullError(
                f"executor {self.executor_id} has {self.active_calls} calls in progress; "
                "retry shortly or add executors",
                {"executor": self.executor_id},
            )

    async def execute(
        self, request: executor_service_pb2.ExecuteFunctionRequest
    ) -> executor_service_pb2.ExecuteFunctionResponse:
        """Run a one-shot call; store its outcome under the response key and/or return it."""
        self._admit()
        self.active_calls += 1
        attributes = self._attributes(request.function_name, request.call_id)
        try:
            with telemetry.span(
                f"run {request.function_name}", request.trace_context, attributes
            ) as current:
                outcome = await self._run(
                    request.call_id,
                    request.function_name,
                    request.function_version,
                    request.arguments,
                    (),
                    pinned=False,
                )
                _annotate(current, outcome)
            if request.response_key:
                await self._store(request.response_key, outcome)
        finally:
            self.active_calls -= 1
        response = executor_service_pb2.ExecuteFunctionResponse()
        if request.direct_response:
            response.outcome.CopyFrom(outcome)
        return response

    async def _resolve(self, argument: value_pb2.Argument, timeout: float) -> Any:
        kind = argument.WhichOneof("kind")
        if kind == "value":
            return await self._deserialize(argument.value)
        if kind == "reference":
            ref = argument.reference
            lattice = await self._kvs.get(ref.key, wait=ref.wait, timeout=timeout)
            if lattice is None:
                if ref.wait:
                    raise CloudburstTimeoutError(
                        f"the result at {ref.key!r} passed as an argument was not ready within "
                        f"{timeout:.1f}s",
                        {"key": ref.key},
                    )
                return None
            return lattice_value(lattice)
        return None

    async def _deserialize(self, value: value_pb2.Value) -> Any:
        if len(value.data) > LARGE_VALUE_BYTES:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, runner.unpickle, value
            )
        return runner.unpickle(value)

    async def _run(
        self,
        call_id: str,
        name: str,
        version: int,
        arguments: Sequence[value_pb2.Argument],
        extra: tuple[Any, ...],
        pinned: bool,
        stage: _Chain | None = None,
    ) -> execution_pb2.Outcome:
        """Resolve arguments, run the function, and describe what happened.

        The function runs on a worker thread, or on the loop when it has shown
        itself quick and library-free (see :mod:`executors.inline`). With
        ``stage`` (a DAG stage), the run goes on to the downstream stages it
        can run at once (see :meth:`_next_in_chain`) and ``stage.last`` names
        the function whose outcome is returned.
        """
        started = time.monotonic()
        deadline = started + self._call_timeout
        loop = self._loop = asyncio.get_running_loop()
        try:
            loaded = await self._function(name, version)
            args = [await self._resolve(a, deadline - time.monotonic()) for a in arguments]
            args.extend(extra)
        except RemoteFunctionError as exc:  # a future argument whose function failed
            return self._measured(name, started, _failure_outcome_of(exc))
        except CloudburstError as exc:
            return self._measured(
                name, started, execution_pb2.Outcome(error=error_to_call_error(exc))
            )
        library = self._library(call_id)
        # The copied context carries the current span into the thread, so the user
        # library's spans are children of this run.
        context = contextvars.copy_context()
        where = self._inline.where(loaded.runs, loop)
        # A one-shot call runs its function; a DAG stage, the chain it can run at once.
        function: Callable[..., execution_pb2.Outcome]
        call: tuple[Any, ...]
        if stage is None:
            pinned = pinned and name in self.pinned
            function, call = self._invoke, (loaded, library, tuple(args), pinned, where)
        else:
            stage.started = started
            function, call = self._invoke_chain, (stage, loaded, library, tuple(args), where)
        try:
            if where == LOOP:
                outcome = context.run(function, *call)
            elif where == GREENLET:
                with self._inline.greenlet_run(loaded.name, loaded.runs) as stretches:
                    outcome = await cooperative.drive(
                        functools.partial(function, *call), context, stretches
                    )
            else:
                outcome = await loop.run_in_executor(self._pool, context.run, function, *call)
        finally:
            library.close()
        # A stage's chain measured each of its functions itself.
        return outcome if stage is not None else self._measured(name, started, outcome)

    @staticmethod
    def _measured(
        name: str, started: float, outcome: execution_pb2.Outcome
    ) -> execution_pb2.Outcome:
        labels = {"function": name}
        telemetry.FUNCTION_DURATION.record(time.monotonic() - started, labels)
        telemetry.FUNCTION_CALLS.add(1, {**labels, "outcome": outcome.WhichOneof("result") or ""})
        return outcome

    def _attributes(self, function: str, call_id: str) -> dict[str, str]:
        return {
            "cloudburst.function": function,
            "cloudburst.executor": self.executor_id,
            "cloudburst.call_id": call_id,
        }

    def _invoke(
        self,
        loaded: runner.LoadedFunction,
        library: UserLibrary,
        args: tuple[Any, ...],
        pinned: bool,
        where: Where,
    ) -> execution_pb2.Outcome:
        """Run user code and serialize its result, ``where`` the gate chose."""
        if where == THREAD:
            bridge = library.bridge
            bridge.begin(self._inline.max_seconds)
            try:
                return self._outcome(loaded, library, args, pinned)
            finally:
                bridge.end()
                self._inline.ran_on_thread(
                    loaded.name,
                    loaded.target,
                    loaded.runs,
                    bridge.streak,
                    bridge.broken,
                    bridge.foreign,
                )
        if where == GREENLET:  # the greenlet's driver accounts each stretch
            self._inline.entered(loaded.name, loaded.runs)
            library.bridge.own()
            try:
                return self._outcome(loaded, library, args, pinned)
            finally:
                if library.bridge.foreign:
                    self._inline.keep_off_loop(loaded.name, loaded.runs)
        usage = self._inline.usage()
        began = time.perf_counter()
        self._inline.started(loaded.name, began)
        hidden = cooperative.hide_loop()  # user code sees the thread as a worker's
        try:
            return self._outcome(loaded, library, args, pinned)
        finally:
            cooperative.restore_loop(hidden)
            took = time.perf_counter() - began
            self._inline.stopped()
            self._inline.ran_on_loop(loaded.name, loaded.runs, took, usage)

    def _outcome(
        self,
        loaded: runner.LoadedFunction,
        library: UserLibrary,
        args: tuple[Any, ...],
        pinned: bool,
    ) -> execution_pb2.Outcome:
        try:
            result = runner.invoke(loaded, library, args, pinned)
        except BaseException as exc:  # even sys.exit() in user code only fails its call
            return execution_pb2.Outcome(failure=failure_from_exception(exc, loaded.name))
        try:
            value = serialize(result, what=f"the result of {loaded.name!r}", limit=self._limit)
        except CloudburstError as exc:
            # The runtime's own error (too large, unpicklable), not the function's.
            return execution_pb2.Outcome(error=error_to_call_error(exc))
        except BaseException as exc:  # the result's own pickling hook exiting
            return execution_pb2.Outcome(failure=failure_from_exception(exc, loaded.name))
        return execution_pb2.Outcome(value=value)

    def _invoke_chain(
        self,
        stage: _Chain,
        loaded: runner.LoadedFunction,
        library: UserLibrary,
        args: tuple[Any, ...],
        where: Where,
    ) -> execution_pb2.Outcome:
        """Run a DAG stage, then each downstream stage it can run at once.

        Each function of a chain ``a -> b`` whose ``b`` waits for nothing else
        and is placed here runs straight after ``a`` in the same place (a
        worker thread, or the loop while each function may run there),
        sparing a return to the loop, a trigger and a thread hand-off per stage.
        """
        outcome = self._invoke(loaded, library, args, stage.last in self.pinned, where)
        self._measured(stage.last, stage.started, outcome)
        while (ready := self._next_in_chain(stage, outcome, where)) is not None:
            loaded, args = ready
            library = self._library(stage.schedule.call_id)
            started = time.monotonic()
            try:
                outcome = self._invoke(loaded, library, args, stage.last in self.pinned, where)
            finally:
                # Only a mailbox needs ending, on the loop; waking the loop for
                # nothing would cost every chained stage a thread hand-off.
                if library.has_mailbox:
                    assert self._loop is not None
                    with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                        self._loop.call_soon_threadsafe(library.close)
            self._measured(stage.last, started, outcome)
        return outcome

    def _next_in_chain(
        self, stage: _Chain, outcome: execution_pb2.Outcome, where: Where = THREAD
    ) -> tuple[runner.LoadedFunction, tuple[Any, ...]] | None:
        """The downstream stage to run next on this thread, with its arguments, if any.

        Only the simple case qualifies: one downstream that waits for this stage
        alone, placed here, loaded at the version the call wants, with small
        static arguments and no KVS references, a small value to pass on, and no
        tracing (whose spans are opened on the loop); on the loop, it must also
        be a function that runs there, and one that never uses the user library
        unless the chain runs in a greenlet. Anything else goes through a
        trigger as usual. Sets ``stage.last`` to the function chosen.
        """
        if telemetry.tracing() or self._closed or outcome.WhichOneof("result") != "value":
            return None
        topo, schedule = stage.topology, stage.schedule
        downstreams = topo.downstreams.get(stage.last, ())
        if len(downstreams) != 1:
            return None
        target = downstreams[0]
        if topo.upstreams[target] != (stage.last,):
            return None
        if schedule.placements[target] != self.executor_id:
            return None
        loaded = self._functions.get(target)
        if loaded is None or loaded.version < schedule.function_versions[target]:
            return None
        if where != THREAD and not self._inline.follows(loaded.runs, where):
            return None
        if len(outcome.value.data) > LARGE_VALUE_BYTES:
            return None
        arguments = schedule.function_arguments[target].arguments
        if any(
            a.WhichOneof("kind") != "value" or len(a.value.data) > LARGE_VALUE_BYTES
            for a in arguments
        ):
            return None
        try:
            static = [runner.unpickle(a.value) for a in arguments]
            value = runner.unpickle(outcome.value)
        except Exception:
            return None  # the trigger path reports it, naming the stage
        static.extend(value if isinstance(value, tuple) else (value,))
        stage.last = target
        return loaded, tuple(static)

    def _library(self, call_id: str) -> UserLibrary:
        assert self._loop is not None
        return UserLibrary(
            LoopBridge(self._loop, self._call_timeout),
            self._kvs,
            self._clock,
            self._limit,
            call_id,
            self._router,
        )

    async def _store(self, key: str, outcome: execution_pb2.Outcome) -> None:
        await self._kvs.put(key, lww(outcome_value(outcome), self._clock))

    # -- DAG stages ----------------------------------------------------------------

    def _topology(self, dag: function_pb2.Dag) -> Topology:
        key = (dag.name, dag.version)
        topo = self._topologies.get(key)
        if topo is None:
            topo = topology(
                list(dag.functions), [(c.upstream, c.downstream) for c in dag.connections]
            )
            self._topologies[key] = topo
        return topo

    def trigger(self, trigger: execution_pb2.Trigger) -> None:
        """Accept a trigger; run the stage once every upstream has reported."""
        if self._closed:
            logger.warning("executor %s dropped a trigger while shutting down", self.executor_id)
            return
        schedule = trigger.schedule
        target = trigger.target_function
        topo = self._topology(schedule.dag)
        upstreams = topo.upstreams[target]
        if not trigger.upstream_function:
            self._spawn(self._run_stage(schedule, target, {}, {"": dict(trigger.trace_context)}))
            return
        key = (schedule.call_id, target)
        stage = self._stages.get(key)
        if stage is None:
            stage = _Stage(schedule)
            self._stages[key] = stage
            remaining = schedule.deadline_time.ToNanoseconds() / 1e9 - time.time()
            stage.expiry = asyncio.get_running_loop().call_later(
                max(remaining, 0.0), self._expire_stage, key
            )
        stage.outcomes[trigger.upstream_function] = trigger.outcome
        stage.contexts[trigger.upstream_function] = dict(trigger.trace_context)
        if all(u in stage.outcomes for u in upstreams):
            del self._stages[key]
            if stage.expiry:
                stage.expiry.cancel()
            self._spawn(self._run_stage(schedule, target, stage.outcomes, stage.contexts))

    def _expire_stage(self, key: tuple[str, str]) -> None:
        stage = self._stages.pop(key, None)
        if stage is not None:
            missing = [
                u
                for u in self._topology(stage.schedule.dag).upstreams[key[1]]
                if u not in stage.outcomes
            ]
            logger.warning(
                "call %s: stage %s gave up waiting for %s", key[0], key[1], ", ".join(missing)
            )

    async def _run_stage(
        self,
        schedule: execution_pb2.DagSchedule,
        function: str,
        outcomes: dict[str, execution_pb2.Outcome],
        contexts: dict[str, dict[str, str]],
    ) -> None:
        topo = self._topology(schedule.dag)
        with self._stage_span(schedule, topo, function, contexts) as current:
            last, outcome = await self._stage_outcome(schedule, topo, function, outcomes)
            _annotate(current, outcome)
            if last == topo.sink:
                await self._finish(schedule, outcome)
                return
            for downstream in topo.downstreams[last]:
                await self._send_trigger(schedule, downstream, last, outcome)

    def _stage_span(
        self,
        schedule: execution_pb2.DagSchedule,
        topo: Topology,
        function: str,
        contexts: dict[str, dict[str, str]],
    ) -> contextlib.AbstractContextManager[Any]:
        """A stage's ``run`` span (built only while tracing is on)."""
        if not telemetry.tracing():
            return telemetry.span(function)  # no span, and nothing built for one
        # The first upstream (in the DAG's order) is the parent; the others of a join are links.
        ordered = [contexts[u] for u in topo.upstreams[function] if u in contexts] or [
            contexts.get("", {})
        ]
        links = [link for c in ordered[1:] if (link := telemetry.link_to(c)) is not None]
        attributes = {
            **self._attributes(function, schedule.call_id),
            "cloudburst.dag": schedule.dag.name,
        }
        return telemetry.span(f"run {function}", ordered[0], attributes, links)

    async def _stage_outcome(
        self,
        schedule: execution_pb2.DagSchedule,
        topo: Topology,
        function: str,
        outcomes: dict[str, execution_pb2.Outcome],
    ) -> tuple[str, execution_pb2.Outcome]:
        """Run a stage and the chain after it; return the function that ran last, its outcome."""
        stage = _Chain(schedule, topo, function)
        self.active_calls += 1
        try:
            outcome = None
            extra: list[Any] = []
            for upstream in topo.upstreams[function]:
                received = outcomes[upstream]
                if received.WhichOneof("result") != "value":
                    outcome = received
                    break
                value = await self._deserialize(received.value)
                if isinstance(value, tuple):
                    extra.extend(value)
                else:
                    extra.append(value)
            if outcome is None:
                arguments = schedule.function_arguments[function].arguments
                outcome = await self._run(
                    schedule.call_id,
                    function,
                    schedule.function_versions[function],
                    arguments,
                    tuple(extra),
                    pinned=True,
                    stage=stage,
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
        return stage.last, outcome

    async def _send_trigger(
        self,
        schedule: execution_pb2.DagSchedule,
        target: str,
        upstream: str,
        outcome: execution_pb2.Outcome,
    ) -> None:
        trigger = execution_pb2.Trigger(
            schedule=schedule, target_function=target, upstream_function=upstream
        )
        trigger.outcome.CopyFrom(outcome)
        telemetry.inject(trigger.trace_context)
        executor_id = schedule.placements[target]
        if executor_id == self.executor_id:
            self.trigger(trigger)
            return
        try:
            peer = self._peers.get(executor_id, schedule.executor_addresses[executor_id])
            await peer.trigger(trigger)
        except CloudburstError as exc:
            logger.warning("call %s: cannot reach %s: %s", schedule.call_id, executor_id, exc)
            await self._finish(schedule, execution_pb2.Outcome(error=error_to_call_error(exc)))

    async def _finish(
        self, schedule: execution_pb2.DagSchedule, outcome: execution_pb2.Outcome
    ) -> None:
        """Deliver the sink's outcome: store it and/or route it to the waiting scheduler."""
        if schedule.HasField("start_time"):
            elapsed = time.time() - schedule.start_time.ToNanoseconds() / 1e9
            telemetry.DAG_DURATION.record(max(elapsed, 0.0), {"dag": schedule.dag.name})
        telemetry.DAG_CALLS.add(
            1, {"dag": schedule.dag.name, "outcome": outcome.WhichOneof("result") or ""}
        )
        if schedule.response_key:
            try:
                await self._store(schedule.response_key, outcome)
            except CloudburstError:
                logger.exception("call %s: cannot store the result", schedule.call_id)
        if schedule.direct_response:
            remaining = schedule.deadline_time.ToNanoseconds() / 1e9 - time.time()
            self.results.deliver(schedule.call_id, outcome, keep_for=remaining)


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


def _failure_outcome_of(exc: RemoteFunctionError) -> execution_pb2.Outcome:
    failure = value_pb2.Failure(
        type=exc.remote_type,
        message=exc.remote_message,
        traceback=exc.remote_traceback,
        function_name=exc.function_name,
    )
    return execution_pb2.Outcome(failure=failure)


def outcome_value(outcome: execution_pb2.Outcome) -> value_pb2.Value:
    """The value stored in the KVS for an outcome: the value, or the failure as a failure value."""
    kind = outcome.WhichOneof("result")
    if kind == "value":
        return outcome.value
    if kind == "failure":
        return failure_value(outcome.failure)
    error = outcome.error
    reason = reason_name(error.reason)
    return failure_value(runtime_failure(reason, error.message))
