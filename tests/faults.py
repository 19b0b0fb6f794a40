"""The fault suite's shared pieces: a workload whose calls run long at a known place, and
waits on what the scheduler reports, each with a deadline."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from cloudburst.future import CloudburstFuture
from harness import CbgrpcProcess, wait_for_pool

#: The bound the fault suite holds every call to once a node is lost (seconds).
BOUND = 5.0


def resume_and_kill(process: CbgrpcProcess) -> None:
    """Kill a process that may be stopped: continue it first (a stopped one ignores SIGTERM)."""
    if process.proc.poll() is None:
        os.kill(process.proc.pid, signal.SIGCONT)
        process.kill()


def register_workload(conn: CloudburstConnection) -> None:
    """Register ``stage``, ``sink``, ``gated`` and the DAGs ``pipeline`` (stage -> sink)
    and ``gated-pipeline`` (gated -> sink).

    ``stage(tag)`` returns ``tag``; a ``slow*`` tag marks the call started (key
    ``started-TAG``) and then runs long. ``sink(value)`` returns ``done-VALUE``.
    ``gated(tag)`` marks itself started, runs until the key ``go-TAG`` exists,
    and returns ``gated-TAG``.
    Both are defined here, inside a function, so they are pickled by value.
    """

    def stage(cloudburst: Any, tag: str) -> str:
        if tag.startswith("slow"):
            cloudburst.put_object(f"started-{tag}", True)
            time.sleep(120)  # the workload: busy until the test kills or stops its process
        return tag

    def sink(_: Any, value: str) -> str:
        return f"done-{value}"

    def gated(cloudburst: Any, tag: str) -> str:
        cloudburst.put_object(f"started-{tag}", True)
        deadline = time.monotonic() + 60
        while cloudburst.get_object(f"go-{tag}") is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the workload: runs until the test opens its gate
        return f"gated-{tag}"

    conn.register(stage, "stage")
    conn.register(sink, "sink")
    conn.register(gated, "gated")
    assert conn.register_dag("pipeline", ["stage", "sink"], [("stage", "sink")])
    assert conn.register_dag("gated-pipeline", ["gated", "sink"], [("gated", "sink")])


def wait_started(conn: CloudburstConnection, tag: str, timeout: float = 60.0) -> None:
    """Wait (a waiting read of the KVS) until the ``slow`` call tagged ``tag`` runs."""
    assert CloudburstFuture(f"started-{tag}", conn).get(timeout=timeout) is True


def pool_of(
    scheduler: str,
    predicate: Callable[[dict[str, set[str]]], bool],
    timeout: float = 60.0,
) -> dict[str, set[str]]:
    """Wait on ListExecutors until ``{executor_id: pinned functions}`` satisfies ``predicate``.

    Only executors work may be placed on are listed (not those set aside).
    """
    response = wait_for_pool(
        scheduler,
        lambda r: predicate({e.executor_id: set(e.pinned_functions) for e in r.executors}),
        timeout,
    )
    return {e.executor_id: set(e.pinned_functions) for e in response.executors}


def process_of(executors: list[CbgrpcProcess], executor_id: str) -> CbgrpcProcess:
    """The executor process started with ``--id executor_id``."""
    return next(e for e in executors if f"--id {executor_id}" in " ".join(e.args))


def lose_an_executor_under_load(
    scheduler: str, executors: list[CbgrpcProcess], fault: str, client_address: str = ""
) -> None:
    """SIGKILL (``fault="kill"``) or SIGSTOP (``"stop"``) the executor that runs calls.

    Calls in flight there (a DAG call read with ``.get()``, one with a direct
    response, both losing their first, non-sink stage, and a one-shot call)
    must end with UnavailableError within :data:`BOUND`; the executor leaves
    the pool, calls placed afterwards succeed on the survivor, and a stopped
    executor comes back once it answers health checks again.
    """
    with (
        CloudburstConnection(client_address or scheduler) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        register_workload(conn)
        pins = pool_of(scheduler, lambda pool: len(pool) == 2)
        # One replica per function: the first stage and the sink run on different executors.
        (victim_id,) = [eid for eid, pinned in pins.items() if "stage" in pinned]
        assert "sink" not in pins[victim_id]
        victim = process_of(executors, victim_id)
        survivor_id = next(eid for eid in pins if eid != victim_id)

        via_key = conn.call_dag("pipeline", {"stage": "slow-get"})
        direct = background.submit(
            conn.call_dag, "pipeline", {"stage": "slow-direct"}, direct_response=True
        )
        one_shot = conn.exec_func("stage", ["slow-one-shot"])
        for tag in ("slow-get", "slow-direct", "slow-one-shot"):
            wait_started(conn, tag)
        try:
            os.kill(victim.proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            lost_at = time.monotonic()
            # Each wait is bounded: a call that hung would raise a timeout error instead.
            with pytest.raises(UnavailableError, match=victim_id):
                via_key.get(timeout=BOUND)
            with pytest.raises(UnavailableError, match=victim_id):
                direct.result(timeout=max(BOUND - (time.monotonic() - lost_at), 0.1))
            with pytest.raises(UnavailableError):
                one_shot.get(timeout=BOUND)

            # The lost executor is out of the pool; new calls run on the survivor.
            pool_of(scheduler, lambda pool: set(pool) == {survivor_id}, timeout=BOUND)
            assert conn.call_dag("pipeline", {"stage": "fast"}).get(timeout=30) == "done-fast"
            assert conn.call_dag("pipeline", {"stage": "again"}, direct_response=True) == (
                "done-again"
            )
            assert conn.exec_func("stage", ["quick"]).get(timeout=30) == "quick"

            if fault == "stop":
                # Back in the pool only once it answers health checks again.
                os.kill(victim.proc.pid, signal.SIGCONT)
                pool_of(scheduler, lambda pool: victim_id in pool, timeout=30)
        finally:
            resume_and_kill(victim)
