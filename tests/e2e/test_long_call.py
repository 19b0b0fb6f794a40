"""A ten-minute call on a process cluster: connections stay up as long as the peers do.

A function runs ten minutes, sending nothing meanwhile, and is called three
ways at once: a one-shot call read with ``.get()``, a DAG call read with
``.get()`` and a DAG call with a direct response. Each waits on a connection
that carries no data for those ten minutes but keepalive pings, from the SDK
to the scheduler and from the scheduler to the executor. Clients ping often
(``cloudburst.transport.KEEPALIVE_MS``) so that a hung peer is noticed within
seconds; a server that did not permit pings that often would end such a
connection ("too_many_pings"), and a ping timeout that fired on a live peer
would cut the call: either way the calls end with UnavailableError and this
test fails. It is the real-time counterpart of
``tests/integration/test_keepalive.py`` and takes about ten minutes.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from harness import running_process_cluster

#: How long the call runs (seconds).
LONG = 600.0

#: Room on top of LONG for starting the cluster and reading the results on a loaded machine.
SLACK = 240.0


def nap(_: Any, seconds: float) -> str:
    """Run ``seconds`` without a word to anyone."""
    time.sleep(seconds)  # the workload: a call that takes this long
    return f"slept {seconds:.0f}s"


@pytest.mark.timeout(LONG + 2 * SLACK)
def test_a_ten_minute_call_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls may run longer than the default 300 s (every process reads this).
    monkeypatch.setenv("CBGRPC_SCHEDULER_CALL_TIMEOUT_SECONDS", str(LONG + SLACK))
    expected = f"slept {LONG:.0f}s"
    with (
        running_process_cluster() as cluster,
        CloudburstConnection(cluster.address, timeout=LONG + SLACK) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        conn.register(nap, "nap")
        assert conn.register_dag("long", ["nap"], [])
        one_shot = conn.exec_func("nap", [LONG])
        via_key = conn.call_dag("long", {"nap": LONG})
        direct = background.submit(conn.call_dag, "long", {"nap": LONG}, direct_response=True)

        assert one_shot.get() == expected
        assert via_key.get() == expected
        assert direct.result(timeout=LONG + SLACK) == expected
