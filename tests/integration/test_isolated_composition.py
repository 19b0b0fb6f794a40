"""`start_local` with executor processes, driven from a test's own event loop thread.

The end-to-end behaviour (faults, restarts, shutdown) is in
tests/e2e/test_isolation.py; this checks the composition itself: the pool
holds the executor processes, calls and DAGs run there, and stopping the node
ends every one of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cloudburst import CloudburstConnection
from cloudburst_grpc.local import Node, start_local
from harness import LoopThread, make_config, wait_for_pool


def where(_: Any, value: int) -> tuple[int, int]:
    return value + 1, os.getpid()


def test_calls_run_in_executor_processes_that_end_with_the_node(
    start_node: Callable[..., Node], server_loop: LoopThread
) -> None:
    node = start_node(start_local(make_config(executor={"isolation": "process", "count": 2})))
    assert node.supervisor is not None and not node.executors
    processes = {c.executor_id: c.process for c in node.supervisor.children}
    assert sorted(processes) == ["executor-0", "executor-1"]
    pids = {p.pid for p in processes.values() if p is not None}
    pool = wait_for_pool(node.address, lambda response: len(response.executors) == 2)
    assert {e.address for e in pool.executors} == set(node.executor_addresses())
    with CloudburstConnection(node.address) as cloud:
        cloud.register(where, "where")
        value, pid = cloud.exec_func("where", [1]).get(timeout=60)
        assert value == 2 and pid in pids and pid != os.getpid()
        cloud.register(lambda _, value, pid: value * 10, "times_ten")
        assert cloud.register_dag("dag", ["where", "times_ten"], [("where", "times_ten")])
        assert cloud.call_dag("dag", {"where": 4}, direct_response=True) == 50
    server_loop.run(node.stop(5.0))
    assert all(p is not None and p.returncode is not None for p in processes.values())
