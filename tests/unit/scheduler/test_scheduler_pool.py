"""The executor pool's liveness: set aside until a health check passes, lost work told at once."""

from __future__ import annotations

import asyncio

import pytest

from cloudburst.errors import UnavailableError
from cloudburst.v1 import executor_service_pb2
from cloudburst_grpc.executor_client import PeerDirectory
from cloudburst_grpc.scheduler.pool import ExecutorPool


class FakePeer:
    """A peer whose status request answers, fails or hangs, as the test says."""

    def __init__(self, executor_id: str, address: str) -> None:
        self.executor_id = executor_id
        self.address = address
        self.mode = "answer"

    async def status(self) -> executor_service_pb2.GetExecutorStatusResponse:
        if self.mode == "fail":
            raise UnavailableError("connection refused")
        if self.mode == "hang":
            await asyncio.Event().wait()
        return executor_service_pb2.GetExecutorStatusResponse(executor_id=self.executor_id)

    async def close(self) -> None:
        pass


def make_pool(*ids: str) -> tuple[ExecutorPool, dict[str, FakePeer]]:
    fakes: dict[str, FakePeer] = {}

    def factory(executor_id: str, address: str) -> FakePeer:
        return fakes.setdefault(executor_id, FakePeer(executor_id, address))

    pool = ExecutorPool(PeerDirectory(factory))  # type: ignore[arg-type]
    for executor_id in ids:
        pool.add(executor_id, f"host:{executor_id}")
        pool.peer(executor_id)
    return pool, fakes


def up(pool: ExecutorPool) -> set[str]:
    return {v.executor_id for v in pool.views() if not v.overloaded}


async def test_an_executor_set_aside_stays_out_until_it_answers_a_health_check() -> None:
    pool, _ = make_pool("a", "b")
    pool.set_aside("a", "its stream broke")
    assert up(pool) == {"b"}
    # Discovery listing it again does not bring it back.
    await pool.sync([("a", "host:a"), ("b", "host:b")])
    assert up(pool) == {"b"}
    await pool.check_health(timeout=1.0)
    assert up(pool) == {"a", "b"}


@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_a_failed_or_hung_health_check_sets_an_executor_aside(mode: str) -> None:
    pool, fakes = make_pool("a", "b")
    fakes["a"].mode = mode
    version = pool.version
    await pool.check_health(timeout=0.05)
    assert up(pool) == {"b"}
    assert pool.version > version
    fakes["a"].mode = "answer"
    await pool.check_health(timeout=1.0)
    assert up(pool) == {"a", "b"}


async def test_work_on_a_lost_executor_is_told_once_and_other_work_is_not() -> None:
    pool, _ = make_pool("a", "b")
    told: list[tuple[str, str]] = []
    pool.track(["a", "b"], lambda reason: told.append(("dag", reason)))
    pool.track(["b"], lambda reason: told.append(("on-b", reason)))
    finished = pool.track(["a"], lambda reason: told.append(("finished", reason)))
    pool.untrack(finished)
    pool.set_aside("a", "it did not answer")
    pool.set_aside("a", "again")
    assert [who for who, _ in told] == ["dag"]
    assert "executor a" in told[0][1] and "it did not answer" in told[0][1]
    # The DAG's watch is gone from b too: losing b later tells only b's own work.
    pool.set_aside("b", "gone")
    assert [who for who, _ in told] == ["dag", "on-b"]


async def test_work_placed_on_an_executor_already_down_is_told_at_once() -> None:
    pool, _ = make_pool("a")
    pool.set_aside("a", "its stream broke")
    told: list[str] = []
    pool.track(["a"], told.append)
    assert len(told) == 1 and "its stream broke" in told[0]
    pool.track(["gone"], told.append)
    assert len(told) == 2 and "left the pool" in told[1]


async def test_an_executor_leaving_tells_its_work() -> None:
    pool, _ = make_pool("a", "b")
    told: list[str] = []
    pool.track(["a"], told.append)
    await pool.sync([("b", "host:b")])
    assert len(told) == 1 and "left the pool" in told[0]
