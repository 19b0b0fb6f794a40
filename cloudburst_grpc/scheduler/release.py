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
(:meth:`ResultReleaser.want`). A scheduler that stores the results itself
(``cbgrpc serve`` with executor processes) holds its own stores the same way
(:class:`HeldStores`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from cloudburst.errors import CloudburstError
from cloudburst.v1 import lattice_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.kvs_access import KvsAccess

logger = logging.getLogger(__name__)

#: The most keys deleted in one request.
BATCH_LIMIT = 1000

#: Seconds the first released key waits for others to join its batch.
LINGER_SECONDS = 0.1

#: Seconds a result its caller may release waits before it is stored (``hold_store``): in
#: ``f(x).get()`` the caller releases it within about a call's time, and a release that comes
#: meanwhile drops the store, which then costs the KVS nothing (neither a write nor a delete).
HOLD_SECONDS = 0.01

#: The most keys a holder remembers as wanted before their results came.
WANTED_REMEMBERED = 1024


class Holder(Protocol):
    """What may hold the store of a result (see :meth:`ResultReleaser.held_by`).

    An executor (through its peer), or a scheduler's own :class:`HeldStores`.
    """

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        """Drop the stores of ``drop``, start those of ``store`` now; never waits."""
        ...


class HeldStores:
    """The held stores of results a scheduler stores itself (``Scheduler.stores_results``).

    As an executor holds the store of a result its caller may release (see
    the module's docstring), so does a scheduler that stores results itself:
    :meth:`hold` starts the store only after :data:`HOLD_SECONDS`, unless the
    releaser ends the hold first (:meth:`end_hold`, this class being a
    :class:`Holder`): a release drops the store, and a call that refers to the
    result, or a caller about to read it, has it start at once. A key wanted
    before its result came is stored as soon as it comes (the last
    :data:`WANTED_REMEMBERED` such keys are remembered). :meth:`store_all`
    ends every hold with its store, for shutdown.
    """

    def __init__(
        self,
        store: Callable[[str, lattice_pb2.Lattice, asyncio.Future[None]], None],
        releaser: ResultReleaser,
    ) -> None:
        """Store with ``store(key, lattice, stored)``, which settles ``stored`` when done."""
        self._store = store
        self._releaser = releaser
        self._held: dict[
            str, tuple[lattice_pb2.Lattice, asyncio.Future[None], asyncio.TimerHandle]
        ] = {}
        self._wanted: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, key: str, lattice: lattice_pb2.Lattice, stored: asyncio.Future[None]) -> None:
        """Store ``lattice`` under ``key`` once the hold ends; ``stored`` settles after."""
        if self._wanted.pop(key, False) is None:  # a call or a read waits for it already
            self._store(key, lattice, stored)
            return
        timer = asyncio.get_running_loop().call_later(HOLD_SECONDS, self._end, key, True)
        self._held[key] = (lattice, stored, timer)

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        """Drop the held stores of ``drop``, start those of ``store`` now; never waits."""
        for key in drop:
            self._end(key, False)
        for key in store:
            if key in self._held:
                self._end(key, True)
            else:
                self._wanted[key] = None
                if len(self._wanted) > WANTED_REMEMBERED:
                    self._wanted.popitem(last=False)

    def store_all(self) -> None:
        """End every hold with its store."""
        for key in list(self._held):
            self._end(key, True)

    def _end(self, key: str, keep: bool) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        lattice, stored, timer = held
        timer.cancel()
        if keep:
            self._store(key, lattice, stored)
            return
        telemetry.RESULTS_DROPPED.add(1)
        self._releaser.dropped(key)  # before it settles: nothing to delete
        if not stored.done():
            stored.set_result(None)


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
