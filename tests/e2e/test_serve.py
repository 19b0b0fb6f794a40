"""`cbgrpc serve` as a user runs it: durability across restarts and crashes, CLI behaviour."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cloudburst import CloudburstConnection
from harness import ServeProcess


def double(_: object, x: int) -> int:
    return 2 * x


def test_registrations_and_values_survive_a_restart(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = serve_process("--data-dir", str(data))
    with CloudburstConnection(first.address) as cloud:
        cloud.register(double, "double")
        cloud.register(lambda _, x: x + 1, "incr")
        assert cloud.register_dag("pipeline", ["incr", "double"], [("incr", "double")])
        assert cloud.put_object("greeting", {"hello": "world"})
        stored = cloud.call_dag("pipeline", {"incr": 4})
        assert stored.get(timeout=30) == 10
    assert first.stop(signal.SIGTERM) == 0

    second = serve_process("--data-dir", str(data))
    with CloudburstConnection(second.address) as cloud:
        assert sorted(cloud.list()) == ["double", "incr"]
        assert cloud.get_object("greeting") == {"hello": "world"}
        assert cloud.get_object(stored.obj_id) == 10
        assert cloud.call_dag("pipeline", {"incr": 1}, direct_response=True) == 4
        assert cloud.exec_func("double", [21]).get(timeout=30) == 42


def test_acknowledged_writes_survive_sigkill(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = serve_process("--data-dir", str(data))
    with CloudburstConnection(first.address) as cloud:
        cloud.register(double, "double")
        for i in range(50):
            assert cloud.put_object(f"key-{i}", i)
    first.stop(signal.SIGKILL)

    second = serve_process("--data-dir", str(data))
    with CloudburstConnection(second.address) as cloud:
        assert [cloud.get_object(f"key-{i}") for i in range(50)] == list(range(50))
        assert cloud.exec_func("double", [5]).get(timeout=30) == 10


def test_memory_storage_forgets_on_restart(serve_process: Callable[..., ServeProcess]) -> None:
    first = serve_process("--storage", "memory")
    with CloudburstConnection(first.address) as cloud:
        cloud.put_object("k", 1)
    assert first.stop() == 0
    second = serve_process("--storage", "memory")
    with CloudburstConnection(second.address) as cloud:
        assert cloud.get_object("k") is None


def cbgrpc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", *args], capture_output=True, text=True, timeout=60
    )


def test_help_explains_commands_and_options() -> None:
    top = cbgrpc("--help")
    assert top.returncode == 0
    for command in ("serve", "kvs", "executor", "scheduler"):
        assert command in top.stdout
    serve = cbgrpc("serve", "--help")
    assert serve.returncode == 0
    for option in (
        "--port",
        "--host",
        "--storage",
        "--data-dir",
        "--executors",
        "--threads",
        "--inline-max-seconds",
        "--config",
    ):
        assert option in serve.stdout


def test_bad_configuration_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[kvs]\nengine = 'redis'\n")
    result = cbgrpc("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "kvs.engine must be 'sqlite', 'memory' or 'valkey'" in result.stderr
    valkey = tmp_path / "valkey.toml"
    valkey.write_text("[kvs]\nengine = 'valkey'\nvalkey_url = 'redis://127.0.0.1:1'\n")
    result = cbgrpc("serve", "--config", str(valkey))
    assert result.returncode == 2
    assert "'valkey' serves only `cbgrpc kvs` processes" in result.stderr
    result = cbgrpc("kvs", "--config", str(valkey))
    assert result.returncode == 1
    assert "cannot reach the Valkey cluster at redis://127.0.0.1:1" in result.stderr
    result = cbgrpc("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = cbgrpc("serve", "--inline-max-seconds", "-1")
    assert result.returncode == 2
    assert "executor.inline_max_seconds must be between 0 (off) and 0.1" in result.stderr


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cbgrpc("serve", "--port", str(port), "--storage", "memory")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "another process" in result.stderr


def test_unreachable_server_gives_a_clear_error() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    from cloudburst.errors import UnavailableError

    with pytest.raises(UnavailableError, match="cbgrpc serve"):
        CloudburstConnection(f"127.0.0.1:{port}", connect_timeout=1)


#: A client that tries twice to connect to a port where nothing listens, then exits.
_TWO_FAILED_CONNECTS = """
import sys
from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
for _ in range(2):
    try:
        CloudburstConnection(sys.argv[1], connect_timeout=0.5)
    except UnavailableError:
        print("unavailable", flush=True)
"""


def test_a_connection_tried_again_after_failing_leaves_no_traceback() -> None:
    """A script that waits for its server by trying again prints nothing from gRPC's loops."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-c", _TWO_FAILED_CONNECTS, f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["unavailable", "unavailable"]
    assert "Traceback" not in result.stderr, result.stderr


def _allowed_cpus(pid: int, tid: str) -> str:
    with open(f"/proc/{pid}/task/{tid}/status") as status:
        for line in status:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid} of {pid}")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_cpus_pins_every_thread_of_the_server(
    serve_process: Callable[..., ServeProcess],
) -> None:
    before = os.sched_getaffinity(0)
    cpu = max(before)
    # Started under another affinity (as a child of a pinned process is): --cpus decides.
    os.sched_setaffinity(0, {min(before)})
    try:
        served = serve_process("--storage", "memory", "--cpus", str(cpu))
    finally:
        os.sched_setaffinity(0, before)
    with CloudburstConnection(served.address) as cloud:
        # Calls start the executor threads; they must be pinned too.
        assert cloud.register(double, "double")(21).get(timeout=30) == 42
    pid = served.proc.pid
    threads = os.listdir(f"/proc/{pid}/task")
    assert len(threads) > 3
    assert {_allowed_cpus(pid, tid) for tid in threads} == {str(cpu)}
    assert f"pinned to CPU {cpu}" in served.stderr()


def test_cpus_naming_a_missing_cpu_is_a_configuration_error() -> None:
    result = cbgrpc("serve", "--storage", "memory", "--port", "0", "--cpus", "4096")
    assert result.returncode == 2
    assert "server.cpus: CPU 4096 does not exist on this machine" in result.stderr


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_large_values_reuse_memory_instead_of_faulting_in_fresh_pages(
    serve_process: Callable[..., ServeProcess],
) -> None:
    """A 1 MiB put maps little fresh memory once warm, where every copy of the value
    into freshly mapped memory faults 256 pages in; glibc's own MALLOC_* variables,
    when set, are left to rule."""
    value = b"v" * (1 << 20)

    def faults_per_put(server: ServeProcess) -> float:
        with CloudburstConnection(server.address) as cloud:
            for _ in range(30):
                cloud.put_object("big", value)
            before = _minor_faults(server.proc.pid)
            for _ in range(40):
                cloud.put_object("big", value)
            return (_minor_faults(server.proc.pid) - before) / 40

    tuned = faults_per_put(serve_process("--storage", "memory"))
    fixed = serve_process("--storage", "memory", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    untuned = faults_per_put(fixed)
    assert untuned > 256, f"the user's setting: each 1 MiB block freshly mapped ({untuned})"
    assert tuned < 128, f"{tuned} page faults per 1 MiB put ({untuned} with the user's setting)"
