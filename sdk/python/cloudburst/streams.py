"""Long-lived bidirectional gRPC streams that frames are written to as they come.

Hot paths send many small messages to one peer; a message on an open stream
costs a fraction of a unary call. :class:`OutboxStream` opens the stream on
the first send (with an optional first frame, such as a hello), hands every
answer to a callback, reopens on the next send after the stream ends, and on
close half-closes so the peer ends its side before the channel goes.
:func:`settle` resolves the future a caller waits on from a stream's reader.

This module is public: the SDK's call stream to the scheduler is built on it,
and so are the runtime's streams between schedulers, executors and messaging
peers, so that every hot path behaves the same way. Both classes work with any
``grpc.aio`` stub method and message types.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc

from cloudburst.errors import UnavailableError
from cloudburst.transport import MESSAGE_OVERHEAD_BYTES

logger = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

#: Set to 0, false, no or off, this environment variable keeps a process from batching frames.
BATCHES_ENV = "CLOUDBURST_STREAM_BATCHES"
#: At most this many frames go in one batch.
MAX_BATCH_FRAMES = 64
#: At most this many bytes of frames go in one batch; a frame that would pass it goes in the
#: next message. Every process accepts messages of MESSAGE_OVERHEAD_BYTES and more, whatever
#: its payload limit, so a batch never exceeds a peer's limit where single frames would not.
MAX_BATCH_BYTES = MESSAGE_OVERHEAD_BYTES // 4
#: For this many seconds after a frame had to wait behind a write in progress, a stream that
#: batches gives its event loop one turn before it writes a lone frame, so that frames sent in
#: that turn (other calls' tasks, woken by the same message) go in the same message. A stream
#: that saw no such wait writes at once: a lone caller's frames pay no extra turn.
GATHER_SECONDS = 0.05
_OFF = frozenset({"0", "false", "no", "off"})
#: What gRPC's asyncio client reports (as INTERNAL) for a stream that its peer ended while a
#: frame was being written to it: the peer's own status is lost (grpc/grpc#36066).
_STATUS_LOST_IN_WRITE = "Internal error from Core"
#: The details of the UNAVAILABLE error that :class:`OutboxStream` reports in its place.
_STATUS_LOST = (
    "the peer ended the stream while a frame was being written to it (its status was lost)"
)


def batches_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process offers to read batched frames and batches to peers that read them.

    On unless ``CLOUDBURST_STREAM_BATCHES`` is 0, false, no or off.
    """
    return environ.get(BATCHES_ENV, "").strip().lower() not in _OFF


def take_batch(
    backlog: collections.deque[Any],
    max_frames: int = MAX_BATCH_FRAMES,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Any:
    """Pop the next message to write from ``backlog``: one frame, or several in one batch.

    The frames are protobuf messages with a repeated ``batch`` field of their own
    type. Frames are taken in order, stopping before a None (which half-closes)
    and at ``max_frames`` frames or ``max_bytes`` serialized bytes; a lone frame
    is returned as it is, several as a new message whose ``batch`` holds them.
    The first frame is always taken, whatever its size.
    """
    first = backlog.popleft()
    if not backlog or backlog[0] is None:
        return first
    frames = [first]
    size = first.ByteSize()
    while backlog and len(frames) < max_frames:
        following = backlog[0]
        if following is None:
            break
        size += following.ByteSize()
        if size > max_bytes:
            break
        frames.append(backlog.popleft())
    if len(frames) == 1:
        return first
    message = type(first)()
    message.batch.extend(frames)
    return message


def settle(
    future: concurrent.futures.Future[Any] | asyncio.Future[Any] | None,
    value: Any = None,
    error: BaseException | None = None,
) -> None:
    """Resolve a future that its waiter may have given up on meanwhile.

    Stream readers settle the futures that caller threads wait on directly, so
    an answer reaches its caller without a round trip through the event loop.
    An asyncio future (of a waiter on the loop) works too; settle it on the loop.
    """
    if future is None or future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
        pass  # cancelled by a caller that timed out


def _status_of(error: grpc.RpcError) -> grpc.RpcError:
    """The error a stream ended with, with one of gRPC's own INTERNAL errors taken for what it is.

    A stream its peer ends (with any status) while a frame is being written to
    it ends, in gRPC's asyncio client, with INTERNAL "Internal error from Core"
    more often than not. That is no bug of the peer: the stream ended, and its
    status is lost; say so, as UNAVAILABLE.
    """
    rpc: Any = error
    if rpc.code() != grpc.StatusCode.INTERNAL or rpc.details() != _STATUS_LOST_IN_WRITE:
        return error
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), _STATUS_LOST
    )


def status_lost(error: grpc.RpcError) -> bool:
    """Whether a stream ended while a frame was being written to it, its own status lost.

    The peer may have refused the stream (UNAUTHENTICATED, UNIMPLEMENTED) or
    gone away: only a call of another kind can tell.
    """
    rpc: Any = error
    return bool(
        rpc.code() == grpc.StatusCode.UNAVAILABLE and rpc.details() == _STATUS_LOST
    ) or bool(rpc.code() == grpc.StatusCode.INTERNAL and rpc.details() == _STATUS_LOST_IN_WRITE)


class _Outgoing(Generic[Request]):
    """One open stream's call and the frames waiting to be written on it."""

    __slots__ = ("backlog", "batches", "busy", "call", "queued_at")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.backlog: collections.deque[Request | None] = collections.deque()
        """Frames to write once the write in progress is done; None half-closes."""
        self.busy = False
        """Whether a write is in progress (whoever started it writes the backlog too)."""
        self.batches = False
        """Whether the peer said it reads batches on this stream (it then gets them)."""
        self.queued_at = -math.inf
        """When a frame last had to wait behind a write in progress (``time.monotonic``)."""


class OutboxStream(Generic[Request, Response]):
    """A bidirectional stream that writes whatever is sent and dispatches what comes back.

    Frames are written in the order they are sent. :meth:`write` (from a
    coroutine) starts the write at once when none is in progress, sparing a
    turn of the event loop; :meth:`send` (from a callback) hands the write to a
    task. Either way, a frame sent while a write is in progress is written
    right after it, by whoever is writing: with ``batches``, together with the
    others that queued meanwhile, in one message, when the peer reads batches.
    Under such load (see :data:`GATHER_SECONDS`), a lone frame waits one turn
    of the loop for others to join it.

    Args:
        name: What the stream connects to, for messages (e.g. "executor ex-1 at host:port").
        open_call: Starts the RPC (a stub's stream method, called without arguments).
        on_answer: Called on the loop with every response.
        on_end: Called on the loop when the stream ends, with the gRPC error that
            ended it (None when it ended cleanly or was closed).
        first_frame: Makes the frame each new stream starts with, if any (it may return
            None: no first frame on this stream).
        batches: Batch frames where the peer reads batches. The request and response
            types then have a repeated ``batch`` field of their own type (frames, in
            order) and the response type a ``reads_batches`` flag. A response that
            carries a batch is handed to ``on_answer`` frame by frame; once a response
            sets ``reads_batches``, the frames queued behind a write in progress on
            that stream go out in one message (see :func:`take_batch`). Without it,
            or before the peer said so, every frame is a message of its own.
    """

    def __init__(
        self,
        name: str,
        open_call: Callable[[], Any],
        on_answer: Callable[[Response], None],
        on_end: Callable[[grpc.RpcError | None], None],
        first_frame: Callable[[], Request | None] | None = None,
        batches: bool = False,
    ) -> None:
        self.name = name
        self._batches = batches
        self._open_call = open_call
        self._on_answer = on_answer
        self._on_end = on_end
        self._first_frame = first_frame
        self._outgoing: _Outgoing[Request] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writers: set[asyncio.Task[None]] = set()
        self.closed = False
        self.opened = 0
        """How many streams were opened so far (the number of the current one, while open)."""

    @property
    def is_open(self) -> bool:
        """Whether a stream is open (frames sent now go on it, not on a new one)."""
        return self._outgoing is not None and not self.closed

    def _open(self) -> _Outgoing[Request]:
        if self.closed:
            raise UnavailableError(f"the stream to {self.name} is closed")
        outgoing = self._outgoing
        if outgoing is None:
            outgoing = self._outgoing = _Outgoing(self._open_call())
            self.opened += 1
            self._reader = asyncio.create_task(self._read(outgoing))
            first = self._first_frame() if self._first_frame is not None else None
            if first is not None:
                self._hand_off(outgoing, first)
        return outgoing

    def open(self) -> int:
        """Open a stream unless one is open; return its number (see :attr:`opened`).

        Frames sent before the caller next awaits go on that stream, so a sender
        can tell which stream carried what (it starts from nothing on a new one).

        Raises:
            UnavailableError: The stream was closed for good.
        """
        self._open()
        return self.opened

    def send(self, frame: Request) -> None:
        """Send a frame, opening the stream if needed (call on the loop).

        Raises:
            UnavailableError: The stream was closed for good.
        """
        self._hand_off(self._open(), frame)

    async def write(self, frame: Request) -> None:
        """Send a frame, writing it now if no write is in progress (call on the loop).

        Returns once it is written or queued behind the write in progress; a
        stream that broke meanwhile is not an error here (``on_end`` reports it).

        Raises:
            UnavailableError: The stream was closed for good.
        """
        outgoing = self._open()
        outgoing.backlog.append(frame)
        if not outgoing.busy:
            outgoing.busy = True
            await self._write(outgoing)
        else:
            outgoing.queued_at = time.monotonic()

    async def write_all(self, frames: Sequence[Request]) -> None:
        """Send several frames in order, as :meth:`write` sends one.

        With ``batches``, where the peer reads batches, they go out in one message
        (or as few as :func:`take_batch` allows).

        Raises:
            UnavailableError: The stream was closed for good.
        """
        outgoing = self._open()
        if not frames:
            return
        # All but the last wait in the backlog; writing the last writes them first.
        last = len(frames) - 1
        outgoing.backlog.extend(itertools.islice(frames, last))
        await self.write(frames[last])

    def _hand_off(self, outgoing: _Outgoing[Request], frame: Request | None) -> None:
        outgoing.backlog.append(frame)
        if outgoing.busy:
            outgoing.queued_at = time.monotonic()
        else:
            outgoing.busy = True
            # The writer leaves _writers itself as it ends: a done callback would do it a
            # turn of the event loop later, which costs every hand-off a further turn.
            self._writers.add(asyncio.create_task(self._write_handed_off(outgoing)))

    async def _write_handed_off(self, outgoing: _Outgoing[Request]) -> None:
        """:meth:`_write`, in a writer task of :attr:`_writers` that it leaves as it ends."""
        try:
            await self._write(outgoing)
        finally:
            writer = asyncio.current_task()
            if writer is not None:
                self._writers.discard(writer)

    async def _write(self, outgoing: _Outgoing[Request]) -> None:
        """Write the backlog, in order (``outgoing.busy`` is set).

        A writer cancelled mid-write cancels the call (gRPC does): the stream
        breaks, and its senders send again what was not answered. One cancelled
        while it gives the loop a turn hands the backlog on to a writer task.
        """
        handed_on = False
        try:
            backlog = outgoing.backlog
            while backlog:
                if outgoing.batches and backlog[0] is not None:
                    if len(backlog) == 1 and time.monotonic() - outgoing.queued_at < GATHER_SECONDS:
                        try:
                            await asyncio.sleep(0)  # under load: let the frames of this turn join
                        except asyncio.CancelledError:
                            # Frames that joined must not wait for the next sender: a writer
                            # task of the stream's own writes them (the stream stays busy).
                            if not self.closed:
                                handed_on = True
                                writer = asyncio.create_task(self._write_handed_off(outgoing))
                                self._writers.add(writer)
                            raise
                    await outgoing.call.write(take_batch(backlog))
                    continue
                frame = backlog.popleft()
                if frame is None:
                    await outgoing.call.done_writing()
                    outgoing.backlog.clear()
                    return
                await outgoing.call.write(frame)
        except (grpc.RpcError, asyncio.InvalidStateError):
            # The stream ended: its reader reports it, and what was not written is
            # the sender's to send again on the next stream.
            outgoing.backlog.clear()
        finally:
            if not handed_on:
                outgoing.busy = False

    async def _read(self, outgoing: _Outgoing[Request]) -> None:
        call = outgoing.call
        error: grpc.RpcError | None = None
        try:
            batches = self._batches
            on_answer = self._on_answer
            async for answer in call:
                if batches:
                    if answer.reads_batches:
                        outgoing.batches = True
                    inner = answer.batch
                    if inner:
                        for frame in inner:
                            on_answer(frame)
                        continue
                on_answer(answer)
        except grpc.RpcError as exc:
            error = _status_of(exc)
            if not self.closed:
                logger.warning("stream to %s broke: %s", self.name, error.code())
        finally:
            call.cancel()
            if self._outgoing is outgoing:
                self._outgoing = None
            self._on_end(None if self.closed else error)

    async def close(self, grace: float = 2.0) -> None:
        """Half-close, give the peer ``grace`` seconds to end its side, then cancel; idempotent.

        With ``grace`` 0 the stream is cancelled at once, without a half-close:
        for a stream that carries nothing the peer must still read.
        """
        if self.closed:
            return
        self.closed = True
        if self._outgoing is not None and grace > 0:
            self._hand_off(self._outgoing, None)
        reader = self._reader
        if reader is not None:
            if grace > 0:
                try:
                    async with asyncio.timeout(grace):
                        await asyncio.shield(reader)
                except (TimeoutError, asyncio.CancelledError):
                    pass
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        for writer in list(self._writers):
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)
