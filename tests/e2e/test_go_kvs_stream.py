"""The Go client's objects at the KVS itself travel over one StreamOps stream.

A cluster in this process (a KVS whose interceptors count what it receives, and
a scheduler that names it to clients) and the Go client's driver
(sdk/go/internal/clientdriver, built here): its puts, gets and deletes go as
frames of one stream, every error comes back as from the unary calls
(``CLOUDBURST_KVS_STREAM=0``), a value over the counted KVS's message limit
(smaller than the scheduler's) goes to it in chunks and Python reads it intact,
and a deadline shorter than a waiting op ends it while the stream goes on.
Without Go the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst_grpc.local import Node
from e2e.drivers import Launcher
from harness import LoopThread
from kvs_interceptors import LIMIT, CountedKvs


@pytest.fixture
def cluster(
    start_kvs_server: Callable[[CountedKvs], CountedKvs],
    naming_scheduler: Callable[..., Node],
    server_loop: LoopThread,
) -> tuple[Node, CountedKvs]:
    """A scheduler that names the counted KVS to its clients (its own KVS is another)."""
    kvs = start_kvs_server(CountedKvs(server_loop))
    return naming_scheduler(kvs.address), kvs


#: Ops, the errors the KVS answers some of with (an empty key), and a value over the counted
#: KVS's message limit (LIMIT), which goes in chunks (PutValueChunks), not as a frame, though
#: the scheduler's own KVS takes it in one message.
SCRIPT: list[dict[str, Any]] = [
    *({"op": "put", "key": f"k{index}", "value": {"index": index}} for index in range(3)),
    {"op": "get", "key": "k1"},
    {"op": "get", "key": "none"},
    {"op": "delete", "key": "k0"},
    {"op": "delete", "key": "k0"},
    {"op": "get", "key": "k0"},
    {"op": "put", "key": "", "value": 1},
    {"op": "get", "key": ""},
    {"op": "put", "key": "chunked", "value": "x" * (LIMIT + 1)},
]


def test_go_ops_at_the_kvs_go_on_one_stream_and_fail_as_unary_calls(
    cluster: tuple[Node, CountedKvs], launch_go: Launcher
) -> None:
    scheduler, kvs = cluster
    streamed = launch_go(scheduler.address)
    answers = [streamed.ask(**command) for command in SCRIPT]
    assert streamed.ok(op="kvs_address")["address"] == kvs.address
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.counter.ops == len(SCRIPT) - 1
    assert kvs.unary_calls() == 0
    assert kvs.recorder.calls("PutValueChunks") == 1
    streamed.close()

    unary = launch_go(scheduler.address, env={"CLOUDBURST_KVS_STREAM": "0"})
    assert [unary.ask(**command) for command in SCRIPT] == answers
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.unary_calls() == len(SCRIPT) - 1
    assert kvs.recorder.calls("PutValueChunks") == 2

    assert answers[3] == {"ok": True, "found": True, "value": {"index": 1}}
    assert answers[4:8] == [
        {"ok": True, "found": False},
        {"ok": True, "existed": True},
        {"ok": True, "existed": False},
        {"ok": True, "found": False},
    ]
    for refused in answers[8:10]:
        assert not refused["ok"] and refused["reason"], refused
    assert answers[8]["code"] == answers[9]["code"] == "InvalidArgument"
    # Sized by the counted KVS's own limits, not by the scheduler's (its own KVS's), and intact.
    assert answers[10] == {"ok": True}, answers[10]
    with CloudburstConnection(scheduler.address, connect_timeout=30, timeout=30) as cloud:
        assert cloud.kvs_address == kvs.address
        assert cloud.get_object("chunked") == "x" * (LIMIT + 1)


def test_a_deadline_shorter_than_a_waiting_op_ends_it_and_the_stream_goes_on(
    cluster: tuple[Node, CountedKvs], launch_go: Launcher
) -> None:
    scheduler, kvs = cluster
    driver = launch_go(scheduler.address)
    driver.ok(op="put", key="before", value=1)
    driver.send(op="put", key="held", value=1, timeout=0.5)  # the op's deadline
    answer = driver.receive(30)
    assert answer["code"] == "DeadlineExceeded", answer
    assert kvs.store.holding.is_set()
    assert driver.ok(op="get", key="before")["value"] == 1
    assert kvs.recorder.calls("StreamOps") == 1
    assert kvs.unary_calls() == 0
