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

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.local import Node, start_executor_node, start_kvs_node, start_scheduler_node
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs.local import add_kvs_to_server
from e2e.drivers import Launcher
from harness import LoopThread, make_config
from kvs_interceptors import Chain, HeldStore, MessageCounter, Recorder

#: max_payload_bytes of the counted KVS (its GetLimits.max_message_bytes): a larger value goes
#: to it in chunks, though the scheduler's own KVS takes it in one message.
LIMIT = 16 << 10
UNARY = ("GetValue", "PutValue", "DeleteValue")


class CountedKvs:
    """A KVS server on 127.0.0.1 whose calls and StreamOps frames are counted."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.recorder = Recorder()
        self.counter = MessageCounter()
        self.store = HeldStore()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        await self.store.start()
        server, _health = create_server(LIMIT, Chain(self.counter, self.recorder))
        add_kvs_to_server(server, self.store, KvsConfig(engine="memory"), LIMIT)
        self.address = f"127.0.0.1:{bind(server, '127.0.0.1', 0)}"
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
        self.store.release.set()
        await self.store.close()

    def unary_calls(self) -> int:
        return sum(self.recorder.calls(name) for name in UNARY)


@pytest.fixture
def cluster(
    start_node: Callable[..., Node], server_loop: LoopThread
) -> Iterator[tuple[Node, CountedKvs]]:
    """A scheduler that names the counted KVS to its clients (its own KVS is another)."""
    kvs = CountedKvs(server_loop)
    server_loop.run(kvs.start())
    try:
        main_kvs = start_node(start_kvs_node(make_config()))
        config = make_config(scheduler={"direct_kvs_address": kvs.address})
        executor = start_node(start_executor_node(config, main_kvs.address, "executor-0"))
        scheduler = start_node(start_scheduler_node(config, main_kvs.address, [executor.address]))
        yield scheduler, kvs
    finally:
        server_loop.run(kvs.stop())


#: Ops, the errors the KVS answers some of with (an empty key), and a value over the counted
#: KVS's message limit, which goes in chunks (PutValueChunks), not as a frame.
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
