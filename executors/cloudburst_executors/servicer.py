"""The ExecutorService servicer, and the in-process peer that skips the network."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from cloudburst.errors import (
    CloudburstError,
    InvalidArgumentError,
    QueueFullError,
    UnavailableError,
)
from cloudburst.streams import MAX_BATCH_BYTES, batches_enabled, take_batch
from cloudburst.v1 import (
    execution_pb2,
    executor_service_pb2,
    executor_service_pb2_grpc,
    scheduler_service_pb2,
)
from cloudburst_executors.executor import Executor
from cloudburst_executors.results import RoutedResult
from cloudburst_grpc import telemetry
from cloudburst_grpc.answers import AnswerWriter
from cloudburst_grpc.config import ExecutorConfig
from cloudburst_grpc.failures import error_to_call_error
from cloudburst_grpc.schedules import ReceivedSchedules

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext

#: The most answers one StreamAnswers message carries.
ANSWERS_PER_MESSAGE = 64
#: Answers queued for a caller that does not read its answer stream: past this many, further
#: answers go through the scheduler (whose call stream has flow control of its own), so that a
#: stuck caller cannot fill the executor's memory.
MAX_QUEUED_ANSWERS = 4096
#: Seconds a write to a caller's answer stream may wait for the caller (gRPC flow control holds
#: it while the caller does not read) before further answers go through the scheduler instead.
#: Those already queued stay queued, for a caller that reads again.
STALLED_ANSWER_SECONDS = 2.0
_STREAM_ID = re.compile(r"[0-9a-f]{32}")
#: Seconds a note (a call answered directly, a result stored) waits for others to travel with.
#: Notes are off the caller's path: together they cost the scheduler one message, not several.
NOTE_DELAY_SECONDS = 0.005

AnswersMessage = executor_service_pb2.StreamAnswersResponse


class _WrittenAnswers:
    """A caller's answer stream, written by the tasks whose calls it answers (the default).

    An answer goes out from the task that produced it when no write is in
    progress; answers that come during a write go out after it, several in one
    message (:func:`_merge_answers`). A queue and a turn of the event loop fewer
    per answer than a response generator.
    """

    def __init__(
        self, context: Context[executor_service_pb2.StreamAnswersRequest, AnswersMessage]
    ) -> None:
        self._room = asyncio.Event()
        self._writer = AnswerWriter[AnswersMessage](
            context, self._room, "an answer stream", _merge_answers
        )
        self.ended = asyncio.Event()
        """Set when the stream is to end (replaced, or the executor shuts down)."""
        self.at_shutdown = False
        """Whether the executor shuts down: the stream ends without waiting on a stalled write."""

    @property
    def writer(self) -> asyncio.Task[Any] | None:
        """The task writing to the stream now, if one is."""
        return self._writer.writer

    def pending(self) -> int:
        """Answers not yet written."""
        return self._writer.backlog()

    def stalled(self, seconds: float) -> bool:
        """Whether the caller has taken no answer for longer than ``seconds`` while some wait."""
        return self._writer.stalled(seconds)

    def write(self, message: AnswersMessage) -> Awaitable[None]:
        """Write ``message`` now, or after the write in progress."""
        return self._writer.write(message)

    def end(self, at_shutdown: bool = False) -> None:
        """End the stream once what is pending is written.

        ``at_shutdown``: not once a write has waited :data:`STALLED_ANSWER_SECONDS`
        for the caller; what is pending then is dropped (see :meth:`flush`).
        """
        self.at_shutdown = self.at_shutdown or at_shutdown
        self.ended.set()
        self._room.set()  # a flush under way looks again

    async def flush(self) -> bool:
        """Wait until every answer is written (or the stream is gone); whether they were.

        At shutdown, a write that waits :data:`STALLED_ANSWER_SECONDS` for the
        caller ends the wait: the answers are dropped, as for a caller gone.
        """
        writer = self._writer
        while writer.backlog():
            if self.at_shutdown and writer.stalled(STALLED_ANSWER_SECONDS):
                writer.drop()
                return False
            self._room.clear()
            if not self.at_shutdown:
                await self._room.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(writer.stalled_in(STALLED_ANSWER_SECONDS)):
                    await self._room.wait()
        return True


class _QueuedAnswers:
    """A caller's answer stream sent by a response generator (while tracing is on).

    The tracing interceptor wraps only generators, so with tracing on the
    answers go through a queue to the stream's generator.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[AnswersMessage | None] = asyncio.Queue()
        self.sending_since = 0.0
        """When the generator began sending its message in progress (0: none is)."""

    #: The generator writes: no call's task waits for a write.
    writer: asyncio.Task[Any] | None = None

    def pending(self) -> int:
        """Answers not yet taken by the generator."""
        return self.queue.qsize()

    def stalled(self, seconds: float) -> bool:
        """Whether the caller has taken no answer for longer than ``seconds`` while some wait."""
        since = self.sending_since
        return since > 0 and time.monotonic() - since > seconds

    async def write(self, message: AnswersMessage) -> None:
        """Queue ``message`` for the generator."""
        self.queue.put_nowait(message)

    def end(self, at_shutdown: bool = False) -> None:
        """End the stream once what is queued is sent (a generator cannot leave a stalled write)."""
        self.queue.put_nowait(None)


AnswerStream = _WrittenAnswers | _QueuedAnswers


def _merge_answers(backlog: collections.deque[AnswersMessage]) -> AnswersMessage:
    """The next message of an answer stream: the first waiting, with the answers after it.

    The first message (``registered``) goes alone; at most ANSWERS_PER_MESSAGE
    answers, and no more than MAX_BATCH_BYTES of them after the first, share one:
    a caller takes messages of one answer and of that many bytes whatever its
    limit, so a merged message never exceeds it where single answers would not.
    """
    message = backlog.popleft()
    if message.registered or not backlog:
        return message
    answers = message.answers
    size = message.ByteSize()
    while backlog and len(answers) < ANSWERS_PER_MESSAGE:
        size += backlog[0].ByteSize()
        if size > MAX_BATCH_BYTES:
            break
        answers.extend(backlog.popleft().answers)
    return message


def _answer(sequence: int) -> tuple[AnswersMessage, scheduler_service_pb2.StreamCallsResponse]:
    """A message of an answer stream with one answer, to fill in, and that answer."""
    message = AnswersMessage()
    return message, message.answers.add(sequence=sequence)


class ExecutorServicer(executor_service_pb2_grpc.ExecutorServiceServicer):
    """Serves ExecutorService over one :class:`Executor`.

    Args:
        executor: The executor served.
        max_answer_streams: The most answer streams (StreamAnswers) held at once.
    """

    def __init__(
        self,
        executor: Executor,
        max_answer_streams: int = ExecutorConfig.max_answer_streams,
    ) -> None:
        self._executor = executor
        self._max_answer_streams = max_answer_streams
        self._detached: set[asyncio.Task[None]] = set()
        """Calls whose stream ended before they did: they still run and store their results."""
        self._streams: dict[
            asyncio.Queue[executor_service_pb2.StreamTriggersResponse | None],
            executor_service_pb2.TriggerStreamStatus,
        ] = {}
        """The answer queues of the open StreamTriggers streams, and what each carried."""
        self._closing = False
        self._batches = batches_enabled()
        """Whether trigger streams offer to read batched frames and batch their responses."""
        self._answer_streams: dict[str, AnswerStream] = {}
        """The callers' open answer streams (StreamAnswers), by answer stream id."""
        self._live_answers: set[AnswerStream] = set()
        """Every answer stream whose handler runs, the replaced ones that still flush too."""
        self._stream_ended = asyncio.Event()
        """Set as the handler of a stream (answers or triggers) ends."""
        self._dropped_streams = 0
        """Answer streams given up at shutdown, their write stalled: gRPC still holds them."""
        if not telemetry.tracing():
            # Each call's task writes its answer itself (see _WrittenAnswers). The tracing
            # interceptor only wraps generators, so with tracing on the generator stays.
            self.StreamAnswers = self._stream_answers_written  # type: ignore[method-assign,assignment]
        if executor is not None:
            self.executor_id = executor.executor_id
            telemetry.observe_answer_streams(self)

    @property
    def open_answer_streams(self) -> int:
        """The callers' answer streams registered here now."""
        return len(self._answer_streams)

    def _answer_stream(self, stream_id: str) -> AnswerStream | None:
        """The caller's answer stream here, if it has one that keeps up."""
        if not stream_id or self._closing:
            return None  # shutting down: answers go through the scheduler
        stream = self._answer_streams.get(stream_id)
        if (
            stream is None
            or stream.pending() >= MAX_QUEUED_ANSWERS
            or stream.stalled(STALLED_ANSWER_SECONDS)
        ):
            return None
        return stream

    async def end_streams(self, timeout: float) -> bool:
        """At shutdown: let calls started from streams answer (up to ``timeout``), then end them.

        Peers keep their streams open for as long as the executor lives, so the
        server would otherwise wait out its whole grace period for them. From
        now on, answers go through the scheduler. An answer stream whose write
        waits :data:`STALLED_ANSWER_SECONDS` for a caller that does not read is
        not waited for: its answers are dropped, as for a caller gone (results
        the calls store are stored all the same).

        Returns whether such streams are left: gRPC ends them only with every
        call of the server, so stop it without a grace period.
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0)
        # A call whose task writes its answer has ended but for the write: the stream's
        # end below waits for that write, or gives it up if the caller does not read.
        writing = {stream.writer for stream in self._live_answers}
        running = [task for task in self._detached if task not in writing]
        if running:
            await asyncio.wait(running, timeout=max(deadline - loop.time(), 0))
        for answers in list(self._streams):
            answers.put_nowait(None)
        for stream in list(self._live_answers):
            stream.end(at_shutdown=True)
        while self._streams or self._flushing():
            left = deadline - loop.time()
            if left <= 0:
                break
            self._stream_ended.clear()
            # Timed too: a generator's stream does not end when its write stalls.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, STALLED_ANSWER_SECONDS / 4)):
                    await self._stream_ended.wait()
        stalled = len(self._live_answers) + self._dropped_streams
        if stalled:
            logger.info(
                "%d answer streams end with the server: their callers do not read them", stalled
            )
        return stalled > 0

    def _flushing(self) -> bool:
        """Whether an answer stream still flushes to a caller that reads."""
        return any(not s.stalled(STALLED_ANSWER_SECONDS) for s in self._live_answers)

    async def ExecuteFunction(
        self,
        request: executor_service_pb2.ExecuteFunctionRequest,
        context: Context[
            executor_service_pb2.ExecuteFunctionRequest,
            executor_service_pb2.ExecuteFunctionResponse,
        ],
    ) -> executor_service_pb2.ExecuteFunctionResponse:
        """Run one call."""
        if not request.function_name or not request.call_id:
            raise InvalidArgumentError("function_name and call_id are required")
        return await self._executor.execute(request)

    async def StreamTriggers(
        self,
        request_iterator: AsyncIterator[executor_service_pb2.StreamTriggersRequest],
        context: Context[
            executor_service_pb2.StreamTriggersRequest, executor_service_pb2.StreamTriggersResponse
        ],
    ) -> AsyncIterator[executor_service_pb2.StreamTriggersResponse]:
        """Accept triggers and calls from one peer; answer on the same stream.

        The results of DAG calls whose schedules name this stream (by the hello's
        ``peer_id`` and ``stream_id``) come back on it too.
        """
        answers: asyncio.Queue[executor_service_pb2.StreamTriggersResponse | None] = asyncio.Queue()
        executor = self._executor
        opener_reads_batches = False
        """Whether the opener said it reads batched responses (and batches are on here)."""
        schedules = ReceivedSchedules()
        """The schedules this stream carried, for the triggers that refer to them."""
        stats = executor_service_pb2.TriggerStreamStatus()
        """Who opened the stream (from its hello) and what it carried, for the status."""
        attached: tuple[str, int] | None = None
        """The name the stream's results are routed by, once its hello came."""
        self._streams[answers] = stats

        notes: list[executor_service_pb2.StreamTriggersResponse] = []
        """Notes (calls answered directly, results stored), waiting to travel together.

        Nothing on a call's critical path waits for a note: the scheduler learns
        from them when to stop counting a call and when a release of its result
        may proceed, so they wait up to NOTE_DELAY_SECONDS for each other and
        share one message.
        """

        def send_notes() -> None:
            for waiting in notes:
                answers.put_nowait(waiting)
            notes.clear()

        def note(frame: executor_service_pb2.StreamTriggersResponse) -> None:
            if not notes:
                asyncio.get_running_loop().call_later(NOTE_DELAY_SECONDS, send_notes)
            notes.append(frame)

        async def run_call(
            sequence: int, request: executor_service_pb2.ExecuteFunctionRequest
        ) -> None:
            # The call's task leaves _detached as it ends: a done callback would do it a
            # turn of the event loop later, which costs every call a further turn.
            try:
                await answer_call(sequence, request)
            finally:
                task = asyncio.current_task()
                if task is not None:
                    self._detached.discard(task)

        async def answer_call(
            sequence: int, request: executor_service_pb2.ExecuteFunctionRequest
        ) -> None:
            try:
                response = await executor.execute(request)
            except CloudburstError as exc:
                response = executor_service_pb2.ExecuteFunctionResponse(
                    outcome=execution_pb2.Outcome(error=error_to_call_error(exc))
                )
            direct = self._answer_stream(request.answer_stream_id)
            if direct is not None:
                # The caller's own stream is here: answer there, and tell the scheduler in a
                # note (the caller tells it too, in its next frame: answered_sequences).
                note(
                    executor_service_pb2.StreamTriggersResponse(
                        sequence=sequence,
                        execute_function=executor_service_pb2.ExecuteFunctionResponse(
                            delivered_directly=True
                        ),
                    )
                )
                message, answer = _answer(request.answer_sequence)
                answered = answer.call_function
                answered.response_key = request.response_key
                answered.outcome.CopyFrom(response.outcome)
                written: Awaitable[None] | None = direct.write(message)
            else:
                answers.put_nowait(
                    executor_service_pb2.StreamTriggersResponse(
                        sequence=sequence, execute_function=response
                    )
                )
                written = None
            key = request.response_key
            if request.direct_response and key:
                # Answered first, stored after: the opener holds deletes of the key until its
                # store is reported. Reported once stored, not once the answer is written: a
                # caller that does not read its answer stream holds up neither.
                when_stored(executor, key, functools.partial(report_stored, key))
            if written is not None:
                await written

        def send_result(result: RoutedResult) -> Awaitable[None] | None:
            # A DAG result whose schedule names this stream (see results.ResultRouter).
            stats.dag_results += 1
            call_id, key = result.call_id, result.stored_key
            written = None
            direct = self._answer_stream(result.answer_stream_id)
            if direct is not None:
                # The caller's own stream is here: answer there, and tell the scheduler in a
                # note (see run_call).
                note(
                    executor_service_pb2.StreamTriggersResponse(
                        dag_result=executor_service_pb2.DagResult(
                            call_id=call_id, delivered_directly=True
                        )
                    )
                )
                message, answer = _answer(result.answer_sequence)
                answered = answer.call_dag
                answered.response_key = key
                answered.outcome.CopyFrom(result.outcome)
                written = direct.write(message)  # for the task that delivers it to await
            else:
                answers.put_nowait(
                    executor_service_pb2.StreamTriggersResponse(
                        dag_result=executor_service_pb2.DagResult(
                            call_id=call_id, outcome=result.outcome
                        )
                    )
                )
            if key:
                # Answered first, stored after: the opener holds deletes of the key until now.
                when_stored(executor, key, functools.partial(report_stored, key))
            return written

        def report_stored(key: str, dropped: bool) -> None:
            # Only releases wait for it: a note, in the same message as others.
            note(
                executor_service_pb2.StreamTriggersResponse(
                    result_stored=executor_service_pb2.ResultStored(
                        response_key=key, dropped=dropped
                    )
                )
            )

        async def read() -> None:
            nonlocal opener_reads_batches, attached
            try:
                first = True
                async for frame in request_iterator:
                    kind = frame.WhichOneof("frame")
                    if first:
                        if kind != "hello":
                            raise InvalidArgumentError(
                                "the first StreamTriggers frame must be hello"
                            )
                        first = False
                        opener_reads_batches = self._batches and frame.hello.reads_batches
                        stats.peer_id = frame.hello.peer_id
                        stats.stream_id = frame.hello.stream_id
                        attached = (stats.peer_id, stats.stream_id)
                        executor.results.attach(attached, send_result)
                        continue
                    # A batch carries frames to serve in order as if each came alone.
                    for inner in frame.batch or (frame,):
                        stats.frames_read += 1
                        serve(inner)
            finally:
                answers.put_nowait(None)

        def serve(frame: executor_service_pb2.StreamTriggersRequest) -> None:
            if frame.HasField("end_hold"):
                executor.end_hold(frame.end_hold.drop_keys, frame.end_hold.store_keys)
            kind = frame.WhichOneof("frame")
            if kind == "trigger":
                schedule = schedules.resolve(frame.trigger)
                if schedule is None:
                    logger.warning(
                        "call %s: a trigger for %s came after the call's deadline; dropped",
                        frame.trigger.call_id,
                        frame.trigger.target_function,
                    )
                else:
                    executor.trigger(frame.trigger, schedule)
            elif kind == "execute_function":
                # Not tracked: a call outlives its caller's stream (the caller, e.g.
                # a scheduler that died, may wait on the stored result instead).
                # It leaves _detached itself as it ends (see run_call).
                self._detached.add(
                    asyncio.ensure_future(run_call(frame.sequence, frame.execute_function))
                )

        def report(cache_report: executor_service_pb2.CacheReport) -> None:
            answers.put_nowait(
                executor_service_pb2.StreamTriggersResponse(cache_report=cache_report)
            )

        # The opener learns which keys are cached here (for placement by data locality).
        stop_reports = executor.cache.listen(report) if executor.cache is not None else None
        reader = asyncio.create_task(read())
        try:
            if self._batches:
                # Said first, in a response of its own: the opener may batch from now on.
                yield executor_service_pb2.StreamTriggersResponse(reads_batches=True)
            while (answer := await answers.get()) is not None:
                if not opener_reads_batches or answers.empty():
                    yield answer
                    continue
                # Answers queued while the last one was written: in one batch (or a few).
                backlog: collections.deque[executor_service_pb2.StreamTriggersResponse | None]
                backlog = collections.deque([answer])
                while not answers.empty():
                    backlog.append(answers.get_nowait())
                while backlog and backlog[0] is not None:
                    yield take_batch(backlog)
                if backlog:  # the end of the stream was queued too
                    break
            if not self._closing:
                await reader  # re-raise a protocol error from the reader
        finally:
            del self._streams[answers]
            self._stream_ended.set()
            if attached is not None:
                executor.results.detach(attached, send_result)
            if stop_reports is not None:
                stop_reports()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def StreamAnswers(
        self,
        request: executor_service_pb2.StreamAnswersRequest,
        context: Context[executor_service_pb2.StreamAnswersRequest, AnswersMessage],
    ) -> AsyncIterator[AnswersMessage]:
        """Register a caller's answer stream, and send it the answers routed to it until it ends.

        A second stream with the same id replaces the first, which ends. Past
        ``max_answer_streams`` streams, a new one is refused (a replacement is not).
        This is the handler while tracing is on; otherwise :meth:`_stream_answers_written`
        serves the stream the same way.
        """
        stream = _QueuedAnswers()
        stream_id = self._register_answers(request, stream)
        try:
            yield AnswersMessage(registered=True)
            queue = stream.queue
            while (message := await queue.get()) is not None:
                backlog: collections.deque[AnswersMessage] = collections.deque([message])
                while not queue.empty() and len(backlog) < ANSWERS_PER_MESSAGE:
                    following = queue.get_nowait()
                    if following is None:
                        queue.put_nowait(None)  # after this message
                        break
                    backlog.append(following)
                while backlog:  # one message, or a few when the answers are large
                    stream.sending_since = time.monotonic()
                    yield _merge_answers(backlog)
                    stream.sending_since = 0.0
        finally:
            self._unregister_answers(stream_id, stream)

    async def _stream_answers_written(
        self,
        request: executor_service_pb2.StreamAnswersRequest,
        context: Context[executor_service_pb2.StreamAnswersRequest, AnswersMessage],
    ) -> None:
        """:meth:`StreamAnswers` with each answer written by the task of the call it answers."""
        stream = _WrittenAnswers(context)
        stream_id = self._register_answers(request, stream)
        try:
            await stream.write(AnswersMessage(registered=True))
            await stream.ended.wait()
            if not await stream.flush():
                self._dropped_streams += 1
        finally:
            self._unregister_answers(stream_id, stream)

    def _register_answers(
        self, request: executor_service_pb2.StreamAnswersRequest, stream: AnswerStream
    ) -> str:
        """Register ``stream`` under the request's id (ending a stream it replaces); the id."""
        stream_id = request.answer_stream_id
        if not _STREAM_ID.fullmatch(stream_id):
            raise InvalidArgumentError(
                "answer_stream_id must be 32 lowercase hexadecimal digits (128 random bits)"
            )
        if self._closing:
            raise UnavailableError("this executor is shutting down")
        if (
            stream_id not in self._answer_streams
            and len(self._answer_streams) >= self._max_answer_streams
        ):
            limit = self._max_answer_streams
            raise QueueFullError(
                f"this executor holds {limit} answer streams, its limit "
                "(executor.max_answer_streams): the calls it runs for this caller are answered "
                "through the scheduler instead; open the stream again later, or raise the limit",
                {"limit": str(limit)},
            )
        replaced = self._answer_streams.get(stream_id)
        if replaced is not None:
            replaced.end()
        self._answer_streams[stream_id] = stream
        self._live_answers.add(stream)
        return stream_id

    def _unregister_answers(self, stream_id: str, stream: AnswerStream) -> None:
        if self._answer_streams.get(stream_id) is stream:
            del self._answer_streams[stream_id]
        self._live_answers.discard(stream)
        self._stream_ended.set()

    async def PinFunction(
        self,
        request: executor_service_pb2.PinFunctionRequest,
        context: Context[
            executor_service_pb2.PinFunctionRequest, executor_service_pb2.PinFunctionResponse
        ],
    ) -> executor_service_pb2.PinFunctionResponse:
        """Pin a function."""
        await self._executor.pin(request.function_name, request.function_version)
        return executor_service_pb2.PinFunctionResponse()

    async def UnpinFunction(
        self,
        request: executor_service_pb2.UnpinFunctionRequest,
        context: Context[
            executor_service_pb2.UnpinFunctionRequest, executor_service_pb2.UnpinFunctionResponse
        ],
    ) -> executor_service_pb2.UnpinFunctionResponse:
        """Unpin a function."""
        self._executor.unpin(request.function_name)
        return executor_service_pb2.UnpinFunctionResponse()

    async def GetExecutorStatus(
        self,
        request: executor_service_pb2.GetExecutorStatusRequest,
        context: Context[
            executor_service_pb2.GetExecutorStatusRequest,
            executor_service_pb2.GetExecutorStatusResponse,
        ],
    ) -> executor_service_pb2.GetExecutorStatusResponse:
        """Report status, with the open trigger streams and the results waiting for one."""
        status = self._executor.status()
        status.trigger_streams.extend(self._streams.values())
        status.parked_results = self._executor.results.parked
        return status


class LocalExecutorPeer:
    """An executor in this process, called directly: no serialization, no network."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._detached: set[asyncio.Task[None]] = set()
        """Calls whose stream ended before they did: they still run and store their results."""
        self._stored: dict[str, asyncio.Future[bool]] = {}
        self.executor_id = executor.executor_id
        self.address = executor.address

    async def execute(
        self, request: executor_service_pb2.ExecuteFunctionRequest, timeout: float
    ) -> executor_service_pb2.ExecuteFunctionResponse:
        """Run a call in this process, bounded by ``timeout``."""
        from cloudburst.errors import CloudburstTimeoutError

        try:
            async with asyncio.timeout(timeout):
                return await self._executor.execute(request)
        except TimeoutError:
            raise CloudburstTimeoutError(
                f"call of {request.function_name!r} did not finish within {timeout:.1f}s"
            ) from None
        finally:
            key = request.response_key
            stored = self._stored.pop(key, None)
            if stored is not None:
                when_stored(self._executor, key, functools.partial(_settle, stored))

    def expect_stored(self, response_key: str) -> asyncio.Future[bool]:
        """Settles once the call's result is stored (after its answer); True: dropped."""
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._stored[response_key] = stored
        stored.add_done_callback(functools.partial(self._forget_stored, response_key))
        return stored

    def _forget_stored(self, response_key: str, stored: asyncio.Future[bool]) -> None:
        if self._stored.get(response_key) is stored:
            del self._stored[response_key]

    async def trigger(
        self,
        trigger: execution_pb2.Trigger,
        schedule: execution_pb2.DagSchedule,
        *,
        written: bool = False,
    ) -> None:
        """Hand a trigger and its call's schedule to the executor (neither is copied)."""
        self._executor.trigger(trigger, schedule)

    def expect_result(
        self, schedule: execution_pb2.DagSchedule, timeout: float
    ) -> asyncio.Future[execution_pb2.Outcome]:
        """Wait for the sink's result in this process (callers hold no answer streams here)."""
        call_id = schedule.call_id
        future = self._executor.results.expect(call_id, timeout)
        future.add_done_callback(functools.partial(self._routed, call_id))
        return future

    def _routed(self, call_id: str, _: object) -> None:
        key = self._executor.results.stored_key(call_id)
        stored = self._stored.pop(key, None) if key else None
        if stored is not None:
            when_stored(self._executor, key, functools.partial(_settle, stored))

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        """End held stores of results (see :meth:`Executor.end_hold`)."""
        self._executor.end_hold(drop, store)

    async def pin(self, function_name: str, version: int) -> None:
        """Pin a function."""
        await self._executor.pin(function_name, version)

    async def unpin(self, function_name: str) -> None:
        """Unpin a function."""
        self._executor.unpin(function_name)

    async def status(self) -> executor_service_pb2.GetExecutorStatusResponse:
        """Report status."""
        return self._executor.status()

    async def close(self) -> None:
        """Nothing to release."""


def _settle(future: asyncio.Future[bool], dropped: bool) -> None:
    if not future.done():
        future.set_result(dropped)


def when_stored(executor: Executor, key: str, then: Callable[[bool], None]) -> None:
    """Run ``then`` once the result being stored at ``key`` is stored (at once if it is).

    ``then`` is told whether the store was dropped instead (see :meth:`Executor.end_hold`).
    """
    storing = executor.storing.get(key)
    if storing is None:
        then(False)
    elif storing.done():
        then(_dropped(storing))
    else:
        storing.add_done_callback(lambda done: then(_dropped(done)))


def _dropped(storing: asyncio.Future[bool]) -> bool:
    """Whether a settled store was dropped (a failed or cancelled one was not)."""
    return not storing.cancelled() and storing.exception() is None and storing.result()
