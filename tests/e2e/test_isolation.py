"""User code and user data cannot stop `cbgrpc serve`: its executors are child processes.

An argument whose unpickling blocks holds up only its own call; one
that ends its process (``os._exit``) costs only the call in flight there, and
the supervisor starts the executor again. Each test starts a real `cbgrpc
serve` and drives it with the SDK.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from cloudburst_grpc.security.internal import LIFETIME_ENV
from harness import ServeProcess, wait_for_pool
from waiting import wait_until

#: The service answers again this soon after an executor process died (docs/faults.md).
RECOVERY = 5.0
#: How long the slow argument blocks its executor (well beyond what the other checks take).
BLOCK_SECONDS = 30


class Runs:
    """An argument that runs ``code`` (with exec) while it is unpickled; it arrives as None."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (self.code,))


def identity(_: Any, value: Any) -> Any:
    return value


#: How long ``nap`` blocks in the blocking-function test: beyond the health timeout.
NAP_SECONDS = 5


def nap(_: Any, seconds: int) -> int:
    """Block ``seconds`` (announcing it when it does), then return them."""
    if seconds:
        print("nap-started", flush=True)
        time.sleep(seconds)
    return seconds


def die(_: Any, code: int) -> None:
    os._exit(code)


def read_stdin(_: Any) -> bytes:
    """What user code finds on its process's standard input."""
    return sys.stdin.buffer.read()


def pong(cloudburst: Any) -> int:
    """Answer each message with ten times it, until "stop"; returns how many it answered."""
    cloudburst.put_object("pong", (cloudburst.get_id(), os.getpid()))
    answered = 0
    while True:
        for sender, message in cloudburst.recv(timeout=60):
            if message == "stop":
                return answered
            cloudburst.send(sender, message * 10)
            answered += 1


def ping(cloudburst: Any, value: int) -> tuple[int, int]:
    """Send ``value`` to pong; its answer and this process's pid."""
    peer, _ = cloudburst.get_object("pong", timeout=60)
    cloudburst.send(peer, value)
    replies = cloudburst.recv(timeout=60)
    return replies[0][1], os.getpid()


def stored(cloud: CloudburstConnection, key: str, timeout: float = 60.0) -> Any:
    """The value of ``key`` once a function has stored it."""
    deadline = time.monotonic() + timeout
    while (value := cloud.get_object(key)) is None:
        assert time.monotonic() < deadline, f"{key!r} never stored"
        time.sleep(0.05)
    return value


def children_of(server: ServeProcess, at_least: int = 0) -> dict[str, int]:
    """Executor id -> pid of the executor processes the server says it started (latest).

    With ``at_least``, first wait until the server has logged that many executor ids
    (its log is read on a thread of its own, so a line may lag the server's address).
    """
    for index in range(at_least):
        server.wait_for_log(f"executor executor-{index} runs in process")
    children: dict[str, int] = {}
    for line in server.stderr_lines:
        match = re.search(r"executor (\S+) runs in process (\d+)", line)
        if match:
            children[match.group(1)] = int(match.group(2))
    return children


def gone(pid: int, timeout: float = 30.0) -> bool:
    """Wait until no process ``pid`` exists (or it is a zombie); False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def call_until_it_succeeds(cloud: CloudburstConnection, timeout: float) -> float:
    """Call ``identity`` until a call succeeds; returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            assert cloud.exec_func("identity", [7]).get(timeout=timeout) == 7
            return time.monotonic() - started
        except CloudburstError:
            if time.monotonic() > deadline:
                raise


def test_an_argument_that_blocks_while_unpickled_holds_up_only_its_own_call(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--storage", "memory", "--executors", "1")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(identity, "identity")
        code = (
            "import time; print('unpickling-started', flush=True); "
            f"time.sleep({BLOCK_SECONDS}); print('unpickling-ended', flush=True)"
        )
        slow = cloud.exec_func("identity", [Runs(code)])
        server.wait_for_log("unpickling-started", stdout=True)
        # The KVS and the scheduler answer while the argument still blocks.
        assert cloud.put_object("during", "yes")
        assert cloud.get_object("during") == "yes"
        # The argument is unpickled on a worker thread of the executor process, not on
        # its event loop: the executor keeps answering health checks and serves other
        # calls (here, the only executor there is).
        assert cloud.exec_func("identity", [1]).get(timeout=60) == 1
        assert len(wait_for_pool(server.address, lambda pool: True).executors) == 1
        # All of that happened while the argument was still being unpickled.
        assert not any("unpickling-ended" in line for line in server.stdout_lines)
        del slow
    assert server.proc.poll() is None


def test_a_function_that_blocks_holds_up_only_its_own_call(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--storage", "memory", "--executors", "1")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(nap, "nap")
        # Quick at first (a function that earned a place on an event loop before)...
        for _ in range(50):
            assert cloud.exec_func("nap", [0]).get(timeout=60) == 0
        # ...then it blocks for longer than the scheduler's health timeout (2 s).
        napping = cloud.exec_func("nap", [NAP_SECONDS])
        server.wait_for_log("nap-started", stdout=True)
        assert cloud.exec_func("nap", [0]).get(timeout=60) == 0
        # The blocked call finishes normally: its executor was never set aside.
        assert napping.get(timeout=60) == NAP_SECONDS
        assert not any("is down" in line for line in server.stderr_lines)
    assert server.proc.poll() is None


@pytest.mark.parametrize("culprit", ["argument", "function"])
def test_a_call_that_ends_its_process_costs_only_that_call(
    serve_process: Callable[..., ServeProcess], culprit: str
) -> None:
    server = serve_process("--storage", "memory", "--executors", "2")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(identity, "identity")
        cloud.register(die, "die")
        for i in range(20):
            assert cloud.put_object(f"acknowledged-{i}", i)
        assert cloud.exec_func("identity", [0]).get(timeout=60) == 0
        if culprit == "argument":
            fatal = cloud.exec_func("identity", [Runs("import os; os._exit(9)")])
        else:
            fatal = cloud.exec_func("die", [9])
        with pytest.raises(CloudburstError, match=r"lost the connection to executor|was lost"):
            fatal.get(timeout=60)
        assert server.proc.poll() is None, "the server itself must survive"
        call_until_it_succeeds(cloud, RECOVERY)
        assert [cloud.get_object(f"acknowledged-{i}") for i in range(20)] == list(range(20))
    server.wait_for_log("exited with exit code 9; restarting it")


def test_a_killed_executor_process_is_started_again(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--storage", "memory", "--executors", "1")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(identity, "identity")
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("dag", ["incr", "square"], [("incr", "square")])
        first = children_of(server, 1)["executor-0"]
        os.kill(first, signal.SIGKILL)
        server.wait_for_log("executor executor-0 (process")
        assert "signal SIGKILL" in server.wait_for_log("exited with signal SIGKILL")
        server.wait_for_log("executor executor-0 is back at")
        assert children_of(server)["executor-0"] != first
        wait_for_pool(server.address, lambda pool: len(pool.executors) == 1)
        assert cloud.exec_func("identity", [3]).get(timeout=60) == 3
        # The DAG's functions are pinned on the new process again.
        assert cloud.call_dag("dag", {"incr": 2}).get(timeout=60) == 9


def test_no_executor_process_outlives_the_server(
    serve_process: Callable[..., ServeProcess],
) -> None:
    stopped = serve_process("--storage", "memory", "--executors", "2")
    killed = serve_process("--storage", "memory", "--executors", "2")
    pids = [*children_of(stopped, 2).values(), *children_of(killed, 2).values()]
    assert len(pids) == 4
    assert stopped.stop(signal.SIGTERM) == 0
    killed.stop(signal.SIGKILL)
    assert all(gone(pid) for pid in pids), "an executor process outlived its server"


def test_a_memory_limit_turns_a_memory_bomb_into_an_error(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process(
        "--storage", "memory", "--executors", "1", "--memory-limit-bytes", str(2 << 30)
    )
    with CloudburstConnection(server.address) as cloud:
        cloud.register(lambda _, n: len(bytearray(n)), "allocate")
        with pytest.raises(CloudburstError, match="MemoryError"):
            cloud.exec_func("allocate", [8 << 30]).get(timeout=60)
        assert cloud.exec_func("allocate", [1 << 20]).get(timeout=60) == 1 << 20
    assert server.proc.poll() is None


def test_functions_on_different_executor_processes_exchange_messages(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--storage", "memory", "--executors", "2")
    with CloudburstConnection(server.address) as cloud:
        exchange_messages(server, cloud)


def exchange_messages(server: ServeProcess, cloud: CloudburstConnection) -> None:
    """Ping on one executor process, pong on another: each ping gets its answer."""
    cloud.register(pong, "pong")
    cloud.register(ping, "ping")
    answering = cloud.exec_func("pong", [])
    _, pong_pid = stored(cloud, "pong")
    assert pong_pid in children_of(server, 2).values()
    pids = set()
    for value in range(1, 7):
        reply, pid = cloud.exec_func("ping", [value]).get(timeout=60)
        assert reply == value * 10
        pids.add(pid)
        if pid != pong_pid:
            break
    assert pids - {pong_pid}, "no ping ran on the other executor process"
    peer, _ = cloud.get_object("pong")
    cloud.register(lambda cb, to: cb.send(to, "stop"), "stop")
    cloud.exec_func("stop", [peer]).get(timeout=60)
    assert answering.get(timeout=60) == len(pids)


def writer_of(address: str, key: str) -> str | None:
    """Who wrote the value under a user key (its LWW writer id); None when there is none."""
    with grpc.insecure_channel(address) as channel:
        response = kvs_service_pb2_grpc.KvsServiceStub(channel).GetValue(
            kvs_service_pb2.GetValueRequest(key=key, keyspace=lattice_pb2.KEYSPACE_USER),
            timeout=30,
        )
    return response.lattice.lww.timestamp.writer_id if response.found else None


def test_the_server_stores_the_results_its_callers_await(
    serve_process: Callable[..., ServeProcess],
) -> None:
    # The KVS is in the server's process and the executors are not: a result answered to its
    # caller is stored by the server (a call in its process), not by the executor process (a
    # KVS request and a report back). Read-your-writes and releases work as ever.
    server = serve_process("--storage", "memory", "--executors", "2")
    with CloudburstConnection(server.address, keep_results=True) as cloud:
        incr = cloud.register(lambda _, x: x + 1, "incr")
        cloud.register(lambda _, x: x * x, "square")
        cloud.register_dag("chain", ["incr", "square"], [("incr", "square")])
        call = incr(1)
        assert call.get(timeout=60) == 2
        assert cloud.get_object(call.obj_id) == 2
        assert writer_of(server.address, call.obj_id) == "scheduler-scheduler-local"
        dag = cloud.call_dag("chain", {"incr": 2})
        assert dag.get(timeout=60) == 9
        assert cloud.get_object(dag.obj_id) == 9
        assert writer_of(server.address, dag.obj_id) == "scheduler-scheduler-local"
        # A function that raises: its error is what is stored.
        fails = cloud.register(lambda _: 1 / 0, "fails")
        failed = fails()
        with pytest.raises(CloudburstError, match="ZeroDivisionError"):
            failed.get(timeout=60)
        with pytest.raises(CloudburstError, match="ZeroDivisionError"):
            cloud.get_object(failed.obj_id)
    with CloudburstConnection(server.address) as cloud:
        # Released once read: deleted after its store, never brought back by it.
        released = cloud.exec_func("incr", [41])
        key = released.obj_id
        assert released.get(timeout=60) == 42
        del released
        wait_until(lambda: writer_of(server.address, key) is None, f"{key} deleted", 30)


def test_an_executor_process_that_cannot_start_is_reported() -> None:
    # Too little memory for the executor process even to start.
    result = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "serve", "--port", "0", "--storage", "memory",
         "--memory-limit-bytes", "1000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "executor process executor-" in result.stderr
    assert "ended at start-up" in result.stderr


def test_isolation_none_runs_the_executors_in_the_server(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--storage", "memory", "--isolation", "none")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("dag", ["incr", "square"], [("incr", "square")])
        assert cloud.call_dag("dag", {"incr": 2}).get(timeout=60) == 9
    assert not children_of(server)
    server.wait_for_log("2 executors in this process")


def _cbgrpc(*args: str) -> str:
    """Run a `cbgrpc` command that must succeed; its standard output, then its standard error."""
    result = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def secured_serve(
    serve_process: Callable[..., ServeProcess],
    tmp_path: Path,
    credential: str,
    env: dict[str, str] | None = None,
) -> tuple[ServeProcess, dict[str, Any], Path]:
    """A `cbgrpc serve` with TLS from `cbgrpc certs` (in ``tmp_path/certs``), two executors.

    Returns the server, the keyword arguments of a connection as an admin with a
    ``credential`` (``token`` or ``certificate``), and the server's ``TMPDIR`` (its own
    and its children's: an empty directory of the test's). ``env`` adds to the server's
    environment.
    """
    certs = tmp_path / "certs"
    _cbgrpc("certs", str(certs), "--client", "admin")
    tls = ["--tls-cert", str(certs / "serve.pem"), "--tls-key", str(certs / "serve-key.pem"),
           "--tls-ca", str(certs / "ca.pem")]  # fmt: skip
    login: dict[str, Any] = {"tls_ca": str(certs / "ca.pem")}
    if credential == "token":
        made = _cbgrpc("token", "admin").splitlines()
        token = next(line for line in made if line.startswith("cbt_"))
        entry = next(line for line in made if line.startswith("add to the tokens file: "))
        tokens_file = tmp_path / "tokens"
        tokens_file.write_text(entry.removeprefix("add to the tokens file: ") + "\n")
        tls += ["--tokens-file", str(tokens_file)]
        login["token"] = token
    else:
        login["tls_cert"] = str(certs / "client-admin.pem")
        login["tls_key"] = str(certs / "client-admin-key.pem")
    # Any temporary file of the server's would go to a directory of the test's own.
    private = tmp_path / "tmp"
    private.mkdir()
    server = serve_process(
        "--storage", "memory", "--executors", "2", *tls, env={**(env or {}), "TMPDIR": str(private)}
    )
    return server, login, private


@pytest.mark.parametrize("credential", ["token", "certificate"])
def test_with_tls_the_executors_are_child_processes_with_certificates_of_their_own(
    serve_process: Callable[..., ServeProcess], tmp_path: Path, credential: str
) -> None:
    certs = tmp_path / "certs"
    server, login, private = secured_serve(serve_process, tmp_path, credential)
    user_files = {p.name: p.read_bytes() for p in certs.iterdir()}
    server.wait_for_log("2 executors in child processes")
    pids = children_of(server, 2)
    assert len(pids) == 2 and server.proc.pid not in pids.values()
    assert "not available with TLS" not in server.stderr()
    # The children's certificates and keys reached them without touching the disk.
    assert list(private.iterdir()) == []
    with CloudburstConnection(server.address, **login) as cloud:
        cloud.register(identity, "identity")
        cloud.register(die, "die")
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("dag", ["incr", "square"], [("incr", "square")])
        assert cloud.exec_func("identity", [5]).get(timeout=60) == 5
        assert cloud.call_dag("dag", {"incr": 2}).get(timeout=60) == 9
        # The pipe that carries the certificates is not user code's standard input.
        cloud.register(read_stdin, "read_stdin")
        assert cloud.exec_func("read_stdin", []).get(timeout=60) == b""
        # User code that ends its process leaves the server answering.
        with pytest.raises(CloudburstError, match=r"lost the connection to executor|was lost"):
            cloud.exec_func("die", [9]).get(timeout=60)
        assert server.proc.poll() is None, "the server itself must survive"
        call_until_it_succeeds(cloud, RECOVERY)
        server.wait_for_log("exited with exit code 9; restarting it")
        server.wait_for_log("is back at")
        assert cloud.call_dag("dag", {"incr": 3}).get(timeout=60) == 16
    assert server.stop(signal.SIGTERM) == 0
    assert all(gone(pid) for pid in pids.values()), "an executor process outlived its server"
    assert list(private.iterdir()) == [], "the server left files behind"
    # Nothing the user gave changed.
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == user_files


def test_with_tls_functions_on_different_executor_processes_exchange_messages(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server, login, _ = secured_serve(serve_process, tmp_path, "certificate")
    with CloudburstConnection(server.address, **login) as cloud:
        exchange_messages(server, cloud)


def test_a_killed_tls_server_leaves_no_file_behind(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server, login, private = secured_serve(serve_process, tmp_path, "certificate")
    pids = children_of(server, 2)
    with CloudburstConnection(server.address, **login) as cloud:
        cloud.register(identity, "identity")
        assert cloud.exec_func("identity", [5]).get(timeout=60) == 5
    # SIGKILL: the server cleans nothing up; its children die with it (and are killed here
    # too, so that none outlives the test whatever happens).
    server.stop(signal.SIGKILL)
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert all(gone(pid) for pid in pids.values()), "an executor process outlived its server"
    assert list(private.iterdir()) == [], "a killed server left files behind"


def served_certificate(address: str) -> x509.Certificate:
    """The certificate the TLS server at ``address`` shows in a handshake (not verified)."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def child_addresses(server: ServeProcess) -> dict[str, str]:
    """Executor id -> address of the executor processes the server started (latest)."""
    return {
        match.group(1): match.group(2)
        for line in server.stderr_lines
        if (match := re.search(r"executor (\S+) runs in process \d+ at (\S+)", line))
    }


def store_and_read(cloudburst: Any, key: str, value: int) -> int:
    """Store ``value`` under ``key`` in the KVS and read it back (the executor's channel to it)."""
    cloudburst.put_object(key, value)
    return int(cloudburst.get_object(key))


#: The lifetime of the internal certificates in the renewal test (renewed after a third).
SHORT_LIFETIME = 8.0


def test_executor_processes_keep_serving_after_their_first_certificate_expired(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server, login, _ = secured_serve(
        serve_process, tmp_path, "certificate", env={LIFETIME_ENV: str(SHORT_LIFETIME)}
    )
    pids = children_of(server, 2)
    address = child_addresses(server)["executor-0"]
    first = served_certificate(address)
    lifetime = first.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert lifetime < datetime.timedelta(seconds=SHORT_LIFETIME)  # the test's lifetime applies
    with CloudburstConnection(server.address, **login) as cloud:
        cloud.register(store_and_read, "store_and_read")
        assert cloud.exec_func("store_and_read", ["before", 1]).get(timeout=60) == 1

        def renewed_after_expiry() -> bool:
            now = datetime.datetime.now(datetime.UTC)
            served = served_certificate(address)
            return now > first.not_valid_after_utc and served.not_valid_after_utc > now

        # The first certificate expires; the child shows a renewed one.
        wait_until(renewed_after_expiry, "executor-0 serves a renewed certificate", 120.0)
        server.wait_for_log("renewed the internal TLS certificates")
        # New connections in both directions now need the renewed certificates: a new DAG
        # pins its functions over a new channel to each child, and each child reaches the
        # server's KVS over a new channel, both made after the certificates changed.
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda cb, a: store_and_read(cb, "after-dag", a), "store")
        assert cloud.register_dag("after", ["incr", "store"], [("incr", "store")])
        assert cloud.exec_func("store_and_read", ["after", 2]).get(timeout=60) == 2
        assert cloud.call_dag("after", {"incr": 3}).get(timeout=60) == 4
        exchange_messages(server, cloud)
    # The same processes served throughout: none was restarted with a new certificate.
    assert children_of(server) == pids
    assert not any("exited with" in line for line in server.stderr_lines)
    assert server.proc.poll() is None
