"""Functions that wait for each other on `cbgrpc serve` and on a cluster of processes.

The scenarios of ``waiting.py`` (see ``tests/integration/test_waiting_functions.py``)
on real subprocesses with default executor settings: a busy-polling function
must leave `cbgrpc serve` responsive and stoppable by SIGTERM.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import waiting
from cloudburst import CloudburstConnection
from harness import ServeProcess, running_process_cluster


def test_busy_polling_on_serve_leaves_it_responsive_and_stoppable(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process("--data-dir", str(tmp_path))
    with CloudburstConnection(server.address) as cloud:
        waiting.busy_poll(cloud)
        poller = cloud.register(waiting.poll, "poll")
        poller(f"missing-{uuid.uuid4().hex}")  # polls on, for a key nobody writes
        assert cloud.register(waiting.square, "square")(3).get(timeout=60) == 9
    assert server.stop(signal.SIGTERM, timeout=60) == 0


def test_a_hundred_functions_rendezvous_on_serve(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    server = serve_process("--data-dir", str(tmp_path))
    with CloudburstConnection(server.address) as cloud:
        waiting.rendezvous_all(cloud)


def test_waiting_functions_on_a_process_cluster() -> None:
    # A short call timeout, for the calls that outlive it.
    with running_process_cluster(scheduler_args=("--call-timeout", "5")) as cluster:
        executors = [e.address for e in cluster.executors]
        with CloudburstConnection(cluster.address) as cloud:
            waiting.busy_poll(cloud)
            waiting.overdue_then_ordinary(
                cloud, lambda: all(waiting.active_calls(a) == 0 for a in executors)
            )


def test_a_hundred_functions_rendezvous_on_a_process_cluster() -> None:
    with running_process_cluster() as cluster, CloudburstConnection(cluster.address) as cloud:
        waiting.rendezvous_all(cloud)
