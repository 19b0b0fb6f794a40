"""The executors a scheduler can place work on, and what it knows of their load."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cloudburst_grpc.executor_client import ExecutorPeer, PeerDirectory
from cloudburst_grpc.scheduler.policy import ExecutorView


@dataclass
class _Member:
    executor_id: str
    address: str
    pinned: frozenset[str] = frozenset()
    """Functions pinned there (replaced, not mutated, so views can share it)."""
    placed: int = 0
    """Calls this scheduler placed there that have not finished yet."""
    set_aside_until: float = 0.0
    """Monotonic time until which no work is placed there (it just failed)."""


logger = logging.getLogger(__name__)

#: Seconds an executor that failed a call is left out of placement (unless discovery re-adds it).
SET_ASIDE_SECONDS = 30.0


class ExecutorPool:
    """Membership (static, or fed by discovery) plus pins and load per executor."""

    def __init__(self, peers: PeerDirectory) -> None:
        self.peers = peers
        self._members: dict[str, _Member] = {}
        self.version = 1
        """Increases whenever membership changes or an executor is set aside."""
        self._changed: asyncio.Condition | None = None

    def _bump(self) -> None:
        self.version += 1
        if self._changed is not None:
            condition = self._changed

            async def notify() -> None:
                async with condition:
                    condition.notify_all()

            asyncio.get_running_loop().create_task(notify())

    async def wait_newer(self, version: int, timeout: float) -> None:
        """Wait until the membership version exceeds ``version``, at most ``timeout`` seconds."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.version > version)
        except TimeoutError:
            return

    def add(self, executor_id: str, address: str) -> bool:
        """Add (or re-address) an executor; returns whether it is new."""
        member = self._members.get(executor_id)
        if member is None:
            self._members[executor_id] = _Member(executor_id, address)
            self._bump()
            return True
        if member.address != address or member.set_aside_until:
            member.address = address
            member.set_aside_until = 0.0
            self._bump()
        return False

    async def remove(self, executor_id: str) -> None:
        """Forget an executor that left."""
        if self._members.pop(executor_id, None) is not None:
            self._bump()
        await self.peers.forget(executor_id)

    async def sync(self, executors: Iterable[tuple[str, str]]) -> list[str]:
        """Make membership equal ``(id, address)`` pairs from discovery; returns the new ids."""
        wanted = dict(executors)
        for executor_id in [m for m in self._members if m not in wanted]:
            logger.info("executor %s left the pool", executor_id)
            await self.remove(executor_id)
        added = [eid for eid, address in wanted.items() if self.add(eid, address)]
        for executor_id in added:
            logger.info("executor %s joined the pool at %s", executor_id, wanted[executor_id])
        return added

    def set_aside(self, executor_id: str, reason: str) -> None:
        """Place no work on an executor for a while, after it failed a call."""
        member = self._members.get(executor_id)
        if member is not None and member.set_aside_until <= time.monotonic():
            logger.warning(
                "setting executor %s aside for %.0fs: %s", executor_id, SET_ASIDE_SECONDS, reason
            )
            member.set_aside_until = time.monotonic() + SET_ASIDE_SECONDS
            self._bump()

    def ids(self) -> list[str]:
        """The known executor ids."""
        return sorted(self._members)

    def views(self) -> list[ExecutorView]:
        """A snapshot for the placement policy (executors set aside count as overloaded)."""
        now = time.monotonic()
        return [
            ExecutorView(
                executor_id=m.executor_id,
                address=m.address,
                pinned=m.pinned,
                load=m.placed,
                overloaded=m.set_aside_until > now,
            )
            for m in self._members.values()
        ]

    def peer(self, executor_id: str) -> ExecutorPeer:
        """The peer of a member."""
        member = self._members[executor_id]
        return self.peers.get(executor_id, member.address)

    def address(self, executor_id: str) -> str:
        """The address of a member."""
        return self._members[executor_id].address

    def note_pinned(self, executor_id: str, function: str, pinned: bool) -> None:
        """Record a pin or unpin."""
        member = self._members.get(executor_id)
        if member is not None:
            member.pinned = (member.pinned | {function}) if pinned else (member.pinned - {function})

    def pinned_on(self, function: str) -> list[str]:
        """The executors a function is pinned on."""
        return sorted(m.executor_id for m in self._members.values() if function in m.pinned)

    def started(self, executor_id: str) -> None:
        """Count a call placed on an executor."""
        member = self._members.get(executor_id)
        if member is not None:
            member.placed += 1

    def finished(self, executor_id: str) -> None:
        """Count a placed call as finished."""
        member = self._members.get(executor_id)
        if member is not None and member.placed > 0:
            member.placed -= 1
