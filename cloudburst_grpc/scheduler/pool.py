"""The executors a scheduler can place work on, and what it knows of their liveness and load."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cloudburst.errors import CloudburstError, ProtocolMismatchError
from cloudburst.protocol import ADVICE, CLIENT_KEY, SERVER_KEY
from cloudburst_grpc.executor_client import ExecutorPeer, PeerDirectory
from cloudburst_grpc.scheduler.policy import ExecutorView

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Watch:
    """Work placed on some executors, told if one of them is lost (see ``ExecutorPool.track``)."""

    executor_ids: tuple[str, ...]
    on_lost: Callable[[str], None]
    """Called once, on the loop, with why an executor it runs on was lost."""
    active: bool = True


@dataclass
class _Member:
    executor_id: str
    address: str
    pinned: frozenset[str] = frozenset()
    """Functions pinned there (replaced, not mutated, so views can share it)."""
    placed: int = 0
    """Calls this scheduler placed there that have not finished yet."""
    down: str = ""
    """Why no work is placed there (it failed a call or a health check); empty when up.

    A member that is down comes back only when it answers a health check again.
    """
    watches: set[Watch] = field(default_factory=set)
    """Work in flight there, told when the executor is lost."""
    cached_keys: frozenset[str] = frozenset()
    """User keys its value cache holds, as it last reported (replaced, not mutated)."""


class ExecutorPool:
    """Membership (static, or fed by discovery) plus liveness, pins and load per executor."""

    def __init__(self, peers: PeerDirectory) -> None:
        self.peers = peers
        self._members: dict[str, _Member] = {}
        self.version = 1
        """Increases whenever membership changes or an executor goes down or comes back."""
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
        """Add (or re-address) an executor; returns whether it is new.

        An executor that is down stays down until it answers a health check,
        also when discovery lists it again.
        """
        member = self._members.get(executor_id)
        if member is None:
            self._members[executor_id] = _Member(executor_id, address)
            self._bump()
            return True
        if member.address != address:
            self.set_aside(executor_id, f"it moved to {address}")
            member.address = address
            self._bump()
        return False

    async def remove(self, executor_id: str) -> None:
        """Forget an executor that left; work in flight there is told it was lost."""
        member = self._members.pop(executor_id, None)
        if member is not None:
            self._lost(member, "it left the pool")
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
        """Place no work on an executor until it answers a health check again.

        Work in flight there is told at once that the executor was lost.
        """
        member = self._members.get(executor_id)
        if member is None:
            return
        if not member.down:
            logger.warning(
                "executor %s is down (%s); no work goes there until it answers again",
                executor_id,
                reason,
            )
            member.down = reason
            self._bump()
        self._lost(member, reason)

    def _lost(self, member: _Member, reason: str) -> None:
        watches, member.watches = member.watches, set()
        message = f"executor {member.executor_id} at {member.address} was lost: {reason}"
        for watch in watches:
            if watch.active:
                self.untrack(watch)
                watch.on_lost(message)

    def is_down(self, executor_id: str) -> bool:
        """Whether an executor is down (unknown ones count as down)."""
        member = self._members.get(executor_id)
        return member is None or bool(member.down)

    def track(self, executor_ids: Iterable[str], on_lost: Callable[[str], None]) -> Watch:
        """Watch work placed on ``executor_ids``: ``on_lost`` is called if one is lost first.

        Call :meth:`untrack` when the work ends. Work placed on an executor that
        is already down or unknown is told at once.
        """
        watch = Watch(tuple(dict.fromkeys(executor_ids)), on_lost)
        for executor_id in watch.executor_ids:
            member = self._members.get(executor_id)
            if member is None or member.down:
                reason = member.down if member is not None else "it left the pool"
                watch.active = False
                for other in watch.executor_ids:
                    known = self._members.get(other)
                    if known is not None:
                        known.watches.discard(watch)
                on_lost(f"executor {executor_id} was lost: {reason}")
                return watch
            member.watches.add(watch)
        return watch

    def untrack(self, watch: Watch) -> None:
        """Stop watching work (it ended); idempotent."""
        if not watch.active:
            return
        watch.active = False
        for executor_id in watch.executor_ids:
            member = self._members.get(executor_id)
            if member is not None:
                member.watches.discard(watch)

    async def check_health(self, timeout: float) -> None:
        """Ask every executor for its status once, at most ``timeout`` seconds each.

        One that does not answer in time, or refuses (it speaks another wire
        protocol), is set aside; one that was down and answers comes back.
        """
        members = list(self._members.values())
        results = await asyncio.gather(
            *(self._probe(self.peer(m.executor_id), timeout) for m in members)
        )
        for member, failure in zip(members, results, strict=True):
            if self._members.get(member.executor_id) is not member:
                continue  # it left meanwhile
            if failure:
                self.set_aside(member.executor_id, failure)
            elif member.down:
                logger.info("executor %s answers again; placing work there", member.executor_id)
                member.down = ""
                self._bump()

    @staticmethod
    async def _probe(peer: ExecutorPeer, timeout: float) -> str:
        """Empty when the peer answered a status request in time, else why not."""
        try:
            async with asyncio.timeout(timeout):
                await peer.status()
        except TimeoutError:
            return f"it did not answer a health check within {timeout:.1f}s"
        except ProtocolMismatchError as exc:
            theirs, ours = exc.metadata.get(SERVER_KEY), exc.metadata.get(CLIENT_KEY)
            return (
                f"it speaks cloudburst-grpc wire protocol {theirs}, this scheduler speaks "
                f"{ours}; {ADVICE}"
            )
        except CloudburstError as exc:
            return f"its health check failed: {exc}"
        return ""

    async def monitor(self, interval: float, timeout: float) -> None:
        """Check every executor's health every ``interval`` seconds, until cancelled."""
        while True:
            try:
                await self.check_health(timeout)
            except Exception:
                logger.exception("executor health check failed")
            await asyncio.sleep(interval)

    def ids(self) -> list[str]:
        """The known executor ids."""
        return sorted(self._members)

    def views(self) -> list[ExecutorView]:
        """A snapshot for the placement policy (executors that are down count as overloaded)."""
        return [
            ExecutorView(
                executor_id=m.executor_id,
                address=m.address,
                pinned=m.pinned,
                cached_keys=m.cached_keys,
                load=m.placed,
                overloaded=bool(m.down),
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

    def note_cached(
        self, executor_id: str, added: Iterable[str], removed: Iterable[str], full: bool
    ) -> None:
        """Record an executor's report of the keys its cache holds (all of them when ``full``)."""
        member = self._members.get(executor_id)
        if member is not None:
            known = frozenset() if full else member.cached_keys
            member.cached_keys = (known - frozenset(removed)) | frozenset(added)

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
