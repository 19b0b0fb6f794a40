"""The executor's cache of KVS values: reads served from memory while they are fresh.

:class:`ValueCache` is a :class:`~cloudburst_grpc.kvs_access.KvsAccess` in
front of the executor's real one. It caches last-writer-wins values of the user
keyspace that functions read (reference arguments, ``get_object``), up to a
memory budget, least recently used first out.

Freshness comes from the KVS's change stream: before a key's value is read into
the cache, the cache watches that key by name (both storage engines watch keys
by name), and every change the KVS reports is merged into the cached value. So
a write reaches the caches once its change notification arrives (typically
within a few milliseconds), and when a key's watch ends or fails the entry is
dropped at once, before it could be served stale. Writes through the executor
(``put_object``) are merged into the cached value before the write returns, so
a call reads its own writes; a reference argument carries the time of the
caller's own last write of its key (``not_before_ns``), and an older cached
value is not served for it, so a client reads its own writes too.

Set lattices, the system keyspace and waiting reads of keys not cached yet go
to the KVS every time.

A large cached value can also keep its decoded Python value (:meth:`ValueCache.keep`),
so that a repeat call reading it is not given the cost of unpickling it again. Each
call still gets a value of its own, which it may change without another call seeing
it: only values that can be handed out again cheaply are kept (see :func:`handout`),
immutable ones as they are and flat buffers (``bytearray``, ``array.array``, a NumPy
array of numbers) as a memory copy; anything else is decoded for each call. A kept
value is dropped with the cached value it was decoded from, so it is exactly as fresh,
and counts against the memory budget.

The cache reports the keys it holds (:meth:`ValueCache.listen`), which the
executor forwards to the schedulers on their trigger streams so that placement
prefers executors holding a call's referenced keys.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import copy
import functools
import logging
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cloudburst.chunks import LargeValue, Stored, as_lattice
from cloudburst.v1 import executor_service_pb2, lattice_pb2, value_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.kvs_access import USER, KvsAccess, get_stored

logger = logging.getLogger(__name__)

ENTRY_OVERHEAD_BYTES = 256
"""Bytes counted per entry beyond its key and value (the entry, its watch)."""
WATCH_START_SECONDS = 5.0
"""How long a miss waits for its key's watch to start before reading uncached."""


class WatchingKvs(KvsAccess, Protocol):
    """A :class:`KvsAccess` that can also stream the changes of named keys."""

    def watch_values(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[tuple[str, lattice_pb2.Lattice | None]]:
        """Yield ``("", None)`` once watching, then each key changed and its lattice after."""
        ...


Listener = Callable[[executor_service_pb2.CacheReport], None]


@dataclass(eq=False)
class _Entry:
    """One key's cached value and the watch that keeps it fresh."""

    key: str
    watching: asyncio.Future[None]
    """Settles once the key's watch has started (or failed to)."""
    lattice: Stored | None = None
    """The cached value: a lattice, or a large value left in the chunks it came in."""
    size: int = 0
    """Bytes counted for the entry: its key, value and kept decoded value, and overhead."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    kept: Callable[[], Any] | None = field(default=None, repr=False)
    """Hands out the value decoded from ``lattice`` again (see :meth:`ValueCache.keep`)."""


class ValueCache:
    """A bounded, watched cache of user values in front of the executor's KVS access.

    Args:
        inner: The KVS access to read through and watch.
        max_bytes: The memory budget for cached values; 0 turns caching off.
        name: Names the cache in metrics (the executor's id).
        max_entries: The most keys cached (and watched) at once.
    """

    def __init__(
        self, inner: WatchingKvs, max_bytes: int, name: str = "", max_entries: int = 4096
    ) -> None:
        self._inner = inner
        self.max_bytes = max_bytes
        self.max_entries = max(max_entries, 1)
        self.name = name
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._listeners: list[Listener] = []
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._flush: asyncio.Handle | None = None
        self._closed = False
        telemetry.observe_cache(self)

    # -- reads -----------------------------------------------------------------------

    async def get(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
        not_before_ns: int = 0,
    ) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, from the cache when it holds a fresh enough value.

        ``not_before_ns``: serve a cached value only if it was written at or after
        this time (Unix nanoseconds); the caller's own last write of the key.
        A large value is copied into a lattice: :meth:`get_stored` reads it without.
        """
        if keyspace != USER or self.max_bytes <= 0 or self._closed:
            return await self._inner.get(key, keyspace, wait=wait, timeout=timeout)
        stored = await self.get_stored(key, wait=wait, timeout=timeout, not_before_ns=not_before_ns)
        return None if stored is None else as_lattice(stored)

    async def get_stored(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
        not_before_ns: int = 0,
    ) -> Stored | None:
        """As :meth:`get`, but a large value comes as the chunks it was read in.

        Its size comes from the chunks' lengths and its bytes are joined only when
        decoded (on a worker thread): the event loop never copies it whole.
        """
        if keyspace != USER:
            return await self._inner.get(key, keyspace, wait=wait, timeout=timeout)
        if self.max_bytes <= 0 or self._closed:
            return await get_stored(self._inner, key, wait=wait, timeout=timeout)
        entry = self._entries.get(key)
        if entry is not None and entry.lattice is not None and entry.watching.done():
            if _header(entry.lattice).lww.timestamp.time_ns >= not_before_ns:
                self._entries.move_to_end(key)
                self.hits += 1
                telemetry.CACHE_READS.add(1, {"result": "hit"})
                return entry.lattice
        self.misses += 1
        telemetry.CACHE_READS.add(1, {"result": "miss"})
        if entry is None:
            entry = self._watch(key)
        if not await self._watching(entry):
            return await get_stored(self._inner, key, wait=wait, timeout=timeout)
        # Watching now: whatever changes after this read is merged in by the watch.
        lattice = await get_stored(self._inner, key, wait=wait, timeout=timeout)
        if self._entries.get(key) is not entry:  # evicted or its watch ended meanwhile
            return lattice
        if lattice is None or _header(lattice).WhichOneof("kind") != "lww":
            if entry.lattice is None:
                self._drop(entry)  # nothing worth keeping a watch open for
            return lattice
        self._merge(entry, lattice)
        return entry.lattice if entry.lattice is not None else lattice

    async def get_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> dict[str, lattice_pb2.Lattice | None]:
        """Read several keys: the cached ones from memory, the others in one batch (uncached)."""
        if keyspace != USER or self.max_bytes <= 0 or self._closed:
            return await self._inner.get_many(keys, keyspace)
        found: dict[str, lattice_pb2.Lattice | None] = {}
        missing: list[str] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry.lattice is not None and entry.watching.done():
                self._entries.move_to_end(key)
                found[key] = as_lattice(entry.lattice)
            else:
                missing.append(key)
        self.hits += len(found)
        self.misses += len(missing)
        if found:
            telemetry.CACHE_READS.add(len(found), {"result": "hit"})
        if missing:
            telemetry.CACHE_READS.add(len(missing), {"result": "miss"})
            found.update(await self._inner.get_many(missing, keyspace))
        return {key: found[key] for key in keys}

    def holds(self, key: str, lattice: Stored) -> bool:
        """Whether ``lattice`` is the key's cached value (a value decoded from it may be kept)."""
        entry = self._entries.get(key)
        return entry is not None and entry.lattice is lattice

    def kept(self, key: str, lattice: Stored) -> Callable[[], Any] | None:
        """What hands out the decoded value kept for ``lattice``, the key's cached value.

        None when no decoded value is kept for it (``lattice`` is not, or no longer,
        the cached value, or it was never kept). The callable may run on any thread.
        """
        entry = self._entries.get(key)
        if entry is None or entry.lattice is not lattice:
            return None
        return entry.kept

    def keep(self, key: str, lattice: Stored, kept: Callable[[], Any], size: int) -> None:
        """Keep what hands out the value decoded from ``lattice``, while it is the cached value.

        ``size`` (bytes of the kept value) counts against the budget; a value that
        would not fit is not kept.
        """
        entry = self._entries.get(key)
        if entry is None or entry.lattice is not lattice or entry.kept is not None:
            return
        if entry.size + size > self.max_bytes:
            return
        entry.kept = kept
        entry.size += size
        self.bytes += size
        while self.bytes > self.max_bytes and self._entries:
            self._evict()

    def _watch(self, key: str) -> _Entry:
        """Create the key's entry and start watching it (making room for it first)."""
        while len(self._entries) >= self.max_entries:
            self._evict()
        entry = _Entry(key, asyncio.get_running_loop().create_future())
        self._entries[key] = entry
        entry.task = asyncio.create_task(self._follow(entry))
        return entry

    async def _watching(self, entry: _Entry) -> bool:
        """Wait for the entry's watch to start; False when it could not (read uncached)."""
        try:
            async with asyncio.timeout(WATCH_START_SECONDS):
                await asyncio.shield(entry.watching)
        except Exception as exc:
            logger.debug("cache %s: cannot watch %r: %s", self.name, entry.key, exc)
            self._drop(entry)
            return False
        return True

    async def _follow(self, entry: _Entry) -> None:
        """Merge every change of the entry's key until the watch ends; then drop the entry."""
        try:
            async for key, lattice in self._inner.watch_values([entry.key]):
                if not key:
                    if not entry.watching.done():
                        entry.watching.set_result(None)
                    continue
                if self._entries.get(entry.key) is not entry:
                    break
                if lattice is None or lattice.WhichOneof("kind") != "lww":
                    break  # deleted (or not a cacheable kind): stop watching, drop the entry
                self._merge(entry, lattice)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not entry.watching.done():
                entry.watching.set_exception(exc)
                entry.watching.exception()  # retrieved: a waiter may have given up
            else:
                logger.info("cache %s: the watch of %r ended: %s", self.name, entry.key, exc)
        finally:
            if not entry.watching.done():
                entry.watching.set_exception(ConnectionError("the watch ended"))
                entry.watching.exception()
            # Without its watch the entry could go stale: it must not be served.
            if self._entries.get(entry.key) is entry:
                entry.task = None
                self._drop(entry)

    # -- writes ----------------------------------------------------------------------

    async def put(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
    ) -> None:
        """Merge ``lattice`` into the key durably, then into the cached value (if cached)."""
        await self._inner.put(key, lattice, keyspace)
        if keyspace != USER:
            return
        entry = self._entries.get(key)
        if entry is not None and entry.lattice is not None and lattice.WhichOneof("kind") == "lww":
            self._merge(entry, lattice)

    async def delete(self, key: str, keyspace: lattice_pb2.Keyspace.ValueType = USER) -> bool:
        """Delete the key, and its cached value."""
        existed = await self._inner.delete(key, keyspace)
        entry = self._entries.get(key) if keyspace == USER else None
        if entry is not None:
            self._drop(entry)
        return existed

    async def delete_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> int:
        """Delete the keys, and their cached values."""
        deleted = await self._inner.delete_many(keys, keyspace)
        if keyspace == USER:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self._drop(entry)
        return deleted

    def watch_keys(
        self, prefix: str, keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[str]:
        """Watch a prefix (not cached)."""
        return self._inner.watch_keys(prefix, keyspace)

    async def list_keys(
        self, prefix: str = "", keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> list[str]:
        """List keys (not cached)."""
        return await self._inner.list_keys(prefix, keyspace)

    # -- entries ---------------------------------------------------------------------

    def _merge(self, entry: _Entry, lattice: Stored) -> None:
        """Merge a last-writer-wins value into the entry: the later write wins."""
        if entry.lattice is None or _later(lattice, entry.lattice):
            self._set(entry, lattice)

    def _set(self, entry: _Entry, lattice: Stored | None) -> None:
        """Hold ``lattice`` (or nothing) in the entry, then keep within the budget."""
        had = entry.lattice is not None
        size = 0 if lattice is None else _size(entry.key, lattice)
        if size > self.max_bytes:
            self._drop(entry)  # too large to cache at all
            return
        entry.kept = None  # decoded from the value replaced
        self.bytes += size - entry.size
        entry.lattice, entry.size = lattice, size
        if lattice is not None and not had:
            self._report(entry.key, True)
        elif lattice is None and had:
            self._report(entry.key, False)
        while self.bytes > self.max_bytes and self._entries:
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entry to make room."""
        oldest = next(iter(self._entries.values()))
        self.evictions += 1
        telemetry.CACHE_EVICTIONS.add(1)
        self._drop(oldest)

    def _drop(self, entry: _Entry) -> None:
        """Forget an entry and stop watching its key."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self.bytes -= entry.size
        if entry.lattice is not None:
            self._report(entry.key, False)
        entry.lattice, entry.size, entry.kept = None, 0, None
        if entry.task is not None:
            entry.task.cancel()
            entry.task = None
        if not entry.watching.done():
            entry.watching.cancel()

    def keys(self) -> list[str]:
        """The keys whose values are cached now, sorted."""
        return sorted(k for k, e in self._entries.items() if e.lattice is not None)

    def stats(self) -> executor_service_pb2.CacheStats:
        """The cache's counters."""
        return executor_service_pb2.CacheStats(
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            bytes=self.bytes,
            entries=sum(1 for e in self._entries.values() if e.lattice is not None),
            max_bytes=max(self.max_bytes, 0),
        )

    # -- reports ---------------------------------------------------------------------

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Send ``listener`` every cached key now, then the changes; returns the unsubscribe."""
        listener(executor_service_pb2.CacheReport(full=True, added=self.keys()))
        self._listeners.append(listener)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return stop

    def _report(self, key: str, cached: bool) -> None:
        """Note a change for the listeners; they hear of the changes together, soon."""
        if not self._listeners:
            return
        (self._added if cached else self._removed).add(key)
        (self._removed if cached else self._added).discard(key)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._send_report)

    def _send_report(self) -> None:
        self._flush = None
        report = executor_service_pb2.CacheReport(
            added=sorted(self._added), removed=sorted(self._removed)
        )
        self._added.clear()
        self._removed.clear()
        for listener in list(self._listeners):
            listener(report)

    async def close(self) -> None:
        """Stop every watch and forget every entry; idempotent."""
        self._closed = True
        self._listeners.clear()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for entry in list(self._entries.values()):
            self._drop(entry)
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_reference(
    kvs: KvsAccess, reference: value_pb2.Reference, timeout: float
) -> Stored | None:
    """Read a reference argument's key, through the cache when there is one.

    A large value comes as the chunks it was read in (see :meth:`ValueCache.get_stored`).
    """
    if isinstance(kvs, ValueCache):
        return await kvs.get_stored(
            reference.key,
            wait=reference.wait,
            timeout=timeout,
            not_before_ns=reference.not_before_ns,
        )
    return await get_stored(kvs, reference.key, wait=reference.wait, timeout=timeout)


def handout(value: Any) -> tuple[Callable[[], Any], int] | None:
    """How to give a decoded value to later calls without decoding it again, and its bytes.

    Each call must get a value it may change on its own. Immutable values
    (``bytes``, ``str``) are handed out as they are; flat buffers of numbers
    (``bytearray``, ``array.array``, a NumPy ``ndarray`` without Python objects in
    it) as a copy of a private one, which is a plain memory copy. Anything else
    may hold objects a function can change, so it is not kept (None); it is
    decoded again for each call.

    Call it on a worker thread: the private copy of a large buffer takes a while.
    """
    kind = type(value)
    if kind is bytes or kind is str:
        return functools.partial(_same, value), sys.getsizeof(value)
    if kind is bytearray or kind is array.array:
        private = copy.copy(value)
        return functools.partial(copy.copy, private), memoryview(private).nbytes
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy" and not value.dtype.hasobject:
        private = value.copy()
        return private.copy, int(private.nbytes)
    return None


def _same(value: Any) -> Any:
    return value


def _header(stored: Stored) -> lattice_pb2.Lattice:
    """The lattice of a stored value (without its bytes, for a large one)."""
    return stored.lattice if isinstance(stored, LargeValue) else stored


def _later(a: Stored, b: Stored) -> bool:
    """Whether write ``a`` wins over write ``b`` (the KVS's last-writer-wins order).

    Two writes with the same timestamp and serializer are ordered by their bytes;
    where one of them is a large value, that is the same write read twice (a
    timestamp names one write), and the one held is kept without comparing
    (copying) the bytes.
    """
    la, lb = _header(a).lww, _header(b).lww
    ta, tb = la.timestamp, lb.timestamp
    if ta.time_ns != tb.time_ns:
        return ta.time_ns > tb.time_ns
    if ta.writer_id != tb.writer_id:
        return ta.writer_id > tb.writer_id
    if la.value.serializer != lb.value.serializer:
        return la.value.serializer > lb.value.serializer
    if isinstance(a, LargeValue) or isinstance(b, LargeValue):
        return False
    return la.value.data > lb.value.data


def _size(key: str, stored: Stored) -> int:
    """Bytes counted for a cached value; a large one's from its chunks' lengths, no copy."""
    data = len(stored) if isinstance(stored, LargeValue) else len(stored.lww.value.data)
    return len(key) + data + ENTRY_OVERHEAD_BYTES
