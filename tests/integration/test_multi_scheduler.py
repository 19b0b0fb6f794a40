"""Several schedulers over one KVS see each other's registrations."""

from __future__ import annotations

from collections.abc import Callable

from cloudburst import CloudburstConnection
from cloudburst_grpc.local import Node, start_scheduler_node
from harness import Cluster, make_config


def test_a_registration_through_one_scheduler_is_seen_by_another(
    cluster: Cluster, start_node: Callable[..., Node]
) -> None:
    config = make_config(scheduler={"pin_replicas": 1})
    second = start_node(
        start_scheduler_node(
            config, cluster.kvs.address, [e.address for e in cluster.executors], "scheduler-b"
        )
    )
    with (
        CloudburstConnection(cluster.address) as first_cloud,
        CloudburstConnection(second.address) as second_cloud,
    ):
        first_cloud.register(lambda _, x: f"v1-{x}", "versioned")
        assert second_cloud.exec_func("versioned", [1]).get(timeout=30) == "v1-1"
        first_cloud.register(lambda _, x: x.upper(), "tail")
        assert first_cloud.register_dag("pipe", ["versioned", "tail"], [("versioned", "tail")])
        assert second_cloud.call_dag("pipe", {"versioned": 2}, direct_response=True) == "V1-2"

        # Replace the function through the first scheduler; the second calls the new code.
        first_cloud.register(lambda _, x: f"v2-{x}", "versioned")
        assert second_cloud.exec_func("versioned", [3]).get(timeout=30) == "v2-3"
        assert second_cloud.call_dag("pipe", {"versioned": 4}, direct_response=True) == "V2-4"

        # A DAG deleted through one scheduler is gone for the other.
        assert first_cloud.delete_dag("pipe")
        assert not second_cloud.delete_dag("pipe")
