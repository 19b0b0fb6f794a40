"""Batched frames on streams: what goes in one message, and when a stream batches at all."""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest

from cloudburst.streams import MAX_BATCH_FRAMES, OutboxStream, batches_enabled, take_batch
from cloudburst.v1 import scheduler_service_pb2

Request = scheduler_service_pb2.StreamCallsRequest
Response = scheduler_service_pb2.StreamCallsResponse
DEADLINE = 30.0


def frames(*sequences: int) -> list[Request]:
    return [Request(sequence=n) for n in sequences]


def sequences(message: Request) -> list[int]:
    """The sequences a written message carries, in order."""
    return [f.sequence for f in message.batch] if message.batch else [message.sequence]


def test_queued_frames_go_in_one_batch_in_order() -> None:
    backlog: collections.deque[Request | None] = collections.deque(frames(1, 2, 3))
    message = take_batch(backlog)
    assert [f.sequence for f in message.batch] == [1, 2, 3]
    assert message.sequence == 0 and message.WhichOneof("call") is None
    assert not backlog


def test_a_lone_frame_is_written_as_it_is() -> None:
    frame = Request(sequence=7)
    assert take_batch(collections.deque([frame])) is frame


def test_a_batch_stops_before_a_half_close() -> None:
    backlog: collections.deque[Request | None] = collections.deque(
        [*frames(1, 2), None, *frames(3)]
    )
    assert sequences(take_batch(backlog)) == [1, 2]
    assert list(backlog) == [None, Request(sequence=3)]
    only: collections.deque[Request | None] = collections.deque([*frames(4), None])
    assert sequences(take_batch(only)) == [4]
    assert list(only) == [None]


def test_a_batch_holds_at_most_the_frame_cap() -> None:
    backlog: collections.deque[Request | None] = collections.deque(
        frames(*range(1, 2 * MAX_BATCH_FRAMES + 2))
    )
    written = []
    while backlog:
        written.append(sequences(take_batch(backlog)))
    assert [len(w) for w in written] == [MAX_BATCH_FRAMES, MAX_BATCH_FRAMES, 1]
    assert [n for w in written for n in w] == list(range(1, 2 * MAX_BATCH_FRAMES + 2))
    capped: collections.deque[Request | None] = collections.deque(frames(1, 2, 3))
    assert sequences(take_batch(capped, max_frames=2)) == [1, 2]


def test_a_batch_holds_at_most_the_byte_cap_and_a_large_frame_goes_alone() -> None:
    def sized(sequence: int, size: int) -> Request:
        frame = Request(sequence=sequence)
        frame.release_keys.append("k" * size)
        return frame

    one = sized(1, 100).ByteSize()
    backlog: collections.deque[Request | None] = collections.deque(
        [sized(1, 100), sized(2, 100), sized(3, 100), sized(4, 10_000), sized(5, 100)]
    )
    cap = 2 * one + one // 2  # room for two frames, not three
    assert sequences(take_batch(backlog, max_bytes=cap)) == [1, 2]
    assert sequences(take_batch(backlog, max_bytes=cap)) == [3]  # the next would pass the cap
    assert sequences(take_batch(backlog, max_bytes=cap)) == [4]  # larger than the cap: alone
    assert sequences(take_batch(backlog, max_bytes=cap)) == [5]


def test_batches_are_on_unless_the_environment_turns_them_off() -> None:
    assert batches_enabled({})
    assert batches_enabled({"CLOUDBURST_STREAM_BATCHES": "1"})
    for off in ("0", "false", "No", " off "):
        assert not batches_enabled({"CLOUDBURST_STREAM_BATCHES": off})


class FakeCall:
    """A stream call whose writes finish when the test lets them, answered by the test."""

    def __init__(self) -> None:
        self.written: asyncio.Queue[Request] = asyncio.Queue()
        self.proceed = asyncio.Semaphore(0)
        self.answers: asyncio.Queue[Response | None] = asyncio.Queue()
        self.half_closed = False

    async def write(self, message: Request) -> None:
        self.written.put_nowait(message)
        await self.proceed.acquire()

    async def done_writing(self) -> None:
        self.half_closed = True
        self.answers.put_nowait(None)

    def cancel(self) -> bool:
        self.answers.put_nowait(None)
        return True

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> Response:
        answer = await self.answers.get()
        if answer is None:
            raise StopAsyncIteration
        return answer


class Peer:
    """The calls an :class:`OutboxStream` opened and the answers it dispatched."""

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.answered: list[int] = []
        self.dispatched = asyncio.Event()
        self.ended = asyncio.Event()

    def open(self) -> FakeCall:
        self.calls.append(FakeCall())
        return self.calls[-1]

    def stream(self, batches: bool) -> OutboxStream[Request, Response]:
        def on_answer(answer: Response) -> None:
            self.answered.append(answer.sequence)
            self.dispatched.set()

        def on_end(_: grpc.RpcError | None) -> None:
            self.ended.set()

        return OutboxStream("a test peer", self.open, on_answer, on_end, batches=batches)


async def written(call: FakeCall, count: int) -> list[list[int]]:
    """The next ``count`` messages written on ``call``, each let through once seen."""
    out = []
    async with asyncio.timeout(DEADLINE):
        for _ in range(count):
            out.append(sequences(await call.written.get()))
            call.proceed.release()
    return out


async def dispatched(peer: Peer, count: int) -> list[int]:
    """Wait (bounded) until ``count`` answers were dispatched; return them."""
    async with asyncio.timeout(DEADLINE):
        while len(peer.answered) < count:
            peer.dispatched.clear()
            await peer.dispatched.wait()
    return peer.answered


async def test_frames_queued_behind_a_write_go_in_one_message_once_the_peer_reads_batches() -> None:
    peer = Peer()
    stream = peer.stream(batches=True)
    for frame in frames(1, 2, 3):
        stream.send(frame)
    call = peer.calls[0]
    # The peer has not said it reads batches: one frame per message.
    assert await written(call, 3) == [[1], [2], [3]]

    call.answers.put_nowait(Response(sequence=1, reads_batches=True))
    assert await dispatched(peer, 1) == [1]
    stream.send(Request(sequence=4))
    async with asyncio.timeout(DEADLINE):
        in_progress = await call.written.get()  # not let through yet
    for frame in frames(5, 6, 7):
        stream.send(frame)
    call.proceed.release()
    assert sequences(in_progress) == [4]
    assert await written(call, 1) == [[5, 6, 7]]
    await stream.close(grace=DEADLINE)
    assert call.half_closed


async def test_a_peer_that_does_not_read_batches_gets_single_frames() -> None:
    peer = Peer()
    stream = peer.stream(batches=True)
    call_answers = [Response(sequence=n) for n in (1, 2)]
    for frame in frames(1, 2, 3, 4):
        stream.send(frame)
    call = peer.calls[0]
    for answer in call_answers:
        call.answers.put_nowait(answer)
    assert await dispatched(peer, 2) == [1, 2]
    for frame in frames(5, 6):
        stream.send(frame)
    assert await written(call, 6) == [[1], [2], [3], [4], [5], [6]]
    await stream.close(grace=DEADLINE)


async def test_a_new_stream_waits_for_its_peer_to_say_it_reads_batches_again() -> None:
    peer = Peer()
    stream = peer.stream(batches=True)
    stream.send(Request(sequence=1))
    first = peer.calls[0]
    assert await written(first, 1) == [[1]]
    first.answers.put_nowait(Response(sequence=1, reads_batches=True))
    assert await dispatched(peer, 1) == [1]
    first.answers.put_nowait(None)  # the stream ends
    await asyncio.wait_for(peer.ended.wait(), DEADLINE)

    for frame in frames(2, 3, 4):
        stream.send(frame)
    second = peer.calls[1]
    assert await written(second, 3) == [[2], [3], [4]]
    await stream.close(grace=DEADLINE)


async def test_batched_answers_are_dispatched_one_by_one_in_order() -> None:
    peer = Peer()
    stream = peer.stream(batches=True)
    stream.send(Request(sequence=1))
    call = peer.calls[0]
    batch = Response()
    batch.batch.extend(Response(sequence=n) for n in (3, 1, 2))
    call.answers.put_nowait(batch)
    call.answers.put_nowait(Response(sequence=4))
    assert await dispatched(peer, 4) == [3, 1, 2, 4]
    call.proceed.release()
    await stream.close(grace=DEADLINE)


async def test_without_batches_a_stream_writes_frame_by_frame_and_passes_answers_on() -> None:
    peer = Peer()
    stream = peer.stream(batches=False)
    for frame in frames(1, 2):
        stream.send(frame)
    call = peer.calls[0]
    batch = Response(sequence=9, reads_batches=True)
    batch.batch.extend(Response(sequence=n) for n in (1, 2))
    call.answers.put_nowait(batch)
    assert await dispatched(peer, 1) == [9]
    for frame in frames(3, 4):
        stream.send(frame)
    assert await written(call, 4) == [[1], [2], [3], [4]]
    await stream.close(grace=DEADLINE)


async def test_a_writer_task_leaves_the_stream_once_its_backlog_is_written() -> None:
    peer = Peer()
    stream = peer.stream(batches=False)
    stream.send(Request(sequence=1))
    writers = list(stream._writers)
    assert len(writers) == 1, "a frame handed off while no write is in progress gets a writer"
    call = peer.calls[0]
    assert await written(call, 1) == [[1]]
    await asyncio.wait_for(asyncio.gather(*writers), DEADLINE)
    assert not stream._writers, "the writer left as it ended"
    stream.send(Request(sequence=2))  # a new writer for the next frame
    assert await written(call, 1) == [[2]]
    await stream.close(grace=DEADLINE)
    assert call.half_closed


async def test_frames_written_together_go_in_one_message_once_the_peer_reads_batches() -> None:
    peer = Peer()
    stream = peer.stream(batches=True)
    stream.open()
    call = peer.calls[0]
    writes = asyncio.create_task(stream.write_all(frames(1, 2)))
    # The peer has not said it reads batches: one frame per message.
    assert await written(call, 2) == [[1], [2]]
    await writes

    call.answers.put_nowait(Response(sequence=1, reads_batches=True))
    assert await dispatched(peer, 1) == [1]
    writes = asyncio.create_task(stream.write_all(frames(3, 4, 5)))
    assert await written(call, 1) == [[3, 4, 5]]
    await writes
    await stream.close(grace=DEADLINE)


async def batching(peer: Peer) -> tuple[OutboxStream[Request, Response], FakeCall]:
    """A stream whose peer said it reads batches."""
    stream = peer.stream(batches=True)
    stream.open()
    call = peer.calls[0]
    call.answers.put_nowait(Response(sequence=1, reads_batches=True))
    assert await dispatched(peer, 1) == [1]
    return stream, call


async def test_a_lone_frame_waits_a_turn_for_others_only_once_frames_queued_behind_writes() -> None:
    stream, call = await batching(Peer())
    # No frame has waited yet: the first goes at once, alone; the second waits behind it.
    writes = [asyncio.create_task(stream.write(Request(sequence=n))) for n in (2, 3)]
    assert await written(call, 2) == [[2], [3]]
    await asyncio.gather(*writes)
    # One did wait: now a lone frame gives the loop a turn, and the frame sent in it joins.
    writes = [asyncio.create_task(stream.write(Request(sequence=n))) for n in (4, 5)]
    assert await written(call, 1) == [[4, 5]]
    await asyncio.gather(*writes)
    await stream.close(grace=DEADLINE)


async def test_a_writer_cancelled_in_its_turn_hands_the_frames_on() -> None:
    stream, call = await batching(Peer())
    writes = [asyncio.create_task(stream.write(Request(sequence=n))) for n in (2, 3)]
    assert await written(call, 2) == [[2], [3]]
    await asyncio.gather(*writes)
    cancelled = asyncio.create_task(stream.write(Request(sequence=4)))
    await asyncio.sleep(0)  # one step of the task: to its turn, before it writes
    assert call.written.empty()
    stream.send(Request(sequence=5))  # joins the frame in the backlog
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await written(call, 1) == [[4, 5]]
    stream.send(Request(sequence=6))  # the stream writes on as before
    assert await written(call, 1) == [[6]]
    await stream.close(grace=DEADLINE)
