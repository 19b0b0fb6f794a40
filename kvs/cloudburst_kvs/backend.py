"""The one async lattice-store interface the KVS servicer talks to, and its two back ends.

* :class:`~cloudburst_kvs.store.LatticeStore`: every lattice in this process's
  memory, written through SQLite or kept in memory only (``cbgrpc serve``,
  one-process deployments, tests).
* :class:`~cloudburst_kvs.valkey_store.ValkeyStore`: stateless, over a Valkey
  Cluster; any number of KVS processes may serve the same cluster.

Both merge with the rules of :mod:`cloudburst_kvs.lattices` and report changes
to waiting reads and watches; ``tests/integration/kvs/test_store_contract.py``
holds them to the same contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Protocol, runtime_checkable

from cloudburst.v1 import lattice_pb2
from cloudburst_kvs.store import WatchEvent


@runtime_checkable
class WatchStream(Protocol):
    """The changes to watched keys, in the order they were made.

    Order holds per key, and across the whole system keyspace. Close the
    stream (or leave its ``async with`` block) to stop watching.
    """

    async def __aenter__(self) -> WatchStream:
        """Return the stream itself."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop watching."""
        ...

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        """Iterate the changes."""
        ...

    async def __anext__(self) -> WatchEvent:
        """The next change; raises the error that ended the stream, if any."""
        ...

    async def aclose(self) -> None:
        """Stop watching; idempotent."""
        ...


@runtime_checkable
class LatticeBackend(Protocol):
    """What the KVS needs from a lattice store (see the module docstring)."""

    async def start(self) -> None:
        """Open the store; idempotent."""
        ...

    async def close(self) -> None:
        """End waiters and watches and release every resource; idempotent."""
        ...

    def end_watches(self) -> None:
        """End every watch with UnavailableError (shutdown calls it before the server stops)."""
        ...

    async def read(self, keyspace: int, key: str) -> lattice_pb2.Lattice | None:
        """The key's lattice, or None when it does not exist."""
        ...

    async def read_many(
        self, keyspace: int, keys: Sequence[str]
    ) -> list[lattice_pb2.Lattice | None]:
        """The lattices of several keys, in the order asked (None where missing)."""
        ...

    def known_size(self, keyspace: int, key: str, lattice: lattice_pb2.Lattice) -> int | None:
        """The bytes of a last-writer-wins value a read of the key returned, if known cheaply.

        None when finding them would mean reading (copying) them out of the message.
        """
        ...

    async def wait_for(self, keyspace: int, key: str, timeout: float) -> lattice_pb2.Lattice | None:
        """The key's lattice, waiting up to ``timeout`` seconds for it to be written."""
        ...

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
        """Merge ``lattice`` into the key atomically; return the merged lattice.

        ``size``: the bytes of a last-writer-wins value, when the caller knows
        them, so that the size limit is checked without reading (copying) them.
        ``adopt``: the caller gives ``lattice`` up; the store may normalize it in
        place and keep it instead of a copy.
        """
        ...

    async def delete(self, keyspace: int, key: str, *, request_id: str = "") -> bool:
        """Delete a key; return whether it existed."""
        ...

    async def delete_many(self, keyspace: int, keys: Iterable[str]) -> int:
        """Delete several keys; return how many existed."""
        ...

    async def list_page(
        self, keyspace: int, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[str], str]:
        """One page of the keys starting with ``prefix``, ascending, and the next page's token."""
        ...

    async def subscribe(
        self, keyspace: int, keys: Iterable[str] = (), prefix: str = ""
    ) -> WatchStream:
        """Start watching; every change made after this returns is delivered."""
        ...


__all__ = ["LatticeBackend", "WatchStream"]
