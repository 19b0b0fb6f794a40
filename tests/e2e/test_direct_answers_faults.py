"""Answer streams between real processes: a call whose sink dies still ends, fast and clear.

The sink of a ``direct_response`` DAG call answers its caller on the answer
stream the client holds at the sink's executor. When that executor is
SIGKILLed mid-call, the answer stream and the scheduler's trigger stream both
break: the call must end with the executor-loss error within the bound, never
hang, and later calls must be answered directly by the survivor.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from faults import BOUND, pool_of, process_of, wait_started
from harness import running_process_cluster


def slow_sink(cloudburst: Any, tag: str) -> str:
    """Marks itself started, then runs until the test kills its process."""
    cloudburst.put_object(f"started-{tag}", True)
    time.sleep(120)  # the workload: busy until the test kills its process
    return tag


def test_a_call_whose_sink_is_killed_ends_with_the_executor_loss_error() -> None:
    with (
        running_process_cluster() as cluster,
        CloudburstConnection(cluster.address, timeout=120) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        conn.register(slow_sink, "slow")
        conn.register(lambda _, tag: f"quick-{tag}", "quick")
        assert conn.register_dag("slow", ["slow"], [])
        assert conn.register_dag("quick", ["quick"], [])
        pins = pool_of(cluster.address, lambda pool: len(pool) == 2)
        assert conn.answer_executors == set(pins)
        (victim_id,) = [eid for eid, pinned in pins.items() if "slow" in pinned]
        victim = process_of(cluster.executors, victim_id)
        try:
            call = background.submit(conn.call_dag, "slow", {"slow": "x"}, direct_response=True)
            wait_started(conn, "x")
            killed = time.monotonic()
            victim.kill()
            with pytest.raises(UnavailableError, match=f"executor {victim_id}"):
                call.result(timeout=BOUND + 30)
            assert time.monotonic() - killed < BOUND
        finally:
            victim.kill()
        pool_of(cluster.address, lambda pool: victim_id not in pool)
        # The survivor answers the next calls, directly.
        for i in range(3):
            assert conn.call_dag("quick", {"quick": i}, direct_response=True) == f"quick-{i}"
        assert victim_id not in conn.answer_executors
