"""A process asked to stop stops, whatever its user functions do.

Threads running user code cannot be stopped; code that never yields can hold
up the event loop itself. Either way SIGTERM ends the process within its grace
period plus a few seconds, and its log names each call it abandoned.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstTimeoutError
from harness import CbgrpcProcess, ServeProcess, free_ports, running_process_cluster

#: The default grace period (server.grace_seconds).
GRACE = 5.0
#: What the issue allows beyond the grace period.
SLACK = 5.0


def spin_in_recv(cloudburst: Any) -> None:
    cloudburst.put_object("spin/id", cloudburst.get_id())
    while True:
        cloudburst.recv()


def await_key(cloudburst: Any, key: str) -> Any:
    return cloudburst.get_object(key, timeout=60)


def spin(_: Any, marker: str) -> None:
    print(marker, flush=True)
    while True:
        pass


def where(_: Any, marker: str) -> str:
    if marker:
        print(marker, flush=True)
        while True:
            pass
    return threading.current_thread().name


def stop_and_time(process: CbgrpcProcess) -> tuple[int, float]:
    """SIGTERM ``process``; return its exit code and the seconds it took to exit."""
    started = time.monotonic()
    code = process.stop(signal.SIGTERM, timeout=GRACE + SLACK + 10)
    return code, time.monotonic() - started


def test_sigterm_stops_a_scheduler_still_waiting_for_its_peers() -> None:
    """A start that waits for an executor (up to 30 s) is given up at once, not forced."""
    kvs_port, executor_port = free_ports(2)  # nothing listens there
    process = CbgrpcProcess(
        "scheduler",
        "--kvs",
        f"127.0.0.1:{kvs_port}",
        "--executor",
        f"127.0.0.1:{executor_port}",
        "--log-level",
        "INFO",
        ready=False,
    )
    try:
        # Its registry found no KVS: it has begun to start, with its signal handlers set.
        process.wait_for_log("definitions ended", timeout=30)
        code = process.stop(signal.SIGTERM, timeout=GRACE + SLACK + 10)
    finally:
        process.kill()
    assert code == 0, process.stderr()
    assert "shutdown did not finish" not in process.stderr()
    assert "signal received while starting" in process.stderr()
    assert not process.stdout_lines  # it never listened


def test_sigterm_stops_an_executor_whose_function_spins_in_recv() -> None:
    with running_process_cluster() as cluster:
        with CloudburstConnection(cluster.address) as cloud:
            spinning = cloud.register(spin_in_recv, "spin_in_recv")()
            mailbox_id = cloud.register(await_key, "await_key")("spin/id").get(timeout=60)
            host = mailbox_id.rpartition("@")[2]
            (executor,) = [e for e in cluster.executors if e.address == host]
            code, took = stop_and_time(executor)
        assert took <= GRACE + SLACK, f"exited {took:.1f}s after SIGTERM"
        assert code == 0, executor.stderr()
        line = executor.wait_for_log(f"abandoning call {spinning.obj_id}", timeout=0)
        assert "spin_in_recv" in line


def test_sigterm_stops_serve_whose_function_spins_on_a_thread(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process("--data-dir", str(tmp_path))
    with CloudburstConnection(server.address) as cloud:
        assert cloud.put_object("kept", "stored before the stop")
        spinning = cloud.register(spin, "spin")("spin started")
        server.wait_for_log("spin started", stdout=True)
        code, took = stop_and_time(server)
    assert took <= GRACE + SLACK, f"exited {took:.1f}s after SIGTERM"
    assert code == 0
    line = server.wait_for_log(f"abandoning call {spinning.obj_id}", timeout=0)
    assert "'spin'" in line
    assert "stopped" in server.stderr()

    again = serve_process("--data-dir", str(tmp_path))
    with CloudburstConnection(again.address) as cloud:
        assert cloud.get_object("kept") == "stored before the stop"


def test_sigterm_stops_serve_whose_function_holds_up_its_event_loop(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    """A quick function moves onto the event loop; then it never returns.

    One executor, so that the call lands where the function earned the loop,
    and a generous limit for quick runs, so that under load its runs still
    count as quick; the server's own watchdog ends it. (Isolated executor
    processes run functions on worker threads only, so there no function can
    hold up an event loop.)
    """
    server = serve_process(
        "--data-dir",
        str(tmp_path),
        "--executors",
        "1",
        "--inline-max-seconds",
        "0.1",
        "--isolation",
        "none",
    )
    with CloudburstConnection(server.address) as cloud:
        assert cloud.put_object("kept", "stored before the stop")
        fn = cloud.register(where, "where")
        for _ in range(100):
            if fn("").get(timeout=30) == "MainThread":
                break
        else:
            raise AssertionError("the quick function never moved onto the event loop")
    # The server cannot even accept the call while the function holds up its loop.
    with CloudburstConnection(server.address, timeout=5) as cloud:
        with contextlib.suppress(CloudburstTimeoutError):
            cloud.get_function("where")("holding up the loop")  # type: ignore[misc]
        server.wait_for_log("holding up the loop", stdout=True)
        _, took = stop_and_time(server)
    assert took <= GRACE + SLACK, f"exited {took:.1f}s after SIGTERM"
    line = server.wait_for_log("abandoning call", timeout=0)
    assert "'where'" in line
    assert "shutdown did not finish within the grace period" in server.stderr()

    again = serve_process("--data-dir", str(tmp_path))
    with CloudburstConnection(again.address) as cloud:
        assert cloud.get_object("kept") == "stored before the stop"
