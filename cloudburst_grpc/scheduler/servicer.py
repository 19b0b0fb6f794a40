"""The SchedulerService servicer: validate, delegate to :class:`Scheduler`, convert."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from cloudburst.errors import CloudburstError, InvalidArgumentError
from cloudburst.streams import batches_enabled
from cloudburst.v1 import execution_pb2, scheduler_service_pb2, scheduler_service_pb2_grpc
from cloudburst_grpc import telemetry
from cloudburst_grpc.answer_streams import DELIVERED_DIRECTLY, AnswerRoutes, AnswerTo
from cloudburst_grpc.answers import AnswerBatcher, AnswerWriter
from cloudburst_grpc.failures import error_to_call_error
from cloudburst_grpc.scheduler.core import Accepted, Scheduler, check_chosen_key

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000

Context = grpc.aio.ServicerContext
Answer = scheduler_service_pb2.StreamCallsResponse
Emit = Callable[[Answer], Awaitable[None]]


def _page(names: list[str], page_size: int, page_token: str) -> tuple[list[str], str]:
    if page_size < 0:
        raise InvalidArgumentError("page_size must not be negative")
    size = min(page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
    start = 0
    if page_token:
        start = next((i for i, n in enumerate(names) if n > page_token), len(names))
    page = names[start : start + size]
    more = start + size < len(names)
    return page, (page[-1] if more and page else "")


def _remaining(context: Context[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)


class SchedulerServicer(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    """Serves SchedulerService over a :class:`Scheduler`."""

    takes_chosen_keys = True
    """Whether call streams tell callers that ask (``chooses_keys``) that they take chosen keys."""

    takes_store_keys = True
    """Whether they tell them, in the same answer, that they read ``store_keys``."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._batches = batches_enabled()
        """Whether call streams offer to read batched calls and batch answers to callers."""
        if not telemetry.tracing():
            # Each call's task writes its answers itself (gRPC's reader-writer API): a
            # loop turn and a queue sooner than through a response generator. The
            # tracing interceptor only wraps generators, so with tracing on the
            # generator stays; both batch answers alike (AnswerBatcher).
            self.StreamCalls = self._stream_calls_written  # type: ignore[method-assign,assignment]

    async def CreateFunction(
        self,
        request: scheduler_service_pb2.CreateFunctionRequest,
        context: Context[
            scheduler_service_pb2.CreateFunctionRequest,
            scheduler_service_pb2.CreateFunctionResponse,
        ],
    ) -> scheduler_service_pb2.CreateFunctionResponse:
        """Register a function."""
        stored = await self._scheduler.create_function(request.function, request.replace_existing)
        return scheduler_service_pb2.CreateFunctionResponse(function=stored)

    async def GetFunction(
        self,
        request: scheduler_service_pb2.GetFunctionRequest,
        context: Context[
            scheduler_service_pb2.GetFunctionRequest, scheduler_service_pb2.GetFunctionResponse
        ],
    ) -> scheduler_service_pb2.GetFunctionResponse:
        """Return a function."""
        function = await self._scheduler.get_function(request.name)
        return scheduler_service_pb2.GetFunctionResponse(function=function)

    async def ListFunctions(
        self,
        request: scheduler_service_pb2.ListFunctionsRequest,
        context: Context[
            scheduler_service_pb2.ListFunctionsRequest, scheduler_service_pb2.ListFunctionsResponse
        ],
    ) -> scheduler_service_pb2.ListFunctionsResponse:
        """List function names."""
        names = await self._scheduler.registry.function_names(request.prefix)
        page, token = _page(names, request.page_size, request.page_token)
        return scheduler_service_pb2.ListFunctionsResponse(names=page, next_page_token=token)

    async def DeleteFunction(
        self,
        request: scheduler_service_pb2.DeleteFunctionRequest,
        context: Context[
            scheduler_service_pb2.DeleteFunctionRequest,
            scheduler_service_pb2.DeleteFunctionResponse,
        ],
    ) -> scheduler_service_pb2.DeleteFunctionResponse:
        """Delete a function."""
        await self._scheduler.delete_function(request.name)
        return scheduler_service_pb2.DeleteFunctionResponse()

    async def CreateDag(
        self,
        request: scheduler_service_pb2.CreateDagRequest,
        context: Context[
            scheduler_service_pb2.CreateDagRequest, scheduler_service_pb2.CreateDagResponse
        ],
    ) -> scheduler_service_pb2.CreateDagResponse:
        """Register a DAG."""
        return scheduler_service_pb2.CreateDagResponse(
            dag=await self._scheduler.create_dag(request.dag)
        )

    async def GetDag(
        self,
        request: scheduler_service_pb2.GetDagRequest,
        context: Context[scheduler_service_pb2.GetDagRequest, scheduler_service_pb2.GetDagResponse],
    ) -> scheduler_service_pb2.GetDagResponse:
        """Return a DAG."""
        return scheduler_service_pb2.GetDagResponse(dag=await self._scheduler.get_dag(request.name))

    async def ListDags(
        self,
        request: scheduler_service_pb2.ListDagsRequest,
        context: Context[
            scheduler_service_pb2.ListDagsRequest, scheduler_service_pb2.ListDagsResponse
        ],
    ) -> scheduler_service_pb2.ListDagsResponse:
        """List DAG names."""
        names = await self._scheduler.registry.dag_names(request.prefix)
        page, token = _page(names, request.page_size, request.page_token)
        return scheduler_service_pb2.ListDagsResponse(names=page, next_page_token=token)

    async def DeleteDag(
        self,
        request: scheduler_service_pb2.DeleteDagRequest,
        context: Context[
            scheduler_service_pb2.DeleteDagRequest, scheduler_service_pb2.DeleteDagResponse
        ],
    ) -> scheduler_service_pb2.DeleteDagResponse:
        """Delete a DAG."""
        await self._scheduler.delete_dag(request.name)
        return scheduler_service_pb2.DeleteDagResponse()

    async def CallFunction(
        self,
        request: scheduler_service_pb2.CallFunctionRequest,
        context: Context[
            scheduler_service_pb2.CallFunctionRequest, scheduler_service_pb2.CallFunctionResponse
        ],
    ) -> scheduler_service_pb2.CallFunctionResponse:
        """Call a function; with direct_response, wait for and return its outcome."""
        accepted = await self._scheduler.call_function(
            request, request.direct_response, _remaining(context)
        )
        response = scheduler_service_pb2.CallFunctionResponse(response_key=accepted.response_key)
        if accepted.outcome is not None:
            response.outcome.CopyFrom(await _await_outcome(accepted))
        return response

    async def CallDag(
        self,
        request: scheduler_service_pb2.CallDagRequest,
        context: Context[
            scheduler_service_pb2.CallDagRequest, scheduler_service_pb2.CallDagResponse
        ],
    ) -> scheduler_service_pb2.CallDagResponse:
        """Call a DAG; with direct_response, wait for and return its outcome."""
        accepted = await self._scheduler.call_dag(
            request, request.direct_response, _remaining(context)
        )
        response = scheduler_service_pb2.CallDagResponse(response_key=accepted.response_key)
        if accepted.outcome is not None:
            response.outcome.CopyFrom(await _await_outcome(accepted))
        return response

    async def GetResult(
        self,
        request: scheduler_service_pb2.GetResultRequest,
        context: Context[
            scheduler_service_pb2.GetResultRequest, scheduler_service_pb2.GetResultResponse
        ],
    ) -> scheduler_service_pb2.GetResultResponse:
        """Wait for a stored result; with release, delete it once read."""
        outcome = await self._scheduler.get_result(
            request.response_key, request.release, _remaining(context)
        )
        return scheduler_service_pb2.GetResultResponse(outcome=outcome)

    async def ListExecutors(
        self,
        request: scheduler_service_pb2.ListExecutorsRequest,
        context: Context[
            scheduler_service_pb2.ListExecutorsRequest, scheduler_service_pb2.ListExecutorsResponse
        ],
    ) -> scheduler_service_pb2.ListExecutorsResponse:
        """List the pool; with min_version, wait for a change first (until the deadline nears)."""
        pool = self._scheduler.pool
        if request.min_version:
            remaining = _remaining(context)
            limit = 30.0 if remaining is None else max(remaining - 0.5, 0.0)
            await pool.wait_newer(request.min_version, limit)
        response = scheduler_service_pb2.ListExecutorsResponse(
            version=pool.version, direct_answers=self._scheduler.direct_answers
        )
        for view in pool.views():
            if view.overloaded:
                continue
            response.executors.add(
                executor_id=view.executor_id,
                address=view.address,
                pinned_functions=sorted(view.pinned),
                load=view.load,
                cached_keys=sorted(view.cached_keys),
            )
        return response

    async def StreamCalls(
        self,
        request_iterator: AsyncIterator[scheduler_service_pb2.StreamCallsRequest],
        context: Context[scheduler_service_pb2.StreamCallsRequest, Answer],
    ) -> AsyncIterator[Answer]:
        """Serve many calls over one stream; each is answered when accepted (and finished).

        Answers that queue up while one is being sent go out together, batched
        as by :class:`~cloudburst_grpc.answers.AnswerWriter`.
        """
        backlog: collections.deque[Answer | None] = collections.deque()
        queued = asyncio.Event()
        batcher = AnswerBatcher(self._batches)
        calls: set[asyncio.Task[None]] = set()
        room = asyncio.Event()

        async def emit(answer: Answer) -> None:
            backlog.append(answer)
            queued.set()

        async def read() -> None:
            try:
                await self._read_calls(
                    request_iterator, emit, calls, backlog.__len__, room, batcher
                )
            finally:
                backlog.append(None)
                queued.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                if not backlog:
                    queued.clear()
                    await queued.wait()
                    continue
                if backlog[0] is None:
                    break
                yield batcher.next_message(backlog)
                room.set()
        finally:
            reader.cancel()
            for task in list(calls):
                task.cancel()
            await asyncio.gather(reader, *calls, return_exceptions=True)

    async def _stream_calls_written(
        self,
        request_iterator: AsyncIterator[scheduler_service_pb2.StreamCallsRequest],
        context: Context[scheduler_service_pb2.StreamCallsRequest, Answer],
    ) -> None:
        """:meth:`StreamCalls` with each answer written by the task of the call it answers."""
        room = asyncio.Event()
        batcher = AnswerBatcher(self._batches)
        writer = AnswerWriter[Answer](context, room, "a call stream", batcher.next_message)
        calls: set[asyncio.Task[None]] = set()
        try:
            await self._read_calls(
                request_iterator, writer.write, calls, writer.backlog, room, batcher
            )
        finally:
            for task in list(calls):
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def _read_calls(
        self,
        request_iterator: AsyncIterator[scheduler_service_pb2.StreamCallsRequest],
        emit: Emit,
        calls: set[asyncio.Task[None]],
        backlog: Callable[[], int],
        room: asyncio.Event,
        batcher: AnswerBatcher | None = None,
    ) -> None:
        """Serve every frame of a stream in a task of its own; return once all are answered.

        A message that carries a batch is served frame by frame. ``batcher`` hears
        of the first frame whose caller says it reads batched answers; if the caller
        is yet to be told that this stream reads batched calls, an answer of no call
        (sequence 0) tells it at once. So does one for the first frame whose caller
        asks whether it may choose response keys (``chooses_keys``), with the
        answer (``takes_chosen_keys``), and says that it reads ``store_keys``.

        Flow control: while the stream has ``max_unanswered_calls`` calls running
        or answers not yet written (``backlog``), no further frame is read, so a
        caller that sends faster than it reads is held back by gRPC's own flow
        control instead of growing this process. ``room`` is set whenever a call
        ends or an answer is written.
        """
        limit = self._scheduler.config.max_unanswered_calls

        def ended(task: asyncio.Task[None]) -> None:
            calls.discard(task)
            room.set()

        # Result keys this stream's caller may release: chosen here, answered, marked releasable.
        releasable: set[str] = set()
        # The caller's answer streams at executors, if it holds any (and this scheduler uses them).
        routes = AnswerRoutes() if self._scheduler.direct_answers else None
        asked_keys = False
        try:
            async for message in request_iterator:
                # A batch carries frames to serve in order as if each came alone.
                for frame in message.batch or (message,):
                    hello: Answer | None = None
                    if batcher is not None and frame.reads_batches:
                        batcher.reads_batches()
                        if batcher.offering:
                            # Told now, not with a first answer that may never come (a
                            # sink answers the caller on its answer stream), so that the
                            # caller batches its calls from the next ones on.
                            hello = Answer()
                        batcher = None
                    if frame.chooses_keys and not asked_keys:
                        asked_keys = True
                        if self.takes_chosen_keys or self.takes_store_keys:
                            if hello is None:
                                hello = Answer()
                            hello.takes_chosen_keys = self.takes_chosen_keys
                            hello.takes_store_keys = self.takes_store_keys
                    if hello is not None:
                        await emit(hello)
                    if frame.release_keys:
                        self._release(frame.release_keys, releasable)
                    if frame.store_keys:
                        self._store_now(frame.store_keys, releasable)
                    if frame.answered_sequences and routes is not None:
                        routes.answered(frame.answered_sequences)
                    if frame.WhichOneof("call") is None:
                        if routes is not None:
                            self._route_frame(frame, routes, emit, calls, ended)
                        if (
                            frame.release_keys
                            or frame.store_keys
                            or frame.answered_sequences
                            or frame.HasField("answer_streams")
                            or frame.HasField("answer_stream_lost")
                        ):
                            continue
                    if routes is not None:
                        routes.started(frame.sequence)
                    task = asyncio.create_task(self._serve(frame, emit, releasable, routes))
                    calls.add(task)
                    task.add_done_callback(ended)
                    while len(calls) + backlog() >= limit:
                        room.clear()
                        await room.wait()
        finally:
            if calls:
                await asyncio.gather(*calls, return_exceptions=True)

    def _route_frame(
        self,
        frame: scheduler_service_pb2.StreamCallsRequest,
        routes: AnswerRoutes,
        emit: Emit,
        calls: set[asyncio.Task[None]],
        ended: Callable[[asyncio.Task[None]], None],
    ) -> None:
        """Take in a frame about the caller's answer streams (it carries no call)."""
        if frame.HasField("answer_streams"):
            routes.update(frame.answer_streams)
        if frame.HasField("answer_stream_lost"):
            errors = routes.lost(frame.answer_stream_lost)
            if errors:
                answers = [
                    Answer(sequence=sequence, error=error_to_call_error(error))
                    for sequence, error in errors.items()
                ]
                task = asyncio.create_task(_emit_all(emit, answers))
                calls.add(task)
                task.add_done_callback(ended)

    async def _serve(
        self,
        frame: scheduler_service_pb2.StreamCallsRequest,
        emit: Emit,
        releasable: set[str],
        routes: AnswerRoutes | None = None,
    ) -> None:
        """Answer one frame, with an error answer when the call fails.

        A call whose caller chose its response key and that fails before it is
        accepted also has its error stored under that key (see
        :meth:`Scheduler.refused_chosen_key`), for whoever waits on it.
        """
        chosen = ""
        try:
            if frame.chosen_response_key and frame.WhichOneof("call") is not None:
                chosen = check_chosen_key(frame)
            await self._serve_frame(frame, emit, releasable, routes, chosen)
        except Exception as exc:
            if isinstance(exc, CloudburstError):
                error = exc
            else:
                logger.exception("stream call %d failed", frame.sequence)
                error = CloudburstError("internal error; the details are in the scheduler's log")
            if chosen:
                self._scheduler.refused_chosen_key(chosen, error)
                if frame.releasable:
                    releasable.add(chosen)
            await emit(Answer(sequence=frame.sequence, error=error_to_call_error(error)))
        finally:
            if routes is not None:
                routes.discard(frame.sequence)

    def _release(self, keys: Iterable[str], releasable: set[str]) -> None:
        """Delete the results a caller released, if they are its to release."""
        owned = [key for key in keys if key in releasable]
        releasable.difference_update(owned)
        self._scheduler.releaser.release(owned)

    def _store_now(self, keys: Iterable[str], releasable: set[str]) -> None:
        """Have held stores of results the caller is about to read start now, if they are its."""
        self._scheduler.releaser.want(key for key in keys if key in releasable)

    async def _serve_frame(
        self,
        frame: scheduler_service_pb2.StreamCallsRequest,
        emit: Emit,
        releasable: set[str],
        routes: AnswerRoutes | None,
        chosen: str = "",
    ) -> None:
        """Place one call and answer it, when accepted and with its outcome if asked.

        A call whose caller chose its key (``chosen``, checked) or awaits only
        its outcome is answered once, with the outcome.
        """
        kind = frame.WhichOneof("call")
        if kind is None:
            raise InvalidArgumentError("a StreamCallsRequest must carry call_function or call_dag")
        call = frame.call_function if kind == "call_function" else frame.call_dag
        direct, named = call.direct_response, bool(call.response_key)
        awaited = direct or frame.stream_outcome
        # A call whose outcome its caller awaits may be answered on the caller's answer stream.
        answer_to = AnswerTo(routes, frame.sequence) if routes is not None and awaited else None
        # A caller that had the outcome streamed and will not release the result keeps it.
        expire = frame.releasable or not frame.stream_outcome
        # Results whose caller may release them (added to ``releasable`` once accepted, below).
        may_release = awaited and frame.releasable and not direct and not named
        if kind == "call_function":
            accepted = await self._scheduler.call_function(
                frame.call_function,
                awaited,
                None,
                frame.trace_context,
                expire,
                answer_to=answer_to,
                chosen_key=chosen,
                releasable=may_release,
            )
        else:
            accepted = await self._scheduler.call_dag(
                frame.call_dag,
                awaited,
                None,
                frame.trace_context,
                expire,
                answer_to=answer_to,
                chosen_key=chosen,
                releasable=may_release,
            )

        def answer(outcome: execution_pb2.Outcome | None = None) -> Answer:
            """The call's answer, built in place (an outcome is copied once, into it)."""
            message = Answer(sequence=frame.sequence)
            body = message.call_function if kind == "call_function" else message.call_dag
            body.response_key = accepted.response_key
            if outcome is not None:
                body.outcome.CopyFrom(outcome)
            return message

        if accepted.outcome is not None and frame.releasable and not direct and not named:
            # Releasable from now: an outcome answered directly reaches the caller (and its
            # release may come back) before the sink's note reaches this scheduler. A release
            # of a result not stored yet waits for the store (ResultReleaser).
            releasable.add(accepted.response_key)
        # A caller that chose the key has it already: only the outcome is answered.
        once = direct or bool(chosen)
        if not once and accepted.outcome is not None:
            # A call that finishes at once (its functions ran on the executor's loop) is
            # answered once, with its outcome, rather than accepted now and answered again.
            await asyncio.sleep(0)
            once = accepted.outcome.done()
        if not once:
            await emit(answer())
        if accepted.outcome is not None:
            outcome = await _await_outcome(accepted)
            if outcome is DELIVERED_DIRECTLY:
                assert routes is not None
                lost = routes.finished(frame.sequence, True)
                if lost is not None:
                    await emit(Answer(sequence=frame.sequence, error=error_to_call_error(lost)))
                return
            await emit(answer(outcome))


async def _emit_all(emit: Emit, answers: list[Answer]) -> None:
    for answer in answers:
        await emit(answer)


async def _await_outcome(accepted: Accepted) -> execution_pb2.Outcome:
    assert accepted.outcome is not None
    try:
        return await accepted.outcome
    except CloudburstError as exc:
        return execution_pb2.Outcome(error=error_to_call_error(exc))
