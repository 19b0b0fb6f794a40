"""A stage still waiting for upstreams at its call's deadline is given up (the executor's timer)."""

from __future__ import annotations

import asyncio
import logging
import time

from cloudburst.v1 import execution_pb2, function_pb2
from cloudburst_executors.executor import Executor
from cloudburst_grpc.config import ExecutorConfig


class Waiter(logging.Handler):
    """Sets an event once a record with ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.text in message:
            self.seen.set()


def join_trigger(call_id: str, upstream: str, deadline: float) -> execution_pb2.Trigger:
    dag = function_pb2.Dag(name="d", version=1, functions=["a", "b", "c"])
    dag.connections.add(upstream="a", downstream="c")
    dag.connections.add(upstream="b", downstream="c")
    schedule = execution_pb2.DagSchedule(call_id=call_id, dag=dag)
    schedule.deadline_time.FromNanoseconds(int(deadline * 1e9))
    return execution_pb2.Trigger(schedule=schedule, target_function="c", upstream_function=upstream)


async def test_each_waiting_stage_is_given_up_at_its_own_deadline() -> None:
    executor = Executor("here", "local:here", ExecutorConfig(threads=1), None, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    logger = logging.getLogger("cloudburst_executors.executor")
    late, early = Waiter("call late: stage c gave up waiting for b"), Waiter("call early")
    logger.addHandler(late)
    logger.addHandler(early)
    try:
        now = time.time()
        executor.trigger(join_trigger("late", "a", now + 1.0))
        executor.trigger(join_trigger("early", "b", now + 0.05))  # re-arms the timer sooner
        await asyncio.wait_for(early.seen.wait(), 10)
        assert "call early: stage c gave up waiting for a" in early.messages
        assert not late.seen.is_set(), "the later deadline has not passed"
        await asyncio.wait_for(late.seen.wait(), 10)
        assert time.time() >= now + 1.0
    finally:
        logger.removeHandler(late)
        logger.removeHandler(early)
        await executor.close()
