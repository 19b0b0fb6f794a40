"""Calls sent together: each gets its own answer, whoever sends it and however they travel.

Calls that several threads send before the SDK's loop gets to them are taken
by one sender and written together (in one message where the scheduler reads
batches); these tests check that every call still gets its own answer.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstTimeoutError, DagNotFoundError
from cloudburst.serialization import serialize
from cloudburst.v1 import scheduler_service_pb2
from harness import Cluster

DEADLINE = 60.0


def pause(_: Any, seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def dag_call(name: str, argument: int) -> scheduler_service_pb2.StreamCallsRequest:
    """A direct-response call of DAG ``name`` (an int argument for ``incr``)."""
    frame = scheduler_service_pb2.StreamCallsRequest()
    call = frame.call_dag
    call.name, call.direct_response = name, True
    call.function_arguments["incr"].arguments.add().value.CopyFrom(serialize(argument))
    return frame


def test_calls_queued_together_each_get_their_own_answer(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.scheduler.address, timeout=DEADLINE) as conn:
        conn.register(lambda _, x: x + 1, "incr")
        conn.register(lambda _, x: x * x, "square")
        assert conn.register_dag("chain", ["incr", "square"], [("incr", "square")])
        assert conn.call_dag("chain", {"incr": 0}, direct_response=True) == 1
        core = conn._core
        # Sent back to back from one thread: the loop takes them together.
        pending = [core.send_call(dag_call("chain", n), True) for n in range(20)]
        pending.append(core.send_call(dag_call("no-such-dag", 0), True))
        results = [conn._decode(p.wait_outcome(DEADLINE)) for p in pending[:-1]]
        assert results == [(n + 1) ** 2 for n in range(20)]
        with pytest.raises(DagNotFoundError):
            pending[-1].wait_outcome(DEADLINE)


def test_calls_from_many_threads_each_get_their_own_answer(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.scheduler.address, timeout=DEADLINE) as conn:
        conn.register(lambda _, x: x + 1, "incr")
        conn.register(lambda _, x: x * x, "square")
        assert conn.register_dag("chain", ["incr", "square"], [("incr", "square")])
        handle = conn.get_function("incr")
        assert handle is not None
        wrong: list[str] = []

        def caller(first: int) -> None:
            for n in range(first, first + 30):
                got = conn.call_dag("chain", {"incr": n}, direct_response=True)
                if got != (n + 1) ** 2:
                    wrong.append(f"chain({n}) = {got}")
                if (got := handle(n).get(timeout=DEADLINE)) != n + 1:
                    wrong.append(f"incr({n}) = {got}")

        threads = [threading.Thread(target=caller, args=(100 * i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert not any(thread.is_alive() for thread in threads)
        assert wrong == []


def test_a_direct_response_that_does_not_come_in_time_raises_a_timeout(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.scheduler.address, timeout=DEADLINE) as conn:
        conn.register(pause, "pause")
        assert conn.register_dag("paused", ["pause"], [])
        with pytest.raises(CloudburstTimeoutError, match=r"not accepted within 0\.5s"):
            conn.call_dag("paused", {"pause": 5.0}, direct_response=True, timeout=0.5)
        assert conn.call_dag("paused", {"pause": 0.0}, direct_response=True) == 0.0


def test_every_call_sent_after_the_loop_is_gone_raises(cluster: Cluster) -> None:
    conn = CloudburstConnection(cluster.scheduler.address, timeout=DEADLINE)
    core = conn._core
    conn.close()
    for _ in range(2):  # the second too: a failed sender start leaves none pending
        with pytest.raises(RuntimeError):
            core.send_call(dag_call("chain", 1), True)
