"""Fault suite, scheduler role: SIGKILL the scheduler a client uses, with another one running.

The client (given both addresses) moves to the survivor: idempotent operations
retry there by themselves, a one-shot call and a DAG call that were in flight
still have their results stored by their executors and read by their futures,
no acknowledged write is lost, and new calls and DAG calls succeed. With
Consul in ``test_faults_consul.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from faults import BOUND, pool_of, register_workload, wait_started
from harness import CbgrpcProcess, ProcessCluster, running_process_cluster


@pytest.fixture
def two_schedulers() -> Iterator[tuple[ProcessCluster, CbgrpcProcess]]:
    with running_process_cluster() as cluster:
        flags = [arg for e in cluster.executors for arg in ("--executor", e.address)]
        second = CbgrpcProcess(
            "scheduler",
            "--kvs",
            cluster.kvs.address,
            *flags,
            env={"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"},
        )
        try:
            yield cluster, second
        finally:
            second.kill()


def test_a_client_moves_to_the_surviving_scheduler(
    two_schedulers: tuple[ProcessCluster, CbgrpcProcess],
) -> None:
    cluster, second = two_schedulers
    first = cluster.scheduler
    pool_of(second.address, lambda pool: len(pool) == 2)
    with CloudburstConnection(f"{first.address},{second.address}") as conn:
        assert conn.address == first.address
        register_workload(conn)
        written = {f"acked-{i}": i for i in range(20)}
        for key, value in written.items():
            assert conn.put_object(key, value)
        in_flight = conn.exec_func("gated", ["one-shot"])
        dag_in_flight = conn.call_dag("gated-pipeline", {"gated": "dag"})
        wait_started(conn, "one-shot")
        wait_started(conn, "dag")

        first.kill()

        # Idempotent operations go on at the survivor, each retried there once at most.
        assert conn.put_object("go-one-shot", True)
        assert conn.put_object("go-dag", True)
        assert conn.address == second.address
        assert {key: conn.get_object(key) for key in written} == written
        # The call in flight when its scheduler died: its executor stored the result.
        assert in_flight.get(timeout=BOUND + 10) == "gated-one-shot"
        assert dag_in_flight.get(timeout=BOUND + 10) == "done-gated-dag"
        assert conn.exec_func("stage", ["after"]).get(timeout=30) == "after"
        assert conn.call_dag("pipeline", {"stage": "after"}).get(timeout=30) == "done-after"
        assert conn.call_dag("pipeline", {"stage": "direct"}, direct_response=True) == (
            "done-direct"
        )


def test_a_client_with_one_scheduler_reports_it_lost(
    two_schedulers: tuple[ProcessCluster, CbgrpcProcess],
) -> None:
    cluster, _ = two_schedulers
    with CloudburstConnection(cluster.scheduler.address, timeout=BOUND) as conn:
        assert conn.put_object("k", 1)
        cluster.scheduler.kill()
        with pytest.raises(UnavailableError):
            conn.get_object("k")
