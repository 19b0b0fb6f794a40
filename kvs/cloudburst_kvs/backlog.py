"""The bounded backlog of a watch: items waiting for a slow reader, and how the watch ends.

Both storage engines' watches (:class:`~cloudburst_kvs.store.Subscription`,
:class:`~cloudburst_kvs.valkey_store.ValkeyWatch`) queue what they hear for a
reader that may fall behind. A reader more than ``limit`` items behind is ended
with :class:`~cloudburst.errors.QueueFullError` and its backlog freed, rather
than let the KVS grow; a watch ends once, with or without an error, and every
read after its end stops instead of blocking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from cloudburst.errors import CloudburstError, QueueFullError

T = TypeVar("T")


class _End(NamedTuple):
    """Marks the end of a watch, with the error that ended it, if any."""

    error: CloudburstError | None


class Backlog(Generic[T]):
    """A queue of at most ``limit`` items that ends once.

    ``on_end(drop_backlog)`` runs once, when the backlog ends, so its watch can
    stop listening (and drop what it keeps beside the backlog).
    """

    def __init__(self, limit: int, on_end: Callable[[bool], None]) -> None:
        self._limit = limit
        self._on_end = on_end
        # Unbounded on purpose: offer() bounds it at `limit` itself, so the end
        # marker always fits even when the backlog is full.
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self.ended = False

    def offer(self, item: T) -> None:
        """Queue ``item``, or end the backlog with QueueFullError if it is full."""
        if self.ended:
            return
        if self._queue.qsize() >= self._limit:
            self.end(
                QueueFullError(
                    f"the watch fell more than {self._limit} changes behind and was ended; "
                    "read the changes faster, then watch again and re-read the keys",
                    {"limit": str(self._limit)},
                ),
                drop_backlog=True,
            )
            return
        self._queue.put_nowait(item)

    def end(self, error: CloudburstError | None, *, drop_backlog: bool) -> None:
        """End after the items queued (or at once with ``drop_backlog``); idempotent."""
        if self.ended:
            return
        self.ended = True
        self._on_end(drop_backlog)
        if drop_backlog:
            # The point of ending a slow reader is to free its backlog now.
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put_nowait(_End(error))

    async def next(self) -> T:
        """The next item.

        Raises:
            CloudburstError: the error the backlog ended with, once.
            StopAsyncIteration: the backlog ended (every read after the end).
        """
        item = await self._queue.get()
        if isinstance(item, _End):
            # Leave an error-free end marker so later reads stop instead of blocking.
            self._queue.put_nowait(_End(None))
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item
