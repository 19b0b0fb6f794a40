"""Batched frames on the call stream, against a real scheduler: who gets batches, and order."""

from __future__ import annotations

import json
import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once

from cloudburst import CloudburstConnection
from cloudburst.serialization import deserialize
from cloudburst.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc, value_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.local import Node, start_local
from harness import make_config

DEADLINE = 120.0
CALLS = 200

Request = scheduler_service_pb2.StreamCallsRequest
Response = scheduler_service_pb2.StreamCallsResponse


def double(_: Any, n: int) -> int:
    return 2 * n


def call(sequence: int, reads_batches: bool) -> Request:
    """A call of ``double(sequence)`` whose outcome is streamed."""
    argument = value_pb2.Value(
        data=json.dumps(sequence).encode(), serializer=value_pb2.SERIALIZER_JSON
    )
    return Request(
        sequence=sequence,
        stream_outcome=True,
        reads_batches=reads_batches,
        call_function=scheduler_service_pb2.CallFunctionRequest(
            name="double", arguments=[value_pb2.Argument(value=argument)]
        ),
    )


def exchange(node: Node, messages: list[Request]) -> list[Response]:
    """Send ``messages``; return every answer message until all CALLS outcomes came."""
    with CloudburstConnection(node.address) as cloud:
        if "double" not in cloud.list():
            cloud.register(double, "double")
    outgoing: queue.Queue[Request | None] = queue.Queue()
    for sent in messages:
        outgoing.put(sent)

    def frames() -> Iterator[Request]:
        while (frame := outgoing.get(timeout=DEADLINE)) is not None:
            yield frame

    received: list[Response] = []
    outcomes = 0
    with grpc.insecure_channel(node.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        answers = stub.StreamCalls(frames(), timeout=DEADLINE)
        try:
            for message in answers:
                received.append(message)
                if message.sequence == 0 and not message.batch:
                    # An answer of no call: it only tells the caller that batches are read.
                    assert message.reads_batches and message.WhichOneof("answer") is None
                    continue
                for answer in message.batch or [message]:
                    assert answer.WhichOneof("answer") == "call_function", answer
                    outcomes += answer.call_function.HasField("outcome")
                if outcomes == CALLS:
                    break
        finally:
            outgoing.put(None)
            answers.cancel()
    return received


def check_answers(received: list[Response]) -> None:
    """Every call is answered, with the right outcome, and its outcome comes last."""
    done: set[int] = set()
    for message in received:
        for answer in message.batch or [message]:
            assert answer.sequence not in done, f"call {answer.sequence} answered after its outcome"
            if answer.call_function.HasField("outcome"):
                assert deserialize(answer.call_function.outcome.value) == 2 * answer.sequence
                done.add(answer.sequence)
    assert done == set(range(1, CALLS + 1))


def _reset_global_provider() -> None:
    # The API lets a process set its tracer provider once; a test needs a fresh one.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture(params=["untraced", "traced"])
def node(request: pytest.FixtureRequest, start_node: Callable[..., Node]) -> Iterator[Node]:
    """A `cbgrpc serve` node, with tracing off or on (each serves the stream its own way)."""
    if request.param == "untraced":
        yield start_node(start_local(make_config()))
        return
    provider = TracerProvider()
    _reset_global_provider()
    telemetry.use_tracer_provider(provider)
    try:
        # Tracing is on before the servers are built, as `cbgrpc serve` does it.
        yield start_node(start_local(make_config()))
        assert telemetry.tracing()
    finally:
        telemetry.stop_tracing()
        provider.shutdown()
        _reset_global_provider()


def test_a_caller_that_does_not_read_batches_gets_every_answer_alone(node: Node) -> None:
    received = exchange(node, [call(n, reads_batches=False) for n in range(1, CALLS + 1)])
    # The scheduler offers to read batched calls on its first answer, of a call.
    assert received[0].reads_batches and received[0].sequence == 1
    assert not any(message.batch for message in received)
    check_answers(received)


def test_calls_sent_in_batches_are_served_and_answered_in_batches(node: Node) -> None:
    messages = []
    for start in range(1, CALLS + 1, 50):
        batch = Request()
        batch.batch.extend(call(n, reads_batches=True) for n in range(start, start + 50))
        messages.append(batch)
    received = exchange(node, messages)
    # A caller that reads batches is told at once, in an answer of no call: the first
    # answer of a call may be long in coming (or never come, when an executor answers).
    assert received[0].reads_batches and received[0].sequence == 0
    assert received[0].WhichOneof("answer") is None and not received[0].batch
    assert not any(message.reads_batches for message in received[1:])
    # Fifty calls placed at once answer faster than one write at a time.
    assert any(message.batch for message in received)
    for message in received:
        for answer in message.batch:
            assert not answer.batch and answer.WhichOneof("answer") is not None
    check_answers(received)
