"""An executor holds at most ``executor.max_answer_streams`` answer streams at once.

Each answer stream (``ExecutorService.StreamAnswers``) costs the executor a
stream and a queue; whoever may open one could otherwise open them without end,
each with a fresh id. Past the limit a new stream is refused with
RESOURCE_EXHAUSTED; its caller is answered through the scheduler meanwhile.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cloudburst.errors import QueueFullError
from cloudburst.rpc import error_from_rpc
from cloudburst.v1 import executor_service_pb2, executor_service_pb2_grpc
from cloudburst_grpc.local import Node, start_executor_node, start_kvs_node
from harness import make_config

DEADLINE = 60.0
LIMIT = 2


@pytest.fixture
def executor_stub(start_node: Callable[..., Node]) -> Iterator[Any]:
    config = make_config(executor={"max_answer_streams": LIMIT})
    kvs = start_node(start_kvs_node(config))
    executor = start_node(start_executor_node(config, kvs.address, "executor-0"))
    with grpc.insecure_channel(executor.address) as channel:
        yield executor_service_pb2_grpc.ExecutorServiceStub(channel)


def open_stream(stub: Any, stream_id: str) -> Any:
    """Open an answer stream and return it once it is registered (or raise its refusal)."""
    request = executor_service_pb2.StreamAnswersRequest(answer_stream_id=stream_id)
    stream = stub.StreamAnswers(request, timeout=DEADLINE)
    try:
        assert next(stream).registered
    except BaseException:
        stream.cancel()
        raise
    return stream


def test_past_the_limit_a_new_answer_stream_is_refused_saying_what_to_do(
    executor_stub: Any,
) -> None:
    held = {secrets.token_hex(16): None for _ in range(LIMIT)}
    streams = [open_stream(executor_stub, stream_id) for stream_id in held]
    try:
        with pytest.raises(grpc.RpcError) as refused:
            open_stream(executor_stub, secrets.token_hex(16))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        error = error_from_rpc(refused.value)
        assert isinstance(error, QueueFullError)  # ErrorInfo reason QUEUE_FULL: retry later
        assert error.metadata == {"limit": str(LIMIT)}
        assert "executor.max_answer_streams" in str(error)
        assert "answered through the scheduler" in str(error)
        # A caller that opens its own stream again replaces it: that is not one more stream.
        first_id = next(iter(held))
        again = open_stream(executor_stub, first_id)
        streams.append(again)
        assert list(streams[0]) == []  # the replaced stream ends
        # Once a stream ends, a new one is taken (the executor notices its end at once, but
        # on its own loop: try until it has, within the deadline).
        streams[1].cancel()
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                streams.append(open_stream(executor_stub, secrets.token_hex(16)))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the ended stream still counts"
    finally:
        for stream in streams:
            stream.cancel()
