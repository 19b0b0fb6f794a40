"""Fault suite, scheduler role: SIGKILL or SIGSTOP the scheduler a client uses, with another one
running.

The client (given both addresses) moves to the survivor: idempotent operations
retry there by themselves, a one-shot call and a DAG call that were in flight
still have their results stored by their executors and read by their futures,
no acknowledged write is lost, and new calls and DAG calls succeed. A stopped
(hung) scheduler keeps its connections open; the client learns that it stopped
answering from its keepalive pings, within seconds. With Consul in
``test_faults_consul.py``.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from faults import BOUND, pool_of, register_workload, resume_and_kill, wait_started
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
            resume_and_kill(second)
            resume_and_kill(cluster.scheduler)


def test_a_client_moves_to_the_surviving_scheduler(
    two_schedulers: tuple[ProcessCluster, CbgrpcProcess],
) -> None:
    cluster, second = two_schedulers
    first = cluster.scheduler
    pool_of(second.address, lambda pool: len(pool) == 2)
    # Objects through the scheduler (as token clients of a TLS cluster reach them), so that
    # object operations exercise its failover too; direct KVS access never touches it.
    with CloudburstConnection(f"{first.address},{second.address}", direct_kvs=False) as conn:
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
    with (
        CloudburstConnection(cluster.scheduler.address, timeout=BOUND) as direct,
        CloudburstConnection(cluster.scheduler.address, timeout=BOUND, direct_kvs=False) as conn,
    ):
        assert direct.kvs_address == cluster.kvs.address
        assert conn.put_object("k", 1)
        cluster.scheduler.kill()
        with pytest.raises(UnavailableError):
            conn.get_object("k")
        with pytest.raises(UnavailableError):
            direct.exec_func("stage", ["lost"]).get(timeout=BOUND)
        # Objects at the KVS itself do not need the scheduler.
        assert direct.get_object("k") == 1


#: Each request's own deadline in the SIGSTOP test: an operation that waited on the stopped
#: scheduler instead of moving on would run into it and raise CloudburstTimeoutError.
HUNG_TIMEOUT = 30.0


def test_a_client_moves_away_from_a_hung_scheduler(
    two_schedulers: tuple[ProcessCluster, CbgrpcProcess],
) -> None:
    cluster, second = two_schedulers
    first = cluster.scheduler
    pool_of(second.address, lambda pool: len(pool) == 2)
    with (
        CloudburstConnection(
            f"{first.address},{second.address}", timeout=HUNG_TIMEOUT, direct_kvs=False
        ) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        register_workload(conn)
        written = {f"acked-{i}": i for i in range(20)}
        for key, value in written.items():
            assert conn.put_object(key, value)
        in_flight = conn.exec_func("gated", ["one-shot"])
        dag_in_flight = conn.call_dag("gated-pipeline", {"gated": "dag"})
        direct = background.submit(
            conn.call_dag, "gated-pipeline", {"gated": "direct"}, direct_response=True
        )
        for tag in ("one-shot", "dag", "direct"):
            wait_started(conn, tag)

        os.kill(first.proc.pid, signal.SIGSTOP)
        # The first idempotent operation notices the hang and goes on at the survivor.
        assert conn.put_object("go-one-shot", True)
        assert conn.address == second.address
        assert conn.put_object("go-dag", True)
        assert conn.put_object("go-direct", True)
        assert {key: conn.get_object(key) for key in written} == written
        # Calls in flight: their executors store the results, read through the survivor.
        assert in_flight.get(timeout=HUNG_TIMEOUT) == "gated-one-shot"
        assert dag_in_flight.get(timeout=HUNG_TIMEOUT) == "done-gated-dag"
        # A direct response travelled on the stopped scheduler's stream: it may be lost.
        try:
            assert direct.result(timeout=HUNG_TIMEOUT + 5) == "done-gated-direct"
        except UnavailableError as exc:
            assert first.address in str(exc), exc
        assert conn.exec_func("stage", ["after"]).get(timeout=30) == "after"
        assert conn.call_dag("pipeline", {"stage": "after"}).get(timeout=30) == "done-after"
        assert conn.call_dag("pipeline", {"stage": "direct"}, direct_response=True) == (
            "done-direct"
        )
