"""Intention checks: who is subject to them, how long answers last, failing closed."""

from __future__ import annotations

import asyncio

from cloudburst_grpc.security.identity import Identity
from cloudburst_grpc.security.intentions import IntentionCheck


class FakeAgent:
    def __init__(self) -> None:
        self.allowed = True
        self.down = False
        self.asked: list[tuple[str, str]] = []

    async def mesh_identity(self) -> tuple[str, str]:
        return "abcd.consul", "dc1"

    async def authorize(self, target: str, client_uri: str, client_serial: str) -> tuple[bool, str]:
        if self.down:
            raise ConnectionError("agent down")
        self.asked.append((target, client_uri))
        return self.allowed, "Matched L4 intention" if not self.allowed else "allowed"


def test_services_are_checked_and_answers_reused() -> None:
    agent = FakeAgent()
    check = IntentionCheck(agent, "executor", decision_seconds=3600)
    scheduler = Identity("scheduler", "certificate", "spiffe://cloudburst.local/role/scheduler")

    async def run() -> None:
        assert await check.denial(scheduler) is None
        assert await check.denial(scheduler) is None
        assert agent.asked == [
            (
                "cloudburst-executor",
                "spiffe://abcd.consul/ns/default/dc/dc1/svc/cloudburst-scheduler",
            )
        ]
        # Clients and `cbgrpc serve` are not services of Consul: no intentions apply.
        assert await check.denial(Identity("admin", "token")) is None
        assert await check.denial(Identity("serve", "certificate")) is None
        assert len(agent.asked) == 1

    asyncio.run(run())


def test_a_denial_names_both_services_and_a_silent_agent_denies() -> None:
    agent = FakeAgent()
    agent.allowed = False
    check = IntentionCheck(agent, "kvs", decision_seconds=0)
    executor = Identity("executor", "certificate")

    async def run() -> None:
        reason = await check.denial(executor)
        assert reason == (
            "Consul intentions deny cloudburst-executor -> cloudburst-kvs: Matched L4 intention"
        )
        agent.allowed = True
        assert await check.denial(executor) is None
        agent.down = True
        assert "could not be asked" in (await check.denial(executor) or "")

    asyncio.run(run())
