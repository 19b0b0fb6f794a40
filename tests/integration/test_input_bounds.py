"""Bounded inputs: calls a stream may leave unanswered, malformed frames, long error lists."""

from __future__ import annotations

import concurrent.futures
import itertools
import sys
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import InvalidDagError
from cloudburst.v1 import (
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
    value_pb2,
)
from cloudburst_grpc.local import Node, start_local
from cloudburst_grpc.scheduler.core import MAX_DAG_FUNCTIONS
from harness import make_config

#: The stream bound the flow-control test configures.
UNANSWERED = 4
#: Unanswered calls the SDK sends without waiting to be accepted (its CHOSEN_KEYS_IN_FLIGHT);
#: were it more, the flow-control test would see its caller never held back, and fail.
SENT_UNACCEPTED = 64

_started = threading.Semaphore(0)
_release = threading.Event()
#: The SDK ships functions by value: ``hold`` finds this module's objects by its name.
MODULE = __name__


def hold(_: Any, n: int) -> int:
    """Counts itself started, then waits until the test lets every call finish."""
    here = sys.modules[MODULE]
    here._started.release()
    here._release.wait(60)
    return n


def test_a_stream_reads_no_more_calls_while_its_bound_is_unanswered(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(
        start_local(
            make_config(
                scheduler={"max_unanswered_calls": UNANSWERED},
                executor={"threads": 16, "inline_max_seconds": 0.0},
            )
        )
    )
    _release.clear()
    with (
        CloudburstConnection(node.address) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as caller,
    ):
        conn.register(hold, "hold")
        # Beyond the calls the SDK sends without waiting to be accepted (a chosen key).
        calls = 3 * UNANSWERED + SENT_UNACCEPTED
        try:
            # A caller placing more calls than the bound is held back until some end.
            placed = caller.submit(lambda: [conn.exec_func("hold", [n]) for n in range(calls)])
            for _ in range(UNANSWERED):
                assert _started.acquire(timeout=30)
            assert not _started.acquire(timeout=0.5)
            assert not placed.done()
        finally:
            _release.set()
        futures = placed.result(timeout=30)
        assert [f.get(timeout=30) for f in futures] == list(range(calls))
    while _started.acquire(blocking=False):
        pass


_answered_calls = [0]
"""Calls of ``bulky`` so far (a list, so the function can count in place)."""
_answered_changed = threading.Condition()


def bulky(_: Any, n: int) -> bytes:
    """Counts itself, and answers with a value large enough to fill flow-control windows."""
    here = sys.modules[MODULE]
    with here._answered_changed:
        here._answered_calls[0] += 1
        here._answered_changed.notify_all()
    return b"x" * 16384


def test_a_caller_that_never_reads_its_answers_is_held_back(
    start_node: Callable[..., Node],
) -> None:
    _answered_calls[0] = 0
    sent = 2000
    node = start_node(start_local(make_config(scheduler={"max_unanswered_calls": 8})))
    with CloudburstConnection(node.address) as conn:
        conn.register(bulky, "bulky")
    frames = (
        scheduler_service_pb2.StreamCallsRequest(
            sequence=n + 1,
            stream_outcome=True,
            call_function=scheduler_service_pb2.CallFunctionRequest(
                name="bulky",
                arguments=[
                    value_pb2.Argument(
                        value=value_pb2.Value(data=b"1", serializer=value_pb2.SERIALIZER_JSON)
                    )
                ],
            ),
        )
        for n in range(sent)
    )
    with grpc.insecure_channel(node.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        answers = stub.StreamCalls(frames, timeout=60)  # never read
        try:
            with _answered_changed:
                assert _answered_changed.wait_for(lambda: _answered_calls[0] >= 8, timeout=30)
                # Answers pile up only until the windows are full: then nothing more runs.
                assert not _answered_changed.wait_for(lambda: _answered_calls[0] >= sent, timeout=5)
        finally:
            answers.cancel()


def test_malformed_frames_and_requests_are_invalid_arguments(local_node: Node) -> None:
    with grpc.insecure_channel(local_node.address) as channel:
        stream = channel.stream_stream(
            "/cloudburst.v1.SchedulerService/StreamCalls",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([b"\xff\xff\xff\xff"]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in (info.value.details() or "")

        unary = channel.unary_unary(
            "/cloudburst.v1.SchedulerService/CreateDag",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            unary(b"\x0a\xff\xff\xff", timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_garbage_failure_argument_is_an_invalid_argument(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as conn:
        conn.register(lambda _, x: x, "echo")
    with grpc.insecure_channel(local_node.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        garbage = value_pb2.Value(data=b"\xff\xff\xff", serializer=value_pb2.SERIALIZER_FAILURE)
        response = stub.CallFunction(
            scheduler_service_pb2.CallFunctionRequest(
                name="echo",
                arguments=[value_pb2.Argument(value=garbage)],
                direct_response=True,
            ),
            timeout=30,
        )
    assert response.outcome.WhichOneof("result") == "error"
    assert response.outcome.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "Failure" in response.outcome.error.message


@pytest.mark.parametrize("count", [500, 5_000, MAX_DAG_FUNCTIONS + 1])
def test_a_dag_of_many_unknown_functions_is_refused_with_a_short_reason(
    local_node: Node, count: int
) -> None:
    names = [f"unknown-{i:05d}" for i in range(count)]
    connections = list(itertools.pairwise(names))
    with CloudburstConnection(local_node.address) as conn:
        assert conn.register_dag("many", names, connections) is False
        error = conn.last_error
    assert isinstance(error, InvalidDagError)
    assert len(str(error)) < 1000
    assert sum(len(k) + len(v) for k, v in error.metadata.items()) < 1000
    if count <= MAX_DAG_FUNCTIONS:
        assert "'unknown-00000'" in str(error) and f"and {count - 10} more" in str(error)
    else:
        assert f"at most {MAX_DAG_FUNCTIONS}" in str(error)


def test_a_dag_whose_schedule_would_not_fit_a_message_is_refused(
    start_node: Callable[..., Node],
) -> None:
    limit = 64 * 1024
    node = start_node(start_local(make_config(server={"max_payload_bytes": limit})))
    names = [f"{i:03d}-".ljust(200, "f") for i in range(120)]  # about 120 KB of schedule
    with CloudburstConnection(node.address) as conn:
        for name in names:
            conn.register(lambda _, x: x, name)
        assert conn.register_dag("fits", names[:20], list(itertools.pairwise(names[:20])))
        assert conn.register_dag("large", names, list(itertools.pairwise(names))) is False
        error = conn.last_error
        assert "large" not in conn.list_dags()
    assert isinstance(error, InvalidDagError)
    assert "too large to call" in str(error) and f"({limit:,})" in str(error)
