"""A call that cannot reach its executor at all is placed on another, transparently."""

from __future__ import annotations

from collections.abc import Callable

from cloudburst import CloudburstConnection
from cloudburst_grpc.local import Node, start_executor_node, start_kvs_node, start_scheduler_node
from harness import LoopThread, make_config


def test_a_call_that_never_reached_its_executor_runs_on_another(
    start_node: Callable[..., Node], server_loop: LoopThread
) -> None:
    # Health checks too rare to notice the stopped executor first: the call path must.
    config = make_config(scheduler={"pin_replicas": 1, "health_interval_seconds": 600.0})
    kvs = start_node(start_kvs_node(config))
    executors = [
        start_node(start_executor_node(config, kvs.address, f"executor-{i}")) for i in range(2)
    ]
    scheduler = start_node(
        start_scheduler_node(config, kvs.address, [e.address for e in executors])
    )
    assert scheduler.scheduler is not None
    pool = scheduler.scheduler.pool
    with CloudburstConnection(scheduler.address) as conn:
        conn.register(lambda _, x: x + 1, "incr")
        assert conn.register_dag("only", ["incr"], [])
        (pinned,) = pool.pinned_on("incr")
        gone = next(e for e in executors if e.executors[0].executor_id == pinned)
        server_loop.run(gone.stop(0.1))
        # Placed where the function is pinned, on an executor no stream reaches any more.
        assert conn.exec_func("incr", [1]).get(timeout=30) == 2
    assert [v.executor_id for v in pool.views() if not v.overloaded] == [
        e.executors[0].executor_id for e in executors if e is not gone
    ]
