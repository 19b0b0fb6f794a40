"""The user guide's flow through the SDK, against `serve`'s composition and a split cluster."""

from __future__ import annotations

import logging

import pytest

from cloudburst import CloudburstConnection
from cloudburst_grpc.local import Node, start_local
from harness import Cluster, make_config


def run_guide(address: str) -> None:
    with CloudburstConnection(address, "127.0.0.1", local=True) as cloudburst:
        cloud_incr = cloudburst.register(lambda _, a: a + 1, "incr")
        assert cloud_incr(1).get() == 2
        cloud_square = cloudburst.register(lambda _, a: a * a, "square")
        assert cloud_square(2).get() == 4
        assert cloudburst.register_dag("test_dag", ["incr", "square"], [("incr", "square")]) is True
        assert cloudburst.call_dag("test_dag", {"incr": 1}).get() == 4
        assert cloudburst.call_dag("test_dag", {"incr": 3}, direct_response=True) == 16


def test_guide_flow_on_serve(local_node: Node) -> None:
    run_guide(local_node.address)


def test_guide_flow_on_split_cluster_uses_both_executors(cluster: Cluster) -> None:
    run_guide(cluster.address)
    pinned = [set(node.executors[0].pinned) for node in cluster.executors]
    # With one replica per function, incr and square are pinned on different executors,
    # so the DAG's trigger crossed between the two servers.
    assert pinned[0] and pinned[1] and pinned[0] != pinned[1]
    assert pinned[0] | pinned[1] == {"incr", "square"}


@pytest.mark.parametrize("direct", [False, True])
def test_dag_result_crosses_executors(cluster: Cluster, direct: bool) -> None:
    with CloudburstConnection(cluster.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * 10, "times10")
        assert cloud.register_dag("chain", ["incr", "times10"], [("incr", "times10")])
        for i in range(20):
            result = cloud.call_dag("chain", {"incr": i}, direct_response=direct)
            assert (result if direct else result.get(timeout=10)) == (i + 1) * 10


async def test_an_orderly_stop_logs_no_lost_watch(caplog: pytest.LogCaptureFixture) -> None:
    node = await start_local(make_config())
    with caplog.at_level(logging.INFO):
        await node.stop(1.0)
    assert "serve on port" in caplog.text, "the stop itself is logged"
    assert "re-establishing" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
