"""Deleting results their callers released, in batches and off the call path.

A caller that holds a call's future owns the result stored under the key the
scheduler chose for it. When the future is gone, the SDK names the key in a
later frame of its call stream; the scheduler deletes those keys here, one
``delete_many`` at a time, collecting the keys released meanwhile into the
next batch. A failed batch is logged and dropped: its results stay stored,
which loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from cloudburst.errors import CloudburstError
from cloudburst_grpc import telemetry
from cloudburst_grpc.kvs_access import KvsAccess

logger = logging.getLogger(__name__)

#: The most keys deleted in one request.
BATCH_LIMIT = 1000


class ResultReleaser:
    """Deletes released result keys from the KVS in the background."""

    def __init__(self, kvs: KvsAccess) -> None:
        self._kvs = kvs
        self._queued: list[str] = []
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Keys released and not deleted yet."""
        return len(self._queued) + self._in_flight

    def release(self, keys: Iterable[str]) -> None:
        """Queue keys for deletion (call on the loop); returns at once."""
        self._queued.extend(keys)
        if self._queued and self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
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
        """Finish deleting what was released, waiting at most ``timeout`` seconds."""
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
