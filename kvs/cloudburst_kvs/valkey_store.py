"""The lattice store over a Valkey Cluster: stateless, so any number of KVS processes share it.

Design:

* **Atomic merges on the engine.** Every put runs a function of
  :mod:`cloudburst_kvs.valkey_functions` on the primary that owns the key; it
  compares the stored and incoming writes and keeps the winner (last-writer-wins
  in the order of :func:`cloudburst_kvs.lattices.lww_order_key`) or stores the
  union (sets). Values over ``inline_limit`` bytes are written to a staging key
  in the key's slot with a plain ``SET``/``SADD`` in the same pipeline, so their
  bytes never pass through the scripting engine (see the functions' module).
* **One connection per write.** The staging write, the merge and, with durable
  writes, ``WAIT 1`` go out as one pipeline on one connection to the key's
  primary: ``WAIT`` counts the replicas that have this connection's writes, so
  a ``WAIT`` sent on another connection (or answered by another node after a
  redirect) would acknowledge nothing. When any step fails (a redirect, a lost
  connection, no replica in time) the whole pipeline is sent again to the
  primary the refreshed topology names; merges are idempotent, so repeating one
  is safe, and a write the new primary had not received is merged again.
* **Waiting reads never poll.** A merge that changes a key publishes on the
  key's sharded channel (same slot as the key). Each process keeps one
  subscriber connection per primary, shared by all its waiting reads and
  watches; a reader subscribes before it reads, so no write between the read
  and the wait is missed. When a subscriber connection is lost or the slot
  moves (failover), the channels are subscribed again on the new primary and
  every waiter and watch reads its keys again, since changes made meanwhile
  were announced to nobody.
* **Reads** go to the primary (read-your-writes and monotonic reads per key);
  a read is ``MULTI``/``GET``/``SMEMBERS``/``EXEC`` so that the kind and value
  come from one instant.

Consistency: per key, merges are atomic, a read sees every write acknowledged
before it started, and reads never go back in time; across keys nothing is
promised. With durable writes (the default), a put or delete is acknowledged
only once one replica has it, so the failure of one node loses nothing
acknowledged; without, a primary that dies may take its last writes with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cloudburst.errors import (
    CloudburstError,
    InvalidArgumentError,
    LatticeTypeMismatchError,
    PayloadTooLargeError,
    UnavailableError,
)
from cloudburst.v1 import lattice_pb2
from cloudburst_grpc import telemetry
from cloudburst_kvs import lattices
from cloudburst_kvs import valkey_codec as codec
from cloudburst_kvs import valkey_functions as functions
from cloudburst_kvs.backlog import Backlog
from cloudburst_kvs.storage import STORAGE_FORMAT, StorageFormatError, check_format
from cloudburst_kvs.store import (
    WATCH_QUEUE_LIMIT,
    WatchEvent,
    check_key,
    normalize_keyspace,
    page_of,
)

logger = logging.getLogger(__name__)

#: Values up to this many bytes travel inside the merge call; larger ones are staged.
INLINE_LIMIT = 64 * 1024

#: How long a staged value lives if its merge never runs (the client died in between).
STAGE_TTL_MS = 60_000

#: How often an idle subscriber connection is pinged, and how long silence means it is lost.
PING_INTERVAL = 2.0
SILENCE_LIMIT = 3 * PING_INTERVAL

#: The longest pause between two attempts of an operation the cluster refused for now.
MAX_BACKOFF = 0.5

_RETRYABLE = (
    RedisConnectionError,
    RedisClusterException,  # a slot not covered, no node reachable: mid-failover
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    MovedError,
    AskError,
    ConnectionError,
    OSError,
)


class _NotReplicated(RedisError):
    """WAIT saw no replica acknowledge the write in time."""


def parse_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Split a Valkey URL into seed nodes and connection options.

    ``redis://[user:password@]host:port[,host:port...]`` (also ``valkey://``;
    ``rediss://`` and ``valkeys://`` use TLS). Any node of the cluster will do;
    naming several lets the KVS start while one of them is down.

    Raises:
        InvalidArgumentError: The URL is malformed.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "valkey", "valkeys"):
        raise InvalidArgumentError(
            f"kvs.valkey_url {url!r} must start with redis://, rediss://, valkey:// or valkeys://",
            {"field": "kvs.valkey_url"},
        )
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgumentError(
                f"kvs.valkey_url {url!r}: {item!r} is not host:port", {"field": "kvs.valkey_url"}
            )
        seeds.append((host.strip("[]"), int(port)))
    options: dict[str, Any] = {}
    if credentials:
        user, _, password = credentials.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    if parts.scheme in ("rediss", "valkeys"):
        options["ssl"] = True
    return seeds, options


class ValkeyStore:
    """The lattice store over a Valkey Cluster (see the module docstring).

    Use ``async with ValkeyStore(url) as store:`` or call :meth:`start` and
    :meth:`close`; every method must be called on the loop that started it.
    """

    def __init__(
        self,
        url: str,
        *,
        durable_writes: bool = True,
        operation_timeout: float = 10.0,
        max_lattice_bytes: int | None = None,
        watch_queue_limit: int = WATCH_QUEUE_LIMIT,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:
        """Prepare a store over the cluster at ``url``; nothing connects until :meth:`start`.

        Args:
            url: Seed nodes of the cluster (see :func:`parse_url`).
            durable_writes: Acknowledge a write only once a replica has it (``WAIT 1``).
            operation_timeout: The longest one operation keeps retrying while the
                cluster fails over, before it fails with UnavailableError.
            max_lattice_bytes: The most user data one write may carry; None for no limit.
            watch_queue_limit: How many undelivered events a watcher may have.
            inline_limit: Values up to this many bytes go inside the merge call.
        """
        self._seeds, self._options = parse_url(url)
        self._url = url
        self._durable = durable_writes
        self._timeout = operation_timeout
        self._max_lattice_bytes = max_lattice_bytes
        self._watch_queue_limit = watch_queue_limit
        self._inline_limit = inline_limit
        self._cluster: RedisCluster | None = None
        self._notifier: _Notifier | None = None
        self._watches: set[ValkeyWatch] = set()
        self._fresh: dict[tuple[int, str], tuple[lattice_pb2.Lattice, int]] = {}
        """Last-writer-wins lattices reads returned in this turn of the loop, with the sizes
        of their values (see :meth:`known_size`)."""
        self._started = False
        self._closing = False
        self._start_lock = asyncio.Lock()

    # Lifecycle

    async def start(self) -> None:
        """Connect, check the storage format and load the merge functions; idempotent.

        The cluster's storage format is recorded (only where none is) at the first start.

        Raises:
            UnavailableError: No seed node answers, or the cluster is not usable.
            StorageFormatError: The cluster holds data of another storage format.
        """
        async with self._start_lock:
            if self._closing:
                raise UnavailableError("the KVS store is closed and cannot be started again")
            if self._started:
                return
            cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._seeds],
                decode_responses=False,
                socket_timeout=max(self._timeout, 1.0),
                socket_connect_timeout=2.0,
                **self._options,
            )
            try:
                await cluster.initialize()
                # Before anything else is written. Set only where absent (a new cluster, or
                # one written before the marker, whose layout is format 1), in one command
                # with the read: KVS processes starting at once agree, and a newer release's
                # marker is never replaced.
                found = await cluster.set(
                    codec.FORMAT_KEY, str(STORAGE_FORMAT).encode(), nx=True, get=True
                )
                if found is None:
                    logger.info(
                        "marked the Valkey cluster at %s as storage format %d",
                        self._url,
                        STORAGE_FORMAT,
                    )
                else:
                    self._check_format(found)
                for node in cluster.get_primaries():
                    await _load_functions(node)
            except StorageFormatError:
                await cluster.aclose()
                raise
            except (RedisError, RedisClusterException, OSError) as exc:
                await cluster.aclose()
                raise UnavailableError(
                    f"cannot reach the Valkey cluster at {self._url}: {exc}; check "
                    "kvs.valkey_url and that the cluster is up (CLUSTER INFO says ok)"
                ) from exc
            self._cluster = cluster
            self._notifier = _Notifier(self, cluster)
            self._started = True
            logger.info(
                "KVS store started on the Valkey cluster at %s (%d primaries, durable writes %s)",
                self._url,
                len(cluster.get_primaries()),
                "on" if self._durable else "off",
            )

    def _check_format(self, found: bool | str | bytes) -> None:
        """Refuse a storage format marker other than this release's (see ``check_format``)."""
        where = f"the Valkey cluster at {self._url} (key {codec.FORMAT_KEY.decode()})"
        try:
            number = int(found)
        except ValueError:
            raise StorageFormatError(
                f"{where} holds {found!r}, not a storage format number; this release does "
                "not start on data it cannot identify. Restore the cluster from a backup, or "
                "check that kvs.valkey_url names the cluster of this deployment"
            ) from None
        check_format(where, number)

    async def close(self) -> None:
        """End waiters and watches and disconnect; idempotent."""
        if self._closing:
            return
        self._closing = True
        self.end_watches()
        if self._notifier is not None:
            await self._notifier.close()
        if self._cluster is not None:
            await self._cluster.aclose()
        if self._started:
            logger.info("KVS store on the Valkey cluster closed")

    async def __aenter__(self) -> ValkeyStore:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_usable(self) -> RedisCluster:
        if self._closing:
            raise UnavailableError("the KVS is shutting down; retry against a running KVS")
        if self._cluster is None:
            raise RuntimeError("ValkeyStore.start() must be awaited before the store is used")
        return self._cluster

    # The engine round trip

    async def _run(
        self,
        operation: str,
        routing_key: bytes,
        commands: Sequence[Sequence[Any]],
        *,
        durable: bool = False,
    ) -> list[Any]:
        """Send ``commands`` as one pipeline on one connection to the primary of the key's slot.

        Retries on the primary the refreshed topology names until the commands
        succeed or the operation timeout passes. With ``durable``, ``WAIT 1`` is
        appended and must report a replica.

        Returns:
            The replies, one per command (WAIT's excluded); error replies other than
            redirects are returned as ResponseError instances, not raised.

        Raises:
            UnavailableError: The cluster did not complete the operation in time.
        """
        cluster = self._check_usable()
        started = time.monotonic()
        deadline = started + self._timeout
        wait_ms = max(int(min(self._timeout / 4, 2.0) * 1000), 100)
        batch = list(commands)
        if durable:
            batch.append(("WAIT", 1, wait_ms))
        slot = cluster.keyslot(routing_key)
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    replies = await self._send(cluster, slot, batch)
                    if durable:
                        acked = replies.pop()
                        if isinstance(acked, BaseException) or int(acked) < 1:
                            raise _NotReplicated(f"WAIT 1 answered {acked!r}")
                    for reply in replies:
                        if isinstance(reply, _RETRYABLE):
                            raise reply
                        if isinstance(reply, ResponseError) and "Function not found" in str(reply):
                            await _load_functions(cluster.nodes_manager.get_node_from_slot(slot))
                            raise TryAgainError("functions were missing and are loaded now")
                    return replies
                except (*_RETRYABLE, _NotReplicated) as exc:
                    if self._closing:
                        raise UnavailableError(
                            "the KVS is shutting down; retry against a running KVS"
                        ) from exc
                    now = time.monotonic()
                    if now >= deadline:
                        raise UnavailableError(
                            f"the Valkey cluster did not complete a {operation} within "
                            f"{self._timeout:.0f}s ({type(exc).__name__}: {exc}); retry later",
                            {"operation": operation},
                        ) from exc
                    if attempt == 1 or attempt % 10 == 0:
                        logger.info("Valkey %s retried after %s: %s", operation, type(exc), exc)
                    await asyncio.sleep(min(0.05 * attempt, MAX_BACKOFF, deadline - now))
                    await self._refresh(cluster)
        finally:
            telemetry.KVS_ENGINE_DURATION.record(
                time.monotonic() - started, {"operation": operation}
            )

    async def _send(self, cluster: RedisCluster, slot: int, batch: list[Any]) -> list[Any]:
        node = cluster.nodes_manager.get_node_from_slot(slot)
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(batch))
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # Replies may be left unread: the connection cannot be reused.
            await connection.disconnect()
            raise
        finally:
            node.release(connection)

    async def _refresh(self, cluster: RedisCluster) -> None:
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await cluster.nodes_manager.initialize()

    # Reads

    async def read(self, keyspace: int, key: str) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, or None when it does not exist.

        Raises:
            InvalidArgumentError: The key is empty or the keyspace unknown.
            UnavailableError: The cluster did not answer in time.
        """
        ks = normalize_keyspace(keyspace)
        lattice, size = await self._read(ks, key)
        self._remember(ks, key, lattice, size)
        return lattice

    async def _read(self, ks: int, key: str) -> tuple[lattice_pb2.Lattice | None, int | None]:
        """The key's lattice and, for a last-writer-wins one, the bytes of its value."""
        check_key(key)
        data = codec.data_key(ks, key)
        replies = await self._run(
            "get", data, [("MULTI",), ("GET", data), ("SMEMBERS", data), ("EXEC",)]
        )
        result = replies[-1]
        if isinstance(result, BaseException):
            raise UnavailableError(f"the Valkey cluster refused a read of key {key!r}: {result}")
        value, members = result
        if isinstance(value, bytes):
            return codec.decode_lww(value), codec.lww_value_size(value)
        if isinstance(members, set | list) and members:
            return codec.decode_members(members), None
        return None, None

    def _remember(
        self, ks: int, key: str, lattice: lattice_pb2.Lattice | None, size: int | None
    ) -> None:
        """Keep the size of a value a read returns until the loop's next turn."""
        if lattice is None or size is None:
            return
        self._fresh[(ks, key)] = (lattice, size)
        asyncio.get_running_loop().call_soon(self._forget_size, (ks, key), lattice)

    def _forget_size(self, store_key: tuple[int, str], lattice: lattice_pb2.Lattice) -> None:
        fresh = self._fresh.get(store_key)
        if fresh is not None and fresh[0] is lattice:
            del self._fresh[store_key]

    def known_size(self, keyspace: int, key: str, lattice: lattice_pb2.Lattice) -> int | None:
        """The bytes of ``lattice``'s last-writer-wins value, when a read just returned it.

        A read measures the stored string (which it has anyway) and keeps the size
        beside the lattice it returns, by identity, until the loop's next turn: the
        caller that asks right after the read, in the same turn (as the servicer
        does), gets the exact size without copying the value out of the message.
        None otherwise, and for lattices not returned by a read (a value that came
        in a change message).
        """
        fresh = self._fresh.get((normalize_keyspace(keyspace), key))
        if fresh is None or fresh[0] is not lattice:
            return None
        return fresh[1]

    async def read_many(
        self, keyspace: int, keys: Sequence[str]
    ) -> list[lattice_pb2.Lattice | None]:
        """Return the lattices of several keys, in the order asked (None where missing)."""
        ks = normalize_keyspace(keyspace)
        found = await asyncio.gather(*(self._read(ks, key) for key in keys))
        # Remembered now, not as each read ends: the caller asks in this turn of the loop.
        for key, (lattice, size) in zip(keys, found, strict=True):
            self._remember(ks, key, lattice, size)
        return [lattice for lattice, _ in found]

    async def list_page(
        self, keyspace: int, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[str], str]:
        """Return one page of the keys that start with ``prefix``, ascending.

        Every call scans the keyspace on every primary (``SCAN MATCH``), so a
        page costs time in proportion to the number of matching keys.

        Raises:
            InvalidArgumentError: ``page_size`` is negative or ``page_token`` is invalid.
            UnavailableError: The cluster did not answer in time.
        """
        ks = normalize_keyspace(keyspace)
        cluster = self._check_usable()
        pattern = codec.scan_pattern(ks, prefix)
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                found: set[str] = set()
                for node in cluster.get_primaries():
                    cursor: int = 0
                    while True:
                        cursor, batch = await node.execute_command(
                            "SCAN", cursor, "MATCH", pattern, "COUNT", 1000
                        )
                        for raw in batch:
                            name = codec.key_of(ks, raw)
                            if name is not None and name.startswith(prefix):
                                found.add(name)
                        if int(cursor) == 0:
                            break
                break
            except _RETRYABLE as exc:
                if time.monotonic() >= deadline:
                    raise UnavailableError(
                        f"the Valkey cluster did not list keys within {self._timeout:.0f}s "
                        f"({exc}); retry later"
                    ) from exc
                await asyncio.sleep(0.1)
                await self._refresh(cluster)
        return page_of(sorted(found), ks, prefix, page_size, page_token)

    async def wait_for(self, keyspace: int, key: str, timeout: float) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, waiting up to ``timeout`` seconds for it to be written.

        Subscribes to the key's channel first, then reads; a change message wakes
        it (a small last-writer-wins value arrives in the message itself).

        Raises:
            UnavailableError: The store closed while waiting, or the cluster did not answer.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        check_key(key)
        if timeout <= 0:
            return await self.read(ks, key)
        assert self._notifier is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wake = asyncio.Event()
        delivered: list[lattice_pb2.Lattice] = []

        def listener(change: codec.Change | None) -> None:
            if change is None or change.key == key:
                if change is not None and change.lattice is not None:
                    delivered.append(change.lattice)
                wake.set()

        chan = codec.channel(ks, key)
        try:
            async with asyncio.timeout_at(deadline):
                await self._notifier.add(chan, listener, deadline)
        except TimeoutError:
            return None
        try:
            while True:
                wake.clear()
                current = await self.read(ks, key)
                if current is not None:
                    return current
                try:
                    async with asyncio.timeout_at(deadline):
                        await wake.wait()
                except TimeoutError:
                    return None
                if self._closing:
                    raise UnavailableError("the KVS is shutting down; retry against a running KVS")
                if delivered:
                    return delivered[-1]
        finally:
            self._notifier.remove(chan, listener)

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
        """Merge ``lattice`` into the key on the engine and return the merged lattice.

        ``request_id`` is accepted for the interface's sake: a retried merge is
        idempotent, so no memory of ids is needed. ``size``, the bytes of a
        last-writer-wins value when the caller knows them, spares reading them
        for the size check; with ``adopt`` (the caller gives ``lattice`` up) it
        is normalized in place instead of copied.

        Raises:
            InvalidArgumentError: The key is empty or the lattice malformed.
            LatticeTypeMismatchError: The key holds a lattice of another kind.
            PayloadTooLargeError: The lattice holds more than ``max_lattice_bytes``.
            UnavailableError: The cluster did not complete (and, with durable writes,
                replicate) the merge in time.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        check_key(key)
        lattices.validate(lattice)
        normalized = lattices.normalize(lattice, adopt=adopt)
        self._check_size(key, normalized, size)
        data = codec.data_key(ks, key)
        chan = codec.channel(ks, key)
        kid = codec.key_id(key)
        if lattices.kind_of(normalized) == "lww":
            blob = codec.encode_lww(normalized.lww)
            header = codec.lww_header(normalized.lww)
            commands: list[tuple[Any, ...]]
            # System keys (functions, DAGs) always go inline, so that their change
            # messages carry the value and watchers see every registration in order.
            if len(blob) <= self._inline_limit or ks == lattice_pb2.KEYSPACE_SYSTEM:
                commands = [
                    (
                        "FCALL",
                        functions.LWW_PUT,
                        1,
                        data,
                        chan,
                        kid,
                        header,
                        blob,
                        self._inline_limit,
                    )
                ]
            else:
                stage = codec.stage_key(ks, key, uuid.uuid4().hex)
                commands = [
                    ("SET", stage, blob, "PX", STAGE_TTL_MS),
                    ("FCALL", functions.LWW_PUT, 2, data, stage, chan, kid, header, b"", 0),
                ]
            replies = await self._run("put", data, commands, durable=self._durable)
            outcome = _raise_kind_error(replies[-1], key, "lww")
            if outcome[0] != 0:
                return normalized
            if len(outcome) > 1 and isinstance(outcome[1], bytes):
                return codec.decode_lww(outcome[1])
            return await self.read(ks, key) or normalized
        stage = codec.stage_key(ks, key, uuid.uuid4().hex)
        replies = await self._run(
            "put",
            data,
            [
                ("SADD", stage, *codec.encode_members(normalized)),
                ("PEXPIRE", stage, STAGE_TTL_MS),
                ("FCALL", functions.SET_PUT, 2, data, stage, chan, kid),
                ("SMEMBERS", data),
            ],
            durable=self._durable,
        )
        _raise_kind_error(replies[2], key, "set")
        members = replies[3]
        if isinstance(members, BaseException):
            raise _kind_mismatch(key, "lww", "set")
        return codec.decode_members(members)

    def _check_size(self, key: str, lattice: lattice_pb2.Lattice, size: int | None) -> None:
        limit = self._max_lattice_bytes
        if limit is None:
            return
        if size is None or lattice.WhichOneof("kind") != "lww":
            size = lattices.lattice_size(lattice)
        if size > limit:
            raise PayloadTooLargeError(
                f"key {key!r} would hold {size} bytes, over the limit of {limit} bytes; store "
                "large data in smaller pieces or raise the limit (max_payload_bytes)",
                {"key": key, "size": str(size), "limit": str(limit)},
            )

    async def delete(self, keyspace: int, key: str, *, request_id: str = "") -> bool:
        """Delete a key and return whether it existed.

        Raises:
            InvalidArgumentError: The key is empty.
            UnavailableError: The cluster did not complete (and replicate) the delete in time.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        check_key(key)
        data = codec.data_key(ks, key)
        replies = await self._run(
            "delete",
            data,
            [("FCALL", functions.DELETE, 1, data, codec.channel(ks, key), codec.key_id(key))],
            durable=self._durable,
        )
        if isinstance(replies[0], BaseException):
            raise UnavailableError(f"the Valkey cluster refused to delete {key!r}: {replies[0]}")
        return int(replies[0]) == 1

    async def delete_many(self, keyspace: int, keys: Iterable[str]) -> int:
        """Delete several keys (concurrently); return how many existed.

        Raises:
            InvalidArgumentError: A key is empty.
            UnavailableError: The cluster did not complete the deletes in time.
        """
        self._check_usable()
        ks = normalize_keyspace(keyspace)
        wanted = list(keys)
        for key in wanted:
            check_key(key)
        return sum(await asyncio.gather(*(self.delete(ks, key) for key in wanted)))

    # Watches

    async def subscribe(
        self, keyspace: int, keys: Iterable[str] = (), prefix: str = ""
    ) -> ValkeyWatch:
        """Start watching keys (any keyspace) or a key prefix (system keyspace only).

        Returns once the subscriptions are confirmed: every change made after
        that is delivered.

        Raises:
            InvalidArgumentError: Nothing to watch, an empty key, or a prefix in the
                user keyspace (changes there are announced per key only).
            UnavailableError: The store is closing or the cluster did not answer.
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
        if prefix and ks != lattice_pb2.KEYSPACE_SYSTEM:
            raise InvalidArgumentError(
                "the valkey engine watches key prefixes only in the system keyspace; "
                "watch user keys by name",
                {"field": "key_prefix"},
            )
        assert self._notifier is not None
        watch = ValkeyWatch(self, ks, wanted, prefix, self._watch_queue_limit)
        self._watches.add(watch)
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            for chan in watch.channels():
                await self._notifier.add(chan, watch._on_change, deadline)
        except BaseException:
            await watch.aclose()
            raise
        return watch

    def end_watches(self) -> None:
        """End every watch with UnavailableError, after the changes already queued."""
        for watch in list(self._watches):
            watch._end(
                UnavailableError("the KVS is shutting down; watch again on a running KVS"),
                drop_backlog=False,
            )

    def _forget(self, watch: ValkeyWatch) -> None:
        self._watches.discard(watch)
        if self._notifier is not None:
            for chan in watch.channels():
                self._notifier.remove(chan, watch._on_change)

    def watcher_count(self) -> int:
        """Return how many watches are active (for monitoring and tests)."""
        return len(self._watches)


def _kind_mismatch(key: str, stored: str, incoming: str) -> LatticeTypeMismatchError:
    names = {"lww": "last-writer-wins", "set": "set"}
    return LatticeTypeMismatchError(
        f"the key holds a {names[stored]} lattice and cannot merge a {names[incoming]} one; a "
        "key keeps one kind for its life, so write the same kind or delete the key first",
        {"stored_kind": stored, "incoming_kind": incoming, "key": key},
    )


def _raise_kind_error(reply: Any, key: str, incoming: str) -> Any:
    if isinstance(reply, ResponseError):
        text = str(reply)
        if text.startswith(functions.KIND_ERROR):
            raise _kind_mismatch(key, text.split()[-1], incoming)
        raise UnavailableError(f"the Valkey cluster refused a merge of key {key!r}: {text}")
    return reply


async def _load_functions(node: ClusterNode) -> None:
    await node.execute_command("FUNCTION", "LOAD", "REPLACE", functions.SOURCE)


class _Reread(NamedTuple):
    key: str


class _Relist(NamedTuple):
    prefix: str


class ValkeyWatch:
    """The changes to watched keys, as an async iterator of WatchEvent.

    Change messages carrying a value become events as they are; the others
    (large values, sets) and a re-subscription after a failover are read again
    when the consumer reaches them, so events keep the order of the messages.
    """

    def __init__(
        self,
        store: ValkeyStore,
        keyspace: int,
        keys: frozenset[str],
        prefix: str,
        max_queued: int,
    ) -> None:
        self.keyspace = keyspace
        self.keys = keys
        self.prefix = prefix
        self._store = store
        self._backlog: Backlog[WatchEvent | _Reread | _Relist] = Backlog(
            max_queued, self._stop_listening
        )
        self._pending: collections.deque[WatchEvent | _Reread] = collections.deque()

    def _stop_listening(self, drop_backlog: bool) -> None:
        self._store._forget(self)
        if drop_backlog:
            self._pending.clear()

    def channels(self) -> set[bytes]:
        """The channels this watch listens on."""
        if self.keyspace == lattice_pb2.KEYSPACE_SYSTEM:
            return {codec.channel(self.keyspace, "")}
        return {codec.channel(self.keyspace, key) for key in self.keys}

    def _wanted(self, key: str) -> bool:
        return key in self.keys or (bool(self.prefix) and key.startswith(self.prefix))

    def _on_change(self, change: codec.Change | None) -> None:
        if self._backlog.ended:
            return
        if change is None:
            # Re-subscribed after a lost connection: anything may have changed.
            for key in sorted(self.keys):
                self._offer(_Reread(key))
            if self.prefix:
                self._offer(_Relist(self.prefix))
            return
        if not self._wanted(change.key):
            return
        if change.kind == codec.VALUE:
            self._offer(WatchEvent(change.key, change.lattice, False))
        elif change.kind == codec.DELETED:
            self._offer(WatchEvent(change.key, None, True))
        else:
            self._offer(_Reread(change.key))

    def _offer(self, item: WatchEvent | _Reread | _Relist) -> None:
        self._backlog.offer(item)

    def _end(self, error: CloudburstError | None, *, drop_backlog: bool) -> None:
        self._backlog.end(error, drop_backlog=drop_backlog)

    def __aiter__(self) -> ValkeyWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._pending:
                item: WatchEvent | _Reread | _Relist = self._pending.popleft()
            else:
                item = await self._backlog.next()
            if isinstance(item, WatchEvent):
                return item
            if isinstance(item, _Relist):
                keys: list[str] = []
                token = ""
                while True:
                    page, token = await self._store.list_page(
                        self.keyspace, item.prefix, 1000, token
                    )
                    keys.extend(page)
                    if not token:
                        break
                self._pending.extend(_Reread(key) for key in keys)
                continue
            lattice = await self._store.read(self.keyspace, item.key)
            return WatchEvent(item.key, lattice, lattice is None)

    async def aclose(self) -> None:
        """Stop watching; events not yet read are dropped. Idempotent."""
        self._end(None, drop_backlog=True)

    async def __aenter__(self) -> ValkeyWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


Listener = Callable[[codec.Change | None], None]


class _Notifier:
    """Sharded subscriptions of one process: one connection per primary, shared by all."""

    def __init__(self, store: ValkeyStore, cluster: RedisCluster) -> None:
        self._store = store
        self._cluster = cluster
        self._listeners: dict[bytes, set[Listener]] = {}
        self._shards: dict[str, _ShardSubscriber] = {}
        self._channel_shard: dict[bytes, _ShardSubscriber] = {}
        self._recovering: set[asyncio.Task[None]] = set()
        self._closed = False

    async def add(self, chan: bytes, listener: Listener, deadline: float) -> None:
        """Call ``listener`` for every change on ``chan``; returns once subscribed.

        Raises:
            UnavailableError: No primary confirmed the subscription before ``deadline``.
        """
        self._listeners.setdefault(chan, set()).add(listener)
        try:
            await self._ensure(chan, deadline)
        except BaseException:
            self.remove(chan, listener)
            raise

    def remove(self, chan: bytes, listener: Listener) -> None:
        """Stop calling ``listener``; the channel is left when nobody listens any more."""
        listeners = self._listeners.get(chan)
        if listeners is None:
            return
        listeners.discard(listener)
        if not listeners:
            del self._listeners[chan]
            shard = self._channel_shard.pop(chan, None)
            if shard is not None:
                shard.unsubscribe(chan)

    async def _ensure(self, chan: bytes, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            shard = self._channel_shard.get(chan)
            try:
                if shard is None or shard.lost:
                    node = self._cluster.nodes_manager.get_node_from_slot(
                        self._cluster.keyslot(chan)
                    )
                    shard = await self._shard(node)
                    self._channel_shard[chan] = shard
                async with asyncio.timeout_at(deadline):
                    await shard.subscribe(chan)
                return
            except (*_RETRYABLE, TimeoutError) as exc:
                if shard is not None and self._channel_shard.get(chan) is shard:
                    del self._channel_shard[chan]
                if self._closed:
                    raise UnavailableError("the KVS is shutting down") from exc
                if loop.time() >= deadline:
                    raise UnavailableError(
                        f"the Valkey cluster did not confirm a subscription in time ({exc}); "
                        "retry later"
                    ) from exc
                await asyncio.sleep(min(0.05 * attempt, MAX_BACKOFF))
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await self._cluster.nodes_manager.initialize()

    async def _shard(self, node: ClusterNode) -> _ShardSubscriber:
        shard = self._shards.get(node.name)
        if shard is None or shard.lost:
            shard = _ShardSubscriber(self, node)
            self._shards[node.name] = shard
            shard.start_connecting()
        await shard.connected()
        return shard

    def deliver(self, chan: bytes, message: bytes) -> None:
        """Hand a message to the channel's listeners."""
        try:
            change = codec.decode_change(message)
        except ValueError:
            logger.warning("ignored a malformed change message on %r", chan)
            return
        for listener in list(self._listeners.get(chan, ())):
            listener(change)

    def lost(self, shard: _ShardSubscriber, reason: str, channels: Iterable[bytes]) -> None:
        """Subscribe ``channels`` again wherever they live now, then tell their listeners."""
        if self._closed:
            return
        moved = [c for c in channels if self._channel_shard.get(c) is shard]
        for chan in moved:
            del self._channel_shard[chan]
        if self._shards.get(shard.name) is shard and shard.lost:
            del self._shards[shard.name]
        if not moved:
            return
        logger.info("re-subscribing %d channels after %s", len(moved), reason)
        task = asyncio.ensure_future(self._resubscribe(moved))
        self._recovering.add(task)
        task.add_done_callback(self._recovering.discard)

    async def _resubscribe(self, channels: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        pending = list(channels)
        while pending and not self._closed:
            chan = pending[0]
            if chan not in self._listeners:
                pending.pop(0)
                continue
            try:
                await self._ensure(chan, loop.time() + self._store._timeout)
            except UnavailableError:
                continue  # the cluster is still failing over: keep trying
            pending.pop(0)
            for listener in list(self._listeners.get(chan, ())):
                listener(None)

    async def close(self) -> None:
        """Close every subscriber connection and stop re-subscribing."""
        self._closed = True
        for task in list(self._recovering):
            task.cancel()
        await asyncio.gather(*self._recovering, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self._shards.values()), return_exceptions=True)
        self._shards.clear()
        self._channel_shard.clear()


class _ShardSubscriber:
    """One subscriber connection to one primary, with its reader task."""

    def __init__(self, notifier: _Notifier, node: ClusterNode) -> None:
        self.name = node.name
        self._notifier = notifier
        kwargs = {
            k: v
            for k, v in node.connection_kwargs.items()
            if k not in ("retry", "connection_class", "max_connections")
        }
        kwargs["socket_timeout"] = None
        # RESP2: messages come back as replies to read, not as RESP3 pushes to a handler.
        kwargs["protocol"] = 2
        self._connection = Connection(**kwargs)
        self._subscribed: set[bytes] = set()
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        # Unsubscribes sent and not yet confirmed, per channel.
        self._unsubscribing: collections.Counter[bytes] = collections.Counter()
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.lost = False

    def start_connecting(self) -> None:
        self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            await self._connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            self.lost = True
            raise
        self._reader = asyncio.ensure_future(self._read())
        self._pinger = asyncio.ensure_future(self._ping())

    async def connected(self) -> None:
        assert self._connecting is not None
        await asyncio.shield(self._connecting)

    async def subscribe(self, chan: bytes) -> None:
        if self.lost:
            raise RedisConnectionError(f"the subscriber connection to {self.name} is lost")
        if chan in self._subscribed and not self._unsubscribing[chan]:
            return
        future = self._confirmations.get(chan)
        if future is None:
            future = self._confirmations[chan] = asyncio.get_running_loop().create_future()
            await self._connection.send_command("SSUBSCRIBE", chan)
        await asyncio.shield(future)

    def unsubscribe(self, chan: bytes) -> None:
        if self.lost or chan not in self._subscribed:
            return
        self._unsubscribing[chan] += 1
        task = asyncio.ensure_future(self._send("SUNSUBSCRIBE", chan))
        task.add_done_callback(_ignore_result)

    async def _send(self, *args: Any) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._connection.send_command(*args)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            await self._send("PING")

    async def _read(self) -> None:
        reason = "a lost subscriber connection"
        try:
            while True:
                reply = await self._connection.read_response(timeout=SILENCE_LIMIT)
                if not isinstance(reply, list) or not reply:
                    continue
                kind = bytes(reply[0]).lower()
                if kind == b"smessage":
                    self._notifier.deliver(reply[1], reply[2])
                elif kind == b"ssubscribe":
                    chan = reply[1]
                    self._subscribed.add(chan)
                    future = self._confirmations.pop(chan, None)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif kind == b"sunsubscribe":
                    chan = reply[1]
                    self._subscribed.discard(chan)
                    if self._unsubscribing[chan] > 0:
                        self._unsubscribing[chan] -= 1
                        if not self._unsubscribing[chan]:
                            del self._unsubscribing[chan]
                    else:
                        # The server dropped it: its slot moved to another primary.
                        self._notifier.lost(self, "a slot moved", [chan])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"a lost subscriber connection to {self.name} ({type(exc).__name__})"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.lost = True
        error = RedisConnectionError(reason)
        for future in self._confirmations.values():
            if not future.done():
                future.set_exception(error)
                future.add_done_callback(_ignore_result)
        self._confirmations.clear()
        if self._pinger is not None:
            self._pinger.cancel()
        channels = set(self._subscribed)
        self._subscribed.clear()
        task = asyncio.ensure_future(self._connection.disconnect())
        task.add_done_callback(_ignore_result)
        self._notifier.lost(self, reason, channels)

    async def close(self) -> None:
        self.lost = True
        for task in (self._connecting, self._reader, self._pinger):
            if task is not None:
                task.cancel()
        tasks = [t for t in (self._connecting, self._reader, self._pinger) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._connection.disconnect()


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


__all__ = ["INLINE_LIMIT", "ValkeyStore", "ValkeyWatch", "parse_url"]
