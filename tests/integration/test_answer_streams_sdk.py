"""The SDK's answer streams (:mod:`cloudburst._answers`) against real executors.

The executors are those of a cluster of separate gRPC servers in this process;
the scheduler is a stand-in that lists them (and one that is gone).
"""

from __future__ import annotations

import asyncio
import socket

from cloudburst._answers import AnswerStreams
from cloudburst.transport import ClientSecurity
from cloudburst.v1 import scheduler_service_pb2
from harness import Cluster

DEADLINE = 60.0


class ListingScheduler:
    """A scheduler's ListExecutors only: lists the given executors, then waits for changes."""

    def __init__(self, executors: dict[str, str]) -> None:
        self.executors = executors

    async def ListExecutors(
        self, request: scheduler_service_pb2.ListExecutorsRequest, timeout: float
    ) -> scheduler_service_pb2.ListExecutorsResponse:
        if request.min_version:
            await asyncio.Event().wait()  # no change, ever (cancelled at close)
        response = scheduler_service_pb2.ListExecutorsResponse(version=1, direct_answers=True)
        for executor_id, address in self.executors.items():
            response.executors.add(executor_id=executor_id, address=address)
        return response


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was just free)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connecting_does_not_wait_for_an_executor_it_cannot_reach(cluster: Cluster) -> None:
    live = cluster.executors[0]
    live_id = live.executors[0].executor_id
    listing = ListingScheduler({live_id: live.address, "gone": f"127.0.0.1:{free_port()}"})
    answers = AnswerStreams(
        listing,  # type: ignore[arg-type]
        ClientSecurity(),
        1 << 20,
        on_answer=lambda _: None,
        on_change=lambda: None,
        on_lost=lambda _: None,
    )
    try:
        # Registered at the live executor, refused at the other: start returns then, not
        # after its own (long) timeout.
        async with asyncio.timeout(DEADLINE / 2):
            assert await answers.start(timeout=DEADLINE)
        assert answers.registered == {live_id}
    finally:
        await answers.close()
