"""The KVS operations the scheduler and executors need, independent of transport.

In one process (``cbgrpc serve``) they are served by the store directly; across
processes over gRPC. ``cloudburst_kvs.access`` holds both adapters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from cloudburst.chunks import Stored
from cloudburst.v1 import lattice_pb2

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM


class KvsAccess(Protocol):
    """Async access to the lattice KVS."""

    async def get(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> lattice_pb2.Lattice | None:
        """Return the key's lattice or None; with ``wait``, wait up to ``timeout`` for it."""
        ...

    async def get_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> dict[str, lattice_pb2.Lattice | None]:
        """Return every key's lattice (None for a missing key), read in one batch."""
        ...

    async def put(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
    ) -> None:
        """Merge ``lattice`` into the key durably."""
        ...

    async def delete(self, key: str, keyspace: lattice_pb2.Keyspace.ValueType = USER) -> bool:
        """Delete the key; return whether it existed."""
        ...

    async def delete_many(
        self, keys: Sequence[str], keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> int:
        """Delete the keys; return how many existed."""
        ...

    def watch_keys(
        self, prefix: str, keyspace: lattice_pb2.Keyspace.ValueType = USER
    ) -> AsyncIterator[str]:
        """Yield ``""`` once watching, then the key of every change under ``prefix``."""
        ...

    async def list_keys(
        self,
        prefix: str = "",
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
    ) -> list[str]:
        """Return every key of the keyspace that starts with ``prefix``, sorted."""
        ...


@runtime_checkable
class StoredKvs(Protocol):
    """A :class:`KvsAccess` that can leave a large value in the chunks it came in."""

    async def get_stored(
        self,
        key: str,
        keyspace: lattice_pb2.Keyspace.ValueType = USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Stored | None:
        """As :meth:`KvsAccess.get`; a large last-writer-wins value may come as a ``LargeValue``."""
        ...


async def get_stored(
    kvs: KvsAccess,
    key: str,
    *,
    wait: bool = False,
    timeout: float | None = None,
) -> Stored | None:
    """Read a user key; a large value stays in its chunks when ``kvs`` can leave it there."""
    if isinstance(kvs, StoredKvs):
        return await kvs.get_stored(key, wait=wait, timeout=timeout)
    return await kvs.get(key, wait=wait, timeout=timeout)
