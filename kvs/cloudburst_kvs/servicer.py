"""The ``cloudburst.v1.KvsService`` servicer: validate, delegate to the store, convert.

Errors are raised as cloudburst exceptions and turned into gRPC statuses by
:class:`~cloudburst_grpc.interceptors.ErrorMappingInterceptor`; nothing here
catches them, except on ``StreamOps``, where each op's error is its answer.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from cloudburst import chunks
from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    InternalError,
    InvalidArgumentError,
    PayloadTooLargeError,
    UnavailableError,
)
from cloudburst.serialization import LwwClock
from cloudburst.streams import batches_enabled
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.answers import AnswerBatcher, AnswerWriter
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.failures import error_to_call_error
from cloudburst_grpc.interceptors import RefusedFrame
from cloudburst_kvs import lattices
from cloudburst_kvs.backend import LatticeBackend
from cloudburst_kvs.store import MAX_BATCH_KEYS, WatchEvent, check_key, normalize_keyspace

logger = logging.getLogger(__name__)

#: The bytes of a value per chunk of GetValueChunks (and of the clients' PutValueChunks).
CHUNK_BYTES = 1 << 20
#: Room left in a message for everything besides a value (at most an eighth of it).
MESSAGE_MARGIN_BYTES = 64 << 10
#: The smallest chunk a reader's message limit makes GetValueChunks send.
MIN_CHUNK_BYTES = 16 << 10
#: Ops one StreamOps stream may have running or answered and not yet sent; it reads no more
#: frames until some are sent, so a caller that does not read holds itself back. Waiting reads
#: do not count: they may wait for a merge sent behind them on the same stream.
MAX_UNANSWERED_OPS = 1024

OpRequest = kvs_service_pb2.StreamOpsRequest
OpAnswer = kvs_service_pb2.StreamOpsResponse
OpFrame = OpRequest | RefusedFrame
Emit = Callable[[OpAnswer], Awaitable[None]]
#: The name of the span of a StreamOps op (with tracing on), by the kind of op.
_OP_SPANS = {"get": "StreamOps get", "put": "StreamOps put", "delete": "StreamOps delete"}


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _inline_bytes(message_limit: int) -> int:
    """The largest lattice that fits in a message of ``message_limit`` bytes, with the rest."""
    return message_limit - min(MESSAGE_MARGIN_BYTES, message_limit // 8)


def _timed(operation: str) -> Callable[[_Method], _Method]:
    """Record the method's latency in the KVS operation histogram."""

    def decorate(method: _Method) -> _Method:
        labels = {"operation": operation}

        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return await method(*args, **kwargs)
            finally:
                telemetry.KVS_DURATION.record(time.monotonic() - started, labels)

        return timed  # type: ignore[return-value]

    return decorate


class KvsServicer(kvs_service_pb2_grpc.KvsServiceServicer):
    """Serves a :class:`~cloudburst_kvs.backend.LatticeBackend` over gRPC."""

    def __init__(
        self, store: LatticeBackend, kvs_config: KvsConfig, max_payload_bytes: int
    ) -> None:
        """Serve ``store``.

        Args:
            store: The started store to delegate to.
            kvs_config: Gives the longest a waiting GetValue waits and how far ahead of
                this process's clock a write's timestamp may be.
            max_payload_bytes: The most user data one PutValue may carry.
        """
        self._store = store
        self._max_wait_seconds = kvs_config.max_wait_seconds
        self._max_payload_bytes = max_payload_bytes
        self._max_value_bytes = max(kvs_config.max_value_bytes, max_payload_bytes)
        # A lattice larger than this does not fit in one message (with room for the rest).
        self._max_inline_bytes = _inline_bytes(max_payload_bytes)
        self._max_skew_ns = int(kvs_config.max_clock_skew_seconds * 1e9)
        # One clock per servicer: timestamps it assigns strictly increase, so two
        # unstamped puts from one client are ordered as they arrived.
        self._clock = LwwClock()
        self._streams: dict[asyncio.Task[Any], set[asyncio.Task[None]]] = {}
        """The tasks reading StreamOps streams, each with the ops it runs."""
        self._ending = False
        """Set at shutdown: streams end once their ops are answered, and no new one starts."""
        self._batches = batches_enabled()
        """Whether op streams offer to read batched ops and batch answers to callers."""
        if not telemetry.tracing():
            # Each op's task writes its answer itself (gRPC's reader-writer API): a loop
            # turn and a queue sooner than through a response generator. The tracing
            # interceptor only wraps generators, so with tracing on the generator stays.
            self.StreamOps = self._stream_ops_written  # type: ignore[method-assign,assignment]

    async def GetValue(
        self,
        request: kvs_service_pb2.GetValueRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.GetValueRequest, kvs_service_pb2.GetValueResponse
        ],
    ) -> kvs_service_pb2.GetValueResponse:
        """Read one key, waiting for it when asked (within the deadline and the wait limit)."""
        response = kvs_service_pb2.GetValueResponse()
        await self._get_value(request, context.time_remaining(), response)
        return response

    @_timed("get")
    async def _get_value(
        self,
        request: kvs_service_pb2.GetValueRequest,
        remaining: float | None,
        response: kvs_service_pb2.GetValueResponse,
    ) -> None:
        """Answer a GetValue in ``response``; ``remaining`` is the seconds left to its deadline."""
        check_key(request.key)
        keyspace = normalize_keyspace(request.keyspace)
        if request.wait:
            # End the wait a little before the caller's deadline, so the caller gets a
            # "not found" answer (after the waiter is gone) rather than DEADLINE_EXCEEDED.
            deadline = math.inf if remaining is None else remaining - min(remaining * 0.1, 0.05)
            timeout = max(min(deadline, self._max_wait_seconds), 0.0)
            lattice = await self._store.wait_for(keyspace, request.key, timeout)
        else:
            lattice = await self._store.read(keyspace, request.key)
        if lattice is None:
            response.found = False
            return
        response.found = True
        if self._message_size(keyspace, request.key, lattice) > self._inline_for(
            request.max_message_bytes
        ):
            response.chunked = True
            return
        response.lattice.CopyFrom(lattice)

    async def GetValueChunks(
        self,
        request: kvs_service_pb2.GetValueChunksRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.GetValueChunksRequest, kvs_service_pb2.GetValueChunksResponse
        ],
    ) -> AsyncIterator[kvs_service_pb2.GetValueChunksResponse]:
        """Read one key: its lattice without the value's bytes, then the bytes in chunks.

        A last-writer-wins value's chunks are its bytes; a set's first frame is an
        empty set, and its chunks joined are the encoded ``SetLattice``.
        """
        check_key(request.key)
        lattice = await self._store.read(normalize_keyspace(request.keyspace), request.key)
        if lattice is None:
            return
        header = kvs_service_pb2.GetValueChunksResponse()
        if lattice.WhichOneof("kind") == "lww":
            header.lattice.lww.timestamp.CopyFrom(lattice.lww.timestamp)
            header.lattice.lww.value.serializer = lattice.lww.value.serializer
            data = lattice.lww.value.data
        else:
            header.lattice.set.SetInParent()
            data = lattice.set.SerializeToString()
        del lattice
        yield header
        size = len(data)
        view = memoryview(data)
        step = max(min(CHUNK_BYTES, self._inline_for(request.max_message_bytes)), MIN_CHUNK_BYTES)
        for start in range(0, size, step):
            chunk = bytes(view[start : start + step])
            if start + step >= size:
                # The copy goes before the last chunk does: the stream may be left
                # suspended (not closed) for a while after the caller has read everything.
                view.release()
                del data
            yield kvs_service_pb2.GetValueChunksResponse(chunk=chunk)

    @_timed("put")
    async def PutValueChunks(
        self,
        request_iterator: AsyncIterator[kvs_service_pb2.PutValueChunksRequest],
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.PutValueChunksRequest, kvs_service_pb2.PutValueChunksResponse
        ],
    ) -> kvs_service_pb2.PutValueChunksResponse:
        """Merge a last-writer-wins value sent as a header frame and then chunks of its bytes.

        The chunks are joined and parsed into the lattice on a worker thread, and
        freed: with the store's copy, at most two copies at a time. The store is
        given the value's size, so that no read copies the bytes to measure them.
        """
        put: kvs_service_pb2.PutValueRequest | None = None
        received: chunks.LargeValue | None = None
        async for frame in request_iterator:
            kind = frame.WhichOneof("frame")
            if put is None:
                if kind != "put":
                    raise InvalidArgumentError("the first PutValueChunks frame must be the put")
                put = frame.put
                check_key(put.key)
                if put.lattice.WhichOneof("kind") != "lww":
                    raise InvalidArgumentError(
                        "PutValueChunks carries last-writer-wins values only",
                        {"field": "put.lattice"},
                    )
                header = lattice_pb2.Lattice()
                header.lww.timestamp.CopyFrom(put.lattice.lww.timestamp)
                header.lww.value.serializer = put.lattice.lww.value.serializer
                lattices.validate(header)
                received = chunks.LargeValue(header)
                continue
            if kind != "chunk":
                raise InvalidArgumentError("after the put, PutValueChunks frames are chunks")
            assert received is not None
            received.add(frame.chunk)
            if len(received) > self._max_value_bytes:
                raise PayloadTooLargeError(
                    f"the value for key {put.key!r} is over the limit of "
                    f"{self._max_value_bytes} bytes (kvs.max_value_bytes)",
                    {"key": put.key, "limit": str(self._max_value_bytes)},
                )
        if put is None or received is None:
            raise InvalidArgumentError("PutValueChunks received no put")
        lattices.check_not_ahead(received.lattice, time.time_ns(), self._max_skew_ns)
        # Stamped before the bytes go in, so that stamping copies no value.
        received.lattice = lattices.stamp(received.lattice, self._clock)
        size = len(received)
        # Joining the chunks and parsing them take a while for a large value: not on the loop.
        lattice = await asyncio.to_thread(received.to_lattice)
        await self._store.put(
            normalize_keyspace(put.keyspace),
            put.key,
            lattice,
            request_id=put.request_id,
            size=size,
        )
        return kvs_service_pb2.PutValueChunksResponse(size=size)

    async def GetLimits(
        self,
        request: kvs_service_pb2.GetLimitsRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.GetLimitsRequest, kvs_service_pb2.GetLimitsResponse
        ],
    ) -> kvs_service_pb2.GetLimitsResponse:
        """Report the largest value and the largest message, and that StreamOps is served here."""
        return kvs_service_pb2.GetLimitsResponse(
            max_value_bytes=self._max_value_bytes,
            max_message_bytes=self._max_payload_bytes,
            serves_op_streams=True,
        )

    async def PutValue(
        self,
        request: kvs_service_pb2.PutValueRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.PutValueRequest, kvs_service_pb2.PutValueResponse
        ],
    ) -> kvs_service_pb2.PutValueResponse:
        """Merge a lattice into a key, stamping an unstamped last-writer-wins write."""
        response = kvs_service_pb2.PutValueResponse()
        # The request is this call's alone: its lattice may be stored as it is.
        await self._put_value(request, response, adopt=True)
        return response

    @_timed("put")
    async def _put_value(
        self,
        request: kvs_service_pb2.PutValueRequest,
        response: kvs_service_pb2.PutValueResponse,
        *,
        adopt: bool = False,
    ) -> None:
        """Answer a PutValue in ``response``.

        With ``adopt``, the request is not part of a larger message (a batch of
        frames), so its lattice may be kept by the store instead of a copy.
        """
        check_key(request.key)
        keyspace = normalize_keyspace(request.keyspace)
        lattices.validate(request.lattice)
        size = lattices.lattice_size(request.lattice)
        if size > self._max_payload_bytes:
            raise PayloadTooLargeError(
                f"the lattice for key {request.key!r} holds {size} bytes of data, over the "
                f"limit of {self._max_payload_bytes} bytes; store large data in smaller pieces "
                "or raise the limit (max_payload_bytes)",
                {
                    "key": request.key,
                    "size": str(size),
                    "limit": str(self._max_payload_bytes),
                },
            )
        lattices.check_not_ahead(request.lattice, time.time_ns(), self._max_skew_ns)
        lattice = lattices.stamp(request.lattice, self._clock)
        # The size goes along: measuring a last-writer-wins value copies its bytes.
        merged = await self._store.put(
            keyspace, request.key, lattice, request_id=request.request_id, size=size, adopt=adopt
        )
        if not request.omit_lattice:
            response.lattice.CopyFrom(merged)

    async def StreamOps(
        self,
        request_iterator: AsyncIterator[kvs_service_pb2.StreamOpsRequest],
        context: grpc.aio.ServicerContext[kvs_service_pb2.StreamOpsRequest, OpAnswer],
    ) -> AsyncIterator[OpAnswer]:
        """Serve small reads and writes over one stream, each answered as it ends.

        Every frame is served as its unary call would be (GetValue, PutValue,
        DeleteValue),
        concurrently: a waiting read holds up no later frame. An op's error is
        its answer, not the stream's end. Answers that queue up while one is
        being sent go out together to a caller that reads batches (see
        :class:`~cloudburst_grpc.answers.AnswerBatcher`). This form yields the
        answers (with tracing on); :meth:`_stream_ops_written` writes them from
        the ops' tasks.
        """
        answers: collections.deque[OpAnswer | None] = collections.deque()
        queued = asyncio.Event()
        room = asyncio.Event()
        batcher = AnswerBatcher(self._batches)

        async def emit(answer: OpAnswer) -> None:
            answers.append(answer)
            queued.set()

        async def read() -> None:
            try:
                await self._serve_ops(
                    request_iterator, emit, answers.__len__, room, batcher.reads_batches
                )
            finally:
                answers.append(None)
                queued.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                if not answers:
                    queued.clear()
                    await queued.wait()
                    continue
                if answers[0] is None:
                    break
                yield batcher.next_message(answers)
                room.set()
            if not reader.cancelled():  # cancelled: ended by end_streams
                await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _stream_ops_written(
        self,
        request_iterator: AsyncIterator[kvs_service_pb2.StreamOpsRequest],
        context: grpc.aio.ServicerContext[kvs_service_pb2.StreamOpsRequest, OpAnswer],
    ) -> None:
        """:meth:`StreamOps` with each answer written by the task of the op it answers."""
        room = asyncio.Event()
        batcher = AnswerBatcher(self._batches)
        writer = AnswerWriter[OpAnswer](context, room, "an op stream", batcher.next_message)
        await self._serve_ops(
            request_iterator, writer.write, writer.backlog, room, batcher.reads_batches
        )

    async def _serve_ops(
        self,
        frames: AsyncIterator[OpFrame],
        emit: Emit,
        unwritten: Callable[[], int],
        room: asyncio.Event,
        reads_batches: Callable[[], None] | None = None,
    ) -> None:
        """Serve every frame in a task of its own; return once all are answered.

        A message that carries a batch is served frame by frame, in order.
        ``reads_batches`` is called once, on the first frame whose caller says
        it reads batched answers.

        Flow control: while the stream has :data:`MAX_UNANSWERED_OPS` ops running
        (waiting reads aside) or answers not yet sent (``unwritten``), no further
        frame is read, so a caller that sends faster than it reads is held back
        by gRPC's own flow control instead of growing this process. ``room`` is
        set whenever an op ends or an answer is sent.
        """
        ops: set[asyncio.Task[None]] = set()
        waits: set[asyncio.Task[None]] = set()

        def ended(task: asyncio.Task[None]) -> None:
            ops.discard(task)
            waits.discard(task)
            room.set()

        if self._ending:
            raise UnavailableError("the KVS is shutting down; send the ops to another instance")
        reader = asyncio.current_task()
        assert reader is not None
        self._streams[reader] = ops
        try:
            async for message in frames:
                # A batch carries frames to serve in order as if each came alone (a refused
                # frame comes alone: authorization takes batches apart).
                batch = message.batch if type(message) is OpRequest else None
                for frame in batch or (message,):
                    if (
                        reads_batches is not None
                        and type(frame) is OpRequest
                        and frame.reads_batches
                    ):
                        reads_batches()
                        reads_batches = None
                    task = asyncio.create_task(self._serve_op(frame, emit))
                    ops.add(task)
                    if _waits(frame):
                        waits.add(task)
                    task.add_done_callback(ended)
                    while len(ops) - len(waits) + unwritten() >= MAX_UNANSWERED_OPS:
                        room.clear()
                        await room.wait()
            if ops:
                await asyncio.gather(*ops)
        except asyncio.CancelledError:
            if not self._ending:
                raise
            # Ended by end_streams: the stream ends with OK rather than as cancelled, which
            # gRPC would not answer (the caller would wait for the server to stop).
            reader.uncancel()
        finally:
            self._streams.pop(reader, None)
            for task in list(ops):
                task.cancel()
            await asyncio.gather(*ops, return_exceptions=True)

    async def end_streams(self, timeout: float) -> None:
        """At shutdown: let the ops in flight answer (up to ``timeout``), then end the streams.

        Callers keep their streams open for as long as they live, so the server
        would otherwise wait out its whole grace period for them. A caller's
        ops in flight on an ended stream fail as calls to a KVS going away do.
        """
        self._ending = True
        running = [op for ops in self._streams.values() for op in ops]
        if running:
            await asyncio.wait(running, timeout=max(timeout, 0.0))
        for reader in list(self._streams):
            reader.cancel()

    async def _serve_op(self, frame: OpFrame, emit: Emit) -> None:
        """Answer one frame: with the unary call's response, or with its error."""
        if isinstance(frame, RefusedFrame):
            error = error_to_call_error(frame.error)
            await emit(OpAnswer(sequence=frame.frame.sequence, error=error))
            return
        answer = OpAnswer(sequence=frame.sequence)
        remaining = frame.timeout.ToNanoseconds() / 1e9 if frame.HasField("timeout") else None
        kind = frame.WhichOneof("op")
        try:
            with telemetry.span(_OP_SPANS.get(kind or "", "StreamOps"), frame.trace_context):
                # As gRPC ends a unary call at its deadline.
                async with asyncio.timeout(remaining):
                    if kind == "get":
                        answer.get.SetInParent()
                        await self._get_value(frame.get, remaining, answer.get)
                    elif kind == "put":
                        answer.put.SetInParent()
                        await self._put_value(frame.put, answer.put)
                    elif kind == "delete":
                        answer.delete.SetInParent()
                        await self._delete_value(frame.delete, answer.delete)
                    else:
                        raise InvalidArgumentError(
                            "a StreamOpsRequest must carry get, put or delete", {"field": "op"}
                        )
        except CloudburstError as exc:
            answer = OpAnswer(sequence=frame.sequence, error=error_to_call_error(exc))
        except TimeoutError:
            late = CloudburstTimeoutError(f"the {kind} did not finish before its deadline")
            answer = OpAnswer(sequence=frame.sequence, error=error_to_call_error(late))
        except Exception:
            logger.exception("internal error in a StreamOps %s", kind)
            bug = InternalError("internal error; the details are in the service's log")
            answer = OpAnswer(sequence=frame.sequence, error=error_to_call_error(bug))
        await emit(answer)

    async def DeleteValue(
        self,
        request: kvs_service_pb2.DeleteValueRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.DeleteValueRequest, kvs_service_pb2.DeleteValueResponse
        ],
    ) -> kvs_service_pb2.DeleteValueResponse:
        """Delete a key; deleting a missing key succeeds with ``existed=False``."""
        response = kvs_service_pb2.DeleteValueResponse()
        await self._delete_value(request, response)
        return response

    @_timed("delete")
    async def _delete_value(
        self,
        request: kvs_service_pb2.DeleteValueRequest,
        response: kvs_service_pb2.DeleteValueResponse,
    ) -> None:
        """Answer a DeleteValue in ``response``."""
        check_key(request.key)
        response.existed = await self._store.delete(
            normalize_keyspace(request.keyspace), request.key, request_id=request.request_id
        )

    @_timed("batch_get")
    async def BatchGetValues(
        self,
        request: kvs_service_pb2.BatchGetValuesRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.BatchGetValuesRequest, kvs_service_pb2.BatchGetValuesResponse
        ],
    ) -> kvs_service_pb2.BatchGetValuesResponse:
        """Read up to 1000 keys, answering in request order.

        Lattices that do not fit in the response (each alone, or after those
        before it) are marked ``chunked``, for the caller to read with GetValueChunks.
        """
        _check_batch("BatchGetValues", request.keys)
        keyspace = normalize_keyspace(request.keyspace)
        found = await self._store.read_many(keyspace, list(request.keys))
        room = self._inline_for(request.max_message_bytes)
        entries = []
        for key, lattice in zip(request.keys, found, strict=True):
            size = 0 if lattice is None else self._message_size(keyspace, key, lattice)
            if size > room:
                entries.append(kvs_service_pb2.KeyValue(key=key, found=True, chunked=True))
                continue
            room -= size
            entries.append(_key_value(key, lattice))
        return kvs_service_pb2.BatchGetValuesResponse(entries=entries)

    @_timed("batch_delete")
    async def BatchDeleteValues(
        self,
        request: kvs_service_pb2.BatchDeleteValuesRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.BatchDeleteValuesRequest, kvs_service_pb2.BatchDeleteValuesResponse
        ],
    ) -> kvs_service_pb2.BatchDeleteValuesResponse:
        """Delete up to 1000 keys; answers once every delete is durable."""
        _check_batch("BatchDeleteValues", request.keys)
        deleted = await self._store.delete_many(normalize_keyspace(request.keyspace), request.keys)
        return kvs_service_pb2.BatchDeleteValuesResponse(deleted=deleted)

    @_timed("list")
    async def ListKeys(
        self,
        request: kvs_service_pb2.ListKeysRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.ListKeysRequest, kvs_service_pb2.ListKeysResponse
        ],
    ) -> kvs_service_pb2.ListKeysResponse:
        """List one page of the keys that start with a prefix."""
        keys, token = await self._store.list_page(
            normalize_keyspace(request.keyspace),
            request.prefix,
            request.page_size,
            request.page_token,
        )
        return kvs_service_pb2.ListKeysResponse(keys=keys, next_page_token=token)

    async def WatchValues(
        self,
        request: kvs_service_pb2.WatchValuesRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.WatchValuesRequest, kvs_service_pb2.WatchValuesResponse
        ],
    ) -> AsyncIterator[kvs_service_pb2.WatchValuesResponse]:
        """Stream every change to the watched keys until the client cancels."""
        keyspace = normalize_keyspace(request.keyspace)
        subscription = await self._store.subscribe(keyspace, request.keys, request.key_prefix)
        async with subscription:
            # Headers go out only now that the subscription exists: a client that
            # waits for them knows that no later change can be missed.
            await context.send_initial_metadata(())
            async for event in subscription:
                yield self._watch_response(keyspace, event)

    def _inline_for(self, reader_limit: int) -> int:
        """The largest lattice to answer in one message to a reader that takes ``reader_limit``.

        ``reader_limit`` is a request's ``max_message_bytes``: 0 when the reader takes what this
        server sends.
        """
        if not reader_limit:
            return self._max_inline_bytes
        return min(self._max_inline_bytes, _inline_bytes(reader_limit))

    def _message_size(self, keyspace: int, key: str, lattice: lattice_pb2.Lattice) -> int:
        """About the bytes ``lattice`` (just read from the key) takes in a message.

        A last-writer-wins value's bytes (the rest is small), from the store when
        it knows them: reading them from the message would copy them, for every
        read; a set's encoding, whose many small values can take much more than
        their bytes.
        """
        if lattice.WhichOneof("kind") == "set":
            return lattice.ByteSize()
        known = self._store.known_size(keyspace, key, lattice)
        return lattices.lattice_size(lattice) if known is None else known

    def _watch_response(
        self, keyspace: int, event: WatchEvent
    ) -> kvs_service_pb2.WatchValuesResponse:
        lattice = event.lattice
        if (
            lattice is not None
            and self._message_size(keyspace, event.key, lattice) > self._max_inline_bytes
        ):
            return kvs_service_pb2.WatchValuesResponse(
                entry=kvs_service_pb2.KeyValue(key=event.key, found=True), value_omitted=True
            )
        return kvs_service_pb2.WatchValuesResponse(
            entry=_key_value(event.key, lattice), deleted=event.deleted
        )


def _waits(frame: OpFrame) -> bool:
    """Whether the frame is a waiting read."""
    return (
        isinstance(frame, kvs_service_pb2.StreamOpsRequest)
        and frame.WhichOneof("op") == "get"
        and frame.get.wait
    )


def _key_value(key: str, lattice: lattice_pb2.Lattice | None) -> kvs_service_pb2.KeyValue:
    if lattice is None:
        return kvs_service_pb2.KeyValue(key=key, found=False)
    return kvs_service_pb2.KeyValue(key=key, found=True, lattice=lattice)


def _check_batch(method: str, keys: Sequence[str]) -> None:
    """Refuse a batch of more than MAX_BATCH_KEYS keys, or with an empty key."""
    if len(keys) > MAX_BATCH_KEYS:
        raise InvalidArgumentError(
            f"{method} takes at most {MAX_BATCH_KEYS} keys, got {len(keys)}; split the request",
            {"field": "keys", "limit": str(MAX_BATCH_KEYS)},
        )
    for index, key in enumerate(keys):
        check_key(key, what=f"keys[{index}]")


__all__ = ["KvsServicer"]
