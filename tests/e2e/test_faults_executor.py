"""Fault suite, executor role: SIGKILL or SIGSTOP an executor while calls run on it.

Every call in flight there ends within the bound with a clear UNAVAILABLE
error (one-shot calls, DAG calls read with ``.get()`` and with a direct
response, whichever stage ran there), calls placed afterwards succeed on the
survivor, and the executor comes back only once it answers health checks.
Static addresses here; with Consul in ``test_faults_consul.py``.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from faults import lose_an_executor_under_load, pool_of, process_of, wait_started
from harness import running_process_cluster


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_calls_on_a_lost_executor_end_fast_and_the_survivor_serves(fault: str) -> None:
    with running_process_cluster() as cluster:
        lose_an_executor_under_load(cluster.address, cluster.executors, fault)


def first_run_hangs(cloudburst: Any, tag: str) -> str:
    """Hangs on its first run for ``tag`` (marking it started); later runs return at once."""
    if cloudburst.get_object(f"attempted-{tag}") is None:
        cloudburst.put_object(f"attempted-{tag}", True)
        cloudburst.put_object(f"started-{tag}", True)
        time.sleep(120)  # the workload: busy until the test kills its process
    return f"again-{tag}"


def test_calls_registered_with_retries_run_again_on_the_survivor() -> None:
    with (
        running_process_cluster() as cluster,
        CloudburstConnection(cluster.address) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        conn.register(first_run_hangs, "first", retries=1)
        conn.register(lambda _, value: f"done-{value}", "last")
        assert conn.register_dag("retried", ["first", "last"], [("first", "last")], retries=1)
        pins = pool_of(cluster.address, lambda pool: len(pool) == 2)
        (victim_id,) = [eid for eid, pinned in pins.items() if "first" in pinned]
        victim = process_of(cluster.executors, victim_id)
        try:
            via_key = conn.call_dag("retried", {"first": "get"})
            direct = background.submit(
                conn.call_dag, "retried", {"first": "direct"}, direct_response=True
            )
            one_shot = conn.exec_func("first", ["one-shot"])
            for tag in ("get", "direct", "one-shot"):
                wait_started(conn, tag)
            victim.kill()
            # At-least-once: each runs again on the survivor, where its first run is recorded.
            assert via_key.get(timeout=30) == "done-again-get"
            assert direct.result(timeout=30) == "done-again-direct"
            assert one_shot.get(timeout=30) == "again-one-shot"
        finally:
            victim.kill()
