"""A real Valkey Cluster on loopback for tests: started on ports chosen at run time, stopped by PID.

``valkey-server`` (or ``redis-server`` 7, which speaks the same protocol) must be
installed; ``tools/valkey/install.sh`` installs it. Each node runs in its own
directory under a temporary path, keeps nothing on disk, and is stopped by the
PID this module started, also when start-up fails half way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT = 30.0


def server_binary() -> str | None:
    """The Valkey (or Redis) server on PATH, or None."""
    return shutil.which("valkey-server") or shutil.which("redis-server")


def cli_binary() -> str | None:
    """The matching command-line client on PATH, or None."""
    server = server_binary()
    if server is None:
        return None
    return shutil.which("valkey-cli" if server.endswith("valkey-server") else "redis-cli")


@dataclasses.dataclass
class ValkeyNode:
    """One server process of the cluster."""

    port: int
    bus_port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclasses.dataclass
class ValkeyCluster:
    """A running cluster: its nodes, and how to reach and stop them."""

    nodes: list[ValkeyNode]
    cli: str

    @property
    def url(self) -> str:
        """A URL naming every node, as ``kvs.valkey_url`` takes it."""
        return "redis://" + ",".join(n.address for n in self.nodes if n.alive)

    def command(self, node: ValkeyNode, *args: str, timeout: float = 10.0) -> str:
        """Run one command on one node with the CLI and return its output."""
        result = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return result.stdout

    def primaries(self) -> list[ValkeyNode]:
        """The live nodes that are primaries now."""
        found = []
        for node in self.nodes:
            if node.alive and "role:master" in self.command(node, "INFO", "replication"):
                found.append(node)
        return found

    def primary_of(self, key: str) -> ValkeyNode:
        """The live primary that owns ``key``'s slot now."""
        slot = int(self.command(self._any_alive(), "CLUSTER", "KEYSLOT", key).strip())
        for node in self.primaries():
            for line in self.command(node, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" not in fields[2]:
                    continue
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return node
        raise LookupError(f"no live primary owns slot {slot}")

    def _any_alive(self) -> ValkeyNode:
        return next(n for n in self.nodes if n.alive)

    def kill(self, node: ValkeyNode) -> None:
        """SIGKILL one node (by its PID) and reap it."""
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT, replicas: int | None = None) -> None:
        """Wait until every live node says the cluster is ok (and primaries have their replicas)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._healthy(replicas):
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Valkey cluster was not healthy within {timeout:.0f}s")
            time.sleep(0.05)

    def _healthy(self, replicas: int | None) -> bool:
        for node in self.nodes:
            if node.alive and "cluster_state:ok" not in self.command(node, "CLUSTER", "INFO"):
                return False
        if replicas is not None:
            for node in self.primaries():
                info = self.command(node, "INFO", "replication")
                if f"connected_slaves:{replicas}" not in info:
                    return False
                if info.count("state=online") < replicas:
                    return False
        return True

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, then SIGKILL); idempotent."""
        for node in self.nodes:
            if node.alive:
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(5)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_node(server: str, directory: Path, node_timeout_ms: int) -> ValkeyNode:
    """Start one node on fresh ports; retried with other ports when one was taken meanwhile."""
    for _ in range(10):
        port, bus_port = _free_port(), _free_port()
        if port == bus_port:
            continue
        node_dir = directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [
            server,
            "--port", str(port),
            "--cluster-port", str(bus_port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", str(node_timeout_ms),
            "--dir", str(node_dir),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(node_dir / "server.log"),
        ]  # fmt: skip
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = ValkeyNode(port, bus_port, process, node_dir)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and node.alive:
            if _ping(port):
                return node
            time.sleep(0.02)
        if node.alive:
            node.process.kill()
        node.process.wait(5)
    raise RuntimeError(f"cannot start {server}: see the logs under {directory}")


def start_cluster(
    directory: Path, primaries: int = 3, replicas: int = 2, node_timeout_ms: int = 1000
) -> ValkeyCluster:
    """Start and form a cluster of ``primaries`` x (1 + ``replicas``) nodes under ``directory``.

    Every process started is stopped again if forming the cluster fails.
    """
    server, cli = server_binary(), cli_binary()
    if server is None or cli is None:
        raise RuntimeError("valkey-server is not installed: run tools/valkey/install.sh")
    cluster = ValkeyCluster([], cli)
    try:
        for _ in range(primaries * (1 + replicas)):
            cluster.nodes.append(_start_node(server, directory, node_timeout_ms))
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(n.address for n in cluster.nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=STARTUP_TIMEOUT,
        )
        cluster.wait_healthy(replicas=replicas)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster(directory: Path, **kwargs: int) -> Iterator[ValkeyCluster]:
    """Start a cluster for the block and stop every node after it."""
    cluster = start_cluster(directory, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()
