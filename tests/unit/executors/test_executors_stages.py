"""The DAG stages of one executor as pure code: joins, expiry and routing (StageState)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from cloudburst.serialization import serialize
from cloudburst.v1 import execution_pb2, function_pb2
from cloudburst_executors.stages import Deliver, Expired, Forward, StageState

HERE = "executor-here"
OTHER = "executor-other"
DEADLINE = 1_000.0  # seconds since the epoch, as the schedules below say


def schedule(
    functions: list[str],
    connections: list[tuple[str, str]],
    call_id: str = "call-1",
    placements: dict[str, str] | None = None,
    deadline: float = DEADLINE,
) -> execution_pb2.DagSchedule:
    dag = function_pb2.Dag(name="d", version=1, functions=functions)
    for upstream, downstream in connections:
        dag.connections.add(upstream=upstream, downstream=downstream)
    built = execution_pb2.DagSchedule(call_id=call_id, dag=dag)
    for name in functions:
        built.placements[name] = (placements or {}).get(name, HERE)
    built.deadline_time.FromNanoseconds(int(deadline * 1e9))
    return built


#: a, b and c all feed d.
FAN_IN = (["a", "b", "c", "d"], [("a", "d"), ("b", "d"), ("c", "d")])


def ok(obj: Any) -> execution_pb2.Outcome:
    return execution_pb2.Outcome(value=serialize(obj, what="test value", limit=1 << 20))


def failed(message: str) -> execution_pb2.Outcome:
    outcome = execution_pb2.Outcome()
    outcome.failure.message = message
    return outcome


def trigger(
    built: execution_pb2.DagSchedule,
    target: str,
    upstream: str = "",
    outcome: execution_pb2.Outcome | None = None,
    context: str = "",
) -> execution_pb2.Trigger:
    made = execution_pb2.Trigger(schedule=built, target_function=target, upstream_function=upstream)
    if outcome is not None:
        made.outcome.CopyFrom(outcome)
    if context:
        made.trace_context["traceparent"] = context
    return made


@pytest.fixture
def state() -> StageState:
    return StageState(HERE)


def test_a_source_runs_at_once_with_its_own_trigger_as_its_parent(state: StageState) -> None:
    built = schedule(*FAN_IN)
    ready = state.trigger(trigger(built, "a", context="from the scheduler"))
    assert ready is not None
    assert (ready.schedule, ready.function, ready.inputs) == (built, "a", ())
    assert ready.topology is state.topologies.get(built.dag)
    assert [dict(c) for c in ready.contexts] == [{"traceparent": "from the scheduler"}]
    assert len(state) == 0


def test_a_stage_with_one_upstream_runs_at_once_without_waiting(state: StageState) -> None:
    built = schedule(["a", "b"], [("a", "b")])
    ready = state.trigger(trigger(built, "b", "a", ok(1)))
    assert ready is not None and ready.inputs == (ok(1),)
    assert len(state) == 0 and state.next_expiry() is None, "nothing waits, nothing expires"


@pytest.mark.parametrize("order", list(itertools.permutations(["a", "b", "c"])))
def test_a_join_runs_once_all_have_arrived_with_inputs_in_the_dags_order(
    state: StageState, order: tuple[str, ...]
) -> None:
    built = schedule(*FAN_IN)
    arrivals = [state.trigger(trigger(built, "d", u, ok(u), context=u)) for u in order]
    assert arrivals[:-1] == [None, None], "it waits for every upstream"
    ready = arrivals[-1]
    assert ready is not None and ready.function == "d"
    assert ready.inputs == (ok("a"), ok("b"), ok("c")), "never the arrival order"
    assert [c["traceparent"] for c in ready.contexts] == ["a", "b", "c"]
    assert ready.upstream_values() == ((ok("a"), ok("b"), ok("c")), None)
    assert len(state) == 0


def test_joins_of_different_calls_do_not_mix(state: StageState) -> None:
    first, second = schedule(*FAN_IN, call_id="call-1"), schedule(*FAN_IN, call_id="call-2")
    for upstream in ("a", "b"):
        assert state.trigger(trigger(first, "d", upstream, ok(1))) is None
        assert state.trigger(trigger(second, "d", upstream, ok(2))) is None
    assert len(state) == 2
    ready = state.trigger(trigger(second, "d", "c", ok(2)))
    assert ready is not None and ready.schedule.call_id == "call-2"
    assert ready.inputs == (ok(2),) * 3
    assert len(state) == 1, "call-1 still waits for c"


def test_a_repeated_trigger_replaces_the_earlier_until_the_stage_runs(state: StageState) -> None:
    built = schedule(*FAN_IN)
    assert state.trigger(trigger(built, "d", "a", ok("first"))) is None
    assert state.trigger(trigger(built, "d", "a", ok("again"))) is None, "still waiting for b, c"
    assert state.trigger(trigger(built, "d", "b", ok("b"))) is None
    ready = state.trigger(trigger(built, "d", "c", ok("c")))
    assert ready is not None and ready.inputs[0] == ok("again")
    # One more after the stage ran opens a new wait, which only expires.
    assert state.trigger(trigger(built, "d", "a", ok("late"))) is None
    assert state.expire(DEADLINE) == [Expired("call-1", "d", ("b", "c"))]


def test_a_trigger_from_a_function_that_is_no_upstream_does_not_count(state: StageState) -> None:
    built = schedule(*FAN_IN)
    assert state.trigger(trigger(built, "d", "a", ok("a"))) is None
    assert state.trigger(trigger(built, "d", "stranger", ok("?"))) is None
    assert state.trigger(trigger(built, "d", "b", ok("b"))) is None, "still waiting for c"
    ready = state.trigger(trigger(built, "d", "c", ok("c")))
    assert ready is not None and ready.inputs == (ok("a"), ok("b"), ok("c"))


def test_a_wide_join_runs_once_every_upstream_reported(state: StageState) -> None:
    sources = [f"s{i:04d}" for i in range(2000)]
    built = schedule([*sources, "sink"], [(s, "sink") for s in sources])
    for source in sources[:-1]:
        assert state.trigger(trigger(built, "sink", source, ok(source))) is None
    ready = state.trigger(trigger(built, "sink", sources[-1], ok(sources[-1])))
    assert ready is not None and ready.inputs == tuple(ok(s) for s in sources)


def test_an_upstream_failure_is_passed_on_after_the_values_before_it(state: StageState) -> None:
    built = schedule(*FAN_IN)
    state.trigger(trigger(built, "d", "c", ok("c")))
    state.trigger(trigger(built, "d", "b", failed("b broke")))
    ready = state.trigger(trigger(built, "d", "a", ok("a")))
    assert ready is not None
    assert ready.upstream_values() == ((ok("a"),), failed("b broke"))


def test_a_stage_missing_upstreams_expires_at_its_calls_deadline(state: StageState) -> None:
    early, late = (
        schedule(*FAN_IN, "early", deadline=10.0),
        schedule(*FAN_IN, "late", deadline=20.0),
    )
    state.trigger(trigger(late, "d", "a", ok(1)))
    state.trigger(trigger(early, "d", "b", ok(1)))
    assert state.next_expiry() == 10.0
    assert state.expire(9.99) == []
    assert state.expire(10.0) == [Expired("early", "d", ("a", "c"))]
    assert state.next_expiry() == 20.0 and len(state) == 1
    assert state.expire(100.0) == [Expired("late", "d", ("b", "c"))]
    assert state.next_expiry() is None and len(state) == 0


def test_a_stage_that_ran_does_not_expire(state: StageState) -> None:
    built = schedule(*FAN_IN)
    for upstream in ("a", "b"):
        state.trigger(trigger(built, "d", upstream, ok(1)))
    assert state.next_expiry() == DEADLINE
    assert state.trigger(trigger(built, "d", "c", ok(1))) is not None
    assert state.next_expiry() is None
    assert state.expire(DEADLINE * 2) == []


def test_after_a_stage_its_outcome_goes_to_each_downstream_here_or_elsewhere(
    state: StageState,
) -> None:
    built = schedule(
        ["a", "b", "c", "d"],
        [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
        placements={"c": OTHER},
    )
    source = state.trigger(trigger(built, "a"))
    assert source is not None
    assert state.ran(source, "a", ok(1)) == [
        Forward(built, "b", "a", ok(1), HERE, local=True),
        Forward(built, "c", "a", ok(1), OTHER, local=False),
    ]
    # A chain that went on from a to the sink delivers.
    assert state.ran(source, "d", failed("x")) == Deliver(built, failed("x"))


def test_a_trigger_for_a_function_the_dag_lacks_is_refused(state: StageState) -> None:
    with pytest.raises(KeyError):
        state.trigger(trigger(schedule(*FAN_IN), "nope", "a", ok(1)))


def test_clearing_forgets_every_waiting_stage(state: StageState) -> None:
    state.trigger(trigger(schedule(*FAN_IN), "d", "a", ok(1)))
    state.clear()
    assert len(state) == 0 and state.next_expiry() is None
