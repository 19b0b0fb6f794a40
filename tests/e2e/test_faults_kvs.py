"""Fault suite, KVS role: SIGKILL the KVS process (SQLite) under load, then start it again.

While it is gone every operation ends within its bound with a result or a
clear error (never a hang until the caller's deadline); once it is back on
the same address the cluster serves again, and every write acknowledged
before the kill is there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError, CloudburstTimeoutError
from faults import BOUND, pool_of, register_workload
from harness import CbgrpcProcess, free_ports

ENV = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}


@pytest.fixture
def started() -> Iterator[list[CbgrpcProcess]]:
    procs: list[CbgrpcProcess] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.kill()


def ends_clearly(operation: Callable[[], Any]) -> str:
    """Run an operation during the outage: it returns, or raises a clear (non-timeout) error."""
    try:
        operation()
    except CloudburstTimeoutError as exc:
        pytest.fail(f"an operation waited out its deadline instead of failing: {exc}")
    except CloudburstError as exc:
        return type(exc).__name__
    return "ok"


def test_a_killed_kvs_comes_back_with_every_acknowledged_write(
    started: list[CbgrpcProcess], tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    store = ["--port", str(port), "--storage", "sqlite", "--data-dir", str(tmp_path)]
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

    with CloudburstConnection(scheduler.address, timeout=BOUND) as conn:
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
        # Serving again: wait (bounded) until a write goes through.
        deadline = time.monotonic() + 30
        while ends_clearly(lambda: conn.put_object("after", 1)) != "ok":
            assert time.monotonic() < deadline, "the cluster did not serve again within 30 s"
            time.sleep(0.05)  # the interval between polls; the deadline bounds the wait
        assert {key: conn.get_object(key) for key in acknowledged} == acknowledged
        assert conn.exec_func("stage", ["after"]).get(timeout=30) == "after"
        assert conn.call_dag("pipeline", {"stage": "after"}).get(timeout=30) == "done-after"
        assert conn.call_dag("pipeline", {"stage": "x"}, direct_response=True) == "done-x"
