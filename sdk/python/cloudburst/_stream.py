"""One long-lived bidirectional gRPC stream fed by a queue.

Hot paths send many small messages to one peer; a message on an open stream
costs a fraction of a unary call. :class:`OutboxStream` opens the stream on
the first send (with an optional first frame, such as a hello), hands every
answer to a callback, reopens on the next send after the stream ends, and on
close half-closes so the peer ends its side before the channel goes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

from cloudburst.errors import UnavailableError

logger = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


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


class OutboxStream(Generic[Request, Response]):
    """A bidirectional stream that sends whatever is queued and dispatches what comes back.

    Args:
        name: What the stream connects to, for messages (e.g. "executor ex-1 at host:port").
        open_call: Starts the RPC given the request iterator (a stub's stream method).
        on_answer: Called on the loop with every response.
        on_end: Called on the loop when the stream ends, with the gRPC error that
            ended it (None when it ended cleanly or was closed).
        first_frame: Makes the frame each new stream starts with, if any.
    """

    def __init__(
        self,
        name: str,
        open_call: Callable[[AsyncIterator[Request]], Any],
        on_answer: Callable[[Response], None],
        on_end: Callable[[grpc.RpcError | None], None],
        first_frame: Callable[[], Request] | None = None,
    ) -> None:
        self.name = name
        self._open_call = open_call
        self._on_answer = on_answer
        self._on_end = on_end
        self._first_frame = first_frame
        self._outbox: asyncio.Queue[Request | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def is_open(self) -> bool:
        """Whether a stream is open (frames sent now go on it, not on a new one)."""
        return self._outbox is not None and not self.closed

    def send(self, frame: Request) -> None:
        """Queue a frame, opening the stream if needed (call on the loop).

        Raises:
            UnavailableError: The stream was closed for good.
        """
        if self.closed:
            raise UnavailableError(f"the stream to {self.name} is closed")
        if self._outbox is None:
            outbox: asyncio.Queue[Request | None] = asyncio.Queue()
            if self._first_frame is not None:
                outbox.put_nowait(self._first_frame())
            self._outbox = outbox
            self._reader = asyncio.create_task(self._read(outbox))
        self._outbox.put_nowait(frame)

    @staticmethod
    async def _frames(outbox: asyncio.Queue[Request | None]) -> AsyncIterator[Request]:
        while (frame := await outbox.get()) is not None:
            yield frame

    async def _read(self, outbox: asyncio.Queue[Request | None]) -> None:
        call = self._open_call(self._frames(outbox))
        error: grpc.RpcError | None = None
        try:
            async for answer in call:
                self._on_answer(answer)
        except grpc.RpcError as exc:
            error = exc
            if not self.closed:
                logger.warning("stream to %s broke: %s", self.name, exc.code())
        finally:
            call.cancel()
            if self._outbox is outbox:
                self._outbox = None
            self._on_end(None if self.closed else error)

    async def close(self, grace: float = 2.0) -> None:
        """Half-close, give the peer ``grace`` seconds to end its side, then cancel; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._reader)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
