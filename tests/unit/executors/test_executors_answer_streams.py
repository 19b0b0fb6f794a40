"""An executor answers a caller directly only while the caller reads its answer stream."""

from __future__ import annotations

import asyncio
from typing import Any

from cloudburst.v1 import scheduler_service_pb2
from cloudburst_executors import servicer as servicer_module
from cloudburst_executors.servicer import ExecutorServicer

STREAM_ID = "0123456789abcdef0123456789abcdef"


async def test_a_caller_that_does_not_read_its_answers_is_answered_by_the_scheduler(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(servicer_module, "MAX_QUEUED_ANSWERS", 2)
    executor_servicer = ExecutorServicer(executor=None)  # type: ignore[arg-type]
    assert executor_servicer._answer_stream(STREAM_ID) is None  # no stream: the scheduler
    assert executor_servicer._answer_stream("") is None
    queue: asyncio.Queue[scheduler_service_pb2.StreamCallsResponse | None] = asyncio.Queue()
    executor_servicer._answer_streams[STREAM_ID] = queue
    assert executor_servicer._answer_stream(STREAM_ID) is queue
    queue.put_nowait(scheduler_service_pb2.StreamCallsResponse(sequence=1))
    assert executor_servicer._answer_stream(STREAM_ID) is queue
    queue.put_nowait(scheduler_service_pb2.StreamCallsResponse(sequence=2))
    # Two answers wait unread: the next goes through the scheduler, until the stream catches up.
    assert executor_servicer._answer_stream(STREAM_ID) is None
    queue.get_nowait()
    assert executor_servicer._answer_stream(STREAM_ID) is queue
