"""The DAG stages of one executor, as pure code: joins, expiry, routing and chains.

A DAG call arrives as triggers, each with the call's schedule (which the
trigger carries, or refers to: see :mod:`cloudburst_grpc.schedules`). A stage runs
once every upstream's trigger has arrived (a source at once); when it has run,
its outcome goes to each downstream, or, from the sink, to the caller. A
failure upstream is not run on: it becomes the stage's outcome and so, in the
end, the call's result.

:class:`StageState` keeps which upstream outcomes have arrived per (call,
function) and tells the executor what to do next as plain instructions
(:class:`RunStage`, :class:`Forward`, :class:`Deliver`, :class:`Expired`). It
does no I/O and keeps no timers: a stage waiting for its upstreams has a
deadline (its call's), which the executor's one timer asks about through
:meth:`StageState.next_expiry` and :meth:`StageState.expire`.

:func:`chain_next` decides which downstream stage the thread that ran a stage
may run straight after it, sparing a trigger and a hand-off.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cloudburst.v1 import execution_pb2
from cloudburst_grpc.dags import Topology, TopologyCache
from cloudburst_grpc.schedules import epoch_seconds

#: Values larger than this are (de)serialized on a worker thread, not the event loop,
#: and never passed along a chain.
LARGE_VALUE_BYTES = 64 * 1024

Schedule = execution_pb2.DagSchedule
Outcome = execution_pb2.Outcome


@dataclass(slots=True)
class RunStage:
    """Instruction: run ``function`` of the call now; every upstream has reported."""

    schedule: Schedule
    topology: Topology
    """The topology of the schedule's DAG."""
    function: str
    inputs: tuple[Outcome, ...]
    """One outcome per upstream, in the DAG's order (none for a source)."""
    contexts: tuple[Mapping[str, str], ...]
    """The trace contexts the triggers carried, in the same order; a source's own
    trigger's for a source. The first is the stage's parent, the others links."""

    def upstream_values(self) -> tuple[tuple[Outcome, ...], Outcome | None]:
        """The upstream values to pass on in order, up to the first upstream that failed.

        Returns:
            The outcomes holding values before the first failed one, and that
            failed outcome (a failure or an error), which the stage passes on
            instead of running; None when every upstream produced a value.
        """
        for index, received in enumerate(self.inputs):
            if received.WhichOneof("result") != "value":
                return self.inputs[:index], received
        return self.inputs, None


@dataclass(slots=True)
class Forward:
    """Instruction: trigger ``target`` on ``executor_id`` with the outcome of ``upstream``."""

    schedule: Schedule
    target: str
    upstream: str
    outcome: Outcome
    executor_id: str
    local: bool
    """Whether ``executor_id`` is this executor."""

    def trigger(self) -> execution_pb2.Trigger:
        """The trigger to send, without the schedule, which goes along by reference.

        Copying the schedule into every trigger would cost the size of the DAG per
        stage; a remote peer sends it once per stream and call instead (see
        :mod:`cloudburst_grpc.schedules`).
        """
        made = execution_pb2.Trigger(
            target_function=self.target,
            upstream_function=self.upstream,
            call_id=self.schedule.call_id,
        )
        made.outcome.CopyFrom(self.outcome)
        return made


@dataclass(slots=True)
class Deliver:
    """Instruction: the sink ran; deliver ``outcome`` as the call's result."""

    schedule: Schedule
    outcome: Outcome


@dataclass(slots=True)
class Expired:
    """Instruction (to log): a stage gave up waiting for ``missing`` at its call's deadline."""

    call_id: str
    function: str
    missing: tuple[str, ...]


@dataclass(slots=True)
class _Join:
    """The upstream outcomes one stage has received so far."""

    upstreams: tuple[str, ...]
    serial: int
    """Tells this join from a later one of the same (call, function) in the deadline heap."""
    expected: frozenset[str] = frozenset()
    """``upstreams`` as a set: each trigger's check costs the same however wide the join."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    contexts: dict[str, Mapping[str, str]] = field(default_factory=dict)


class StageState:
    """The stages of DAG calls waiting on this executor for their upstreams.

    Args:
        here: This executor's id (where a downstream runs without a network hop).
        topologies: The topology cache to share; a new one by default.
    """

    def __init__(self, here: str, topologies: TopologyCache | None = None) -> None:
        self.here = here
        self.topologies = topologies or TopologyCache()
        self._joins: dict[tuple[str, str], _Join] = {}
        self._deadlines: list[tuple[float, int, tuple[str, str]]] = []
        """A heap of (deadline, serial, key) per join opened; stale entries are skipped."""
        self._serials = itertools.count()

    def trigger(
        self, trigger: execution_pb2.Trigger, schedule: Schedule | None = None
    ) -> RunStage | None:
        """A trigger arrived: the stage to run now, or None while it waits for more.

        ``schedule`` is the call's schedule (by default the one the trigger
        carries); it is kept by reference, never copied, so the work per trigger
        does not grow with the DAG. A trigger without an upstream starts a
        source. A repeated trigger from an upstream replaces the earlier one
        until the stage runs; one that comes after opens a new wait, which expires.

        Raises:
            KeyError: The trigger names a function its DAG does not have.
        """
        if schedule is None:
            schedule = trigger.schedule
        topo = self.topologies.get(schedule.dag)
        target = trigger.target_function
        upstream = trigger.upstream_function
        if not upstream:
            return RunStage(schedule, topo, target, (), (trigger.trace_context,))
        upstreams = topo.upstreams[target]
        if upstreams == (upstream,):  # waits for nothing else
            context = trigger.trace_context
            return RunStage(schedule, topo, target, (trigger.outcome,), (context,))
        key = (schedule.call_id, target)
        join = self._joins.get(key)
        if join is None:
            join = self._joins[key] = _Join(upstreams, next(self._serials), frozenset(upstreams))
            deadline = epoch_seconds(schedule.deadline_time)
            heapq.heappush(self._deadlines, (deadline, join.serial, key))
        if upstream not in join.expected:
            return None  # not an upstream of the target: nothing it waits for
        join.outcomes[upstream] = trigger.outcome
        join.contexts[upstream] = trigger.trace_context
        if len(join.outcomes) < len(upstreams):
            return None
        del self._joins[key]
        return RunStage(
            schedule,
            topo,
            target,
            tuple(join.outcomes[u] for u in upstreams),
            tuple(join.contexts[u] for u in upstreams),
        )

    def next_expiry(self) -> float | None:
        """The earliest deadline (seconds since the epoch) of a stage still waiting, if any."""
        heap = self._deadlines
        while heap:
            _, serial, key = heap[0]
            join = self._joins.get(key)
            if join is not None and join.serial == serial:
                return heap[0][0]
            heapq.heappop(heap)  # that stage ran already
        return None

    def expire(self, now: float) -> list[Expired]:
        """Give up on the stages whose call's deadline is at or before ``now``."""
        expired: list[Expired] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, serial, key = heapq.heappop(heap)
            join = self._joins.get(key)
            if join is None or join.serial != serial:
                continue
            del self._joins[key]
            missing = tuple(u for u in join.upstreams if u not in join.outcomes)
            expired.append(Expired(key[0], key[1], missing))
        return expired

    def ran(self, stage: RunStage, last: str, outcome: Outcome) -> Deliver | list[Forward]:
        """``stage`` (and its chain, ending with ``last``) ran: where its outcome goes."""
        schedule, topo = stage.schedule, stage.topology
        if last == topo.sink:
            return Deliver(schedule, outcome)
        placements = schedule.placements
        return [
            Forward(
                schedule,
                target,
                last,
                outcome,
                placements[target],
                placements[target] == self.here,
            )
            for target in topo.downstreams[last]
        ]

    def clear(self) -> None:
        """Forget every waiting stage (the executor is shutting down)."""
        self._joins.clear()
        self._deadlines.clear()

    def __len__(self) -> int:
        """Stages waiting for upstreams."""
        return len(self._joins)


class Versioned(Protocol):
    """A function loaded at some version."""

    @property
    def version(self) -> int:
        """The version loaded."""
        ...


def chain_next(
    schedule: Schedule,
    topo: Topology,
    last: str,
    outcome: Outcome,
    here: str,
    loaded: Mapping[str, Versioned],
) -> str | None:
    """The downstream stage the thread that ran ``last`` may run next, if any.

    Only the simple case qualifies: ``last`` produced a small value, and has one
    downstream, which waits for it alone, is placed ``here``, is ``loaded`` at
    the version the call wants and has only small static arguments (no KVS
    references). Anything else goes through a trigger as usual.
    """
    if outcome.WhichOneof("result") != "value":
        return None
    downstreams = topo.downstreams.get(last, ())
    if len(downstreams) != 1:
        return None
    target = downstreams[0]
    if topo.upstreams[target] != (last,) or schedule.placements[target] != here:
        return None
    function = loaded.get(target)
    if function is None or function.version < schedule.function_versions[target]:
        return None
    if len(outcome.value.data) > LARGE_VALUE_BYTES:
        return None
    for argument in schedule.function_arguments[target].arguments:
        if argument.WhichOneof("kind") != "value" or len(argument.value.data) > LARGE_VALUE_BYTES:
            return None
    return target
