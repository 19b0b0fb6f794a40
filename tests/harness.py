"""Test harness: servers on 127.0.0.1 port 0 in a background loop, clusters, `cbgrpc serve`.

Servers run on an event loop in a background thread, so tests can drive them
with the synchronous SDK exactly as users do. Every fixture stops what it
started, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from cloudburst.transport import ClientSecurity
from cloudburst.v1 import (
    kvs_service_pb2,
    kvs_service_pb2_grpc,
    lattice_pb2,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_grpc.config import Config, ExecutorConfig, KvsConfig, SchedulerConfig, ServerConfig
from cloudburst_grpc.local import Node
from cloudburst_kvs.store import LatticeStore

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0


async def drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still on the loop and wait for them, so none is destroyed pending."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()


class LoopThread:
    """An asyncio loop on a daemon thread, for servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-servers", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STARTUP_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(drain(self.loop), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def make_config(tmp_path: Path | None = None, **sections: Any) -> Config:
    """A config for tests: port 0, in-memory storage (or SQLite in tmp_path), small pools."""
    server = ServerConfig(host="127.0.0.1", port=0, grace_seconds=1.0)
    kvs = (
        KvsConfig(engine="memory")
        if tmp_path is None
        else KvsConfig(engine="sqlite", data_dir=tmp_path)
    )
    config = Config(
        server=server,
        kvs=kvs,
        # In-process executors: these tests reach into them; tests of isolation ask for it.
        executor=ExecutorConfig(count=2, threads=4, isolation="none"),
        scheduler=SchedulerConfig(call_timeout_seconds=30.0),
    )
    for name, changes in sections.items():
        config = dataclasses.replace(
            config, **{name: dataclasses.replace(getattr(config, name), **changes)}
        )
    return config.validate()


@dataclasses.dataclass
class Cluster:
    """Separate servers (KVS, executors, scheduler) in one test process."""

    loop: LoopThread
    kvs: Node
    executors: list[Node]
    scheduler: Node

    @property
    def address(self) -> str:
        return self.scheduler.address


class CbgrpcProcess:
    """A `cbgrpc COMMAND` subprocess; its address is read from its first line of output.

    Both output streams are read on threads for the life of the process (so a
    chatty process never blocks on a full pipe) and kept in ``stdout_lines`` and
    ``stderr_lines``.
    """

    def __init__(
        self, command: str, *args: str, env: dict[str, str] | None = None, ready: bool = True
    ) -> None:
        """Start ``cbgrpc COMMAND ARGS``; wait until it listens, unless not ``ready``.

        A process started with ``ready`` False (one that is not to get as far as
        listening) has no ``address``.
        """
        self.command = command
        self.args = args
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._stderr_changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudburst_grpc", command, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        first_line = threading.Event()

        def read_stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                with self._stderr_changed:
                    self.stdout_lines.append(line)
                    self._stderr_changed.notify_all()
                first_line.set()
            first_line.set()
            with self._stderr_changed:
                self._stderr_changed.notify_all()

        def read_stderr() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                with self._stderr_changed:
                    self.stderr_lines.append(line)
                    self._stderr_changed.notify_all()
            with self._stderr_changed:
                self._stderr_changed.notify_all()

        self._readers = [
            threading.Thread(target=read_stdout, daemon=True),
            threading.Thread(target=read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        if not ready:
            return
        first_line.wait(STARTUP_TIMEOUT)
        line = self.stdout_lines[0] if self.stdout_lines else ""
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(
                f"cbgrpc {command} did not start: {line!r}\n{''.join(self.stderr_lines[-40:])}"
            )
        self.address = line.rsplit(" ", 1)[1].strip()

    def wait_for_log(self, text: str, timeout: float = 60.0, stdout: bool = False) -> str:
        """Wait until a line containing ``text`` appears on stderr (or stdout); returns it."""
        deadline = time.monotonic() + timeout
        lines = self.stdout_lines if stdout else self.stderr_lines
        with self._stderr_changed:
            while True:
                for line in lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.proc.poll() is not None and not self._readers[1].is_alive()
                ):
                    raise TimeoutError(
                        f"{text!r} not logged by cbgrpc {self.command}:\n"
                        + "".join(self.stderr_lines[-40:])
                    )
                self._stderr_changed.wait(remaining)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stderr(self) -> str:
        return "".join(self.stderr_lines)


class ServeProcess(CbgrpcProcess):
    """A `cbgrpc serve` subprocess."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("serve", *args, env=env)


@dataclasses.dataclass
class ProcessCluster:
    """A KVS, executors and a scheduler, each its own `cbgrpc` process."""

    kvs: CbgrpcProcess
    executors: list[CbgrpcProcess]
    scheduler: CbgrpcProcess

    @property
    def address(self) -> str:
        return self.scheduler.address

    def all(self) -> list[CbgrpcProcess]:
        return [self.scheduler, *self.executors, self.kvs]


@contextlib.contextmanager
def running_process_cluster(
    *executor_args: str,
    scheduler_args: tuple[str, ...] = (),
    scheduler_env: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ProcessCluster]:
    """Start a :class:`ProcessCluster` (memory storage), its executors given ``executor_args``.

    The scheduler is given ``scheduler_args`` and, in its environment, ``scheduler_env``;
    every process gets ``env`` in its environment.

    Each function of a DAG is pinned on one executor, so the functions of a
    DAG spread over both executor processes. Every process is killed on exit.
    """
    env = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1", **(env or {})}
    started: list[CbgrpcProcess] = []
    try:
        kvs = CbgrpcProcess("kvs", "--storage", "memory", env=env)
        started.append(kvs)
        executors = []
        for name in ("executor-a", "executor-b"):
            executor = CbgrpcProcess(
                "executor", "--kvs", kvs.address, "--id", name, *executor_args, env=env
            )
            started.append(executor)
            executors.append(executor)
        flags = [arg for e in executors for arg in ("--executor", e.address)]
        scheduler = CbgrpcProcess(
            "scheduler",
            "--kvs",
            kvs.address,
            *flags,
            *scheduler_args,
            env={**env, **(scheduler_env or {})},
        )
        started.append(scheduler)
        yield ProcessCluster(kvs, executors, scheduler)
    finally:
        for proc in reversed(started):
            proc.kill()


def consul_binary() -> str:
    """The path of the `consul` binary, built from the Go module proxy if not cached yet."""
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "consul" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building consul failed:\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


def required_tool(name: str) -> str:
    """The path of the program ``name`` on PATH; a test without it fails in CI, else skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI for the client tests")
        pytest.skip(f"{name} is not installed")
    return path


def free_ports(count: int) -> list[int]:
    """Ports free right now, for programs (like Consul) that cannot report what they bound."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ConsulAgent:
    """A real `consul agent -dev` bound to loopback ports chosen at run time.

    Consul cannot bind port 0 and report it, so ports are chosen free just
    before it starts; if one was taken in between, it starts again on others.
    """

    ATTEMPTS = 3

    def __init__(
        self,
        binary: str,
        http_port: int | None = None,
        grpc: bool = False,
        hcl: str = "",
        grpc_tls: bool = False,
    ) -> None:
        """Start the agent; with ``grpc``, also its plaintext gRPC API (Connect CA, ...).

        ``hcl`` is extra configuration, e.g. ACLs. With ``grpc_tls``, the gRPC API is
        also served over TLS (``grpc_tls_address``); ``hcl`` must then give the agent
        its certificate (``tls { defaults { ... } }``).
        """
        for attempt in range(self.ATTEMPTS):
            try:
                self._start(binary, http_port, grpc, hcl, grpc_tls)
                return
            except RuntimeError as exc:
                in_use = "address already in use" in str(exc)
                if not in_use or http_port is not None or attempt == self.ATTEMPTS - 1:
                    raise

    def _start(
        self, binary: str, http_port: int | None, grpc: bool, hcl: str, grpc_tls: bool
    ) -> None:
        ports = free_ports(6)
        self.http_port = http_port or ports[0]
        self.address = f"127.0.0.1:{self.http_port}"
        self.grpc_address = f"127.0.0.1:{ports[4]}" if grpc else ""
        self.grpc_tls_address = f"127.0.0.1:{ports[5]}" if grpc_tls else ""
        self.proc = subprocess.Popen(
            [
                binary,
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
                "-http-port",
                str(self.http_port),
                "-grpc-port",
                str(ports[4]) if grpc else "-1",
                "-grpc-tls-port",
                str(ports[5]) if grpc_tls else "-1",
                "-dns-port",
                "-1",
                "-serf-lan-port",
                str(ports[1]),
                "-serf-wan-port",
                str(ports[2]),
                "-server-port",
                str(ports[3]),
                "-log-level",
                "info",
                *(["-hcl", hcl] if hcl else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if "cluster leadership acquired" in line or "Synced node info" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(STARTUP_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("consul agent did not start:\n" + "".join(self.log[-30:]))
        # The log line can come before the HTTP API listens: wait until it answers with a leader.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                if self.get("/v1/status/leader", timeout=5)[1]:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "consul agent's HTTP API never answered:\n" + "".join(self.log[-30:])
                )
            time.sleep(0.05)

    def get(self, path: str, timeout: float = 40.0) -> tuple[str, Any]:
        """GET an HTTP API path; returns (X-Consul-Index, decoded JSON)."""
        with urllib.request.urlopen(f"http://{self.address}{path}", timeout=timeout) as response:
            return response.headers.get("X-Consul-Index", "0"), json.load(response)

    def wait(self, path: str, predicate: Any, timeout: float = 60.0) -> Any:
        """Blocking-query ``path`` until ``predicate(body)`` holds; Consul holds each call."""
        deadline = time.monotonic() + timeout
        index = "0"
        separator = "&" if "?" in path else "?"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{path} never satisfied the condition within {timeout}s")
            wait = max(1, int(min(remaining, 30)))
            index, body = self.get(
                f"{path}{separator}index={index}&wait={wait}s", timeout=wait + 10
            )
            if predicate(body):
                return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_for_pool(
    scheduler: str,
    predicate: Callable[[scheduler_service_pb2.ListExecutorsResponse], bool],
    timeout: float = 60.0,
    security: ClientSecurity | None = None,
) -> scheduler_service_pb2.ListExecutorsResponse:
    """Block on the scheduler's ListExecutors until its answer satisfies ``predicate``.

    Each call waits for the pool's next version, so nothing polls; only
    executors that work may be placed on are listed (not those set aside).
    ``security`` is a client's TLS settings (and token) for a secured scheduler.
    """
    deadline = time.monotonic() + timeout
    version = 0
    if security is None or not security.tls:
        opened = grpc.insecure_channel(scheduler)
    else:
        name = security.server_name
        options = [("grpc.ssl_target_name_override", name)] if name else []
        opened = grpc.secure_channel(scheduler, security.credentials(), options=options)
    with opened as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the scheduler's pool never matched (version {version})")
            response = stub.ListExecutors(
                scheduler_service_pb2.ListExecutorsRequest(min_version=version),
                timeout=min(remaining, 20),
            )
            if predicate(response):
                return response
            version = response.version


def executors_of(
    scheduler: str, predicate: Callable[[set[str]], bool], timeout: float = 60.0
) -> scheduler_service_pb2.ListExecutorsResponse:
    """Wait until the set of the scheduler's executor addresses satisfies ``predicate``."""
    return wait_for_pool(
        scheduler, lambda response: predicate({e.address for e in response.executors}), timeout
    )


class Writes:
    """The user keys a node's store wrote and deleted (see :func:`recorded_writes`)."""

    def __init__(self) -> None:
        self.put: list[str] = []
        self.deleted: list[str] = []


@contextlib.contextmanager
def recorded_writes(node: Node) -> Iterator[Writes]:
    """Record the user keys written to and deleted from the node's own store while open."""
    store: Any = node.store
    seen = Writes()
    put, delete, delete_many = store.put, store.delete, store.delete_many
    user = lattice_pb2.KEYSPACE_USER

    async def recorded_put(keyspace: int, key: str, *args: Any, **kwargs: Any) -> Any:
        if keyspace == user:
            seen.put.append(key)
        return await put(keyspace, key, *args, **kwargs)

    async def recorded_delete(keyspace: int, key: str, *args: Any, **kwargs: Any) -> Any:
        if keyspace == user:
            seen.deleted.append(key)
        return await delete(keyspace, key, *args, **kwargs)

    async def recorded_delete_many(keyspace: int, keys: Any) -> Any:
        keys = list(keys)
        if keyspace == user:
            seen.deleted.extend(keys)
        return await delete_many(keyspace, keys)

    store.put, store.delete, store.delete_many = recorded_put, recorded_delete, recorded_delete_many
    try:
        yield seen
    finally:
        store.put, store.delete, store.delete_many = put, delete, delete_many


def stored(node: Node, key: str) -> bool:
    """Whether a user key is in the node's own store (a KVS node, or ``cbgrpc serve``'s)."""
    assert isinstance(node.store, LatticeStore)
    return node.store.get(lattice_pb2.KEYSPACE_USER, key) is not None


def wait_unstored(node: Node, keys: Iterable[str], timeout: float = 20.0) -> None:
    """Wait until none of ``keys`` is stored in ``node``, nor will be.

    For ``cbgrpc serve``'s composition in this process (its scheduler and
    executors here): a released result may still be held, or being stored,
    and deleted only after that, so its absence from the store alone says
    nothing. Every store is in the scheduler's books from the call's placement
    until it is done or dropped; a key is settled once it is in none of them.
    """
    assert node.scheduler is not None
    releaser = node.scheduler.releaser
    wanted = set(keys)

    def settled() -> bool:
        pending = (
            wanted & releaser._storing.keys()
            or wanted & releaser._held
            or any(wanted & (e.storing.keys() | e._holds.keys()) for e in node.executors)
        )
        return not (pending or releaser.backlog or releaser._task is not None) and not any(
            stored(node, key) for key in wanted
        )

    deadline = time.monotonic() + timeout
    while not settled():
        assert time.monotonic() < deadline, "released results were still stored or pending"
        time.sleep(0.01)


def wait_stored(address: str, key: str, timeout: float = 30.0) -> bool:
    """Whether a user key is stored at ``address``, read with a waiting ``GetValue``.

    For a result answered before it is stored (see "Held stores" in docs/protocol.md):
    a client that did not make the call waits for it, as the protocol says. The read
    waits at most ``timeout`` seconds (past it, the RPC fails with DEADLINE_EXCEEDED).
    """
    with grpc.insecure_channel(address) as channel:
        kvs = kvs_service_pb2_grpc.KvsServiceStub(channel)
        request = kvs_service_pb2.GetValueRequest(
            key=key, keyspace=lattice_pb2.KEYSPACE_USER, wait=True
        )
        return kvs.GetValue(request, timeout=timeout).found


def wait_deleted(node: Node, loop: LoopThread, keys: Iterable[str], timeout: float = 20) -> None:
    """Wait until every key is gone from the node's store (watching it, not polling)."""
    store = node.store
    assert isinstance(store, LatticeStore)
    wanted = set(keys)
    user = lattice_pb2.KEYSPACE_USER

    async def wait() -> None:
        async with store.watch(user, keys=wanted) as changes:
            left = {key for key in wanted if store.get(user, key) is not None}
            if not left:
                return
            async with asyncio.timeout(timeout):
                async for change in changes:
                    if change.deleted:
                        left.discard(change.key)
                    if not left:
                        return

    loop.run(wait())
