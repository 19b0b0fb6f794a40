"""The user library: the first argument every function receives.

User code runs on executor threads; each library call hands a coroutine to the
event loop and waits for it with a deadline, so the loop is never blocked and
no call waits forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from cloudburst.errors import CloudburstTimeoutError
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize

from cloudburst_grpc.kvs_access import KvsAccess

T = TypeVar("T")


class LoopBridge:
    """Runs coroutines on the event loop from user threads, with a deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout

    def run(self, coro: Coroutine[Any, Any, T], what: str, timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result.

        Raises:
            CloudburstTimeoutError: It did not finish within the timeout.
        """
        limit = self.timeout if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(limit)
        except TimeoutError:
            future.cancel()
            raise CloudburstTimeoutError(f"{what} did not finish within {limit:.1f}s") from None


class UserLibrary:
    """What a function can do besides compute: read and write the KVS, message peers.

    The original system's names ``get``, ``put`` and ``getid`` are aliases.
    """

    def __init__(
        self,
        bridge: LoopBridge,
        kvs: KvsAccess,
        clock: LwwClock,
        max_payload_bytes: int,
        call_id: str,
    ) -> None:
        self._bridge = bridge
        self._kvs = kvs
        self._clock = clock
        self._limit = max_payload_bytes
        self._call_id = call_id

    def get_object(self, key: str) -> Any:
        """Return the value stored at ``key``, or None when the key does not exist."""
        _check_key(key)
        lattice = self._bridge.run(self._kvs.get(key), f"get_object({key!r})")
        return None if lattice is None else lattice_value(lattice)

    def put_object(self, key: str, value: Any) -> bool:
        """Store ``value`` at ``key`` (last writer wins); returns True once durable."""
        _check_key(key)
        data = serialize(value, what=f"value for key {key!r}", limit=self._limit)
        self._bridge.run(self._kvs.put(key, lww(data, self._clock)), f"put_object({key!r})")
        return True

    get = get_object
    put = put_object

    def get_id(self) -> str:
        """Return this invocation's messaging id (see the messaging service)."""
        raise NotImplementedError(
            "messaging (get_id/send/recv) is not available in this version of cloudburst-grpc"
        )

    getid = get_id

    def send(self, dest: str, msg: Any) -> None:
        """Send ``msg`` to the function whose id is ``dest``."""
        raise NotImplementedError(
            "messaging (get_id/send/recv) is not available in this version of cloudburst-grpc"
        )

    def recv(self, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Return the messages received so far."""
        raise NotImplementedError(
            "messaging (get_id/send/recv) is not available in this version of cloudburst-grpc"
        )


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        from cloudburst.errors import InvalidArgumentError

        raise InvalidArgumentError(f"a KVS key must be a non-empty string, not {key!r}")
