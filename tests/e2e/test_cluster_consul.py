"""Cluster mode: separate `cbgrpc` processes that find each other through a real Consul agent."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from harness import CbgrpcProcess, ConsulAgent, consul_binary, executors_of, free_ports

#: Fast health checks so failures are noticed within seconds.
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


class Cluster:
    """Processes of one test, all stopped by PID at teardown."""

    def __init__(self, consul: ConsulAgent) -> None:
        self.consul = consul
        self.env = {"CONSUL_HTTP_ADDR": consul.address, "CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
        self.procs: list[CbgrpcProcess] = []

    def start(self, command: str, *args: str) -> CbgrpcProcess:
        proc = (
            CbgrpcProcess(command, "--storage", "memory", *CHECK, *args, env=self.env)
            if (command == "kvs")
            else CbgrpcProcess(command, *CHECK, *args, env=self.env)
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@pytest.fixture
def cluster(consul: ConsulAgent) -> Iterator[Cluster]:
    procs = Cluster(consul)
    try:
        yield procs
    finally:
        procs.close()


def where(cloudburst: Any, _: int) -> str:
    """The address of the process this call ran in (mailbox ids name it)."""
    return str(cloudburst.get_id()).rpartition("@")[2]


def start_cluster(
    cluster: Cluster, executors: int = 2
) -> tuple[CbgrpcProcess, list[CbgrpcProcess]]:
    cluster.start("kvs")
    workers = [cluster.start("executor", "--id", f"executor-{i}") for i in range(executors)]
    scheduler = cluster.start("scheduler")
    wanted = {w.address for w in workers}
    executors_of(scheduler.address, lambda pool: pool == wanted)
    passing_scheduler(cluster.consul, scheduler)
    return scheduler, workers


def passing_scheduler(consul: ConsulAgent, scheduler: CbgrpcProcess) -> None:
    """Wait until Consul reports ``scheduler`` passing (what the SDK's consul:// lookup needs)."""
    consul.wait(
        "/v1/health/service/cloudburst-scheduler?passing=true",
        lambda body: (
            scheduler.address in {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in body}
        ),
    )


def test_user_guide_and_a_dag_across_both_executors(cluster: Cluster) -> None:
    scheduler, _ = start_cluster(cluster)
    # The SDK finds the scheduler through Consul.
    with CloudburstConnection(f"consul://{cluster.consul.address}") as cloud:
        assert cloud.address == scheduler.address
        incr = cloud.register(lambda _, a: a + 1, "incr")
        assert incr(1).get(timeout=30) == 2
        square = cloud.register(lambda _, a: a * a, "square")
        assert square(2).get(timeout=30) == 4
        assert cloud.register_dag("test_dag", ["incr", "square"], [("incr", "square")])
        assert cloud.call_dag("test_dag", {"incr": 1}).get(timeout=30) == 4
        assert cloud.call_dag("test_dag", {"incr": 2}, direct_response=True) == 9
        # Executors as Consul names them, answering this client directly.
        assert cloud.answer_executors == {"executor-0", "executor-1"}
    pool = executors_of(scheduler.address, lambda pool: len(pool) == 2)
    pinned = {e.address: set(e.pinned_functions) for e in pool.executors}
    # One replica per function: incr and square are pinned on different executors.
    assert sorted(map(sorted, pinned.values())) == [["incr"], ["square"]]


def test_services_register_with_health_checks_and_leave_on_shutdown(cluster: Cluster) -> None:
    _, workers = start_cluster(cluster)
    for name in ("cloudburst-kvs", "cloudburst-scheduler", "cloudburst-executor"):
        body = cluster.consul.wait(f"/v1/health/service/{name}?passing=true", lambda b: len(b) > 0)
        checks = [c for entry in body for c in entry["Checks"] if c["ServiceName"] == name]
        assert checks and all(c["Type"] == "grpc" for c in checks)
    assert workers[1].stop(signal.SIGTERM) == 0
    cluster.consul.wait(
        "/v1/health/service/cloudburst-executor",
        lambda body: [e["Service"]["ID"] for e in body] == ["executor-0"],
    )
    assert "deregistered executor-1 from Consul" in workers[1].stderr()


def sleepy(cloudburst: Any, seconds: float) -> str:
    cloudburst.put_object("sleepy-started", where(cloudburst, 0))
    time.sleep(seconds)
    return "woke"


def test_a_killed_executor_is_avoided_and_its_work_fails_clearly(cluster: Cluster) -> None:
    scheduler, workers = start_cluster(cluster)
    by_address = {w.address: w for w in workers}
    with CloudburstConnection(scheduler.address) as cloud:
        future = cloud.register(sleepy, "sleepy")(60)
        waiter = cloud.register(lambda cb, key: cb.get_object(key, timeout=30), "waiter")
        victim_address = waiter("sleepy-started").get(timeout=40)
        victim = by_address[victim_address]
        survivor = next(w for w in workers if w is not victim)
        victim.stop(signal.SIGKILL)

        # Work already on the dead executor fails with a clear error, long before its deadline.
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="lost the connection to executor"):
            future.get(timeout=50)
        assert time.monotonic() - started < 30

        # Consul marks it critical; the scheduler's pool drops it.
        cluster.consul.wait(
            "/v1/health/service/cloudburst-executor?passing=true",
            lambda body: (
                [e["Service"]["ID"] for e in body] != []
                and all(
                    f"{e['Service']['Address']}:{e['Service']['Port']}" != victim_address
                    for e in body
                )
            ),
        )
        executors_of(scheduler.address, lambda pool: pool == {survivor.address})

        # Calls made now succeed on the survivor.
        here = cloud.register(where, "where")
        ran_on = {here(i).get(timeout=30) for i in range(10)}
        assert ran_on == {survivor.address}


def test_a_new_executor_joins_and_receives_work(cluster: Cluster) -> None:
    scheduler, _ = start_cluster(cluster)
    newcomer = cluster.start("executor", "--id", "executor-late")
    executors_of(scheduler.address, lambda pool: newcomer.address in pool)
    with CloudburstConnection(scheduler.address) as cloud:
        here = cloud.register(where, "where")
        ran_on = [here(i).get(timeout=30) for i in range(40)]
        cluster.start("executor", "--id", "executor-later")
        # The client follows the membership and opens an answer stream at the latest too.
        deadline = time.monotonic() + 60
        while "executor-later" not in cloud.answer_executors:
            assert time.monotonic() < deadline, cloud.answer_executors
            time.sleep(0.05)
    assert newcomer.address in ran_on


def test_a_scheduler_restart_loses_no_registration(cluster: Cluster) -> None:
    scheduler, _ = start_cluster(cluster)
    with CloudburstConnection(scheduler.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * 10, "times10")
        assert cloud.register_dag("chain", ["incr", "times10"], [("incr", "times10")])
    assert scheduler.stop(signal.SIGTERM) == 0
    replacement = cluster.start("scheduler")
    executors_of(replacement.address, lambda pool: len(pool) == 2)
    passing_scheduler(cluster.consul, replacement)
    with CloudburstConnection(f"consul://{cluster.consul.address}") as cloud:
        assert cloud.address == replacement.address
        assert sorted(cloud.list()) == ["incr", "times10"]
        assert cloud.list_dags() == ["chain"]
        assert cloud.call_dag("chain", {"incr": 4}, direct_response=True) == 50


def test_consul_unreachable_at_start_up_is_retried_and_reported(consul_path: str) -> None:
    (port,) = free_ports(1)
    env = {"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}
    kvs = CbgrpcProcess("kvs", "--storage", "memory", "--id", "kvs-early", *CHECK, env=env)
    agent: ConsulAgent | None = None
    try:
        line = kvs.wait_for_log("cannot register kvs-early in Consul")
        assert f"127.0.0.1:{port}" in line and "retrying in" in line
        assert kvs.proc.poll() is None  # still serving, still retrying
        agent = ConsulAgent(consul_path, http_port=port)
        kvs.wait_for_log("registered kvs-early (cloudburst-kvs) in Consul")
        agent.wait("/v1/health/service/cloudburst-kvs?passing=true", lambda body: len(body) == 1)
        assert kvs.stop() == 0
    finally:
        kvs.kill()
        if agent is not None:
            agent.stop()


def test_the_cli_says_what_is_missing() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudburst_grpc",
            "scheduler",
            "--port",
            "0",
            "--kvs",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("CONSUL_")},
    )
    assert result.returncode == 2
    assert "no executors to use" in result.stderr and "--consul" in result.stderr


def test_an_unreachable_consul_in_the_sdk_is_reported() -> None:
    (port,) = free_ports(1)
    with pytest.raises(UnavailableError, match=f"cannot ask Consul at http://127.0.0.1:{port}"):
        CloudburstConnection(f"consul://127.0.0.1:{port}", connect_timeout=2)


def test_no_passing_scheduler_is_reported(consul: ConsulAgent) -> None:
    with pytest.raises(UnavailableError, match="knows no passing cloudburst-scheduler"):
        CloudburstConnection(f"consul://{consul.address}", connect_timeout=2)
