"""Which downstream stage the thread that ran a stage runs straight after it (pure code)."""

from __future__ import annotations

from typing import Any

import pytest

from cloudburst.serialization import serialize
from cloudburst.v1 import execution_pb2, function_pb2, value_pb2
from cloudburst_executors import runner
from cloudburst_executors.invocation import Chain
from cloudburst_executors.stages import LARGE_VALUE_BYTES, chain_next
from cloudburst_grpc.dags import topology

HERE = "executor-here"


def add(cloudburst: Any, *numbers: int) -> int:
    return sum(numbers)


LOADED = {
    name: runner.LoadedFunction(name, 5, function_pb2.FUNCTION_KIND_FUNCTION, add)
    for name in ("a", "b", "c")
}


def value(obj: Any) -> value_pb2.Value:
    return serialize(obj, what="test value", limit=1 << 30)


def chain(
    functions: list[str],
    connections: list[tuple[str, str]],
    placements: dict[str, str] | None = None,
    arguments: dict[str, list[value_pb2.Argument]] | None = None,
) -> Chain:
    dag = function_pb2.Dag(name="d", version=1, functions=functions)
    for upstream, downstream in connections:
        dag.connections.add(upstream=upstream, downstream=downstream)
    schedule = execution_pb2.DagSchedule(call_id="call-1", dag=dag)
    for name in functions:
        schedule.placements[name] = (placements or {}).get(name, HERE)
        schedule.function_versions[name] = 5
        schedule.function_arguments[name].SetInParent()
        schedule.function_arguments[name].arguments.extend((arguments or {}).get(name, []))
    return Chain(schedule, topology(functions, connections), functions[0])


def ok(obj: Any) -> execution_pb2.Outcome:
    return execution_pb2.Outcome(value=value(obj))


def next_of(stage: Chain, outcome: execution_pb2.Outcome, loaded: Any = LOADED) -> str | None:
    return chain_next(stage.schedule, stage.topology, stage.last, outcome, HERE, loaded)


def test_a_downstream_waiting_only_for_this_stage_runs_next() -> None:
    stage = chain(
        ["a", "b", "c"],
        [("a", "b"), ("b", "c")],
        arguments={"b": [value_pb2.Argument(value=value(10))]},
    )
    assert next_of(stage, ok((1, 2))) == "b"
    stage.last = "b"
    assert next_of(stage, ok(13)) == "c"
    stage.last = "c"
    assert next_of(stage, ok(13)) is None, "the sink has no downstream"


@pytest.mark.parametrize(
    ("case", "stage", "outcome"),
    [
        ("placed elsewhere", chain(["a", "b"], [("a", "b")], {"b": "executor-other"}), ok(1)),
        ("a join", chain(["a", "c", "b"], [("a", "b"), ("c", "b")]), ok(1)),
        ("fan-out", chain(["a", "b", "c"], [("a", "b"), ("a", "c"), ("b", "c")]), ok(1)),
        (
            "a KVS reference argument",
            chain(
                ["a", "b"],
                [("a", "b")],
                arguments={"b": [value_pb2.Argument(reference=value_pb2.Reference(key="k"))]},
            ),
            ok(1),
        ),
        (
            "a large static argument",
            chain(
                ["a", "b"],
                [("a", "b")],
                arguments={"b": [value_pb2.Argument(value=value(b"x" * (LARGE_VALUE_BYTES + 1)))]},
            ),
            ok(1),
        ),
        ("the upstream failed", chain(["a", "b"], [("a", "b")]), execution_pb2.Outcome()),
        ("a large value", chain(["a", "b"], [("a", "b")]), ok(b"x" * (LARGE_VALUE_BYTES + 1))),
    ],
)
def test_anything_else_goes_through_a_trigger(
    case: str, stage: Chain, outcome: execution_pb2.Outcome
) -> None:
    assert next_of(stage, outcome) is None, case
    assert stage.last == "a"


def test_a_downstream_not_loaded_at_the_wanted_version_goes_through_a_trigger() -> None:
    stage = chain(["a", "b"], [("a", "b")])
    stage.schedule.function_versions["b"] = 6  # re-registered since this executor loaded it
    assert next_of(stage, ok(1)) is None
    stage.schedule.function_versions["b"] = 5
    assert next_of(stage, ok(1)) == "b"
    assert next_of(stage, ok(1), {k: v for k, v in LOADED.items() if k != "b"}) is None
