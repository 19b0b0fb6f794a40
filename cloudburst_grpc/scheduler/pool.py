"""The executors a scheduler can place work on, and what it knows of their load."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudburst_grpc.executor_client import ExecutorPeer, PeerDirectory
from cloudburst_grpc.scheduler.policy import ExecutorView


@dataclass
class _Member:
    executor_id: str
    address: str
    pinned: set[str] = field(default_factory=set)
    reported_load: int = 0
    placed: int = 0
    """Calls this scheduler placed there that have not finished yet."""


class ExecutorPool:
    """Membership (static, or fed by discovery) plus pins and load per executor."""

    def __init__(self, peers: PeerDirectory) -> None:
        self.peers = peers
        self._members: dict[str, _Member] = {}

    def add(self, executor_id: str, address: str) -> None:
        """Add (or re-address) an executor."""
        member = self._members.get(executor_id)
        if member is None:
            self._members[executor_id] = _Member(executor_id, address)
        else:
            member.address = address

    async def remove(self, executor_id: str) -> None:
        """Forget an executor that left."""
        self._members.pop(executor_id, None)
        await self.peers.forget(executor_id)

    def ids(self) -> list[str]:
        """The known executor ids."""
        return sorted(self._members)

    def views(self) -> list[ExecutorView]:
        """A snapshot for the placement policy."""
        return [
            ExecutorView(
                executor_id=m.executor_id,
                address=m.address,
                pinned=frozenset(m.pinned),
                load=max(m.placed, m.reported_load),
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
            (member.pinned.add if pinned else member.pinned.discard)(function)

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

    def report_load(self, executor_id: str, load: int) -> None:
        """Record the load an executor reported."""
        member = self._members.get(executor_id)
        if member is not None:
            member.reported_load = load
