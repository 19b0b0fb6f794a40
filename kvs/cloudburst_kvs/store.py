"""The lattice store: every lattice in memory, merged on the event loop, written durably.

:class:`LatticeStore` is the domain core of the KVS. The servicer delegates to it,
and components in the same process may use it directly.

Concurrency model:

* All state lives on the event loop thread. ``put`` reads, merges and replaces a
  key's lattice without awaiting in between, so concurrent puts to one key are
  atomic without locks.
* Durability is delegated to one writer thread that owns the storage engine. It
  takes every write queued since its last transaction and commits them together
  (group commit), then resolves the waiting puts on the loop. A put returns only
  after the transaction holding its write committed.
* Waiters (``wait_for``) and watchers (``watch``) are told about a write once it
  committed, so no notification announces a write that a crash could still undo.
  Reads are different: ``get`` (and ``wait_for`` on a key that already exists)
  return the newest merged lattice, committed or not, so that a process's own
  reads follow its writes.

Lattices handed out by the store (``get``, ``put``, ``wait_for``, watch events)
are shared with it: treat them as read-only and copy one before changing it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeAlias

from cloudburst.errors import (
    CloudburstError,
    InvalidArgumentError,
    PayloadTooLargeError,
    UnavailableError,
)
from cloudburst.v1 import lattice_pb2
from cloudburst_kvs import lattices
from cloudburst_kvs.backlog import Backlog
from cloudburst_kvs.storage import Row, StorageEngine

logger = logging.getLogger(__name__)

#: A keyspace number (``lattice_pb2.KEYSPACE_*``).
Keyspace: TypeAlias = lattice_pb2.Keyspace.ValueType

#: A key of the store: keyspace number and key.
StoreKey = tuple[int, str]

#: The most keys one ListKeys page returns (also the page size when 0 is asked for).
MAX_PAGE_SIZE = 1000

#: The most keys one batch request (BatchGetValues, BatchDeleteValues) may name.
MAX_BATCH_KEYS = 1000

#: How many undelivered events a watcher may fall behind before its stream is ended.
WATCH_QUEUE_LIMIT = 1000

#: The most writes committed in one transaction, so one huge backlog cannot delay
#: the first writes of it for long.
MAX_WRITES_PER_COMMIT = 10_000

#: How many recent request ids are remembered to answer retried puts and deletes.
REQUEST_ID_MEMORY = 4096

_KNOWN_KEYSPACES = frozenset({lattice_pb2.KEYSPACE_USER, lattice_pb2.KEYSPACE_SYSTEM})


def normalize_keyspace(keyspace: int) -> Keyspace:
    """Return the keyspace a request means: ``KEYSPACE_UNSPECIFIED`` is ``KEYSPACE_USER``.

    Raises:
        InvalidArgumentError: The number is not a known keyspace.
    """
    if keyspace == lattice_pb2.KEYSPACE_UNSPECIFIED:
        return lattice_pb2.KEYSPACE_USER
    if keyspace not in _KNOWN_KEYSPACES:
        raise InvalidArgumentError(
            f"unknown keyspace {keyspace}; use KEYSPACE_USER or KEYSPACE_SYSTEM",
            {"keyspace": str(keyspace)},
        )
    return lattice_pb2.Keyspace.ValueType(keyspace)


#: The longest key, in UTF-8 bytes. Keys travel in every listing, watch event and error,
#: so they stay small; values carry the data.
MAX_KEY_BYTES = 4096


def check_key(key: str, *, what: str = "key") -> None:
    """Raise InvalidArgumentError when a key is empty or longer than :data:`MAX_KEY_BYTES`."""
    if not key:
        raise InvalidArgumentError(f"{what} must not be empty", {"field": what})
    # A character is at most 4 bytes in UTF-8: only long keys need encoding to be measured.
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"{what} is {len(key.encode())} bytes long (it starts {key[:40]!r}), over the limit "
            f"of {MAX_KEY_BYTES} bytes; use a shorter key (a hash of a long name, say)",
            {"field": what, "limit": str(MAX_KEY_BYTES)},
        )


class WatchEvent(NamedTuple):
    """One change seen by a watcher."""

    key: str
    """The key that changed."""
    lattice: lattice_pb2.Lattice | None
    """The key's lattice after the change; None when it was deleted."""
    deleted: bool
    """Whether the change was a delete."""


@dataclass(slots=True)
class _Write:
    """One put or delete on its way to the engine."""

    keyspace: int
    key: str
    lattice: lattice_pb2.Lattice | None  # None deletes the key
    changed: bool  # whether watchers and waiters hear of it
    done: asyncio.Future[None] | None  # None when the engine is not durable


class Subscription:
    """The changes to a set of keys and/or a key prefix, as an async iterator of WatchEvent.

    Events are queued from the moment :meth:`LatticeStore.watch` returns. A
    subscriber that falls more than ``limit`` events behind is ended with
    :class:`~cloudburst.errors.QueueFullError` rather than let its backlog grow;
    closing the store ends it with :class:`~cloudburst.errors.UnavailableError`.
    Use it as an async context manager, or call :meth:`aclose`, to stop watching.
    """

    def __init__(
        self,
        store: LatticeStore,
        keyspace: int,
        keys: frozenset[str],
        prefix: str,
        max_queued: int,
    ) -> None:
        self.keyspace = keyspace
        self.keys = keys
        self.prefix = prefix
        self._store = store
        self._backlog: Backlog[WatchEvent] = Backlog(max_queued, self._stop_listening)

    def _stop_listening(self, drop_backlog: bool) -> None:
        self._store._unsubscribe(self)

    def _offer(self, event: WatchEvent) -> None:
        self._backlog.offer(event)

    def _end(self, error: CloudburstError | None, *, drop_backlog: bool) -> None:
        self._backlog.end(error, drop_backlog=drop_backlog)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._backlog.next()

    async def aclose(self) -> None:
        """Stop watching; events not yet read are dropped. Idempotent."""
        self._end(None, drop_backlog=True)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Writer:
    """The dedicated thread that owns the engine and commits writes in groups."""

    def __init__(
        self,
        engine: StorageEngine,
        loop: asyncio.AbstractEventLoop,
        on_commit: Callable[[list[_Write], BaseException | None], None],
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        # Daemon: if the owner never closes the store, exiting must not hang on
        # this thread; such writes were never acknowledged, so nothing is lost.
        self._thread = threading.Thread(target=self._run, name="kvs-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, write: _Write) -> None:
        self._queue.put(write)

    def stop(self) -> None:
        """Ask the thread to commit what is queued, then exit."""
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread is still running."""
        return self._thread.is_alive()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[_Write] = []
            if item is None:
                stopping = True
            else:
                batch.append(item)
            # Group commit: everything queued while the previous transaction ran
            # goes into this one, so a burst costs one commit, not one per write.
            while not stopping and len(batch) < MAX_WRITES_PER_COMMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Write]) -> None:
        error: BaseException | None = None
        try:
            # Several writes to one key in a group: only the last state matters,
            # and it makes each key appear once, as engine.write() requires.
            latest: dict[StoreKey, lattice_pb2.Lattice | None] = {}
            for write in batch:
                latest[(write.keyspace, write.key)] = write.lattice
            puts: list[Row] = []
            deletes: list[tuple[int, str]] = []
            for (keyspace, key), lattice in latest.items():
                if lattice is None:
                    deletes.append((keyspace, key))
                else:
                    # Serialized here rather than on the loop: stored lattices are
                    # never changed in place, so this thread may read them.
                    puts.append((keyspace, key, lattice.SerializeToString()))
            self._engine.write(puts, deletes)
        except Exception as exc:
            logger.exception("KVS commit of %d writes failed", len(batch))
            error = exc
        try:
            self._loop.call_soon_threadsafe(self._on_commit, batch, error)
        except RuntimeError:
            # The loop is closed: nobody is waiting for these writes any more.
            logger.warning("KVS commit finished after its event loop closed")


class LatticeStore:
    """All lattices of the KVS, merged in memory and written through a storage engine.

    Use ``async with LatticeStore(engine) as store:`` or call :meth:`start` and
    :meth:`close`. Every method must be called from the event loop that ran
    :meth:`start`.
    """

    def __init__(
        self,
        engine: StorageEngine,
        *,
        max_lattice_bytes: int | None = None,
        watch_queue_limit: int = WATCH_QUEUE_LIMIT,
    ) -> None:
        """Create a store over ``engine``; nothing is loaded until :meth:`start`.

        Args:
            engine: Where lattices are kept durably (or not, for ``MemoryEngine``).
            max_lattice_bytes: The most user data one key may hold after a merge
                (a set grows with every put); None for no limit.
            watch_queue_limit: How many undelivered events a watcher may have.
        """
        self._engine = engine
        self._max_lattice_bytes = max_lattice_bytes
        self._watch_queue_limit = watch_queue_limit
        self._data: dict[StoreKey, lattice_pb2.Lattice] = {}
        # The bytes of a last-writer-wins value, where a put gave or measured them:
        # reading them from the message again would copy them.
        self._sizes: dict[StoreKey, int] = {}
        self._keys: dict[int, set[str]] = collections.defaultdict(set)
        # Sorted keys per keyspace for ListKeys, rebuilt only after keys were
        # added or removed (values changing does not invalidate it).
        self._sorted: dict[int, list[str]] = {}
        self._waiters: dict[StoreKey, set[asyncio.Future[lattice_pb2.Lattice]]] = {}
        self._key_watchers: dict[StoreKey, set[Subscription]] = {}
        self._prefix_watchers: dict[int, set[Subscription]] = collections.defaultdict(set)
        # The newest not yet committed write of each key, so that a put that
        # changes nothing still returns only once the state it saw is durable.
        self._unflushed: dict[StoreKey, asyncio.Future[None]] = {}
        self._recent: collections.OrderedDict[tuple[str, int, str, str], bool] = (
            collections.OrderedDict()
        )
        """Recent request ids: a put's (True) or a delete's, with whether the key existed."""
        self._writer: _Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing = False
        self._start_task: asyncio.Future[None] | None = None
        self._close_task: asyncio.Future[None] | None = None

    # Lifecycle

    async def start(self) -> None:
        """Load every stored lattice and start the writer thread; idempotent until closed."""
        if self._closing:
            raise UnavailableError("the KVS store is closed and cannot be started again")
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start())
        await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded = await asyncio.to_thread(self._load)
        if self._closing:
            return  # closed while loading: starting a writer now would leak its thread
        for (keyspace, key), lattice in loaded.items():
            self._data[(keyspace, key)] = lattice
            self._keys[keyspace].add(key)
        if self._engine.durable:
            self._writer = _Writer(self._engine, self._loop, self._on_commit)
            self._writer.start()
        self._started = True
        logger.info(
            "KVS store started with %d keys (%s)", len(self._data), type(self._engine).__name__
        )

    def _load(self) -> dict[StoreKey, lattice_pb2.Lattice]:
        loaded: dict[StoreKey, lattice_pb2.Lattice] = {}
        for keyspace, key, data in self._engine.load():
            try:
                loaded[(keyspace, key)] = lattice_pb2.Lattice.FromString(data)
            except Exception:
                # One damaged row should not keep every other key offline.
                logger.exception("KVS skipped unreadable lattice of key %r", key)
        return loaded

    async def close(self) -> None:
        """Commit pending writes, end waiters and watchers, stop the writer, close the engine.

        Idempotent; concurrent calls all return once the store is closed.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing = True
        if self._start_task is not None and not self._start_task.done():
            # Let a start in progress finish loading (it sees _closing and starts
            # no writer) before the engine it reads from is closed.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._start_task)
        if self._writer is not None:
            self._writer.stop()
            # The writer's last completions are queued on the loop before join()
            # returns, so every pending put is resolved when this await resumes.
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        self.end_watches()
        gone = "the KVS is shutting down; retry against a running KVS"
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(UnavailableError(gone))
        self._waiters.clear()
        await asyncio.to_thread(self._engine.close)
        if self._started:
            logger.info("KVS store closed")

    def close_blocking(self, timeout: float) -> None:
        """Commit queued writes and close the engine from any thread, without the loop.

        For a process that must exit while its event loop is held up (by user
        code that never yields): the writer commits what it has queued, waiting
        up to ``timeout`` seconds, and the engine closes. Acknowledged writes
        were durable already; this also leaves the database file tidy.
        """
        self._closing = True
        writer = self._writer
        if writer is not None:
            writer.stop()
            writer.join(timeout)
            if writer.alive:
                logger.warning("the KVS writer did not finish within %.1fs", timeout)
                return  # it still uses the engine; its writes were never acknowledged
        self._engine.close()

    async def __aenter__(self) -> LatticeStore:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_usable(self) -> None:
        if self._closing:
            raise UnavailableError("the KVS is shutting down; retry against a running KVS")
        if not self._started:
            raise RuntimeError("LatticeStore.start() must be awaited before the store is used")

    # Reads

    def get(self, keyspace: int, key: str) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, or None when it does not exist (no I/O)."""
        check_key(key)
        return self._data.get((normalize_keyspace(keyspace), key))

    def __len__(self) -> int:
        return len(self._data)

    async def wait_for(
        self,
        keyspace: int,
        key: str,
        timeout: float,
    ) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, waiting up to ``timeout`` seconds for it to be written.

        Returns:
            The lattice, or None when no put to the key committed in time.

        Raises:
            UnavailableError: The store closed while waiting.
        """
        self._check_usable()
        store_key = (normalize_keyspace(keyspace), key)
        check_key(key)
        current = self._data.get(store_key)
        if current is not None or timeout <= 0:
            return current
        assert self._loop is not None
        waiter: asyncio.Future[lattice_pb2.Lattice] = self._loop.create_future()
        waiters = self._waiters.setdefault(store_key, set())
        waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            return None
        finally:
            # A put pops the whole set when it resolves it; only clean up what
            # is still registered, so a timed-out or cancelled wait leaves nothing.
            registered = self._waiters.get(store_key)
            if registered is not None:
                registered.discard(waiter)
                if not registered:
                    del self._waiters[store_key]

    def waiter_count(self) -> int:
        """Return how many ``wait_for`` calls are waiting (for monitoring and tests)."""
        return sum(len(waiters) for waiters in self._waiters.values())

    def list_keys(
        self, keyspace: int, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[str], str]:
        """Return one page of the keyspace's keys that start with ``prefix``, ascending.

        Args:
            keyspace: The keyspace to list.
            prefix: Only keys starting with it; empty lists all.
            page_size: The most keys to return; 0 means ``MAX_PAGE_SIZE``, larger values
                are capped at it.
            page_token: The token returned with the previous page; empty for the first.

        Returns:
            The keys and the token of the next page, empty when this is the last page.

        Raises:
            InvalidArgumentError: ``page_size`` is negative or ``page_token`` is not
                one this listing returned.
        """
        ks = normalize_keyspace(keyspace)
        return page_of(self._sorted_keys(ks), ks, prefix, page_size, page_token)

    def _sorted_keys(self, keyspace: int) -> list[str]:
        keys = self._sorted.get(keyspace)
        if keys is None:
            keys = self._sorted[keyspace] = sorted(self._keys.get(keyspace, ()))
        return keys

    # The async interface (cloudburst_kvs.backend.LatticeBackend); the methods above
    # stay synchronous for callers in this process that want no await.

    async def read(self, keyspace: int, key: str) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, or None when it does not exist."""
        return self.get(keyspace, key)

    async def read_many(
        self, keyspace: int, keys: Sequence[str]
    ) -> list[lattice_pb2.Lattice | None]:
        """Return the lattices of several keys, in the order asked (None where missing)."""
        return [self.get(keyspace, key) for key in keys]

    def known_size(self, keyspace: int, key: str, lattice: lattice_pb2.Lattice) -> int | None:
        """The bytes of ``lattice``'s last-writer-wins value, when known without reading them.

        ``lattice`` is what a read of the key returned; None when it is no longer
        the key's lattice, or its size was not recorded (a value loaded at start).
        """
        store_key = (normalize_keyspace(keyspace), key)
        if self._data.get(store_key) is not lattice:
            return None
        return self._sizes.get(store_key)

    async def list_page(
        self, keyspace: int, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[str], str]:
        """Return one page of keys, as :meth:`list_keys` does."""
        return self.list_keys(keyspace, prefix, page_size, page_token)

    async def subscribe(
        self, keyspace: int, keys: Iterable[str] = (), prefix: str = ""
    ) -> Subscription:
        """Start watching, as :meth:`watch` does."""
        return self.watch(keyspace, keys, prefix)

    # Writes

    async def put(
        self,
        keyspace: int,
        key: str,
        lattice: lattice_pb2.Lattice,
        *,
        request_id: str = "",
        size: int | None = None,
        adopt: bool = False,
    ) -> lattice_pb2.Lattice:
        """Merge ``lattice`` into the key and return the merged lattice once it is durable.

        Args:
            keyspace: The key's keyspace.
            key: The key; must not be empty.
            lattice: The lattice to merge; it is not changed, unless ``adopt``.
            request_id: When not empty, a retry with the same id (and key) is not
                merged again: it returns the key's lattice now, as merging the same
                write again would (the write's own lattice when the key was deleted
                since). No lattice is kept per id: the ids of the last
                :data:`REQUEST_ID_MEMORY` writes would otherwise hold their values.
            size: The bytes of a last-writer-wins value, when the caller knows them: the
                size limit is then checked without reading (copying) them.
            adopt: The caller gives ``lattice`` up: a last-writer-wins write may be
                normalized in place and stored itself, its value not copied (see
                :func:`~cloudburst_kvs.lattices.merge`). It must not be part of a
                larger message that would then stay in memory with it.

        Raises:
            InvalidArgumentError: The key is empty or the lattice malformed.
            LatticeTypeMismatchError: The key holds a lattice of another kind.
            PayloadTooLargeError: The merged lattice would exceed ``max_lattice_bytes``.
            UnavailableError: The store is closing, or the write could not be made durable.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        check_key(key)
        lattices.validate(lattice)
        request = ("put", ks, key, request_id)
        store_key = (ks, key)
        if request_id and request in self._recent:
            await self._wait_unflushed(store_key, key)
            stored = self._data.get(store_key)
            return stored if stored is not None else lattices.normalize(lattice)
        # From here to _submit nothing awaits: the read-merge-replace of the key
        # is atomic with respect to every other coroutine on the loop.
        stored = self._data.get(store_key)
        merged = (
            lattices.normalize(lattice, adopt=adopt)
            if stored is None
            else lattices.merge(stored, lattice, adopt=adopt)
        )
        measured = self._check_size(key, merged, size)
        if stored is not None and merged == stored:
            await self._wait_unflushed(store_key, key)
            merged = stored
        else:
            self._data[store_key] = merged
            if measured is not None and merged.WhichOneof("kind") == "lww":
                self._sizes[store_key] = measured
            else:
                self._sizes.pop(store_key, None)
            if stored is None:
                self._add_key(ks, key)
            await self._submit(_Write(ks, key, merged, changed=True, done=None))
        if request_id:
            self._remember(request, True)
        return merged

    async def delete(self, keyspace: int, key: str, *, request_id: str = "") -> bool:
        """Delete a key and return whether it existed, once the delete is durable.

        Deleting a missing key succeeds. A retry with the same non-empty
        ``request_id`` returns the first call's answer.

        Raises:
            InvalidArgumentError: The key is empty.
            UnavailableError: The store is closing, or the delete could not be made durable.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        check_key(key)
        request = ("delete", ks, key, request_id)
        if request_id and request in self._recent:
            return bool(self._recent[request])
        store_key = (ks, key)
        existed = self._data.pop(store_key, None) is not None
        self._sizes.pop(store_key, None)
        if existed:
            self._remove_key(ks, key)
            await self._submit(_Write(ks, key, None, changed=True, done=None))
        else:
            await self._wait_unflushed(store_key, key)
        if request_id:
            self._remember(request, existed)
        return existed

    async def delete_many(self, keyspace: int, keys: Iterable[str]) -> int:
        """Delete several keys, committed together; return how many existed.

        Raises:
            InvalidArgumentError: A key is empty.
            UnavailableError: The store is closing, or the deletes could not be made durable.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        keys = list(keys)
        for key in keys:
            check_key(key)
        return sum(await asyncio.gather(*(self.delete(ks, key) for key in keys)))

    def _check_size(self, key: str, merged: lattice_pb2.Lattice, size: int | None) -> int | None:
        """Refuse a merge whose result is over the limit; return its size, when known.

        A last-writer-wins result is the write or the value stored before, which
        passed this check: the write's ``size``, when given, is what to check.
        """
        limit = self._max_lattice_bytes
        if limit is None:
            return size
        if size is None or merged.WhichOneof("kind") != "lww":
            size = lattices.lattice_size(merged)
        if size > limit:
            raise PayloadTooLargeError(
                f"key {key!r} would hold {size} bytes after this merge, over the limit of "
                f"{limit} bytes; store large data in smaller pieces or raise the limit "
                "(max_payload_bytes)",
                {"key": key, "size": str(size), "limit": str(limit)},
            )
        return size

    def _add_key(self, keyspace: int, key: str) -> None:
        self._keys[keyspace].add(key)
        self._sorted.pop(keyspace, None)

    def _remove_key(self, keyspace: int, key: str) -> None:
        self._keys[keyspace].discard(key)
        self._sorted.pop(keyspace, None)

    def _remember(self, request: tuple[str, int, str, str], result: bool) -> None:
        self._recent[request] = result
        if len(self._recent) > REQUEST_ID_MEMORY:
            self._recent.popitem(last=False)

    async def _submit(self, write: _Write) -> None:
        if self._writer is None:
            # Nothing to make durable: the write is as committed as it gets.
            self._on_commit([write], None)
            return
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        # Nobody may await a failed write (its caller was cancelled); retrieving
        # the exception here keeps asyncio from reporting it as lost.
        done.add_done_callback(_consume_exception)
        write.done = done
        self._unflushed[(write.keyspace, write.key)] = done
        self._writer.submit(write)
        await self._await_durable(done, write.key)

    async def _wait_unflushed(self, store_key: StoreKey, key: str) -> None:
        done = self._unflushed.get(store_key)
        if done is not None:
            await self._await_durable(done, key)

    @staticmethod
    async def _await_durable(done: asyncio.Future[None], key: str) -> None:
        try:
            # Shielded: a cancelled caller must not cancel the shared completion
            # that other puts of the key may also be waiting for.
            await asyncio.shield(done)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise UnavailableError(
                f"the KVS could not make the write of key {key!r} durable ({exc}); "
                "the error is in the KVS log; retry later",
                {"key": key},
            ) from exc

    def _on_commit(self, writes: list[_Write], error: BaseException | None) -> None:
        """Resolve committed writes and tell waiters and watchers (on the loop)."""
        for write in writes:
            store_key = (write.keyspace, write.key)
            if write.done is not None:
                if self._unflushed.get(store_key) is write.done:
                    del self._unflushed[store_key]
                if not write.done.done():
                    if error is None:
                        write.done.set_result(None)
                    else:
                        write.done.set_exception(error)
            # Even a failed commit is told: reads already return the merged
            # lattice, and waiters should not see less than readers do.
            if write.changed:
                self._notify(store_key, write.lattice)

    def _notify(self, store_key: StoreKey, lattice: lattice_pb2.Lattice | None) -> None:
        keyspace, key = store_key
        if lattice is not None:
            for waiter in self._waiters.pop(store_key, ()):
                if not waiter.done():
                    waiter.set_result(lattice)
        targets = set(self._key_watchers.get(store_key, ()))
        targets.update(
            s for s in self._prefix_watchers.get(keyspace, ()) if key.startswith(s.prefix)
        )
        if targets:
            event = WatchEvent(key, lattice, lattice is None)
            for subscription in targets:
                subscription._offer(event)

    # Watches

    def watch(self, keyspace: int, keys: Iterable[str] = (), prefix: str = "") -> Subscription:
        """Start watching keys and/or every key that starts with ``prefix``.

        Changes are queued from the moment this returns; iterate the returned
        subscription to read them, and close it to stop watching.

        Raises:
            InvalidArgumentError: No key and no prefix were given, or a key is empty.
            UnavailableError: The store is closing.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        wanted = frozenset(keys)
        for key in wanted:
            check_key(key, what="keys")
        if not wanted and not prefix:
            raise InvalidArgumentError(
                "name at least one key or a key prefix to watch", {"field": "keys"}
            )
        subscription = Subscription(self, ks, wanted, prefix, self._watch_queue_limit)
        for key in wanted:
            self._key_watchers.setdefault((ks, key), set()).add(subscription)
        if prefix:
            self._prefix_watchers[ks].add(subscription)
        return subscription

    def end_watches(self) -> None:
        """End every watch stream with UnavailableError, after the changes already queued.

        Shutdown calls this before stopping the gRPC server, whose grace period
        would otherwise wait for streams that never end by themselves.
        :meth:`close` does it too.
        """
        ended: set[Subscription] = set()
        for watchers in [*self._key_watchers.values(), *self._prefix_watchers.values()]:
            ended.update(watchers)
        for subscription in ended:
            subscription._end(
                UnavailableError("the KVS is shutting down; watch again on a running KVS"),
                drop_backlog=False,
            )

    def _unsubscribe(self, subscription: Subscription) -> None:
        ks = subscription.keyspace
        for key in subscription.keys:
            watchers = self._key_watchers.get((ks, key))
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._key_watchers[(ks, key)]
        if subscription.prefix:
            self._prefix_watchers[ks].discard(subscription)

    def watcher_count(self) -> int:
        """Return how many subscriptions are active (for monitoring and tests)."""
        active: set[Subscription] = set()
        for watchers in self._key_watchers.values():
            active.update(watchers)
        for watchers in self._prefix_watchers.values():
            active.update(watchers)
        return len(active)


def page_of(
    keys: Sequence[str], keyspace: int, prefix: str, page_size: int, page_token: str
) -> tuple[list[str], str]:
    """Return one page of the sorted ``keys`` that start with ``prefix``, and the next token.

    Raises:
        InvalidArgumentError: ``page_size`` is negative or ``page_token`` is not
            one this listing returned.
    """
    if page_size < 0:
        raise InvalidArgumentError(
            f"page_size must not be negative, got {page_size}", {"field": "page_size"}
        )
    size = MAX_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    if page_token:
        last = _decode_page_token(page_token, keyspace, prefix)
        index = bisect.bisect_right(keys, last)
    else:
        index = bisect.bisect_left(keys, prefix)
    page: list[str] = []
    # Keys with a common prefix are contiguous in sorted order, so the page
    # ends at the first key without it.
    while index < len(keys) and len(page) < size and keys[index].startswith(prefix):
        page.append(keys[index])
        index += 1
    more = index < len(keys) and keys[index].startswith(prefix)
    token = _encode_page_token(keyspace, prefix, page[-1]) if more and page else ""
    return page, token


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


_TOKEN_VERSION = 1


def _encode_page_token(keyspace: int, prefix: str, last_key: str) -> str:
    # The listing it belongs to travels inside the token, so a token reused with
    # another keyspace or prefix is refused instead of silently skipping keys.
    raw = json.dumps([_TOKEN_VERSION, keyspace, prefix, last_key], ensure_ascii=False)
    return base64.urlsafe_b64encode(raw.encode()).decode("ascii")


def _decode_page_token(token: str, keyspace: int, prefix: str) -> str:
    invalid = InvalidArgumentError(
        "page_token is not valid for this listing; pass the next_page_token of the previous "
        "page unchanged, with the same keyspace and prefix",
        {"field": "page_token"},
    )
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode("ascii")).decode())
    except (binascii.Error, UnicodeError, ValueError):
        raise invalid from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 4
        or decoded[:3] != [_TOKEN_VERSION, keyspace, prefix]
        or not isinstance(decoded[3], str)
        or not decoded[3].startswith(prefix)
    ):
        raise invalid
    return decoded[3]


__all__ = [
    "MAX_BATCH_KEYS",
    "MAX_KEY_BYTES",
    "MAX_PAGE_SIZE",
    "WATCH_QUEUE_LIMIT",
    "Keyspace",
    "LatticeStore",
    "StoreKey",
    "Subscription",
    "WatchEvent",
    "check_key",
    "normalize_keyspace",
    "page_of",
]
