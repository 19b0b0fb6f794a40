"""An executor answers a caller directly only while the caller reads its answer stream."""

from __future__ import annotations

import collections
from typing import Any

from cloudburst.streams import MAX_BATCH_BYTES
from cloudburst.v1 import executor_service_pb2
from cloudburst_executors import servicer as servicer_module
from cloudburst_executors.servicer import ExecutorServicer, _merge_answers, _QueuedAnswers

STREAM_ID = "0123456789abcdef0123456789abcdef"


def message(*sequences: int) -> executor_service_pb2.StreamAnswersResponse:
    made = executor_service_pb2.StreamAnswersResponse()
    for sequence in sequences:
        made.answers.add(sequence=sequence)
    return made


async def test_a_caller_that_does_not_read_its_answers_is_answered_by_the_scheduler(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(servicer_module, "MAX_QUEUED_ANSWERS", 2)
    executor_servicer = ExecutorServicer(executor=None)  # type: ignore[arg-type]
    assert executor_servicer._answer_stream(STREAM_ID) is None  # no stream: the scheduler
    assert executor_servicer._answer_stream("") is None
    stream = _QueuedAnswers()
    executor_servicer._answer_streams[STREAM_ID] = stream
    assert executor_servicer._answer_stream(STREAM_ID) is stream
    await stream.write(message(1))
    assert executor_servicer._answer_stream(STREAM_ID) is stream
    await stream.write(message(2))
    # Two answers wait unread: the next goes through the scheduler, until the stream catches up.
    assert executor_servicer._answer_stream(STREAM_ID) is None
    stream.queue.get_nowait()
    assert executor_servicer._answer_stream(STREAM_ID) is stream


def test_answers_waiting_together_share_a_message_in_order(monkeypatch: Any) -> None:
    monkeypatch.setattr(servicer_module, "ANSWERS_PER_MESSAGE", 3)
    registered = executor_service_pb2.StreamAnswersResponse(registered=True)
    backlog = collections.deque([registered, *(message(n) for n in range(1, 6))])
    taken = []
    while backlog:
        taken.append(_merge_answers(backlog))
    assert taken[0] == registered  # the first message goes alone
    assert [[a.sequence for a in m.answers] for m in taken[1:]] == [[1, 2, 3], [4, 5]]


def test_large_answers_share_a_message_only_up_to_the_batch_size() -> None:
    # A caller takes a message of one answer, or of MAX_BATCH_BYTES, whatever its limit: answers
    # that waited together are merged only that far, however many waited.
    large = b"x" * (MAX_BATCH_BYTES // 3)
    backlog = collections.deque(message(n) for n in range(1, 8))
    for waiting in backlog:
        waiting.answers[0].call_function.outcome.value.data = large
    taken = []
    while backlog:
        taken.append(_merge_answers(backlog))
    assert [[a.sequence for a in m.answers] for m in taken] == [[1, 2], [3, 4], [5, 6], [7]]
    assert all(m.ByteSize() <= MAX_BATCH_BYTES for m in taken)
