"""Fault suite with Consul: an executor or a scheduler lost, and the Consul agent itself lost.

- An executor SIGKILLed or SIGSTOPped: the same bounds as with static
  addresses (``test_faults_executor.py``).
- Two schedulers: a ``consul://`` client whose scheduler is SIGKILLed or
  SIGSTOPped moves to the other; idempotent operations retry there by
  themselves.
- The Consul agent SIGKILLed: the cluster goes on serving from what each
  process cached; nothing acknowledged is lost.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from cloudburst import CloudburstConnection
from faults import (
    BOUND,
    lose_an_executor_under_load,
    pool_of,
    register_workload,
    resume_and_kill,
    wait_started,
)
from harness import CbgrpcProcess, ConsulAgent, consul_binary

#: Fast Consul health checks, so Consul notices a lost process within seconds.
CHECK = ["--consul-check-interval", "1"]


@pytest.fixture(scope="module")
def consul_path() -> str:
    return consul_binary()


@pytest.fixture
def consul(consul_path: str) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_path)
    try:
        yield agent
    finally:
        agent.stop()


class Processes:
    """The `cbgrpc` processes of one test, found through Consul; all killed by PID at teardown."""

    def __init__(self, consul: ConsulAgent) -> None:
        self.env = {"CONSUL_HTTP_ADDR": consul.address, "CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
        self.procs: list[CbgrpcProcess] = []

    def start(self, command: str, *args: str) -> CbgrpcProcess:
        storage = ["--storage", "memory"] if command == "kvs" else []
        proc = CbgrpcProcess(command, *storage, *CHECK, *args, env=self.env)
        self.procs.append(proc)
        return proc

    def cluster(self, schedulers: int = 1) -> tuple[list[CbgrpcProcess], list[CbgrpcProcess]]:
        """Start a KVS, two executors and ``schedulers`` schedulers; wait until each sees both."""
        self.start("kvs")
        workers = [self.start("executor", "--id", f"executor-{i}") for i in range(2)]
        started = [self.start("scheduler") for _ in range(schedulers)]
        for scheduler in started:
            pool_of(scheduler.address, lambda pool: len(pool) == 2)
        return started, workers

    def close(self) -> None:
        for proc in reversed(self.procs):
            resume_and_kill(proc)


@pytest.fixture
def processes(consul: ConsulAgent) -> Iterator[Processes]:
    procs = Processes(consul)
    try:
        yield procs
    finally:
        procs.close()


def passing_schedulers(consul: ConsulAgent, count: int) -> set[str]:
    body = consul.wait(
        "/v1/health/service/cloudburst-scheduler?passing=true", lambda b: len(b) == count
    )
    return {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in body}


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_lost_executor_with_consul(processes: Processes, fault: str) -> None:
    (scheduler,), workers = processes.cluster()
    lose_an_executor_under_load(scheduler.address, workers, fault)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_consul_client_moves_to_the_other_scheduler(
    processes: Processes, consul: ConsulAgent, fault: str
) -> None:
    schedulers, _ = processes.cluster(schedulers=2)
    passing_schedulers(consul, 2)
    # A request that waited on a stopped scheduler would run into this deadline and fail.
    # Objects through the scheduler, so that object operations exercise its failover too.
    with CloudburstConnection(f"consul://{consul.address}", timeout=30, direct_kvs=False) as conn:
        register_workload(conn)
        written = {f"acked-{i}": i for i in range(20)}
        for key, value in written.items():
            assert conn.put_object(key, value)
        in_flight = conn.exec_func("gated", ["one-shot"])
        wait_started(conn, "one-shot")
        used = next(s for s in schedulers if s.address == conn.address)
        if fault == "kill":
            used.kill()
        else:
            os.kill(used.proc.pid, signal.SIGSTOP)

        assert conn.put_object("go-one-shot", True)
        assert conn.address != used.address
        assert {key: conn.get_object(key) for key in written} == written
        assert in_flight.get(timeout=BOUND + 10) == "gated-one-shot"
        assert conn.call_dag("pipeline", {"stage": "after"}).get(timeout=30) == "done-after"
        assert conn.call_dag("pipeline", {"stage": "direct"}, direct_response=True) == (
            "done-direct"
        )


def test_the_cluster_serves_while_the_consul_agent_is_gone(
    processes: Processes, consul: ConsulAgent
) -> None:
    (scheduler,), _ = processes.cluster()
    with CloudburstConnection(scheduler.address) as conn:
        register_workload(conn)
        assert conn.put_object("before", 1)
        consul.proc.kill()
        consul.proc.wait(10)
        # Every process works from what it cached: calls, DAG calls and writes go on.
        assert conn.exec_func("stage", ["during"]).get(timeout=30) == "during"
        assert conn.call_dag("pipeline", {"stage": "during"}).get(timeout=30) == "done-during"
        assert conn.call_dag("pipeline", {"stage": "x"}, direct_response=True) == "done-x"
        assert conn.put_object("during", 2)
        assert (conn.get_object("before"), conn.get_object("during")) == (1, 2)
        assert pool_of(scheduler.address, lambda pool: len(pool) == 2)
