"""Consul intentions: the operator decides which services may call which.

Each call from another service of the cluster is checked with the local
Consul agent (``/v1/agent/connect/authorize``): the caller's role names its
Consul service (``cloudburst-scheduler``, ...), this node's role the target,
so ``consul intention create -deny cloudburst-scheduler cloudburst-executor``
stops schedulers from reaching executors. Answers are kept for
:data:`DECISION_SECONDS`, so a changed intention applies within that time,
also to streams already open (their frames are checked too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from cloudburst_grpc.security.identity import CONSUL_SERVICE_ROLES, Identity

logger = logging.getLogger(__name__)

#: Seconds an answer of the agent is reused.
DECISION_SECONDS = 1.0

SERVICE_OF_ROLE = {role: service for service, role in CONSUL_SERVICE_ROLES.items()}


class ConsulAuthority(Protocol):
    """The two agent calls intentions need (see ConsulClient)."""

    async def mesh_identity(self) -> tuple[str, str]:
        """The trust domain and the datacenter."""
        ...

    async def authorize(self, target: str, client_uri: str, client_serial: str) -> tuple[bool, str]:
        """Whether ``client_uri`` may reach ``target``, and why."""
        ...


class IntentionCheck:
    """Decides, through the Consul agent, whether a calling service may reach this one."""

    def __init__(
        self, consul: ConsulAuthority, own_role: str, decision_seconds: float = DECISION_SECONDS
    ) -> None:
        """Check callers of a node of ``own_role`` (scheduler, executor or kvs)."""
        self._consul = consul
        self.target = SERVICE_OF_ROLE[own_role]
        self._seconds = decision_seconds
        self._domain: tuple[str, str] | None = None
        self._decisions: dict[str, tuple[float, bool, str]] = {}
        self._lock = asyncio.Lock()

    async def denial(self, identity: Identity) -> str | None:
        """None when ``identity`` may call; otherwise why not (for the caller).

        Identities that are not services of the cluster (clients, ``serve``)
        are not subject to intentions. If the agent cannot be asked, the call
        is refused: an unknown answer must not let traffic through.
        """
        source = SERVICE_OF_ROLE.get(identity.role)
        if source is None:
            return None
        now = time.monotonic()
        cached = self._decisions.get(source)
        if cached is None or cached[0] < now:
            async with self._lock:
                cached = self._decisions.get(source)
                if cached is None or cached[0] < now:
                    cached = await self._ask(source, now)
                    self._decisions[source] = cached
        _, allowed, reason = cached
        if allowed:
            return None
        return f"Consul intentions deny {source} -> {self.target}: {reason}"

    async def _ask(self, source: str, now: float) -> tuple[float, bool, str]:
        try:
            if self._domain is None:
                self._domain = await self._consul.mesh_identity()
            trust_domain, datacenter = self._domain
            uri = f"spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{source}"
            allowed, reason = await self._consul.authorize(self.target, uri, "00")
        except Exception as exc:  # the agent is down or refuses: fail closed, retry soon
            logger.warning("cannot ask Consul about intentions: %s", exc)
            return now + min(self._seconds, 0.5), False, "the Consul agent could not be asked"
        if not allowed:
            logger.info("Consul intentions deny %s -> %s: %s", source, self.target, reason)
        return now + self._seconds, allowed, reason
