"""The fault suite's shared pieces: a workload whose calls run long at a known place, and
waits on what the scheduler reports, each with a deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cloudburst import CloudburstConnection
from cloudburst.future import CloudburstFuture
from cloudburst.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc
from harness import CbgrpcProcess

#: The bound the fault suite holds every call to once a node is lost (seconds).
BOUND = 5.0


def register_workload(conn: CloudburstConnection) -> None:
    """Register ``stage`` and ``sink`` and the DAG ``pipeline`` (stage -> sink).

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
    deadline = time.monotonic() + timeout
    version = 0
    with grpc.insecure_channel(scheduler) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the scheduler's pool never matched (version {version})")
            response = stub.ListExecutors(
                scheduler_service_pb2.ListExecutorsRequest(min_version=version),
                timeout=min(remaining, 20),
            )
            pool = {e.executor_id: set(e.pinned_functions) for e in response.executors}
            if predicate(pool):
                return pool
            version = response.version


@contextlib.contextmanager
def stopped(proc: CbgrpcProcess) -> Iterator[None]:
    """SIGSTOP a process this test started; SIGCONT it on the way out, whatever happens."""
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGCONT)
