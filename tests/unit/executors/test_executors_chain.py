"""Which downstream stage an executor thread runs straight after its stage (no I/O)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cloudburst.serialization import serialize
from cloudburst.v1 import execution_pb2, function_pb2, value_pb2
from cloudburst_executors import runner
from cloudburst_executors.executor import LARGE_VALUE_BYTES, Executor, _Chain
from cloudburst_grpc.config import ExecutorConfig
from cloudburst_grpc.scheduler.dag import topology

HERE = "executor-here"


def add(cloudburst: Any, *numbers: int) -> int:
    return sum(numbers)


@pytest.fixture
def executor() -> Iterator[Executor]:
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), None, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        ex._functions[name] = runner.LoadedFunction(
            name, 5, function_pb2.FUNCTION_KIND_FUNCTION, add
        )
    yield ex
    ex._pool.shutdown(wait=False)


def value(obj: Any) -> value_pb2.Value:
    return serialize(obj, what="test value", limit=1 << 30)


def chain(
    functions: list[str],
    connections: list[tuple[str, str]],
    placements: dict[str, str] | None = None,
    arguments: dict[str, list[value_pb2.Argument]] | None = None,
) -> _Chain:
    dag = function_pb2.Dag(name="d", version=1, functions=functions)
    for upstream, downstream in connections:
        dag.connections.add(upstream=upstream, downstream=downstream)
    schedule = execution_pb2.DagSchedule(call_id="call-1", dag=dag)
    for name in functions:
        schedule.placements[name] = (placements or {}).get(name, HERE)
        schedule.function_versions[name] = 5
        schedule.function_arguments[name].SetInParent()
        schedule.function_arguments[name].arguments.extend((arguments or {}).get(name, []))
    return _Chain(schedule, topology(functions, connections), functions[0])


def ok(obj: Any) -> execution_pb2.Outcome:
    return execution_pb2.Outcome(value=value(obj))


def test_a_downstream_waiting_only_for_this_stage_runs_next_with_its_arguments(
    executor: Executor,
) -> None:
    stage = chain(
        ["a", "b", "c"],
        [("a", "b"), ("b", "c")],
        arguments={"b": [value_pb2.Argument(value=value(10))]},
    )
    ready = executor._next_in_chain(stage, ok((1, 2)))
    assert ready is not None
    loaded, args = ready
    # Static arguments first, then the upstream's result (a tuple spreads).
    assert (loaded.name, args, stage.last) == ("b", (10, 1, 2), "b")
    ready = executor._next_in_chain(stage, ok(13))
    assert ready is not None and ready[1] == (13,) and stage.last == "c"
    assert executor._next_in_chain(stage, ok(13)) is None, "the sink has no downstream"


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
        ("the upstream failed", chain(["a", "b"], [("a", "b")]), execution_pb2.Outcome()),
        ("a large value", chain(["a", "b"], [("a", "b")]), ok(b"x" * (LARGE_VALUE_BYTES + 1))),
    ],
)
def test_anything_else_goes_through_a_trigger(
    executor: Executor, case: str, stage: _Chain, outcome: execution_pb2.Outcome
) -> None:
    assert executor._next_in_chain(stage, outcome) is None, case
    assert stage.last == "a"


def test_a_downstream_not_loaded_at_the_wanted_version_goes_through_a_trigger(
    executor: Executor,
) -> None:
    stage = chain(["a", "b"], [("a", "b")])
    stage.schedule.function_versions["b"] = 6  # re-registered since this executor loaded it
    assert executor._next_in_chain(stage, ok(1)) is None
    del executor._functions["b"]
    stage.schedule.function_versions["b"] = 5
    assert executor._next_in_chain(stage, ok(1)) is None
