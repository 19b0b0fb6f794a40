"""The scheduler's orchestration: registration, pinning, and placing calls.

It owns no durable state: definitions live in the KVS (see ``registry``). For
a DAG call it places every function, names in the schedule the way the sink's
result comes back (its own stream to the sink's executor), then sends start
triggers to the sources; the executors take it from there.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import re
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    DagAlreadyExistsError,
    DagNotFoundError,
    FunctionInUseError,
    FunctionNotFoundError,
    InvalidArgumentError,
    InvalidDagError,
    RemoteFunctionError,
    UnavailableError,
)
from cloudburst.serialization import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    LwwClock,
    check_accept,
    check_size,
    failure_to_error,
    lww,
)
from cloudburst.v1 import (
    execution_pb2,
    executor_service_pb2,
    function_pb2,
    lattice_pb2,
    scheduler_service_pb2,
    value_pb2,
)
from cloudburst_grpc import dags as dag_rules
from cloudburst_grpc import telemetry
from cloudburst_grpc.answer_streams import DELIVERED_DIRECTLY, AnswerTo
from cloudburst_grpc.call_ids import new_call_id
from cloudburst_grpc.config import SchedulerConfig
from cloudburst_grpc.executor_client import NotDeliveredError
from cloudburst_grpc.failures import (
    error_to_call_error,
    failure_value,
    outcome_value,
    runtime_failure,
)
from cloudburst_grpc.kvs_access import KvsAccess
from cloudburst_grpc.scheduler import policy
from cloudburst_grpc.scheduler.pool import ExecutorPool
from cloudburst_grpc.scheduler.registry import Registry
from cloudburst_grpc.scheduler.release import HeldStores, ResultReleaser

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 256
#: The most functions one DAG may list (a call's cost grows linearly with them).
MAX_DAG_FUNCTIONS = 10_000
#: Pins of one DAG's functions in flight at once while it registers.
PINS_AT_ONCE = 16
#: The most times a call may run again after losing its executor (``retries`` at registration).
MAX_RETRIES = 10
#: Seconds past a DAG call's deadline after which its result will not be stored any more.
STORE_GRACE_SECONDS = 10.0
#: Seconds :meth:`Scheduler.close` waits for the results it stores itself to be stored.
CLOSE_STORE_SECONDS = 5.0
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")
#: A response key a caller may choose: the form of :func:`new_call_id` (128 random bits).
_CHOSEN_KEY = re.compile(r"[0-9a-f]{32}")


@dataclass
class Accepted:
    """A call the scheduler accepted: where its result goes, and the outcome if awaited."""

    response_key: str
    outcome: asyncio.Future[execution_pb2.Outcome] | None


def check_name(kind: str, name: str) -> None:
    """Reject empty, over-long or control-character names."""
    if not name:
        raise InvalidArgumentError(f"a {kind} name must not be empty")
    if len(name) > MAX_NAME_LENGTH or _CONTROL_CHARACTER.search(name):
        raise InvalidArgumentError(
            f"{kind} name {name[:40]!r} must be at most {MAX_NAME_LENGTH} printable characters"
        )


def check_chosen_key(frame: scheduler_service_pb2.StreamCallsRequest) -> str:
    """The response key a call stream's caller chose for the call in ``frame``, checked.

    A chosen key stands for a key the scheduler would have chosen, so it must
    look like one (32 lowercase hex digits) and its call must have its outcome
    streamed, name no key of its own and not return its result directly.

    Raises:
        InvalidArgumentError: The key or its call does not qualify (the message says why).
    """
    key = frame.chosen_response_key
    if not _CHOSEN_KEY.fullmatch(key):
        raise InvalidArgumentError(
            f"chosen_response_key {key[:40]!r} must be 32 lowercase hexadecimal digits "
            "(128 random bits, as the scheduler chooses keys); send none to have the "
            "scheduler choose the key",
            {"response_key": key[:64]},
        )
    call = frame.call_function if frame.WhichOneof("call") == "call_function" else frame.call_dag
    if not frame.stream_outcome or call.direct_response or call.response_key:
        raise InvalidArgumentError(
            "chosen_response_key is only for a call whose outcome is streamed "
            "(stream_outcome) and that names no response_key and sets no direct_response; "
            "drop chosen_response_key or those settings",
            {"response_key": key},
        )
    return key


class Scheduler:
    """Registers functions and DAGs, and places calls on the executor pool."""

    def __init__(
        self,
        scheduler_id: str,
        kvs: KvsAccess,
        pool: ExecutorPool,
        config: SchedulerConfig,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        *,
        stores_results: bool = False,
        direct_answers: bool | None = None,
    ) -> None:
        self.scheduler_id = scheduler_id
        self.direct_answers = (
            config.direct_answers if direct_answers is None else direct_answers
        ) and not stores_results
        """Whether a sink answers callers on the answer streams they hold at its executor.

        Off where callers cannot reach executors (``cbgrpc serve``'s one port).
        """
        self.stores_results = stores_results
        """Whether the results of calls whose caller awaits the outcome are stored here.

        The executor that ran the call (the DAG's sink) then only answers, and
        this scheduler stores the outcome it forwards. Right where ``kvs`` is in
        this process and the executors are not (``cbgrpc serve`` with isolated
        executors): the store is then a call in this process instead of a KVS
        request from the executor and its report that the store is done.
        """
        self.pool = pool
        self.config = config
        self.max_payload_bytes = max_payload_bytes
        self._clock = LwwClock(f"scheduler-{scheduler_id}")
        self.registry = Registry(kvs, self._clock)
        self._kvs = kvs
        # An uncollected result under a key chosen here goes once its call's longest life
        # (call_timeout_seconds) and then result_ttl_seconds have passed.
        self.releaser = ResultReleaser(kvs, config.result_ttl_seconds, config.call_timeout_seconds)
        self._holds = HeldStores(self._store_now, self.releaser)
        """The held stores of results stored here (``stores_results``) that callers may release."""
        self._last_version = 0
        self._tasks: set[asyncio.Task[execution_pb2.Outcome]] = set()
        self._background: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stores: set[asyncio.Task[None]] = set()
        self._topologies = dag_rules.TopologyCache()
        self._plans: dict[str, _Plan] = {}
        self.relayed_outcomes = 0
        """Outcomes of calls (one-shot or a DAG's sink) executors sent here to be answered."""
        self.answered_directly = 0
        """Outcomes executors sent straight to their callers' answer streams instead."""

    def _next_version(self) -> int:
        self._last_version = max(time.time_ns(), self._last_version + 1)
        return self._last_version

    # -- functions -----------------------------------------------------------------

    async def create_function(
        self, function: function_pb2.Function, replace_existing: bool
    ) -> function_pb2.Function:
        """Register a function; warm executors reload it on their next call."""
        check_name("function", function.name)
        if function.kind == function_pb2.FUNCTION_KIND_UNSPECIFIED:
            raise InvalidArgumentError("function.kind must be FUNCTION or CLASS")
        if function.retries > MAX_RETRIES:
            raise InvalidArgumentError(f"function.retries must be at most {MAX_RETRIES}")
        if function.body.serializer != value_pb2.SERIALIZER_CLOUDPICKLE:
            raise InvalidArgumentError("function.body must be a SERIALIZER_CLOUDPICKLE value")
        check_size(function.body, what=f"function {function.name!r}", limit=self.max_payload_bytes)
        for index, value in enumerate(function.init_arguments):
            check_size(
                value,
                what=f"init argument {index + 1} of {function.name!r}",
                limit=self.max_payload_bytes,
            )
        existing = await self.registry.get_function(function.name)
        if existing is not None and not replace_existing:
            from cloudburst.errors import AlreadyExistsError

            raise AlreadyExistsError(
                f"function {function.name!r} is already registered; set replace_existing",
                {"function": function.name},
            )
        stored = function_pb2.Function()
        stored.CopyFrom(function)
        stored.version = self._next_version()
        if stored.sources and stored.ByteSize() > self.max_payload_bytes:
            # Source text only improves tracebacks: drop it rather than refuse the function.
            del stored.sources[:]
        check_size(
            value_pb2.Value(data=stored.SerializeToString()),
            what=f"function {function.name!r} with its init arguments",
            limit=self.max_payload_bytes,
        )
        await self.registry.put_function(stored)
        # A pinned class keeps its instance until told: reload it wherever pinned.
        for executor_id in self.pool.pinned_on(stored.name):
            await self._pin(executor_id, stored.name, stored.version)
        logger.info("registered function %s (version %d)", stored.name, stored.version)
        return stored

    async def get_function(self, name: str) -> function_pb2.Function:
        """Return a registered function or raise FunctionNotFoundError."""
        check_name("function", name)
        function = await self.registry.get_function(name)
        if function is None:
            raise FunctionNotFoundError(
                f"function {name!r} is not registered; register it first", {"function": name}
            )
        return function

    async def delete_function(self, name: str) -> None:
        """Delete a function that no DAG uses."""
        await self.get_function(name)
        users = [d.name for d in await self.registry.dags() if name in d.functions]
        if users:
            raise FunctionInUseError(
                f"function {name!r} is used by DAG(s) {', '.join(users)}; delete them first",
                {"function": name, "dags": ",".join(users)},
            )
        for executor_id in self.pool.pinned_on(name):
            await self._unpin(executor_id, name)
        await self.registry.delete_function(name)
        logger.info("deleted function %s", name)

    # -- DAGs ----------------------------------------------------------------------

    async def create_dag(self, dag: function_pb2.Dag) -> function_pb2.Dag:
        """Validate, store and pin a DAG."""
        check_name("DAG", dag.name)
        if await self.registry.get_dag(dag.name) is not None:
            raise DagAlreadyExistsError(
                f"a DAG named {dag.name!r} already exists; delete it first or pick another name",
                {"dag": dag.name},
            )
        functions = list(dag.functions)
        if dag.retries > MAX_RETRIES:
            raise InvalidArgumentError(f"dag.retries must be at most {MAX_RETRIES}")
        if len(functions) > MAX_DAG_FUNCTIONS:
            raise InvalidDagError(
                f"DAG {dag.name!r} lists {len(functions)} functions; at most "
                f"{MAX_DAG_FUNCTIONS} are allowed",
                {"dag": dag.name, "limit": str(MAX_DAG_FUNCTIONS)},
            )
        registered = {f for f in functions if await self.registry.get_function(f) is not None}
        topo = dag_rules.validate(
            functions, [(c.upstream, c.downstream) for c in dag.connections], registered
        )
        stored = function_pb2.Dag()
        stored.CopyFrom(dag)
        stored.version = self._next_version()
        schedule = self._schedule_bytes(stored)
        if schedule > self.max_payload_bytes:
            raise InvalidDagError(
                f"DAG {dag.name!r} is too large to call: the schedule each of its calls sends "
                f"would take about {schedule:,} bytes, more than server.max_payload_bytes "
                f"({self.max_payload_bytes:,}); use fewer functions or shorter names",
                {"dag": dag.name, "limit": str(self.max_payload_bytes)},
            )
        await self.registry.put_dag(stored)
        # Its first call need not compute it again (a DAG of thousands of functions: ~30 ms).
        self._topologies.put(stored, topo)
        # Chosen one after another (each choice counts the ones before it, so pins spread),
        # then pinned a few at a time: a DAG of thousands of functions registers in seconds.
        pins: list[tuple[str, str, int]] = []
        for name in functions:
            function = await self.get_function(name)
            for executor_id in policy.choose_pins(
                name, self.pool.views(), self.config.pin_replicas
            ):
                self.pool.note_pinned(executor_id, name, True)
                pins.append((executor_id, name, function.version))
        lanes = asyncio.Semaphore(PINS_AT_ONCE)

        async def pin(executor_id: str, name: str, version: int) -> None:
            async with lanes:
                if not await self._pin(executor_id, name, version):
                    self.pool.note_pinned(executor_id, name, False)  # counted above

        await asyncio.gather(*(pin(*p) for p in pins))
        logger.info("registered DAG %s with %d functions", stored.name, len(functions))
        return stored

    def _schedule_bytes(self, dag: function_pb2.Dag) -> int:
        """About the size of a call's schedule of ``dag`` without static arguments (serialized).

        Placements are counted at the longest executor id of the pool, versions at
        their largest size.
        """
        views = self.pool.views()
        executor_id = "x" * max((len(v.executor_id) for v in views), default=64)
        schedule = execution_pb2.DagSchedule(call_id=new_call_id(), dag=dag)
        for name in dag.functions:
            schedule.placements[name] = executor_id
            schedule.function_versions[name] = 2**64 - 1
            schedule.function_arguments[name].SetInParent()
        for view in views:
            schedule.executor_addresses[view.executor_id] = view.address
        return schedule.ByteSize()

    async def get_dag(self, name: str) -> function_pb2.Dag:
        """Return a registered DAG or raise DagNotFoundError."""
        check_name("DAG", name)
        dag = await self.registry.get_dag(name)
        if dag is None:
            raise DagNotFoundError(f"DAG {name!r} is not registered", {"dag": name})
        return dag

    async def delete_dag(self, name: str) -> None:
        """Delete a DAG and unpin functions no other DAG uses."""
        dag = await self.get_dag(name)
        await self.registry.delete_dag(name)
        still_used = {f for d in await self.registry.dags() for f in d.functions}
        for function in dag.functions:
            if function not in still_used:
                for executor_id in self.pool.pinned_on(function):
                    await self._unpin(executor_id, function)
        logger.info("deleted DAG %s", name)

    async def start(self) -> None:
        """Follow definition changes and check executors' health (until :meth:`close`)."""
        task = asyncio.create_task(self.registry.follow())
        self._background = task
        self._monitor = asyncio.create_task(
            self.pool.monitor(
                self.config.health_interval_seconds, self.config.health_timeout_seconds
            )
        )

    async def restore_pins(self) -> None:
        """Pin the functions of every stored DAG again (after a restart, or on new executors)."""
        for dag in await self.registry.dags():
            for name in dag.functions:
                function = await self.registry.get_function(name)
                if function is None:
                    continue
                for executor_id in policy.choose_pins(
                    name, self.pool.views(), self.config.pin_replicas
                ):
                    if executor_id not in self.pool.pinned_on(name):
                        await self._pin(executor_id, name, function.version)

    async def _pin(self, executor_id: str, function: str, version: int) -> bool:
        """Pin a function on an executor; whether it worked (a failure is logged)."""
        try:
            await self.pool.peer(executor_id).pin(function, version)
        except CloudburstError as exc:
            logger.warning("cannot pin %s on %s: %s", function, executor_id, exc)
            return False
        self.pool.note_pinned(executor_id, function, True)
        return True

    async def _unpin(self, executor_id: str, function: str) -> None:
        self.pool.note_pinned(executor_id, function, False)
        try:
            await self.pool.peer(executor_id).unpin(function)
        except CloudburstError as exc:
            logger.warning("cannot unpin %s on %s: %s", function, executor_id, exc)

    # -- calls ---------------------------------------------------------------------

    async def call_function(
        self,
        request: scheduler_service_pb2.CallFunctionRequest,
        want_outcome: bool,
        timeout: float | None,
        trace_context: Mapping[str, str] | None = None,
        expire: bool = True,
        *,
        answer_to: AnswerTo | None = None,
        chosen_key: str = "",
        releasable: bool = False,
    ) -> Accepted:
        """Place a one-shot call; its outcome is awaitable when ``want_outcome``.

        A result stored under a key chosen here (or ``chosen_key``, one the
        caller chose in its place, see :func:`check_chosen_key`) expires unless
        ``expire`` is False. ``answer_to`` is as for :meth:`call_dag`, given the
        executor the call runs on. ``releasable``: the caller may release the
        result, so the executor may hold its store (see :mod:`.release`).
        """
        call_id = new_call_id()
        _check_delivery(request)
        # direct_response returns the result and stores nothing.
        response_key = (
            "" if request.direct_response else (request.response_key or chosen_key or call_id)
        )
        attributes = {
            "cloudburst.function": request.name,
            "cloudburst.call_id": call_id,
            "cloudburst.response_key": response_key,
        }
        with telemetry.span(f"schedule {request.name}", trace_context, attributes) as current:
            function = await self.get_function(request.name)
            _check_arguments(request.arguments, f"call of {request.name!r}", self.max_payload_bytes)
            keys = [a.reference.key for a in request.arguments if a.HasField("reference")]
            self.releaser.want(keys)
            view = policy.place(request.name, keys, self.pool.views())
            if current is not None:
                current.set_attribute("cloudburst.executor", view.executor_id)
            limit = self._timeout(timeout)
            execute = executor_service_pb2.ExecuteFunctionRequest(
                call_id=call_id,
                function_name=request.name,
                function_version=function.version,
                arguments=request.arguments,
                response_key=response_key,
                direct_response=want_outcome,
                accept_serializers=request.accept_serializers,
            )
            _set_time(execute.deadline_time, time.time_ns() + int(limit * 1e9))
            telemetry.inject(execute.trace_context)

        # A caller waiting for the outcome is answered before the executor stores it; a
        # release of the result waits until it is stored (a delete must not come first).
        stored: asyncio.Future[None] | None = None
        if want_outcome and response_key:
            stored = asyncio.get_running_loop().create_future()
            self.releaser.storing(response_key, stored)
        if stored is not None and self.stores_results:
            execute.response_key = ""  # the executor only answers; the outcome is stored below
            if releasable:
                self.releaser.held_by(response_key, self._holds)
        elif stored is not None and releasable:
            execute.hold_store = True  # a release that comes soon spares the store
            # Known from now: a call that refers to the result may come before this one is sent.
            self.releaser.held_by(response_key, self.pool.peer(view.executor_id))

        async def run() -> execution_pb2.Outcome:
            executor_id, retries, redelivered = view.executor_id, function.retries, False
            try:
                while True:
                    route = answer_to.route(executor_id) if answer_to is not None else None
                    execute.answer_stream_id, execute.answer_sequence = route or ("", 0)
                    answered = answer_to if route is not None else None
                    try:
                        if execute.response_key:
                            return await self._execute(
                                executor_id, execute, limit, stored, answered
                            )
                        outcome = await self._execute(executor_id, execute, limit, None, answered)
                        if stored is not None:
                            self._store_answered(response_key, outcome, stored, releasable)
                        return outcome
                    except NotDeliveredError as exc:
                        # It never reached the executor: placing it elsewhere is always safe.
                        if redelivered:
                            raise
                        redelivered = True
                        logger.info(
                            "call %s never reached its executor (%s); retrying", call_id, exc
                        )
                    except UnavailableError as exc:
                        # It may have run there: again only where the function opted in.
                        if type(exc) is not UnavailableError or retries <= 0:
                            raise
                        retries -= 1
                        logger.warning(
                            "call %s runs again (%d retries left): %s", call_id, retries, exc
                        )
                    executor_id = policy.place(request.name, keys, self.pool.views()).executor_id
            except CloudburstError as exc:
                if isinstance(exc, UnavailableError):
                    # Also for whoever waits on the key (a call given this one's future).
                    self._store_failure(response_key, str(exc))
                if stored is not None and not stored.done():
                    stored.set_result(None)  # no executor will report a store any more
                return execution_pb2.Outcome(error=error_to_call_error(exc))

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if expire and response_key and not request.response_key:
            self.releaser.expire_later(response_key)
        return Accepted(response_key, task if want_outcome else None)

    async def _execute(
        self,
        executor_id: str,
        execute: executor_service_pb2.ExecuteFunctionRequest,
        limit: float,
        stored: asyncio.Future[None] | None = None,
        answer_to: AnswerTo | None = None,
    ) -> execution_pb2.Outcome:
        """Run a one-shot call on an executor; losing the executor fails the call at once.

        ``stored`` settles once the executor that answered reports the result stored.
        ``answer_to``: the call is answered on the caller's answer stream, and the
        caller may say it has the answer before the executor does (the call then
        stops counting towards the executor's load).

        Raises:
            UnavailableError: The executor was lost before the call finished
                (:class:`NotDeliveredError` when the call never reached it).
        """
        peer = self.pool.peer(executor_id)
        task = asyncio.current_task()
        assert task is not None
        lost: list[str] = []
        finished = False

        def cancel() -> None:
            # Deferred a turn: an answer that arrived with the loss still wins.
            if not finished:
                task.cancel()

        def on_lost(reason: str) -> None:
            lost.append(reason)
            asyncio.get_running_loop().call_soon(cancel)

        counted = True

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.pool.finished(executor_id)

        self.pool.started(executor_id)
        if answer_to is not None:
            answer_to.when_answered(uncount)
        watch = self.pool.track((executor_id,), on_lost)
        attempt = peer.expect_stored(execute.response_key) if stored is not None else None
        if attempt is not None and execute.hold_store:
            self.releaser.held_by(execute.response_key, peer)
        try:
            response = await peer.execute(execute, limit)
            if attempt is not None and stored is not None:
                attempt.add_done_callback(
                    functools.partial(self._reported_stored, execute.response_key, stored)
                )
                attempt = None
            if response.delivered_directly:
                self.answered_directly += 1
                return DELIVERED_DIRECTLY
            self.relayed_outcomes += 1
            return response.outcome
        except asyncio.CancelledError:
            if not lost or task.uncancel() > 0:
                raise
            raise UnavailableError(
                f"call of {execute.function_name!r} ({execute.call_id}) did not finish: {lost[0]}",
                {"executor": executor_id},
            ) from None
        except UnavailableError as exc:
            self.pool.set_aside(executor_id, str(exc))
            raise
        finally:
            finished = True
            if attempt is not None:
                attempt.cancel()  # this attempt failed: nothing to wait for from it
            self.pool.untrack(watch)
            uncount()

    def _reported_stored(
        self, response_key: str, stored: asyncio.Future[None], attempt: asyncio.Future[bool]
    ) -> None:
        """Settle ``stored`` as the executor reported its store; a dropped one needs no delete."""
        if not attempt.cancelled() and attempt.result():
            self.releaser.dropped(response_key)
        _settle(stored, None)

    def _store_answered(
        self,
        response_key: str,
        outcome: execution_pb2.Outcome,
        stored: asyncio.Future[None],
        hold: bool = False,
    ) -> None:
        """Store an outcome answered to its caller (see :attr:`stores_results`).

        The caller is answered without waiting for the store; ``stored``
        settles once it is done (or failed), so a release of the result waits
        for it. With ``hold`` (the caller may release it), the store is held
        as an executor holds one (see :class:`~.release.HeldStores`).
        """
        lattice = lww(outcome_value(outcome), self._clock)
        if hold:
            self._holds.hold(response_key, lattice, stored)
        else:
            self._store_now(response_key, lattice, stored)

    def _store_now(
        self, response_key: str, lattice: lattice_pb2.Lattice, stored: asyncio.Future[None]
    ) -> None:
        """Store a result in the background; ``stored`` settles once it is done (or failed)."""

        async def store() -> None:
            try:
                await self._kvs.put(response_key, lattice)
            except CloudburstError as exc:
                logger.warning("cannot store the result at %r: %s", response_key, exc)
            finally:
                _settle(stored, None)

        self._background_task(store())

    def _store_failure(
        self,
        response_key: str,
        message: str,
        reason: str = UnavailableError.reason,
        stored: asyncio.Future[None] | None = None,
    ) -> None:
        """Store a runtime failure as a call's result, unless its real result is stored.

        The failure carries the lowest possible timestamp, so it never replaces
        a result and any result stored later replaces it: a caller waiting on
        the key learns at once that its call cannot finish. ``stored`` settles
        once the store is done (or failed).
        """
        lattice = lattice_pb2.Lattice()
        lattice.lww.timestamp.time_ns = 1
        lattice.lww.timestamp.writer_id = self._clock.writer_id
        lattice.lww.value.CopyFrom(failure_value(runtime_failure(reason, message)))

        async def store() -> None:
            try:
                await self._kvs.put(response_key, lattice)
            except CloudburstError as exc:
                logger.warning("cannot store the failure of %s: %s", response_key, exc)
            finally:
                if stored is not None:
                    _settle(stored, None)

        self._background_task(store())

    def refused_chosen_key(self, response_key: str, error: CloudburstError) -> None:
        """Store why a call whose caller chose ``response_key`` was not accepted, there.

        Its caller learns it from the call's answer; whoever else waits on the
        key (a later call given this one's future) learns it from the store.
        The key then expires, or is released, like that of an accepted call.
        """
        stored = asyncio.get_running_loop().create_future()
        self.releaser.storing(response_key, stored)
        self._store_failure(response_key, error.message, error.reason, stored)
        self.releaser.expire_later(response_key)

    async def call_dag(
        self,
        request: scheduler_service_pb2.CallDagRequest,
        want_outcome: bool,
        timeout: float | None,
        trace_context: Mapping[str, str] | None = None,
        expire: bool = True,
        *,
        answer_to: AnswerTo | None = None,
        chosen_key: str = "",
        releasable: bool = False,
    ) -> Accepted:
        """Place every function of a DAG call and trigger its sources.

        A result stored under a key chosen here (or ``chosen_key``, as for
        :meth:`call_function`) expires unless ``expire`` is False.
        ``releasable`` is as for :meth:`call_function`.
        ``answer_to`` says, given the sink's executor id, on which of the caller's
        answer streams the sink answers it, if any; the outcome is then
        :data:`~cloudburst_grpc.answer_streams.DELIVERED_DIRECTLY` when it did.
        """
        call_id = new_call_id()
        _check_delivery(request)
        response_key = (
            "" if request.direct_response else (request.response_key or chosen_key or call_id)
        )
        loop = asyncio.get_running_loop()
        result: asyncio.Future[execution_pb2.Outcome] = loop.create_future()
        call = _DagCall(request, response_key, self._timeout(timeout), trace_context)
        call.answer_to = answer_to
        call.stored_here = bool(want_outcome and response_key and self.stores_results)
        call.releasable = releasable
        if want_outcome and response_key:
            # The sink answers before it stores; a release of the result waits for the store,
            # at most until a while after the call's deadline (a sink that never delivered).
            call.stored = loop.create_future()
            self.releaser.storing(response_key, call.stored)
            timer = loop.call_later(call.limit + STORE_GRACE_SECONDS, call.settle_stored)
            call.stored.add_done_callback(lambda _: timer.cancel())
            if call.stored_here and releasable:
                self.releaser.held_by(response_key, self._holds)
        try:
            await self._start_dag(call, call_id, result, None)
        except BaseException:
            call.settle_stored()  # nothing will be stored
            raise
        if expire and response_key and not request.response_key:
            self.releaser.expire_later(response_key)
        return Accepted(response_key, result if want_outcome else None)

    async def get_result(
        self, response_key: str, release: bool, timeout: float | None
    ) -> execution_pb2.Outcome:
        """Wait (up to ``timeout``) for the result stored under a response key; its outcome.

        With ``release``, the stored result is deleted once read.

        Raises:
            InvalidArgumentError: The key is empty, or holds something other than a result.
            CloudburstTimeoutError: No result was stored under the key in time.
        """
        if not response_key:
            raise InvalidArgumentError("response_key must not be empty")
        limit = self._timeout(timeout)
        lattice = await self._kvs.get(response_key, wait=True, timeout=limit)
        if lattice is None:
            raise CloudburstTimeoutError(
                f"no result was stored under {response_key!r} within {limit:.1f}s; "
                "the call may still be running, or the key may be wrong or already released",
                {"key": response_key},
            )
        if lattice.WhichOneof("kind") != "lww":
            raise InvalidArgumentError(
                f"{response_key!r} holds a set, not a call's result", {"key": response_key}
            )
        if release:
            self.releaser.release([response_key])
        return outcome_of(lattice.lww.value)

    async def _start_dag(
        self,
        call: _DagCall,
        call_id: str,
        result: asyncio.Future[execution_pb2.Outcome],
        retries: int | None,
    ) -> None:
        """Place and trigger one run of a DAG call whose outcome goes to ``result``.

        ``retries`` is how many more runs a lost executor may cost (None: the DAG's ``retries``).
        """
        request = call.request
        attributes = (
            {
                "cloudburst.dag": request.name,
                "cloudburst.call_id": call_id,
                "cloudburst.response_key": call.response_key or call_id,
            }
            if telemetry.tracing()
            else None
        )
        with telemetry.span(f"schedule {request.name}", call.trace_context, attributes):
            schedule = execution_pb2.DagSchedule()
            # A sink whose result is stored here answers without storing it.
            key = "" if call.stored_here else call.response_key
            plan, placed = await self._place_dag(request, call_id, key, call.limit, schedule)
            # A release that comes soon spares the sink's store.
            schedule.hold_store = call.releasable and call.stored is not None and bool(key)
            self._follow_dag(
                call,
                schedule,
                placed,
                plan.topology.sink,
                result,
                plan.dag.retries if retries is None else retries,
            )
            # Each peer sends the schedule once per stream (a source's trigger refers to it
            # after that), so many sources on one executor do not each carry the whole DAG.
            for source in plan.topology.sources:
                trigger = execution_pb2.Trigger(target_function=source, call_id=call_id)
                telemetry.inject(trigger.trace_context)
                await self.pool.peer(placed[source]).trigger(trigger, schedule)

    def _follow_dag(
        self,
        call: _DagCall,
        schedule: execution_pb2.DagSchedule,
        placed: Mapping[str, str],
        sink: str,
        result: asyncio.Future[execution_pb2.Outcome],
        retries: int,
    ) -> None:
        """Settle ``result`` with the DAG call's outcome, at once if one of its executors is lost.

        ``placed`` is the schedule's placements (executor ids by function).

        The sink reports every call's end here (``direct_response`` is always
        set), by the route the schedule names, so the scheduler knows which
        calls are still running where. A
        call that loses an executor runs again from the start while ``retries``
        last (the DAG opted into at-least-once runs); otherwise it ends with an
        UNAVAILABLE error, also stored under its response key for a caller
        waiting there.
        """
        call_id, name = schedule.call_id, call.request.name
        failed = False

        def fail(error: CloudburstError) -> None:
            nonlocal failed
            if failed or result.done():
                return  # this run failed already (and may have been run again)
            failed = True
            attempt, call.attempt = call.attempt, None  # this run's sink will report no store
            if attempt is not None:
                attempt.cancel()
            if retries > 0 and type(error) is UnavailableError:
                logger.warning(
                    "DAG call %s of %s runs again (%d retries left): %s",
                    call_id,
                    name,
                    retries,
                    error,
                )
                self._background_task(self._retry_dag(call, result, retries - 1))
                return
            self._settle_failed(call, result, error)

        def on_lost(reason: str) -> None:
            fail(UnavailableError(f"DAG call {call_id} of {name!r} cannot finish: {reason}"))

        def on_sink(future: asyncio.Future[execution_pb2.Outcome]) -> None:
            self.pool.untrack(watch)
            if future.cancelled():
                fail(CloudburstError(f"DAG call {call_id} of {name!r} was cancelled"))
            elif (error := future.exception()) is not None:
                fail(error if isinstance(error, CloudburstError) else CloudburstError(str(error)))
            elif not result.done():
                outcome = future.result()
                if outcome is DELIVERED_DIRECTLY:
                    self.answered_directly += 1
                else:
                    self.relayed_outcomes += 1
                if call.stored_here and call.stored is not None:
                    self._store_answered(call.response_key, outcome, call.stored, call.releasable)
                result.set_result(outcome)

        watch = self.pool.track(placed.values(), on_lost)
        peer = self.pool.peer(placed[sink])
        if call.stored is not None and not call.stored_here:
            attempt = call.attempt = peer.expect_stored(call.response_key)
            if schedule.hold_store:
                self.releaser.held_by(call.response_key, peer)

            def on_stored(_: object) -> None:
                if call.attempt is attempt:  # not a run that failed meanwhile
                    if not attempt.cancelled() and attempt.result():
                        self.releaser.dropped(call.response_key)
                    call.settle_stored()

            attempt.add_done_callback(on_stored)
        route = call.answer_to.route(peer.executor_id) if call.answer_to is not None else None
        if route is not None:
            schedule.answer_stream_id, schedule.answer_sequence = route
        # The schedule names the way back; nothing is sent to the sink's executor for it.
        peer.expect_result(schedule, call.limit).add_done_callback(on_sink)

    async def _retry_dag(
        self, call: _DagCall, result: asyncio.Future[execution_pb2.Outcome], retries: int
    ) -> None:
        try:
            await self._start_dag(call, new_call_id(), result, retries)
        except CloudburstError as exc:
            self._settle_failed(call, result, exc)

    def _settle_failed(
        self,
        call: _DagCall,
        result: asyncio.Future[execution_pb2.Outcome],
        error: CloudburstError,
    ) -> None:
        call.settle_stored()  # no sink will report a store any more
        if result.done():
            return
        result.set_result(execution_pb2.Outcome(error=error_to_call_error(error)))
        if call.response_key and isinstance(error, UnavailableError):
            self._store_failure(call.response_key, str(error))

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    def _topology(self, dag: function_pb2.Dag) -> dag_rules.Topology:
        """The topology of a DAG version, computed once (DAGs are immutable per version)."""
        return self._topologies.get(dag)

    async def _place_dag(
        self,
        request: scheduler_service_pb2.CallDagRequest,
        call_id: str,
        response_key: str,
        limit: float,
        schedule: execution_pb2.DagSchedule,
    ) -> tuple[_Plan, dict[str, str]]:
        """Fill ``schedule`` with a DAG call's placement; return its plan and placements."""
        dag = await self.get_dag(request.name)
        topo = self._topology(dag)
        functions = self.registry.cached_functions(topo.upstream_first)
        if functions is None:
            functions = tuple([await self.get_function(name) for name in topo.upstream_first])
        unknown = [f for f in request.function_arguments if f not in topo.upstreams]
        if unknown:
            raise InvalidArgumentError(
                f"arguments given for {', '.join(map(repr, unknown))}, which DAG "
                f"{request.name!r} does not contain; its functions are {', '.join(dag.functions)}",
                {"dag": request.name},
            )
        plan = self._plan(dag, topo, functions)
        schedule.CopyFrom(plan.template)
        schedule.call_id = call_id
        schedule.response_key = response_key
        # The sink always reports the end of the call, so the scheduler knows what still runs.
        schedule.direct_response = True
        schedule.reply_to = self.scheduler_id
        schedule.accept_serializers.extend(request.accept_serializers)
        now = time.time_ns()
        _set_time(schedule.start_time, now)
        _set_time(schedule.deadline_time, now + int(limit * 1e9))
        views = self.pool.views()
        placed: dict[str, str] = {}
        for name in topo.upstream_first:
            arguments = request.function_arguments.get(name)
            keys: list[str] = []
            if arguments is not None:
                _check_arguments(
                    arguments.arguments, f"arguments of {name!r}", self.max_payload_bytes
                )
                schedule.function_arguments[name].CopyFrom(arguments)
                keys = [a.reference.key for a in arguments.arguments if a.HasField("reference")]
                self.releaser.want(keys)
            pinned = [v for v in views if name in v.pinned and not v.overloaded]
            upstreams = topo.upstreams[name]
            near = placed[upstreams[0]] if upstreams else None
            view = policy.place(name, keys, pinned or views, near=near)
            placed[name] = schedule.placements[name] = view.executor_id
            schedule.executor_addresses[view.executor_id] = view.address
        return plan, placed

    def _plan(
        self,
        dag: function_pb2.Dag,
        topo: dag_rules.Topology,
        functions: tuple[function_pb2.Function, ...],
    ) -> _Plan:
        """What every call of this DAG shares, built once per version of it and its functions."""
        plan = self._plans.get(dag.name)
        if (
            plan is not None
            and plan.dag is dag
            and len(plan.functions) == len(functions)
            and all(map(operator.is_, plan.functions, functions))
        ):
            return plan
        template = execution_pb2.DagSchedule()
        template.dag.CopyFrom(dag)
        for name, function in zip(topo.upstream_first, functions, strict=True):
            template.function_arguments[name].SetInParent()
            template.function_versions[name] = function.version
        if len(self._plans) > 4096:
            self._plans.clear()
        plan = self._plans[dag.name] = _Plan(dag, topo, functions, template)
        return plan

    def _timeout(self, timeout: float | None) -> float:
        limit = self.config.call_timeout_seconds
        return limit if timeout is None else max(0.0, min(timeout, limit))

    async def stop_following(self) -> None:
        """Stop following definition changes (before the KVS ends its watches); idempotent."""
        task, self._background = self._background, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Cancel calls still being placed or awaited; idempotent.

        Results held here are stored first (within :data:`CLOSE_STORE_SECONDS`).
        """
        await self.stop_following()
        self._holds.store_all()
        if self._stores:
            await asyncio.wait(self._stores, timeout=CLOSE_STORE_SECONDS)
        monitor, self._monitor = self._monitor, None
        tasks: list[asyncio.Task[Any]] = [*self._tasks, *self._stores]
        if monitor is not None:
            tasks.append(monitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.releaser.close()


@dataclass
class _DagCall:
    """What every run of one DAG call shares (a retried call runs again under a new id)."""

    request: scheduler_service_pb2.CallDagRequest
    response_key: str
    limit: float
    trace_context: Mapping[str, str] | None
    stored: asyncio.Future[None] | None = None
    """Set when the caller may release the result: settles once it is stored (or cannot be)."""
    attempt: asyncio.Future[bool] | None = None
    """The current run's sink's report of the store (True: dropped)."""
    releasable: bool = False
    """Whether the caller may release the result (the sink may then hold its store)."""
    stored_here: bool = False
    """Whether the scheduler stores the result, not the sink (see ``Scheduler.stores_results``)."""
    answer_to: AnswerTo | None = None
    """Where the sink on an executor answers the caller directly (see ``Scheduler.call_dag``)."""

    def settle_stored(self) -> None:
        """The result is stored, or will not be: releases of it need not wait any more."""
        if self.stored is not None and not self.stored.done():
            self.stored.set_result(None)


@dataclass
class _Plan:
    """The part of a DAG call's schedule every call shares, for one version of the definitions.

    The definitions are the registry's cached objects: a new version of the DAG
    or of one of its functions is a new object, and gets a new plan.
    """

    dag: function_pb2.Dag
    topology: dag_rules.Topology
    functions: tuple[function_pb2.Function, ...]
    """The DAG's functions, upstream first."""
    template: execution_pb2.DagSchedule
    """The DAG, its functions' versions and an empty argument list for each."""


def outcome_of(value: value_pb2.Value) -> execution_pb2.Outcome:
    """The outcome a stored result stands for: its value, a failure, or a runtime error."""
    if value.serializer != value_pb2.SERIALIZER_FAILURE:
        return execution_pb2.Outcome(value=value)
    failure = value_pb2.Failure.FromString(value.data)
    error = failure_to_error(failure)
    if isinstance(error, RemoteFunctionError):
        return execution_pb2.Outcome(failure=failure)
    # The executor stores a runtime error (e.g. the function was deleted) as a failure.
    return execution_pb2.Outcome(error=error_to_call_error(error))


def _check_delivery(
    request: scheduler_service_pb2.CallFunctionRequest | scheduler_service_pb2.CallDagRequest,
) -> None:
    """Reject a call that asks for a result both returned directly and stored."""
    if request.direct_response and request.response_key:
        raise InvalidArgumentError(
            "direct_response returns the result and stores nothing, so response_key must be "
            "empty; drop one of them",
            {"response_key": request.response_key},
        )
    check_accept(request.accept_serializers)


def _set_time(stamp: timestamp_pb2.Timestamp, ns: int) -> None:
    """Timestamp.FromNanoseconds, without its Python-level checks (hot path)."""
    stamp.seconds, stamp.nanos = divmod(ns, 1_000_000_000)


def _check_arguments(
    arguments: Iterable[value_pb2.Argument], what: str, max_payload_bytes: int
) -> None:
    for index, argument in enumerate(arguments):
        kind = argument.WhichOneof("kind")
        if kind is None:
            raise InvalidArgumentError(f"{what}: argument {index + 1} is empty")
        if kind == "value":
            if argument.value.serializer == value_pb2.SERIALIZER_UNSPECIFIED:
                raise InvalidArgumentError(f"{what}: argument {index + 1} has no serializer")
            check_size(
                argument.value, what=f"{what}: argument {index + 1}", limit=max_payload_bytes
            )
        if kind == "reference" and not argument.reference.key:
            raise InvalidArgumentError(f"{what}: argument {index + 1} references an empty key")


def _settle(future: asyncio.Future[None], _: object) -> None:
    if not future.done():
        future.set_result(None)
