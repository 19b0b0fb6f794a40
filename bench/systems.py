"""The systems under test, `cbgrpc serve` and a cluster of `cbgrpc` processes; their workloads."""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench import functions
from bench.measure import SyncWorkload, Throughput, Workload
from bench.procs import Child, Processes, log
from cloudburst import CloudburstConnection

SMALL = 100
LARGE = 1024 * 1024
CHAIN_DAG = "bench_chain"
FAN_DAG = "bench_fan"
PINGPONG_DAG = "bench_pingpong"
FAN_FUNCTIONS = ["fan_1", "fan_2", "fan_3", "fan_4"]


@dataclass
class System:
    """A running deployment and a connection to it."""

    name: str
    """``serve`` or ``cluster``."""
    address: str
    children: list[Child]
    conn: CloudburstConnection | None = None
    notes: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        return {child.name: child.pid for child in self.children}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def start_serve(procs: Processes, name: str = "serve") -> System:
    """`cbgrpc serve --storage memory --port 0`, defaults otherwise."""
    child = procs.start_cbgrpc(name, "serve", "--storage", "memory", cpu=procs.cores.server())
    return System("serve", child.address, [child])


def start_cluster(procs: Processes) -> System:
    """A KVS, two executors and a scheduler, each its own `cbgrpc` process (memory storage).

    Each function is pinned on one executor (``pin_replicas = 1``), so the
    functions of a DAG spread over both executor processes and its triggers
    and messages cross processes.
    """
    env = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
    kvs = procs.start_cbgrpc(
        "cluster-kvs", "kvs", "--storage", "memory", env=env, cpu=procs.cores.server()
    )
    executors = [
        procs.start_cbgrpc(
            f"cluster-executor-{tag}",
            "executor",
            "--kvs",
            kvs.address,
            "--id",
            f"executor-{tag}",
            env=env,
            cpu=procs.cores.spread(index),
        )
        for index, tag in enumerate(("a", "b"))
    ]
    flags = [arg for e in executors for arg in ("--executor", e.address)]
    scheduler = procs.start_cbgrpc(
        "cluster-scheduler",
        "scheduler",
        "--kvs",
        kvs.address,
        *flags,
        env=env,
        cpu=procs.cores.server(),
    )
    return System("cluster", scheduler.address, [scheduler, *executors, kvs])


def connect(system: System) -> CloudburstConnection:
    system.conn = CloudburstConnection(system.address, timeout=120)
    return system.conn


def register_all(conn: CloudburstConnection) -> None:
    """Register the bench's functions and DAGs."""
    for name in (
        "incr",
        "square",
        "fan_source",
        *FAN_FUNCTIONS,
        "fan_sink",
        "ping",
        "pong",
        "pingpong_report",
    ):
        conn.register(getattr(functions, name), name)
    conn.register_dag(CHAIN_DAG, ["incr", "square"], [("incr", "square")], strict=True)
    conn.register_dag(
        FAN_DAG,
        ["fan_source", *FAN_FUNCTIONS, "fan_sink"],
        [("fan_source", f) for f in FAN_FUNCTIONS] + [(f, "fan_sink") for f in FAN_FUNCTIONS],
        strict=True,
    )
    conn.register_dag(
        PINGPONG_DAG,
        ["ping", "pong", "pingpong_report"],
        [("ping", "pingpong_report"), ("pong", "pingpong_report")],
        strict=True,
    )


# Workload names, shared with the floor and Ray so the report can line them up.
CALL = "call incr(1).get()"
DAG_DIRECT = "DAG incr->square, direct_response"
DAG_GET = "DAG incr->square, .get()"
FAN = "DAG fan-out/fan-in (1->4->1), direct_response"
PUT_SMALL = "KVS put_object 100 B"
GET_SMALL = "KVS get_object 100 B"
PUT_LARGE = "KVS put_object 1 MiB"
GET_LARGE = "KVS get_object 1 MiB"
MESSAGE = "send/recv round trip between two functions"


def workloads(system: System) -> list[Workload]:
    """The workloads of one system; functions and DAGs must be registered."""
    conn = system.conn
    assert conn is not None
    handle = conn.get_function("incr")
    assert handle is not None
    small, large = os.urandom(SMALL), os.urandom(LARGE)
    small_key, large_key = f"bench/{uuid.uuid4().hex}/small", f"bench/{uuid.uuid4().hex}/large"
    conn.put_object(small_key, small)
    conn.put_object(large_key, large)
    s = system.name
    return [
        SyncWorkload(s, CALL, lambda: handle(1).get(), check=lambda r: r == 2),
        SyncWorkload(
            s,
            DAG_DIRECT,
            lambda: conn.call_dag(CHAIN_DAG, {"incr": 1}, direct_response=True),
            check=lambda r: r == 4,
        ),
        SyncWorkload(
            s, DAG_GET, lambda: conn.call_dag(CHAIN_DAG, {"incr": 1}).get(), check=lambda r: r == 4
        ),
        SyncWorkload(
            s,
            FAN,
            lambda: conn.call_dag(FAN_DAG, {"fan_source": 1}, direct_response=True),
            check=lambda r: r == functions.FAN_RESULT,
        ),
        SyncWorkload(s, PUT_SMALL, lambda: conn.put_object(small_key, small), check=bool),
        SyncWorkload(s, GET_SMALL, lambda: conn.get_object(small_key), check=lambda r: r == small),
        SyncWorkload(s, PUT_LARGE, lambda: conn.put_object(large_key, large), check=bool),
        SyncWorkload(
            s, GET_LARGE, lambda: conn.get_object(large_key), check=lambda r: len(r) == LARGE
        ),
        MessagingWorkload(system),
    ]


class MessagingWorkload(Workload):
    """A ping-pong DAG: ping sends, pong answers; each round trip is timed inside ping.

    A block of ``n`` round trips is one DAG call (``ping``, ``pong`` and a report
    sink), whose first :data:`WARMUP` round trips are not counted.
    """

    WARMUP = 20
    THROUGHPUT_ROUNDS = 200

    def __init__(self, system: System) -> None:
        super().__init__(system.name, MESSAGE)
        self.deployment = system
        self.placements: set[tuple[str, str]] = set()

    def _exchange(self, warmup: int, rounds: int) -> list[float]:
        conn = self.deployment.conn
        assert conn is not None
        tag = f"bench/pingpong/{uuid.uuid4().hex}"
        result: dict[str, Any] = conn.call_dag(
            PINGPONG_DAG,
            {"ping": [tag, warmup, rounds], "pong": [tag, warmup + rounds]},
            direct_response=True,
            timeout=300,
        )
        if result["answered"] != warmup + rounds or len(result["latencies"]) != rounds:
            raise AssertionError(f"{self.key}: bad exchange {result!r:.200}")
        # Mailbox ids end with the address of the process hosting them.
        self.placements.add((result["me"].rpartition("@")[2], result["peer"].rpartition("@")[2]))
        latencies: list[float] = result["latencies"]
        return latencies

    def block(self, n: int) -> list[float]:
        return self._exchange(self.WARMUP, n)

    def throughput(self, callers: int, seconds: float) -> Throughput:
        latencies: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        began = time.perf_counter()
        stop = began + seconds

        def caller() -> None:
            try:
                while time.perf_counter() < stop and not errors:
                    got = self._exchange(0, self.THROUGHPUT_ROUNDS)
                    with lock:
                        latencies.extend(got)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return Throughput(callers, len(latencies), time.perf_counter() - began, latencies)

    def crossed_processes(self) -> bool | None:
        """Whether ping and pong ran in different processes (None before any exchange)."""
        if not self.placements:
            return None
        return all(me != peer for me, peer in self.placements)


def describe_start(system: System) -> None:
    started = ", ".join(f"{c.name} pid {c.pid} at {c.address}" for c in system.children)
    log(f"{system.name}: {started}")
