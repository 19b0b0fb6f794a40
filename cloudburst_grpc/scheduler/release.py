"""Deleting results their callers released, in batches and off the call path.

A caller that holds a call's future owns the result stored under the key the
scheduler chose for it. When the future is gone, the SDK names the key in a
later frame of its call stream; the scheduler deletes those keys here, one
``delete_many`` at a time, collecting the keys released meanwhile into the
next batch. A batch waits :data:`LINGER_SECONDS` before it goes, so that a
steady stream of calls costs one request to the KVS per linger instead of one
per call: a released result is of use to nobody, and deleting it a moment later
costs nothing but that moment's memory. A failed batch is logged and dropped:
its results stay stored, which loses nothing.

A result under a key the scheduler chose that nobody releases expires: once
the call's longest life and then the result time-to-live have passed, it is
deleted the same way, so a caller that never reads cannot fill the store.
Expiry is kept in this scheduler's memory; a restart forgets what was due.

An executor may hold the store of a result its caller may release (see
``hold_store`` in docs/protocol.md, "Held stores"): a release that comes while
it holds the store is sent to it instead (:meth:`ResultReleaser.held_by`), it
drops the store, and nothing is deleted; a call that refers to such a key, or
a caller about to read it (``store_keys``), has the store start at once
(:meth:`ResultReleaser.want`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from cloudburst.errors import CloudburstError
from cloudburst_grpc import telemetry
from cloudburst_grpc.kvs_access import KvsAccess

logger = logging.getLogger(__name__)

#: The most keys deleted in one request.
BATCH_LIMIT = 1000

#: Seconds the first released key waits for others to join its batch.
LINGER_SECONDS = 0.1


class Holder(Protocol):
    """An executor that may hold the store of a result (see :meth:`ResultReleaser.held_by`)."""

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        """Drop the stores of ``drop``, start those of ``store`` now; never waits."""
        ...


class ResultReleaser:
    """Deletes released result keys from the KVS in the background."""

    def __init__(
        self,
        kvs: KvsAccess,
        ttl: float = 0.0,
        hold: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        linger: float = LINGER_SECONDS,
    ) -> None:
        """Delete from ``kvs``; expire tracked keys ``hold + ttl`` seconds on (``ttl`` 0: never).

        A batch waits ``linger`` seconds for more keys before it is sent.
        """
        self._kvs = kvs
        self._linger = linger
        self._closing = asyncio.Event()
        self._queued: list[str] = []
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None
        self._ttl = ttl
        self._hold = hold
        self._clock = clock
        # Keys due to expire, in the order they are due (every key waits the same time).
        self._due: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._storing: dict[str, asyncio.Future[None]] = {}
        """Result keys still being stored: a release of one waits for its store."""
        self._held: set[str] = set()
        """Keys released while being stored."""
        self._holders: dict[str, Holder] = {}
        """Keys being stored whose executor may hold the store, by that executor."""

    @property
    def expiring(self) -> int:
        """Keys that will expire unless released first."""
        return len(self._due)

    def expire_later(self, key: str) -> None:
        """Delete ``key`` once the hold and the time-to-live are over, unless released before."""
        if self._ttl <= 0:
            return
        self._due[key] = self._clock() + self._hold + self._ttl
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        if not self._due:
            self._timer = None
            return
        first = next(iter(self._due.values()))
        delay = max(first - self._clock(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        now = self._clock()
        expired: list[str] = []
        while self._due:
            key, due = next(iter(self._due.items()))
            if due > now:
                break
            self._due.popitem(last=False)
            expired.append(key)
        if expired:
            logger.debug("%d uncollected results expired", len(expired))
            self._queue(expired)
        self._arm()

    @property
    def backlog(self) -> int:
        """Keys released and not deleted yet."""
        return len(self._queued) + self._in_flight

    def storing(self, key: str, stored: asyncio.Future[None]) -> None:
        """Hold releases of ``key`` until ``stored`` settles (its result is being stored)."""
        self._storing[key] = stored
        stored.add_done_callback(lambda _: self._stored(key, stored))

    def held_by(self, key: str, holder: Holder) -> None:
        """``holder`` may hold the store of ``key`` (being stored, see :meth:`storing`)."""
        if key in self._storing:
            self._holders[key] = holder

    def dropped(self, key: str) -> None:
        """The store of ``key`` was dropped: nothing to delete (call before it settles)."""
        self._held.discard(key)

    def want(self, keys: Iterable[str]) -> None:
        """Have held stores of ``keys`` start now: a call refers to them, or a read follows.

        One request per executor.
        """
        if not self._holders:
            return
        stores: dict[int, tuple[Holder, list[str]]] = {}
        for key in keys:
            holder = self._holders.pop(key, None)
            if holder is not None:
                stores.setdefault(id(holder), (holder, []))[1].append(key)
        for holder, wanted in stores.values():
            holder.end_hold(store=wanted)

    def _stored(self, key: str, stored: asyncio.Future[None]) -> None:
        if self._storing.get(key) is stored:
            del self._storing[key]
            self._holders.pop(key, None)
        if key in self._held:
            self._held.discard(key)
            self.release([key])

    def release(self, keys: Iterable[str]) -> None:
        """Queue keys for deletion (call on the loop); returns at once."""
        keys = list(keys)
        if self._due:
            for key in keys:
                self._due.pop(key, None)
        ready = []
        drops: dict[int, tuple[Holder, list[str]]] = {}
        for key in keys:
            if key in self._storing:
                self._held.add(key)  # deleted once stored, unless the store is dropped
                holder = self._holders.pop(key, None)
                if holder is not None:
                    drops.setdefault(id(holder), (holder, []))[1].append(key)
            else:
                ready.append(key)
        for holder, dropped in drops.values():
            holder.end_hold(drop=dropped)
        self._queue(ready)

    def _queue(self, keys: list[str]) -> None:
        self._queued.extend(keys)
        if self._queued and self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            if self._linger > 0 and not self._closing.is_set():
                # Not a synchronisation: a batching window, cut short by close().
                try:
                    async with asyncio.timeout(self._linger):
                        await self._closing.wait()
                except TimeoutError:
                    pass
            while self._queued:
                batch = self._queued[:BATCH_LIMIT]
                del self._queued[:BATCH_LIMIT]
                self._in_flight = len(batch)
                try:
                    await self._kvs.delete_many(batch)
                except CloudburstError as exc:
                    logger.warning(
                        "cannot delete %d released results (they stay stored): %s", len(batch), exc
                    )
                else:
                    telemetry.RESULTS_RELEASED.add(len(batch))
                finally:
                    self._in_flight = 0
        finally:
            self._task = None

    async def close(self, timeout: float = 5.0) -> None:
        """Finish deleting what was released, waiting at most ``timeout`` seconds.

        Results not yet expired stay stored. Keys released after this are
        deleted without waiting for others to join them.
        """
        self._closing.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning("%d released results not deleted at shutdown", self.backlog)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
