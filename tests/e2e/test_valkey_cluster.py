"""Cluster mode over Valkey: two `cbgrpc kvs --engine valkey` processes found through Consul.

The KVS tier is two identical, stateless KVS processes over one real Valkey
Cluster (3 primaries x 2 replicas on loopback); executors and the scheduler
use whichever Consul names.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.v1 import (
    kvs_service_pb2,
    kvs_service_pb2_grpc,
    lattice_pb2,
    value_pb2,
)
from harness import CbgrpcProcess, ConsulAgent, consul_binary, executors_of
from valkey_cluster import ValkeyCluster

HERE = Path(__file__).resolve().parent
GUIDE = HERE / "data" / "function-execution.md"

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


class Deployment:
    """Two KVS processes over Valkey, two executors and a scheduler, stopped by PID."""

    def __init__(self, consul: ConsulAgent, valkey: ValkeyCluster) -> None:
        self.consul = consul
        self.env = {"CONSUL_HTTP_ADDR": consul.address, "CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
        self.procs: list[CbgrpcProcess] = []
        self.kvs = [
            self.start(
                "kvs",
                *("--engine", "valkey", "--valkey-url", valkey.url, "--id", f"kvs-{i}"),
                *("--metrics-port", "0"),
            )
            for i in range(2)
        ]
        self.wait_kvs(lambda ids: ids == {"kvs-0", "kvs-1"})
        self.executors = [self.start("executor", "--id", f"executor-{i}") for i in range(2)]
        self.scheduler = self.start("scheduler")
        wanted = {e.address for e in self.executors}
        executors_of(self.scheduler.address, lambda pool: pool == wanted)
        address = self.scheduler.address
        consul.wait(
            "/v1/health/service/cloudburst-scheduler?passing=true",
            lambda body: (
                address in {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in body}
            ),
        )

    def start(self, command: str, *args: str) -> CbgrpcProcess:
        proc = CbgrpcProcess(command, *CHECK, *args, env=self.env)
        self.procs.append(proc)
        return proc

    def wait_kvs(self, predicate: Any) -> None:
        self.consul.wait(
            "/v1/health/service/cloudburst-kvs?passing=true",
            lambda body: predicate({e["Service"]["ID"] for e in body}),
        )

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@pytest.fixture
def deployment(consul: ConsulAgent, valkey_cluster: ValkeyCluster) -> Iterator[Deployment]:
    for node in valkey_cluster.primaries():
        valkey_cluster.command(node, "FLUSHALL")
    started = None
    try:
        started = Deployment(consul, valkey_cluster)
        yield started
    finally:
        if started is not None:
            started.close()


def put_value(address: str, key: str, data: bytes) -> None:
    lattice = lattice_pb2.Lattice()
    lattice.lww.value.data = data
    lattice.lww.value.serializer = value_pb2.SERIALIZER_BYTES
    with grpc.insecure_channel(address) as channel:
        kvs_service_pb2_grpc.KvsServiceStub(channel).PutValue(
            kvs_service_pb2.PutValueRequest(key=key, lattice=lattice), timeout=30
        )


def get_value(address: str, key: str, wait: bool = False) -> bytes | None:
    with grpc.insecure_channel(address) as channel:
        response = kvs_service_pb2_grpc.KvsServiceStub(channel).GetValue(
            kvs_service_pb2.GetValueRequest(key=key, wait=wait), timeout=30
        )
    return response.lattice.lww.value.data if response.found else None


def test_user_guide_on_two_kvs_processes_over_valkey(deployment: Deployment) -> None:
    result = subprocess.run(
        [sys.executable, str(HERE / "guide_runner.py"), str(GUIDE), deployment.scheduler.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "guide ok: 4 outputs checked" in result.stdout
    # Both KVS processes serve the same data: written through one, read through the other.
    first, second = (k.address for k in deployment.kvs)
    put_value(first, "shared", b"one store")
    assert get_value(second, "shared") == b"one store"
    # Each KVS process reports the engine's latency per operation.
    for kvs in deployment.kvs:
        url = kvs.wait_for_log("metrics on http://", stdout=True).rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        counts = re.findall(
            r'^cloudburst_kvs_engine_duration_seconds_count\{[^}]*operation="(\w+)"[^}]*\} (\S+)',
            text,
            re.M,
        )
        operations = {operation for operation, count in counts if float(count) > 0}
        assert {"put", "get"} & operations, text[-2000:]


def where(cloudburst: Any) -> str:
    """The address of the process this call runs in (mailbox ids name it)."""
    return str(cloudburst.get_id()).rpartition("@")[2]


def rendezvous(cloudburst: Any, key: str) -> Any:
    return (cloudburst.get_object(key, timeout=30), where(cloudburst))


def publish(cloudburst: Any, key: str, value: int) -> str:
    cloudburst.put_object(key, value)
    return where(cloudburst)


def test_get_object_rendezvous_across_executors(deployment: Deployment) -> None:
    # A reader waiting in get_object on one executor is woken by a writer's put on the
    # other, through the KVS tier. Placement decides where each call runs (pins, load):
    # writers of several names, pinned apart, take turns until a reader and its writer ran
    # on different executors, as one round in two does even when placement ignores pins.
    with CloudburstConnection(deployment.scheduler.address) as cloud:
        waiter = cloud.register(rendezvous, "rendezvous")
        writers = [cloud.register(publish, f"publish-{k}") for k in range(6)]
        seen: list[tuple[str, str]] = []
        for i in range(24):
            waiting = waiter(f"meet-{i}")
            wrote_on = writers[i % len(writers)](f"meet-{i}", i).get(timeout=30)
            value, read_on = waiting.get(timeout=40)
            assert value == i
            seen.append((read_on, wrote_on))
            if read_on != wrote_on:
                break
    assert seen[-1][0] != seen[-1][1], f"every reader ran where its writer did: {seen}"
    executors = {e.address for e in deployment.executors}
    assert set(seen[-1]) == executors


def test_a_killed_kvs_process_leaves_the_other_serving(deployment: Deployment) -> None:
    with CloudburstConnection(deployment.scheduler.address) as cloud:
        cloud.put_object("before", 1)
        incr = cloud.register(lambda cb, key: cb.put_object(key, cb.get_object(key) + 1), "bump")
        # Every process uses the first passing instance, kvs-0: kill it.
        victim, survivor = deployment.kvs
        victim.stop(signal.SIGKILL)
        # Calls keep succeeding at once, before Consul's health check notices: each
        # process that finds kvs-0 unreachable moves to kvs-1 and tries once more there.
        assert cloud.get_object("before") == 1
        for _ in range(10):
            incr("before").get(timeout=30)
        assert cloud.get_object("before") == 11
        deployment.wait_kvs(lambda ids: ids == {"kvs-1"})
        incr("before").get(timeout=30)
        assert cloud.get_object("before") == 12
        assert get_value(survivor.address, "missing") is None
