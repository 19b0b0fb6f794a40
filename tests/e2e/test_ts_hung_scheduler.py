"""The TypeScript client, direct KVS access on, facing a hung scheduler.

With direct access on (the default) the client's first KVS op asks the scheduler
where the KVS is (GetLimits) and then, when that fails, sends the op through the
scheduler: two calls in a row on connections whose pings go unanswered. Each
must fail with UNAVAILABLE, and the Node process must live on: a keepalive
timeout is the calls' error, never an unhandled error of the connection. The
driver (sdk/typescript/test/driver.ts) is built by `make clients`. Without Node
the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from e2e.drivers import Launcher
from faults import resume_and_kill
from harness import running_process_cluster

#: Seconds one step may take to fail: an op makes two calls (GetLimits, then the op through the
#: scheduler), each given up when a ping (every second) goes unanswered for 2 s; the calls' own
#: deadlines are far longer.
BOUND = 20.0


def test_calls_to_a_hung_scheduler_fail_and_the_process_lives_on(launch_ts: Launcher) -> None:
    with running_process_cluster() as cluster:
        try:
            # The kernel accepts connections for the stopped process, which never answers.
            os.kill(cluster.scheduler.proc.pid, signal.SIGSTOP)
            client = launch_ts(cluster.address)
            commands: list[dict[str, Any]] = [
                {"op": "put", "key": "hung/first", "value": 1},
                {"op": "get", "key": "hung/second"},
                {"op": "wait_result", "key": "hung/third"},
            ]
            for step, command in enumerate(commands):
                started = time.monotonic()
                answer = client.ask(timeout=BOUND, **command)
                assert not answer["ok"] and answer["code"] == "Unavailable", (step, answer)
                assert time.monotonic() - started < BOUND
            assert client.proc.poll() is None, client.stderr()
            assert "PING timed out" not in client.stderr(), client.stderr()

            # Resumed, the scheduler answers again, and the client goes to the KVS directly.
            os.kill(cluster.scheduler.proc.pid, signal.SIGCONT)
            client.ok(op="put", key="hung/after", value=2)
            assert client.ok(op="get", key="hung/after")["value"] == 2
            assert client.ok(op="kvs_address")["address"] == cluster.kvs.address
        finally:
            resume_and_kill(cluster.scheduler)
