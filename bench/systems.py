"""The systems under test and their workloads.

- ``serve``: `cbgrpc serve`, its executors child processes (the default isolation);
- ``serve-inprocess``: `cbgrpc serve --isolation none`, everything in one process
  (only the latency workloads of targets T1-T4, to keep the run short);
- ``cluster-static``: a cluster of `cbgrpc` processes (one KVS, two executors,
  one scheduler) given each other's addresses on the command line;
- ``cluster-consul``: the same cluster, whose processes find each other through
  a real Consul agent (the client too: it connects with ``consul://``).
"""

from __future__ import annotations

import array
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench import functions
from bench.measure import SyncWorkload, Throughput, Workload
from bench.procs import ROOT, STARTUP_TIMEOUT, Child, Processes, log
from cloudburst import CloudburstConnection, CloudburstReference
from cloudburst.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc

SMALL = 100
LARGE = 1024 * 1024
CHAIN_DAG = "bench_chain"
FAN_DAG = "bench_fan"
PINGPONG_DAG = "bench_pingpong"
FAN_FUNCTIONS = ["fan_1", "fan_2", "fan_3", "fan_4"]


SERVE = "serve"
#: `cbgrpc serve` with its executors in its own process (``--isolation none``).
SERVE_INPROCESS = "serve-inprocess"
CLUSTER_STATIC = "cluster-static"
CLUSTER_CONSUL = "cluster-consul"
CLUSTERS = (CLUSTER_STATIC, CLUSTER_CONSUL)
#: The static cluster again with every hop mutual TLS: its figures against the static ones.
MTLS = "cluster-mtls"
#: Storage engines the bench can run the clusters' KVS with (``--storage``).
STORAGE_ENGINES = ("memory", "sqlite", "valkey")


@dataclass
class System:
    """A running deployment and a connection to it."""

    name: str
    """``serve``, ``cluster-static`` or ``cluster-consul`` (or a tracing variant)."""
    address: str
    """What the SDK connects to: ``host:port``, or ``consul://host:port``."""
    children: list[Child]
    conn: CloudburstConnection | None = None
    notes: list[str] = field(default_factory=list)
    client_options: dict[str, str] = field(default_factory=dict)
    """Keyword arguments of CloudburstConnection beyond the address (TLS settings)."""

    def pids(self) -> dict[str, int]:
        return {child.name: child.pid for child in self.children}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def start_serve(procs: Processes, name: str = SERVE, *args: str) -> System:
    """`cbgrpc serve --storage memory --port 0`, ``args`` and defaults otherwise."""
    child = procs.start_cbgrpc(
        name, "serve", "--storage", "memory", *args, cpu=procs.cores.server()
    )
    return System(name, child.address, [child])


def start_serve_inprocess(procs: Processes) -> System:
    """`cbgrpc serve --isolation none`: the executors in the server's process."""
    return start_serve(procs, SERVE_INPROCESS, "--isolation", "none")


def storage_args(storage: str, data_dir: Path, valkey_url: str | None = None) -> list[str]:
    """The `cbgrpc kvs` flags for ``storage``.

    SQLite keeps its database in ``data_dir``; Valkey uses the cluster at
    ``valkey_url`` with the KVS's defaults (durable writes on).
    """
    if storage == "memory":
        return ["--storage", "memory"]
    if storage == "valkey":
        if not valkey_url:
            raise ValueError("the valkey engine needs the URL of a Valkey Cluster")
        return ["--engine", "valkey", "--valkey-url", valkey_url]
    return ["--storage", storage, "--data-dir", str(data_dir)]


def start_valkey(directory: Path) -> Any:
    """A Valkey Cluster on loopback (3 primaries with a replica each), as the tests start one.

    One replica per primary is what the KVS's durable writes (``WAIT 1``) need.

    Returns the tests' ``ValkeyCluster`` (``url``, ``stop()``); the caller stops it.

    Raises:
        RuntimeError: valkey-server is not installed (``tools/valkey/install.sh``) or the
            cluster did not form.
    """
    import sys

    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from valkey_cluster import start_cluster as start_valkey_cluster

    directory.mkdir(parents=True, exist_ok=True)
    return start_valkey_cluster(directory, replicas=1)


def _tls(certs: Path | None, role: str) -> list[str]:
    if certs is None:
        return []
    return [
        *("--tls-cert", str(certs / f"{role}.pem"), "--tls-key", str(certs / f"{role}-key.pem")),
        *("--tls-ca", str(certs / "ca.pem")),
    ]


def start_cluster(
    procs: Processes,
    name: str = CLUSTER_STATIC,
    *,
    storage: str = "memory",
    data_dir: Path | None = None,
    consul: str | None = None,
    valkey_url: str | None = None,
    certs: Path | None = None,
) -> System:
    """A KVS, two executors and a scheduler, each its own `cbgrpc` process.

    Each function is pinned on one executor (``pin_replicas = 1``), so the
    functions of a DAG spread over both executor processes and its triggers
    and messages cross processes. Without ``consul`` every process is given
    the addresses it needs on its command line; with it (a Consul agent's
    ``host:port``) they find each other there, the client included. The KVS
    stores with ``storage`` (``memory``, ``sqlite`` in ``data_dir``, or
    ``valkey`` in the Valkey Cluster at ``valkey_url``). With ``certs`` (and no
    Consul), `cbgrpc certs` writes a CA and certificates there and every hop is
    mutual TLS, the client showing an admin certificate.
    """
    env = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
    options: dict[str, str] = {}
    if certs is not None:
        subprocess.run(
            [sys.executable, "-m", "cloudburst_grpc", "certs", str(certs), "--client", "admin"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        options = {
            "tls_ca": str(certs / "ca.pem"),
            "tls_cert": str(certs / "client-admin.pem"),
            "tls_key": str(certs / "client-admin-key.pem"),
        }
    if consul is not None:
        env["CONSUL_HTTP_ADDR"] = consul
    kvs_dir = (data_dir or procs.log_dir) / f"{name}-kvs-data"
    kvs = procs.start_cbgrpc(
        f"{name}-kvs",
        "kvs",
        *storage_args(storage, kvs_dir, valkey_url),
        *_tls(certs, "kvs"),
        env=env,
        cpu=procs.cores.server(),
    )
    to_kvs = [] if consul else ["--kvs", kvs.address]
    executors = [
        procs.start_cbgrpc(
            f"{name}-executor-{tag}",
            "executor",
            *to_kvs,
            "--id",
            f"{name}-executor-{tag}",
            *_tls(certs, "executor"),
            env=env,
            cpu=procs.cores.spread(index),
        )
        for index, tag in enumerate(("a", "b"))
    ]
    flags = [] if consul else [arg for e in executors for arg in ("--executor", e.address)]
    scheduler = procs.start_cbgrpc(
        f"{name}-scheduler",
        "scheduler",
        *to_kvs,
        *flags,
        *_tls(certs, "scheduler"),
        env=env,
        cpu=procs.cores.server(),
    )
    children = [scheduler, *executors, kvs]
    if consul is None:
        return System(name, scheduler.address, children, client_options=options)
    try:
        wait_for_executors(scheduler.address, {e.address for e in executors})
        wait_for_passing(consul, "cloudburst-scheduler", scheduler.address)
    except BaseException:
        for child in children:
            procs.stop(child)
        raise
    return System(name, f"consul://{consul}", children)


def wait_for_executors(scheduler: str, wanted: set[str], timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait (blocking on the scheduler's ListExecutors) until its pool is ``wanted``."""
    deadline = time.monotonic() + timeout
    version = 0
    with grpc.insecure_channel(scheduler) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"the scheduler at {scheduler} never saw the executors {sorted(wanted)} "
                    f"through Consul within {timeout:.0f} s"
                )
            response = stub.ListExecutors(
                scheduler_service_pb2.ListExecutorsRequest(min_version=version),
                timeout=min(remaining, 20),
            )
            if {e.address for e in response.executors} == wanted:
                return
            version = response.version


def wait_for_passing(
    consul: str, service: str, address: str, timeout: float = STARTUP_TIMEOUT
) -> None:
    """Wait until Consul reports ``address`` passing for ``service`` (blocking queries)."""
    deadline = time.monotonic() + timeout
    index = "0"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"Consul never reported {service} at {address} passing")
        url = (
            f"http://{consul}/v1/health/service/{service}?passing=true&index={index}"
            f"&wait={max(1, int(min(remaining, 10)))}s"
        )
        try:
            with urllib.request.urlopen(url, timeout=min(remaining, 10) + 5) as response:
                index = response.headers.get("X-Consul-Index", "0")
                body = json.load(response)
        except OSError:
            time.sleep(0.2)  # Consul not answering yet; ask again (bounded by the deadline)
            continue
        if address in {f"{e['Service']['Address']}:{e['Service']['Port']}" for e in body}:
            return


def consul_binary() -> str:
    """The Consul binary `tools/consul/build.sh` keeps (building it first if not cached).

    Raises:
        RuntimeError: There is no binary and it cannot be built; the message says why.
    """
    try:
        done = subprocess.run(
            ["bash", str(ROOT / "tools" / "consul" / "build.sh")],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"tools/consul/build.sh did not finish: {exc}") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"tools/consul/build.sh failed: {done.stderr.strip()[-600:]}")
    return lines[-1]


def start_consul(procs: Processes, binary: str) -> tuple[Child, str]:
    """A `consul agent -dev` on loopback ports; returns it and its HTTP ``host:port``.

    Consul cannot bind port 0 and say which port it got, so its ports are
    chosen free just before it starts.
    """
    http, serf_lan, serf_wan, server = _free_ports(4)
    argv = [
        binary, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
        "-http-port", str(http), "-grpc-port", "-1", "-grpc-tls-port", "-1",
        "-dns-port", "-1", "-serf-lan-port", str(serf_lan), "-serf-wan-port", str(serf_wan),
        "-server-port", str(server), "-log-level", "warn",
    ]  # fmt: skip
    child = procs.start("consul", argv, wait_for_address=False)
    address = f"127.0.0.1:{http}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/v1/status/leader", timeout=5) as r:
                if json.load(r):
                    return child, address
        except (OSError, ValueError):
            pass
        if not child.alive() or time.monotonic() > deadline:
            procs.stop(child)
            raise RuntimeError(f"consul agent did not start; its log:\n{child.log_tail()}")
        time.sleep(0.1)


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def connect(system: System) -> CloudburstConnection:
    system.conn = CloudburstConnection(system.address, timeout=120, **system.client_options)  # type: ignore[arg-type]
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
        "locality_read",
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
#: The workloads ``serve-inprocess`` is measured on (those of serve's T1 and T4).
INPROCESS_WORKLOADS = (CALL, DAG_DIRECT)
#: The workloads the mutual-TLS cluster is compared on: a call and the chain DAG.
MTLS_WORKLOADS = (CALL, DAG_DIRECT, DAG_GET)


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


#: The locality workload: a function reading ten references to one array of this many bytes.
LOCALITY_BYTES = 8 * 1024 * 1024
LOCALITY_REFERENCES = 10
LOCALITY_COLD = "locality: first call, 10 references to one 8 MiB array (cold)"
LOCALITY_REPEAT = "locality: the same call repeated"


class LocalityProbe:
    """The locality workload on one system: a cold call of ``locality_read`` and its repeat.

    Each sample stores a new 8 MiB array (``array('d')`` of 1,048,576 floats)
    under a new key (not timed), then calls ``locality_read`` with ten
    references to that key twice, one call after the other: the first call is
    the cold one, the second may be served from wherever the first left the
    value (with ``pin_replicas = 1`` both run on the same executor). Each key
    is deleted after its sample.
    """

    def __init__(self, system: System) -> None:
        self.system = system
        self.items = LOCALITY_BYTES // 8
        self.value = array.array("d", bytes(LOCALITY_BYTES))

    def sample(self) -> tuple[float, float]:
        """One sample: (seconds of the cold call, seconds of the repeat)."""
        conn = self.system.conn
        assert conn is not None
        key = f"bench/locality/{uuid.uuid4().hex}"
        conn.put_object(key, self.value)
        try:
            handle = conn.get_function("locality_read")
            assert handle is not None
            refs = [CloudburstReference(key) for _ in range(LOCALITY_REFERENCES)]
            times = []
            for _ in range(2):
                start = time.perf_counter()
                result = handle(*refs).get()
                times.append(time.perf_counter() - start)
                if result != LOCALITY_REFERENCES * self.items:
                    raise AssertionError(f"locality_read returned {result!r:.80}")
        finally:
            conn.delete_object(key)
        return times[0], times[1]


LONG_CHAIN_FUNCTIONS = 4000
LONG_CHAIN_DAG = "bench_long_chain"
LONG_CHAIN = f"DAG chain of {LONG_CHAIN_FUNCTIONS:,} incr functions, direct response"


class LongChainProbe:
    """A DAG call whose cost grows with its length: a chain of thousands of ``incr`` functions.

    :meth:`register` registers ``length`` copies of ``incr`` and the chain of
    them (with ``pin_replicas = 1`` the functions spread over both executors,
    so most hops cross between processes); each :meth:`sample` is one call
    with a direct response, checked.
    """

    def __init__(self, system: System, length: int = LONG_CHAIN_FUNCTIONS) -> None:
        self.system = system
        self.length = length
        self.names = [f"long_incr_{i:05d}" for i in range(length)]

    def register(self) -> float:
        """Register the functions and the DAG; return the seconds it took (not a target)."""
        conn = self.system.conn
        assert conn is not None
        start = time.perf_counter()
        for name in self.names:
            conn.register(functions.incr, name)
        edges = list(zip(self.names, self.names[1:], strict=False))
        conn.register_dag(LONG_CHAIN_DAG, self.names, edges, strict=True)
        return time.perf_counter() - start

    def sample(self) -> float:
        """One call: its seconds."""
        conn = self.system.conn
        assert conn is not None
        start = time.perf_counter()
        result = conn.call_dag(LONG_CHAIN_DAG, {self.names[0]: 1}, direct_response=True)
        seconds = time.perf_counter() - start
        if result != 1 + self.length:
            raise AssertionError(f"the chain returned {result!r:.80}")
        return seconds


def describe_start(system: System) -> None:
    started = ", ".join(f"{c.name} pid {c.pid} at {c.address}" for c in system.children)
    log(f"{system.name}: {started}")
