"""A client process's request loop: its workloads announced, each request answered on one line."""

from __future__ import annotations

import io
import itertools
import json
from typing import Any

from bench import clients
from bench.measure import SyncWorkload


def _answers(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls = itertools.count(1)  # safe to call from the throughput run's threads
    found = [
        SyncWorkload("sys", "counts", lambda: next(calls), check=lambda n: n > 0),
        SyncWorkload("sys", "fails", lambda: 1 / 0),
    ]
    out = io.StringIO()
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    clients.serve_requests(found, io.StringIO(lines + "\n"), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_workloads_are_announced_then_each_request_gets_one_answer() -> None:
    ready, block, throughput, unknown, failed, bad_op = _answers(
        [
            {"op": "block", "key": "sys/counts", "n": 3},
            {"op": "throughput", "key": "sys/counts", "callers": 2, "seconds": 0.05},
            {"op": "block", "key": "sys/none", "n": 1},
            {"op": "block", "key": "sys/fails", "n": 1},
            {"op": "stop", "key": "sys/counts"},
        ]
    )
    assert ready == {
        "ready": [{"system": "sys", "name": "counts"}, {"system": "sys", "name": "fails"}]
    }
    assert len(block["latencies"]) == 3 and all(x >= 0 for x in block["latencies"])
    assert throughput["calls"] >= 2 and throughput["seconds"] > 0
    assert len(throughput["latencies"]) == throughput["calls"]
    assert "sys/none" in unknown["error"]
    assert "ZeroDivisionError" in failed["error"]
    assert "unknown op 'stop'" in bad_op["error"]
