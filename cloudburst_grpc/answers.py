"""Writing a server stream's answers one write at a time, from the tasks that produce them."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from cloudburst.streams import take_batch

logger = logging.getLogger(__name__)

Message = TypeVar("Message")


def _one(backlog: collections.deque[Message]) -> Message:
    return backlog.popleft()


class AnswerBatcher:
    """Chooses the next message of a server stream's answers: one answer, or a batch.

    For streams whose answers have a repeated ``batch`` field of their own type
    and a ``reads_batches`` flag (see :func:`cloudburst.streams.take_batch`).
    Answers are batched once the caller said it reads batches (and ``batches``
    is on); the first message says whether this stream reads batched frames.
    """

    __slots__ = ("_batching", "_enabled", "_offer")

    def __init__(self, batches: bool) -> None:
        """Batch answers, and offer to read batches, only when ``batches`` is on."""
        self._offer = batches
        """Whether batches are on here and not yet announced to the caller."""
        self._enabled = batches
        self._batching = False

    def reads_batches(self) -> None:
        """The caller reads batched answers: batch those that queue up from now on."""
        self._batching = self._enabled

    @property
    def offering(self) -> bool:
        """Whether the next message is yet to tell the caller that this stream reads batches."""
        return self._offer

    def next_message(self, backlog: collections.deque[Any]) -> Any:
        """Take the next message to send from ``backlog`` (not empty; None never first)."""
        message = take_batch(backlog) if self._batching else backlog.popleft()
        if self._offer:
            self._offer = False
            message.reads_batches = True
        return message


class AnswerWriter(Generic[Message]):
    """Writes a stream's answers in the order they come, one write at a time.

    Whichever task has an answer while no write is in progress writes it, and
    then the answers that came meanwhile: ``next_message`` takes each message
    from that backlog (one answer by default; a batch of them, say). ``room``
    is set after every write, for a reader that holds back while answers wait.
    Once the stream is gone (the caller left), answers are dropped: nobody
    could read them.

    Args:
        context: The servicer context of the stream.
        room: Set whenever an answer is written or dropped.
        what: The stream in log lines (``"a call stream"``).
        next_message: Takes the next message to write from a non-empty backlog.
    """

    def __init__(
        self,
        context: Any,
        room: asyncio.Event,
        what: str,
        next_message: Callable[[collections.deque[Message]], Message] = _one,
    ) -> None:
        self._context = context
        self._room = room
        self._what = what
        self._next_message = next_message
        self._backlog: collections.deque[Message] = collections.deque()
        self._busy = False
        self._gone = False
        self._writing_since = 0.0
        """When the write in progress began (``time.monotonic()``), if one is."""
        self.writer: asyncio.Task[Any] | None = None
        """The task writing now, if one is (it waits while the caller does not read)."""

    def backlog(self) -> int:
        """Answers waiting to be written, counting the one being written."""
        return len(self._backlog) + self._busy

    def stalled(self, seconds: float) -> bool:
        """Whether the write in progress has waited longer than ``seconds`` for the caller.

        gRPC flow control holds a write while the caller does not read: its
        window is full.
        """
        return self._busy and time.monotonic() - self._writing_since > seconds

    def stalled_in(self, seconds: float) -> float:
        """Seconds until the write in progress counts as stalled (``seconds`` when none is)."""
        if not self._busy:
            return seconds
        return max(seconds - (time.monotonic() - self._writing_since), 0.0)

    def drop(self) -> None:
        """Write nothing more: answers waiting and to come are dropped, as for a stream gone.

        A write in progress stays in gRPC until the call ends.
        """
        self._gone = True
        self._backlog.clear()
        self._room.set()

    async def write(self, answer: Message) -> None:
        """Write ``answer`` now, or after the write in progress (by whoever is writing)."""
        if self._gone:
            return
        self._backlog.append(answer)
        if self._busy:
            return
        self._busy = True
        self.writer = asyncio.current_task()
        try:
            backlog = self._backlog
            while backlog:
                self._writing_since = time.monotonic()
                await self._context.write(self._next_message(backlog))
                self._room.set()
        except Exception as exc:  # whatever gRPC raises, the answer cannot be delivered
            logger.debug("%s ended before its answers: %r", self._what, exc)
            self._gone = True
            self._backlog.clear()
        finally:
            self._busy = False
            self.writer = None
            self._room.set()
