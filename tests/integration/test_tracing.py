"""One OpenTelemetry trace per call, across the SDK, scheduler, executors, KVS and messaging."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from cloudburst import CloudburstConnection
from cloudburst.errors import RemoteFunctionError
from cloudburst_executors.inline import QUICK_RUNS
from cloudburst_grpc import telemetry
from cloudburst_grpc.local import (
    Node,
    start_executor_node,
    start_kvs_node,
    start_local,
    start_scheduler_node,
)
from harness import make_config


class Spans(InMemorySpanExporter):
    """An in-memory exporter that lets a test wait for the spans it expects."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        with self._arrived:
            self._arrived.notify_all()
        return result

    def wait_for(self, names: Sequence[str], timeout: float = 20.0) -> list[ReadableSpan]:
        """Wait until a span of every name in ``names`` (with repeats) has ended."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                spans = list(self.get_finished_spans())
                ended = [s.name for s in spans]
                if all(ended.count(n) >= list(names).count(n) for n in set(names)):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"wanted {sorted(names)}, ended {sorted(ended)}")
                self._arrived.wait(remaining)


def _reset_global_provider() -> None:
    # The API lets a process set its tracer provider once; tests need a fresh one each.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[Spans]:
    exporter = Spans()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_global_provider()
    telemetry.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.stop_tracing()
        provider.shutdown()
        _reset_global_provider()


@pytest.fixture
def traced_node(spans: Spans, start_node: Callable[..., Node]) -> Node:
    # Tracing is on before the servers are built, as `cbgrpc serve` does it.
    return start_node(start_local(make_config()))


def named(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, [s.name for s in spans]
    return matches[0]


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    found = [s for s in spans if s.context and s.context.span_id == span.parent.span_id]
    assert found, f"the parent of {span.name} was not recorded"
    return found[0]


def one_trace(*members: ReadableSpan) -> None:
    assert len({s.context.trace_id for s in members if s.context}) == 1


def test_a_one_shot_call_is_one_trace(spans: Spans, traced_node: Node) -> None:
    with CloudburstConnection(traced_node.address) as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        assert incr(1).get(timeout=30) == 2
    ended = spans.wait_for(["call incr", "schedule incr", "run incr"])
    root, schedule, run = (named(ended, n) for n in ("call incr", "schedule incr", "run incr"))
    assert root.parent is None and root.kind == SpanKind.CLIENT
    assert parent_of(schedule, ended) is root
    assert parent_of(run, ended) is schedule
    assert run.attributes is not None
    assert run.attributes["cloudburst.function"] == "incr"
    assert str(run.attributes["cloudburst.executor"]).startswith("executor-")
    assert run.attributes["cloudburst.outcome"] == "value"
    one_trace(root, schedule, run)


def test_the_guide_dag_is_one_connected_trace_with_user_kvs_access(
    spans: Spans, traced_node: Node
) -> None:
    def incr(cloudburst: Any, a: int) -> int:
        cloudburst.put_object("seen", a)
        return int(cloudburst.get_object("seen")) + 1

    with CloudburstConnection(traced_node.address) as cloud:
        cloud.register(incr, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("test_dag", ["incr", "square"], [("incr", "square")])
        assert cloud.call_dag("test_dag", {"incr": 1}).get(timeout=30) == 4
    ended = spans.wait_for(
        ["call_dag test_dag", "schedule test_dag", "run incr", "run square", "kvs put", "kvs get"]
    )
    root = named(ended, "call_dag test_dag")
    schedule, run_incr, run_square = (
        named(ended, n) for n in ("schedule test_dag", "run incr", "run square")
    )
    assert parent_of(schedule, ended) is root
    assert parent_of(run_incr, ended) is schedule
    assert parent_of(run_square, ended) is run_incr
    for access in ("kvs put", "kvs get"):
        assert parent_of(named(ended, access), ended) is run_incr
    one_trace(root, schedule, run_incr, run_square, named(ended, "kvs put"))


def test_a_join_links_its_extra_parents(spans: Spans, traced_node: Node) -> None:
    with CloudburstConnection(traced_node.address) as cloud:
        cloud.register(lambda _, a: a, "left")
        cloud.register(lambda _, a: a, "right")
        cloud.register(lambda _, a, b: a - b, "join")
        assert cloud.register_dag(
            "fan_in", ["left", "right", "join"], [("right", "join"), ("left", "join")]
        )
        assert cloud.call_dag("fan_in", {"left": 10, "right": 3}, direct_response=True) == 7
    ended = spans.wait_for(["run left", "run right", "run join", "call_dag fan_in"])
    left, right, join = (named(ended, n) for n in ("run left", "run right", "run join"))
    # The first upstream in the DAG's function order is the parent; the other is a link.
    assert parent_of(join, ended) is left
    linked = {link.context.span_id for link in join.links}
    assert right.context is not None and right.context.span_id in linked
    one_trace(left, right, join, named(ended, "call_dag fan_in"))


def boom(_: Any, n: int) -> int:
    raise ValueError(f"boom {n}")


def test_a_failing_function_marks_its_span_as_an_error(spans: Spans, traced_node: Node) -> None:
    with CloudburstConnection(traced_node.address) as cloud:
        with pytest.raises(RemoteFunctionError):
            cloud.register(boom, "boom")(3).get(timeout=30)
    ended = spans.wait_for(["run boom", "call boom"])
    run = named(ended, "run boom")
    assert run.status.status_code == StatusCode.ERROR
    assert run.attributes is not None and run.attributes["cloudburst.outcome"] == "failure"
    (event,) = [e for e in run.events if e.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "boom 3"
    assert 'raise ValueError(f"boom {n}")' in str(event.attributes["exception.stacktrace"])
    assert named(ended, "call boom").status.status_code == StatusCode.ERROR


def ping(cloudburst: Any, rounds: int) -> int:
    cloudburst.put_object("ping-id", cloudburst.get_id())
    peer = cloudburst.get_object("pong-id", timeout=20)
    for i in range(rounds):
        cloudburst.send(peer, i)
        assert cloudburst.recv(timeout=20)
    return rounds


def pong(cloudburst: Any, rounds: int) -> int:
    cloudburst.put_object("pong-id", cloudburst.get_id())
    for _ in range(rounds):
        for sender, message in cloudburst.recv(timeout=20):
            cloudburst.send(sender, message)
    return rounds


def test_messages_are_spans_linked_to_their_senders(spans: Spans, traced_node: Node) -> None:
    with CloudburstConnection(traced_node.address) as cloud:
        cloud.register(ping, "ping")
        cloud.register(pong, "pong")
        cloud.register(lambda _, a, b: a + b, "total")
        assert cloud.register_dag(
            "pp", ["ping", "pong", "total"], [("ping", "total"), ("pong", "total")]
        )
        assert cloud.call_dag("pp", {"ping": 2, "pong": 2}, direct_response=True) == 4
    ended = spans.wait_for(["run total", "send", "send", "send", "send"])
    run_ping, run_pong = named(ended, "run ping"), named(ended, "run pong")
    sends = [s for s in ended if s.name == "send"]
    recvs = [
        s
        for s in ended
        if s.name == "recv" and s.attributes and s.attributes["cloudburst.messages"]
    ]
    assert {parent_of(s, ended).name for s in sends} == {"run ping", "run pong"}
    send_ids = {s.context.span_id for s in sends if s.context}
    for receive in recvs:
        assert parent_of(receive, ended) in (run_ping, run_pong)
        assert {link.context.span_id for link in receive.links} <= send_ids
        assert receive.links
    one_trace(run_ping, run_pong, *sends, *recvs)


def test_unary_calls_carry_context_in_metadata_and_health_checks_are_not_traced(
    spans: Spans, traced_node: Node
) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("user work") as user_span:
        with CloudburstConnection(traced_node.address) as cloud:
            cloud.register(lambda _, a: a, "echo")
    with grpc.insecure_channel(traced_node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    ended = spans.wait_for(["/cloudburst.v1.SchedulerService/CreateFunction"])
    server = [
        s
        for s in ended
        if s.name == "/cloudburst.v1.SchedulerService/CreateFunction" and s.kind == SpanKind.SERVER
    ]
    assert server and server[0].context is not None
    assert server[0].context.trace_id == user_span.get_span_context().trace_id
    assert not [s for s in spans.get_finished_spans() if "Health" in s.name]


def test_context_crosses_servers_over_trigger_streams(
    spans: Spans, start_node: Callable[..., Node]
) -> None:
    config = make_config(scheduler={"pin_replicas": 1})
    kvs = start_node(start_kvs_node(config))
    executors = [start_node(start_executor_node(config, kvs.address, f"ex-{i}")) for i in range(2)]
    scheduler = start_node(
        start_scheduler_node(config, kvs.address, [e.address for e in executors])
    )
    with CloudburstConnection(scheduler.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("test_dag", ["incr", "square"], [("incr", "square")])
        assert cloud.call_dag("test_dag", {"incr": 1}, direct_response=True) == 4
    ended = spans.wait_for(["run incr", "run square", "call_dag test_dag"])
    run_incr, run_square = named(ended, "run incr"), named(ended, "run square")
    assert run_incr.attributes is not None and run_square.attributes is not None
    assert (
        run_incr.attributes["cloudburst.executor"] != run_square.attributes["cloudburst.executor"]
    )
    assert parent_of(run_square, ended) is run_incr
    one_trace(named(ended, "call_dag test_dag"), run_incr, run_square)


def test_library_spans_of_a_greenlet_run_are_children_of_its_run(
    spans: Spans, start_node: Callable[..., Node]
) -> None:
    """A function that earned the loop runs in a greenlet; its context goes with it."""

    def store(cloudburst: Any, key: str) -> str:
        cloudburst.put_object(key, 1)
        return threading.current_thread().name

    node = start_node(start_local(make_config(executor={"inline_max_seconds": 0.05, "count": 1})))
    with CloudburstConnection(node.address) as cloud:
        fn = cloud.register(store, "store")
        for i in range(QUICK_RUNS):
            fn(f"warm/{i}").get(timeout=30)
        spans.wait_for(["run store"] * QUICK_RUNS)
        spans.clear()
        assert not fn("traced").get(timeout=30).startswith("cb-"), "it ran on the loop"
    ended = spans.wait_for(["call store", "run store", "kvs put"])
    run, put = named(ended, "run store"), named(ended, "kvs put")
    assert parent_of(put, ended) is run
    one_trace(named(ended, "call store"), run, put)
