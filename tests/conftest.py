"""Fixtures shared by every test; each stops what it started, also when the test fails."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import settings

from cloudburst_grpc.local import (
    Node,
    start_executor_node,
    start_kvs_node,
    start_local,
    start_scheduler_node,
)
from harness import (
    Cluster,
    LoopThread,
    ProcessCluster,
    ServeProcess,
    make_config,
    running_process_cluster,
)
from kvs_interceptors import KvsServer
from valkey_cluster import ValkeyCluster, start_cluster

# Property tests judge behaviour, not speed: no per-example time limit (Hypothesis's
# default of 200 ms fails examples on a loaded machine).
settings.register_profile("cloudburst", deadline=None)
settings.load_profile("cloudburst")

K = TypeVar("K", bound=KvsServer)


@pytest.fixture
def server_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def start_node(server_loop: LoopThread) -> Iterator[Callable[..., Node]]:
    """Start nodes by calling this; all are stopped (in reverse) at teardown."""
    started: list[Node] = []

    def start(coro: Coroutine[Any, Any, Node]) -> Node:
        node = server_loop.run(coro)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in reversed(started):
            server_loop.run(node.stop(0.5))


@pytest.fixture
def start_kvs_server(start_node: Callable[..., Node]) -> Iterator[Callable[[K], K]]:
    """Start test KVS servers (kvs_interceptors) by calling this; each is stopped at teardown.

    They stop before the nodes of ``start_node`` (set up first, so torn down after).
    """
    started: list[KvsServer] = []

    def start(kvs: K) -> K:
        started.append(kvs)
        return kvs.start()

    try:
        yield start
    finally:
        for kvs in reversed(started):
            kvs.stop()


@pytest.fixture
def naming_scheduler(start_node: Callable[..., Node]) -> Callable[..., Node]:
    """Start a scheduler that names the KVS at ``kvs_address`` to its clients, and its executor.

    Call it as ``naming_scheduler(kvs_address, shared=False)``. The scheduler and the
    executor use a KVS of their own, which clients reach through the scheduler's proxy;
    ``shared``: they use that KVS too.
    """

    def start(kvs_address: str, shared: bool = False) -> Node:
        backing = kvs_address if shared else start_node(start_kvs_node(make_config())).address
        config = make_config(scheduler={"direct_kvs_address": kvs_address})
        executor = start_node(start_executor_node(config, backing, "executor-0"))
        return start_node(start_scheduler_node(config, backing, [executor.address]))

    return start


@pytest.fixture
def local_node(start_node: Callable[..., Node]) -> Node:
    """`cbgrpc serve`'s composition, in memory, on a free port."""
    return start_node(start_local(make_config()))


@pytest.fixture
def cluster(start_node: Callable[..., Node], server_loop: LoopThread) -> Cluster:
    """One KVS, two executors and one scheduler, each its own gRPC server."""
    config = make_config(scheduler={"pin_replicas": 1})
    kvs = start_node(start_kvs_node(config))
    executors = [
        start_node(start_executor_node(config, kvs.address, f"executor-{i}")) for i in range(2)
    ]
    scheduler = start_node(
        start_scheduler_node(config, kvs.address, [e.address for e in executors])
    )
    return Cluster(server_loop, kvs, executors, scheduler)


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """Start `cbgrpc serve` subprocesses; each is killed at teardown if still running."""
    procs: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        proc = ServeProcess(*args, env=env)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()


@pytest.fixture
def process_cluster() -> Iterator[ProcessCluster]:
    """One KVS, two executors and a scheduler as separate `cbgrpc` processes (memory storage).

    Each function of a DAG is pinned on one executor, so the functions of a
    DAG spread over both processes.
    """
    with running_process_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """A real Valkey Cluster (3 primaries x 2 replicas) on loopback, shared by the whole test run.

    Tests that kill nodes start their own cluster instead.
    """
    cluster = start_cluster(tmp_path_factory.mktemp("valkey"))
    try:
        yield cluster
    finally:
        cluster.stop()
