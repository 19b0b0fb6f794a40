"""Function and DAG definitions, stored in the KVS's system keyspace.

The system keyspace is separate from users' keys, so no user key can collide
with a definition. Definitions are protobuf messages stored as raw bytes in a
last-writer-wins lattice, readable by any client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from cloudburst.serialization import LwwClock, lww
from cloudburst.v1 import function_pb2, lattice_pb2, value_pb2
from cloudburst_grpc.dags import DAG_PREFIX, FUNCTION_PREFIX, dag_key, function_key
from cloudburst_grpc.kvs_access import SYSTEM, KvsAccess

logger = logging.getLogger(__name__)


class Registry:
    """Reads and writes definitions through a cache.

    The cache is kept current by this scheduler's writes and, once
    :meth:`follow` runs, by a watch on the system keyspace, so writes made
    through other schedulers are seen too.
    """

    def __init__(self, kvs: KvsAccess, clock: LwwClock) -> None:
        self._kvs = kvs
        self._clock = clock
        self._functions: dict[str, function_pb2.Function] = {}
        self._dags: dict[str, function_pb2.Dag] = {}

    async def follow(self) -> None:
        """Drop cached definitions as they change anywhere (runs until cancelled)."""
        await asyncio.gather(
            self._follow(FUNCTION_PREFIX, self._functions), self._follow(DAG_PREFIX, self._dags)
        )

    async def _follow(self, prefix: str, cache: dict[str, Any]) -> None:
        attempt = 0
        while True:
            try:
                async for key in self._kvs.watch_keys(prefix, SYSTEM):
                    if not key:  # (re)established: anything cached before may be stale
                        cache.clear()
                        attempt = 0
                    else:
                        cache.pop(key.removeprefix(prefix), None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("watch on %s definitions ended (%s); re-establishing", prefix, exc)
            cache.clear()
            attempt += 1
            await asyncio.sleep(min(5.0, 0.1 * 2**attempt))

    async def get_function(self, name: str) -> function_pb2.Function | None:
        """Return the function, or None when it is not registered."""
        cached = self._functions.get(name)
        if cached is not None:
            return cached
        lattice = await self._kvs.get(function_key(name), SYSTEM)
        if lattice is None:
            return None
        function = function_pb2.Function.FromString(lattice.lww.value.data)
        self._functions[name] = function
        return function

    def cached_functions(self, names: Iterable[str]) -> tuple[function_pb2.Function, ...] | None:
        """The functions, if every one is cached; None if one is not (see :meth:`get_function`).

        Spares a call whose definitions are all cached a wait for each (the usual case).
        """
        cache = self._functions
        try:
            return tuple([cache[name] for name in names])
        except KeyError:
            return None

    async def put_function(self, function: function_pb2.Function) -> None:
        """Store a function durably."""
        await self._kvs.put(function_key(function.name), self._lattice(function), SYSTEM)
        self._functions[function.name] = function

    async def delete_function(self, name: str) -> bool:
        """Delete a function; return whether it existed."""
        self._functions.pop(name, None)
        return await self._kvs.delete(function_key(name), SYSTEM)

    async def function_names(self, prefix: str = "") -> list[str]:
        """Return the registered function names starting with ``prefix``, sorted."""
        keys = await self._kvs.list_keys(FUNCTION_PREFIX + prefix, SYSTEM)
        return [k.removeprefix(FUNCTION_PREFIX) for k in keys]

    async def get_dag(self, name: str) -> function_pb2.Dag | None:
        """Return the DAG, or None when it is not registered."""
        cached = self._dags.get(name)
        if cached is not None:
            return cached
        lattice = await self._kvs.get(dag_key(name), SYSTEM)
        if lattice is None:
            return None
        dag = function_pb2.Dag.FromString(lattice.lww.value.data)
        self._dags[name] = dag
        return dag

    async def put_dag(self, dag: function_pb2.Dag) -> None:
        """Store a DAG durably."""
        await self._kvs.put(dag_key(dag.name), self._lattice(dag), SYSTEM)
        self._dags[dag.name] = dag

    async def delete_dag(self, name: str) -> bool:
        """Delete a DAG; return whether it existed."""
        self._dags.pop(name, None)
        return await self._kvs.delete(dag_key(name), SYSTEM)

    async def dag_names(self, prefix: str = "") -> list[str]:
        """Return the registered DAG names starting with ``prefix``, sorted."""
        keys = await self._kvs.list_keys(DAG_PREFIX + prefix, SYSTEM)
        return [k.removeprefix(DAG_PREFIX) for k in keys]

    async def dags(self) -> list[function_pb2.Dag]:
        """Return every registered DAG."""
        found = [await self.get_dag(name) for name in await self.dag_names()]
        return [d for d in found if d is not None]

    def _lattice(self, message: function_pb2.Function | function_pb2.Dag) -> lattice_pb2.Lattice:
        value = value_pb2.Value(
            data=message.SerializeToString(), serializer=value_pb2.SERIALIZER_BYTES
        )
        return lww(value, self._clock)
