"""Small KVS ops over one long-lived ``KvsService.StreamOps`` stream.

A message on an open stream costs a client and the KVS a fraction of a unary
call, so reads and merges that fit in one message, and deletes, go as frames
of one stream per KVS channel, each with its own sequence and deadline, and
are answered (or fail) exactly as their unary calls would. Ops sent while a
write is in progress go out together, in one message, when the KVS reads
batches (see :class:`~cloudburst.streams.OutboxStream`).

The SDK's direct KVS path and the runtime's KVS client both use
:class:`OpStream`. A write of a value over :data:`MAX_STREAMED_PUT_BYTES` does
not share that stream: it goes on a second one (:class:`OpStreams`).
``CLOUDBURST_KVS_STREAM=0`` turns streams off for a process (see
:func:`stream_enabled`): every op is then a unary call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Mapping

import grpc

from cloudburst import tracing
from cloudburst.errors import CloudburstTimeoutError, UnavailableError
from cloudburst.rpc import UNAVAILABLE_HINT, error_from_call_error, error_from_rpc
from cloudburst.streams import OutboxStream, batches_enabled, settle, status_lost
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc

logger = logging.getLogger(__name__)

#: Set to 0, false, no or off, this environment variable keeps a process's KVS ops on unary
#: calls rather than on one stream per KVS channel.
STREAM_ENV = "CLOUDBURST_KVS_STREAM"
#: A merge whose value holds more bytes than this does not share the stream of small ops,
#: so that no large value holds them up: it goes on a stream of its own (:class:`OpStreams`).
MAX_STREAMED_PUT_BYTES = 64 << 10
#: The largest message a read on the stream of small ops asks for (its ``max_message_bytes``):
#: a larger value is answered ``chunked`` and read with ``GetValueChunks``, on an HTTP/2 stream
#: of its own, so that it holds up no small op behind it.
MAX_STREAMED_GET_BYTES = 4 << 20


_OFF = frozenset({"0", "false", "no", "off"})

OpRequest = kvs_service_pb2.StreamOpsRequest
OpAnswer = kvs_service_pb2.StreamOpsResponse


def stream_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``CLOUDBURST_KVS_STREAM`` lets this process stream its KVS ops.

    It does unless the variable is 0, false, no or off.
    """
    return environ.get(STREAM_ENV, "").strip().lower() not in _OFF


def stream_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the SDK sends its small KVS ops over a stream.

    On unless ``CLOUDBURST_KVS_STREAM`` is 0, false, no or off. While the
    application traces (see :func:`cloudburst.tracing.enabled`), ops stay
    unary calls, each with its own client span.
    """
    return stream_allowed(environ) and not tracing.enabled()


class _Fallback(Exception):
    """The op goes in a unary call (the KVS may have no StreamOps)."""


class OpStream:
    """Small KVS ops over one ``StreamOps`` stream, matched to their answers by sequence.

    The stream opens with the first op and again with the first op after it
    broke. An op that the stream does not answer fails as its unary call
    would have: a broken stream with the same error (UnavailableError for a
    KVS that went away), a passed deadline with CloudburstTimeoutError.
    Ops sent while a write is in progress go out together, in one message,
    once the KVS said it reads batches (see :class:`~cloudburst.streams.OutboxStream`).
    """

    def __init__(
        self,
        stub: kvs_service_pb2_grpc.KvsServiceAsyncStub,
        name: str,
        batches: bool | None = None,
    ) -> None:
        """Send ops with ``stub``; ``name`` says where to, for the log.

        ``batches`` offers to read batched answers and batches ops to a KVS
        that reads them; None: unless turned off (see
        :func:`~cloudburst.streams.batches_enabled`).
        """
        if batches is None:
            batches = batches_enabled()
        self._batches = batches
        self._stream: OutboxStream[OpRequest, OpAnswer] = OutboxStream(
            name, stub.StreamOps, self._dispatch, self._ended, batches=batches
        )
        self._pending: dict[int, tuple[asyncio.Future[OpAnswer], str]] = {}
        self._sequence = itertools.count(1)
        self._answered = 0
        """The number of the last stream the KVS answered an op on (see OutboxStream.opened)."""
        self._retiring = False
        self._closing: asyncio.Task[None] | None = None
        self.available = True
        """False once the KVS answered that it has no StreamOps (ops are unary calls then)."""

    async def request(self, frame: OpRequest, what: str, timeout: float | None) -> OpAnswer | None:
        """Send ``frame`` (given a sequence and the deadline) and return its answer.

        Returns:
            The answer; None when the KVS has no StreamOps (send the op as a unary call).

        Raises:
            CloudburstError: The op's error, as its unary call would raise it.
        """
        sequence = next(self._sequence)
        frame.sequence = sequence
        frame.reads_batches = self._batches
        if timeout is not None:
            timeout = max(timeout, 0.0)
            frame.timeout.FromNanoseconds(int(timeout * 1e9))
        future: asyncio.Future[OpAnswer] = asyncio.get_running_loop().create_future()
        self._pending[sequence] = (future, what)
        scope = asyncio.timeout(timeout)
        try:
            # Sent by a task of the stream's (not written by this one), so that a caller
            # cancelled mid-write cannot break the stream that other ops share.
            self._stream.send(frame)
            async with scope:
                return await future
        except _Fallback:
            return None
        except TimeoutError:
            if scope.expired():
                raise CloudburstTimeoutError(f"{what} did not finish before its deadline") from None
            raise
        finally:
            self._pending.pop(sequence, None)
            if self._retiring:
                self._close_if_idle()

    @property
    def retiring(self) -> bool:
        """Whether the stream ends once its ops are answered (later ops are unary calls)."""
        return self._retiring

    def retire(self) -> None:
        """End the stream once no op is in flight (call on the loop).

        For a client replaced by a new one: as with unary calls, the ops in
        flight go on to their answers.
        """
        self._retiring = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self._pending and self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._stream.close())

    def _dispatch(self, answer: OpAnswer) -> None:
        entry = self._pending.get(answer.sequence)
        if entry is None:
            return  # its op gave up (deadline, cancelled)
        self._answered = self._stream.opened
        if answer.WhichOneof("result") == "error":
            settle(entry[0], error=error_from_call_error(answer.error))
        else:
            settle(entry[0], answer)

    def _ended(self, error: grpc.RpcError | None) -> None:
        """Fail the ops the ended stream did not answer, as their unary calls would have.

        A KVS without StreamOps ends the stream with UNIMPLEMENTED: its ops, and
        all later ones, go in unary calls. When gRPC lost the status that ended
        the stream (a write raced its end) and the KVS answered nothing on it,
        the KVS may lack StreamOps or have refused the caller (UNAUTHENTICATED):
        the ops go in unary calls, which tell.
        """
        code = None if error is None else error.code()
        lost = error is not None and status_lost(error)
        # Still the ended stream's number: a new one opens only after this returns.
        silent = self._answered != self._stream.opened
        if code == grpc.StatusCode.UNIMPLEMENTED:
            if self.available:
                logger.info("%s has no StreamOps: using unary calls", self._stream.name)
            self.available = False
        for sequence, (future, what) in list(self._pending.items()):
            del self._pending[sequence]
            failure: Exception
            if code == grpc.StatusCode.UNIMPLEMENTED or (lost and silent):
                failure = _Fallback()
            elif error is None or lost or code == grpc.StatusCode.CANCELLED:
                # The KVS (or this client, closing) ended the stream: as for a call to a
                # KVS that is going away.
                failure = UnavailableError(
                    f"{what} failed: the service is unavailable (the stream to "
                    f"{self._stream.name} ended before it answered); {UNAVAILABLE_HINT}"
                )
            else:
                assert error is not None
                failure = error_from_rpc(error, what=what)
            settle(future, error=failure)

    async def close(self, grace: float = 2.0) -> None:
        """End the stream (ops in flight fail with UnavailableError); idempotent.

        The KVS gets ``grace`` seconds to end its side; 0 cancels the stream at once.
        """
        await self._stream.close(grace)
        if self._closing is not None:
            await self._closing


class OpStreams:
    """The op streams to one KVS: one for small ops, one for writes of larger values.

    A write whose value holds more than :data:`MAX_STREAMED_PUT_BYTES` goes on
    the second stream, so that it holds up no small op: HTTP/2 interleaves the
    frames of two streams, but sends the messages of one in order. It still
    costs a message on an open stream rather than a unary call. Each stream
    opens with its first op.
    """

    def __init__(self, stub: kvs_service_pb2_grpc.KvsServiceAsyncStub, name: str) -> None:
        """Send ops with ``stub``; ``name`` says where to, for the log."""
        self.small = OpStream(stub, name)
        """Reads, deletes and small writes."""
        self.large = OpStream(stub, f"{name} (large writes)")
        """Writes of values over :data:`MAX_STREAMED_PUT_BYTES`."""

    def for_write(self, value_bytes: int) -> OpStream:
        """The stream for a write of a value of ``value_bytes``.

        A KVS found to have no StreamOps (on the small ops' stream) is not asked again.
        """
        if value_bytes <= MAX_STREAMED_PUT_BYTES or not self.small.available:
            return self.small
        return self.large

    def retire(self) -> None:
        """End both streams once no op is in flight on each (see :meth:`OpStream.retire`)."""
        self.small.retire()
        self.large.retire()

    async def close(self, grace: float = 2.0) -> None:
        """End both streams (ops in flight fail with UnavailableError); idempotent."""
        await self.small.close(grace)
        await self.large.close(grace)


__all__ = [
    "MAX_STREAMED_GET_BYTES",
    "MAX_STREAMED_PUT_BYTES",
    "STREAM_ENV",
    "OpAnswer",
    "OpRequest",
    "OpStream",
    "OpStreams",
    "stream_allowed",
    "stream_enabled",
]
