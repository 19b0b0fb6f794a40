"""Fault suite, KVS role: SIGKILL the KVS process (SQLite) under load, then start it again; or
SIGSTOP it, then continue it.

While it is gone or hung every operation ends within its bound with a result
or a clear error (never a hang until the caller's deadline); once it is back
on the same address (or continued) the cluster serves again, and every write
acknowledged before the fault is there. A hung KVS keeps its connections
open: the scheduler and the executors learn that it stopped answering from
their keepalive pings and connection timeouts, within seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError, CloudburstTimeoutError, UnavailableError
from faults import BOUND, pool_of, register_workload, resume_and_kill
from harness import CbgrpcProcess, free_ports

ENV = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}


@pytest.fixture
def started() -> Iterator[list[CbgrpcProcess]]:
    procs: list[CbgrpcProcess] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            resume_and_kill(proc)


def ends_clearly(operation: Callable[[], Any]) -> str:
    """Run an operation during the outage: it returns, or raises a clear (non-timeout) error."""
    try:
        operation()
    except CloudburstTimeoutError as exc:
        pytest.fail(f"an operation waited out its deadline instead of failing: {exc}")
    except CloudburstError as exc:
        return type(exc).__name__
    return "ok"


def start_cluster(started: list[CbgrpcProcess], store: list[str]) -> tuple[str, CbgrpcProcess]:
    """Start a KVS with ``store``, two executors and a scheduler; return the scheduler's address
    (once its pool is complete) and the KVS."""
    kvs = CbgrpcProcess("kvs", *store, env=ENV)
    started.append(kvs)
    executors = [
        CbgrpcProcess("executor", "--kvs", kvs.address, "--id", f"executor-{i}", env=ENV)
        for i in range(2)
    ]
    started.extend(executors)
    flags = [arg for e in executors for arg in ("--executor", e.address)]
    scheduler = CbgrpcProcess("scheduler", "--kvs", kvs.address, *flags, env=ENV)
    started.append(scheduler)
    pool_of(scheduler.address, lambda pool: len(pool) == 2)
    return scheduler.address, kvs


def serves_again(conn: CloudburstConnection) -> None:
    """Wait (bounded) until a write goes through."""
    deadline = time.monotonic() + 30
    while ends_clearly(lambda: conn.put_object("after", 1)) != "ok":
        assert time.monotonic() < deadline, "the cluster did not serve again within 30 s"
        time.sleep(0.05)  # the interval between polls; the deadline bounds the wait


def test_a_killed_kvs_comes_back_with_every_acknowledged_write(
    started: list[CbgrpcProcess], tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    store = ["--port", str(port), "--storage", "sqlite", "--data-dir", str(tmp_path)]
    address, kvs = start_cluster(started, store)

    with CloudburstConnection(address, timeout=BOUND) as conn:
        register_workload(conn)
        acknowledged = {f"acked-{i}": i for i in range(50)}
        for key, value in acknowledged.items():
            assert conn.put_object(key, value)
        assert conn.call_dag("pipeline", {"stage": "before"}).get(timeout=30) == "done-before"

        kvs.kill()
        outcomes = [
            ends_clearly(lambda: conn.put_object("during", 1)),
            ends_clearly(lambda: conn.get_object("acked-1")),
            ends_clearly(lambda: conn.exec_func("stage", ["during"]).get(timeout=BOUND)),
            ends_clearly(lambda: conn.call_dag("pipeline", {"stage": "g"}).get(timeout=BOUND)),
            ends_clearly(lambda: conn.call_dag("pipeline", {"stage": "d"}, direct_response=True)),
        ]
        assert outcomes[:2] == ["UnavailableError", "UnavailableError"], outcomes
        assert set(outcomes) <= {"ok", "UnavailableError"}, outcomes

        started.append(CbgrpcProcess("kvs", *store, env=ENV))
        serves_again(conn)
        assert {key: conn.get_object(key) for key in acknowledged} == acknowledged
        assert conn.exec_func("stage", ["after"]).get(timeout=30) == "after"
        assert conn.call_dag("pipeline", {"stage": "after"}).get(timeout=30) == "done-after"
        assert conn.call_dag("pipeline", {"stage": "x"}, direct_response=True) == "done-x"


#: Each request's own deadline in the SIGSTOP test: an operation that waited on the stopped
#: KVS instead of failing would run into it and raise CloudburstTimeoutError.
HUNG_TIMEOUT = 20.0


def test_a_hung_kvs_fails_operations_clearly_and_serves_once_continued(
    started: list[CbgrpcProcess], tmp_path: Path
) -> None:
    address, kvs = start_cluster(started, ["--storage", "sqlite", "--data-dir", str(tmp_path)])

    with CloudburstConnection(address, timeout=HUNG_TIMEOUT) as conn:
        register_workload(conn)
        acknowledged = {f"acked-{i}": i for i in range(50)}
        for key, value in acknowledged.items():
            assert conn.put_object(key, value)
        assert conn.call_dag("pipeline", {"stage": "before"}).get(timeout=30) == "done-before"

        os.kill(kvs.proc.pid, signal.SIGSTOP)
        try:
            outcomes = [
                ends_clearly(lambda: conn.put_object("during", 1)),
                ends_clearly(lambda: conn.get_object("acked-1")),
                ends_clearly(lambda: conn.exec_func("stage", ["during"]).get()),
                ends_clearly(lambda: conn.call_dag("pipeline", {"stage": "g"}).get()),
                ends_clearly(
                    lambda: conn.call_dag("pipeline", {"stage": "d"}, direct_response=True)
                ),
            ]
            assert outcomes[:2] == ["UnavailableError", "UnavailableError"], outcomes
            assert set(outcomes) <= {"ok", "UnavailableError"}, outcomes
            with pytest.raises(UnavailableError, match=f"KVS at {kvs.address}"):
                conn.get_object("acked-2")
        finally:
            os.kill(kvs.proc.pid, signal.SIGCONT)

        serves_again(conn)
        assert {key: conn.get_object(key) for key in acknowledged} == acknowledged
        assert conn.exec_func("stage", ["after"]).get(timeout=30) == "after"
        assert conn.call_dag("pipeline", {"stage": "after"}).get(timeout=30) == "done-after"
        assert conn.call_dag("pipeline", {"stage": "x"}, direct_response=True) == "done-x"
