"""An executor at its limit of answer streams, between real processes.

Each executor holds ``executor.max_answer_streams`` answer streams at most
(here 1, through ``CBGRPC_EXECUTOR_MAX_ANSWER_STREAMS``). With its one stream
taken, executor-a refuses the SDK's: the connection holds a stream at
executor-b only, and a call whose sink is on executor-a is answered through the
scheduler, the same as ever. Once the streams end, new ones are taken. The
executors' metrics count the open streams.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.request

import grpc

from cloudburst import CloudburstConnection
from cloudburst.v1 import executor_service_pb2, executor_service_pb2_grpc
from faults import pool_of
from harness import CbgrpcProcess, running_process_cluster

DEADLINE = 60.0


def open_streams(url: str) -> float:
    """The ``cloudburst_executor_answer_streams`` gauge an executor's /metrics shows."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^cloudburst_executor_answer_streams\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


def metrics_url(process: CbgrpcProcess) -> str:
    return process.wait_for_log("metrics on http://", stdout=True).rsplit(" ", 1)[1].strip()


def wait_for_open_streams(url: str, count: float) -> None:
    """Scrape until the gauge shows ``count`` (an ended stream is dropped on the server's loop)."""
    deadline = time.monotonic() + DEADLINE
    while open_streams(url) != count:
        assert time.monotonic() < deadline, f"{url} never showed {count} answer streams"


def test_a_full_executor_refuses_the_stream_and_its_calls_are_answered_by_the_scheduler() -> None:
    with running_process_cluster(
        "--metrics-port", "0", env={"CBGRPC_EXECUTOR_MAX_ANSWER_STREAMS": "1"}
    ) as cluster:
        urls = [metrics_url(executor) for executor in cluster.executors]
        with grpc.insecure_channel(cluster.executors[0].address) as channel:
            stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
            request = executor_service_pb2.StreamAnswersRequest(
                answer_stream_id=secrets.token_hex(16)
            )
            taken = stub.StreamAnswers(request, timeout=DEADLINE * 3)
            try:
                assert next(taken).registered
                with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
                    run_at_the_limit(conn, cluster.address, urls)
            finally:
                taken.cancel()
        # Both streams ended: the executors take new ones.
        for url in urls:
            wait_for_open_streams(url, 0)
        with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
            assert conn.answer_executors == {"executor-a", "executor-b"}
            assert [open_streams(url) for url in urls] == [1, 1]


def run_at_the_limit(conn: CloudburstConnection, scheduler: str, urls: list[str]) -> None:
    # Connecting waited for every executor's answer: executor-a refused the stream.
    assert conn.answer_executors == {"executor-b"}
    # executor-a holds the stream taken before, executor-b the connection's.
    assert [open_streams(url) for url in urls] == [1, 1]
    for name in ("one", "two", "three", "four"):
        conn.register(lambda _, x, tag=name: f"{tag}-{x}", name)
        assert conn.register_dag(name, [name], [])
    pins = pool_of(scheduler, lambda pool: len(pool) == 2)
    on_a = sorted(pins["executor-a"])
    on_b = sorted(pins["executor-b"])
    assert on_a and on_b, pins  # four one-function DAGs, each pinned once, spread over both
    for i in range(3):
        # Sinks on executor-a answer through the scheduler; those on executor-b directly.
        assert conn.call_dag(on_a[0], {on_a[0]: i}, direct_response=True) == f"{on_a[0]}-{i}"
        assert conn.call_dag(on_b[0], {on_b[0]: i}, direct_response=True) == f"{on_b[0]}-{i}"
        assert conn.exec_func(on_a[0], [i]).get(timeout=DEADLINE) == f"{on_a[0]}-{i}"
