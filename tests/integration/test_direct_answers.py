"""The sink of a direct_response DAG call answers its caller directly, on an answer stream."""

from __future__ import annotations

from cloudburst import CloudburstConnection
from harness import Cluster


def test_smoke(cluster: Cluster) -> None:
    scheduler = cluster.scheduler.scheduler
    assert scheduler is not None
    with CloudburstConnection(cluster.address) as conn:
        assert conn.answer_executors == {e.executors[0].executor_id for e in cluster.executors}
        conn.register(lambda _, x: x + 1, "incr")
        conn.register(lambda _, x: x * x, "square")
        assert conn.register_dag("chain", ["incr", "square"], [("incr", "square")])
        for i in range(20):
            assert conn.call_dag("chain", {"incr": i}, direct_response=True) == (i + 1) ** 2
    assert scheduler.answered_directly == 20
    assert scheduler.sink_outcomes == 0
