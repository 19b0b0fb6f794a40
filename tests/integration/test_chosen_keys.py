"""Calls whose response key the SDK chose: answered once, with their outcome.

A connection that saw a function or DAG accepted before calls it again with a
key of its own choosing, where the scheduler says it takes such keys, and
returns the future without waiting for the scheduler's "accepted" answer. The
answers the scheduler writes are counted where it writes them (its answer
writer), never inferred from timing.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import re
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection, CloudburstFuture
from cloudburst.errors import DagNotFoundError, FunctionNotFoundError, UnavailableError
from cloudburst.serialization import deserialize, serialize
from cloudburst.v1 import (
    error_pb2,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_grpc import answers
from cloudburst_grpc.local import Node, start_local
from cloudburst_grpc.scheduler.core import Scheduler
from cloudburst_grpc.scheduler.servicer import SchedulerServicer
from harness import Cluster, LoopThread, make_config, stored, wait_deleted, wait_stored
from waiting import wait_until

DEADLINE = 30.0
KEY = re.compile(r"[0-9a-f]{32}")
Answer = scheduler_service_pb2.StreamCallsResponse


class Written:
    """The call-stream answers the scheduler wrote, by kind, per sequence."""

    def __init__(self) -> None:
        self.accepted: collections.Counter[int] = collections.Counter()
        """Answers that say a call was accepted and carry no outcome."""
        self.outcomes: collections.Counter[int] = collections.Counter()

    def note(self, answer: Any) -> None:
        if not isinstance(answer, Answer):
            return  # another stream's answer writer
        for frame in answer.batch or (answer,):
            kind = frame.WhichOneof("answer")
            if kind in ("call_function", "call_dag"):
                body = getattr(frame, kind)
                counter = self.outcomes if body.HasField("outcome") else self.accepted
                counter[frame.sequence] += 1

    @property
    def accepts(self) -> int:
        return sum(self.accepted.values())


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> Iterator[Written]:
    """Count every answer the scheduler's call streams write."""
    seen = Written()
    original = answers.AnswerWriter.write

    async def write(self: Any, answer: Any) -> None:
        seen.note(answer)
        await original(self, answer)

    monkeypatch.setattr(answers.AnswerWriter, "write", write)
    yield seen


def incr(_: Any, x: int) -> int:
    return x + 1


def told_keys(conn: CloudburstConnection) -> None:
    """Wait for the scheduler's answer that it takes chosen keys.

    It comes on the call stream, and the first call's outcome may come before it on an
    executor's answer stream: until it is in, a call still waits to be accepted (correct,
    only slower), which the tests below count.
    """
    wait_until(
        lambda: conn._core.takes_chosen_keys,
        "the scheduler's answer that it takes chosen keys",
        DEADLINE,
    )


def register(conn: CloudburstConnection) -> None:
    conn.register(incr, "incr")
    conn.register(lambda _, x: x * 2, "double")
    assert conn.register_dag("chain", ["incr", "double"], [("incr", "double")], strict=True)


def test_a_repeat_call_is_answered_only_with_its_outcome(
    cluster: Cluster, written: Written
) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        first = conn.exec_func("incr", [1])
        assert first.get() == 2
        assert written.accepts == 1  # the first call of a name waits to be accepted
        told_keys(conn)
        repeats = [conn.exec_func("incr", [n]) for n in range(10)]
        assert [f.get() for f in repeats] == [n + 1 for n in range(10)]
        assert all(KEY.fullmatch(f.obj_id) for f in repeats)
        assert len({f.obj_id for f in repeats}) == 10
        assert written.accepts == 1

        assert conn.call_dag("chain", {"incr": 1}).get() == 4
        assert written.accepts == 2
        dag_repeats = [conn.call_dag("chain", {"incr": n}) for n in range(5)]
        assert [f.get() for f in dag_repeats] == [(n + 1) * 2 for n in range(5)]
        assert written.accepts == 2
        # A user-named key is the user's: such a call keeps being accepted first.
        named = conn.call_dag("chain", {"incr": 2}, output_key="mine")
        assert named.obj_id == "mine"
        assert named.get() == 6
        assert written.accepts == 3


def test_a_future_with_a_chosen_key_reads_back_and_feeds_a_later_call(
    cluster: Cluster, written: Written
) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        assert conn.exec_func("incr", [0]).get() == 1
        told_keys(conn)
        future = conn.exec_func("incr", [41])
        assert written.accepts == 1
        # Given to a later call before it finished: that call waits for it there.
        later = conn.exec_func("incr", [future])
        assert later.get() == 43
        assert future.get() == 42
        # Read-your-writes: the read waits for the store that follows the answer.
        assert conn.get_object(future.obj_id) == 42
        assert conn.get_object(future) == 42
        dag = conn.call_dag("chain", {"incr": 1})
        dag = conn.call_dag("chain", {"incr": future})
        assert dag.get() == 86
        assert conn.get_object(dag.obj_id) == 86


def test_an_unknown_name_still_raises_from_the_call(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        assert conn.exec_func("incr", [1]).get() == 2
        with pytest.raises(FunctionNotFoundError):
            conn.exec_func("no-such-function", [1])
        with pytest.raises(FunctionNotFoundError):
            conn.exec_func("no-such-function", [1])
        with pytest.raises(DagNotFoundError):
            conn.call_dag("no-such-dag", {"incr": 1})


def test_a_name_deleted_after_it_was_called_raises_from_get(
    cluster: Cluster, written: Written
) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        conn.register(incr, "alone")
        assert conn.exec_func("alone", [1]).get() == 2
        assert conn.call_dag("chain", {"incr": 1}).get() == 4
        told_keys(conn)
        accepts = written.accepts

        # Deleted by another connection (one that deletes a name itself forgets it at once).
        with CloudburstConnection(cluster.address, timeout=DEADLINE) as other:
            other.delete_function("alone")
            assert other.delete_dag("chain")
        gone = conn.exec_func("alone", [1])  # returns at once: the name was known
        assert written.accepts == accepts
        with pytest.raises(FunctionNotFoundError):
            gone.get()
        # The error is stored under the key, for reads of it and calls given the future.
        with pytest.raises(FunctionNotFoundError):
            conn.get_object(gone.obj_id)
        with pytest.raises(FunctionNotFoundError):
            conn.exec_func("incr", [gone]).get()
        # The name is forgotten: the next call waits to be accepted, and raises from the call.
        with pytest.raises(FunctionNotFoundError):
            conn.exec_func("alone", [1])

        gone_dag = conn.call_dag("chain", {"incr": 1})
        with pytest.raises(DagNotFoundError):
            gone_dag.get()
        with pytest.raises(DagNotFoundError):
            conn.call_dag("chain", {"incr": 1})


def test_a_name_this_connection_deleted_raises_from_the_call(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        conn.register(incr, "alone")
        assert conn.exec_func("alone", [1]).get() == 2
        assert conn.call_dag("chain", {"incr": 1}).get() == 4
        conn.delete_function("alone")
        assert conn.delete_dag("chain")
        with pytest.raises(FunctionNotFoundError):
            conn.exec_func("alone", [1])
        with pytest.raises(DagNotFoundError):
            conn.call_dag("chain", {"incr": 1})


def test_a_chosen_key_call_after_its_stream_broke_fails_unsent(cluster: Cluster) -> None:
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        assert conn.exec_func("incr", [1]).get() == 2
        told_keys(conn)
        core = conn._core
        frame = scheduler_service_pb2.StreamCallsRequest(stream_outcome=True, releasable=True)
        frame.call_function.name = "incr"
        frame.call_function.arguments.add().value.CopyFrom(serialize(1))
        # What a broken stream leaves behind: the next one has not said it takes chosen keys.
        core._keys_stream = 0
        pending = core.send_call(frame, True, chosen_key=secrets.token_hex(16))
        future = CloudburstFuture(pending.response_key, conn, pending)
        with pytest.raises(UnavailableError, match="did not run"):
            future.get(timeout=DEADLINE)
        assert pending.unsent
        assert conn.get_object(future.obj_id) is None


def test_a_chosen_key_call_lost_with_its_scheduler_fails_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call the scheduler never answered cannot be known to run: get() says so, not waits."""
    release = asyncio.Event()  # of the server loop: lets the held call go at teardown
    original = Scheduler.call_function

    async def hold(self: Scheduler, request: Any, *args: Any, **kwargs: Any) -> Any:
        if deserialize(request.arguments[0].value) == 99:
            await release.wait()  # the scheduler is lost before it places this call
        return await original(self, request, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "call_function", hold)
    try:
        with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
            register(conn)
            assert conn.exec_func("incr", [1]).get() == 2
            future = conn.exec_func("incr", [99])  # a chosen key: returned before any answer
            assert future._pending is not None and future._pending.chosen
            cluster.loop.run(cluster.scheduler.server.stop(0))
            # Without the rule, get() waits on the key for its whole timeout (nothing is ever
            # stored) and then raises CloudburstTimeoutError.
            with pytest.raises(UnavailableError, match="may or may not have run"):
                future.get(timeout=DEADLINE)
    finally:
        cluster.loop.loop.call_soon_threadsafe(release.set)


def test_without_the_announcement_every_call_is_accepted_first(
    cluster: Cluster, written: Written, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scheduler of a release before chosen keys says nothing about them.
    monkeypatch.setattr(SchedulerServicer, "takes_chosen_keys", False)
    with CloudburstConnection(cluster.address, timeout=DEADLINE) as conn:
        register(conn)
        futures = [conn.exec_func("incr", [n]) for n in range(5)]
        assert [f.get() for f in futures] == [n + 1 for n in range(5)]
        assert conn.call_dag("chain", {"incr": 1}).get() == 4
        assert conn.call_dag("chain", {"incr": 2}).get() == 6
        assert written.accepts == 7
        assert not conn._core.takes_chosen_keys


def test_chosen_keys_are_released_like_the_schedulers(
    local_node: Node, server_loop: LoopThread, written: Written
) -> None:
    with CloudburstConnection(local_node.address, timeout=DEADLINE) as conn:
        conn.register(incr, "incr")
        assert conn.exec_func("incr", [0]).get() == 1
        conn.keep_results = True
        kept = conn.exec_func("incr", [1])
        kept_key = kept.obj_id
        assert kept.get() == 2
        conn.keep_results = False
        dropped = conn.exec_func("incr", [2])
        dropped_key = dropped.obj_id
        assert dropped.get() == 3
        assert written.accepts == 1  # both chose their keys
        del kept, dropped
        gc.collect()
        # Releases are applied in order: had the kept result been released, it went first.
        wait_deleted(local_node, server_loop, [dropped_key])
        assert stored(local_node, kept_key)
        assert conn.get_object(kept_key) == 2


def chosen_call(
    key: str, name: str = "incr", sequence: int = 1, **changes: Any
) -> scheduler_service_pb2.StreamCallsRequest:
    frame = scheduler_service_pb2.StreamCallsRequest(
        sequence=sequence, stream_outcome=True, releasable=True, chosen_response_key=key
    )
    frame.call_function.name = name
    frame.call_function.arguments.add().value.CopyFrom(serialize(1))
    for field, value in changes.items():
        target = frame.call_function if field in ("response_key", "direct_response") else frame
        setattr(target, field, value)
    return frame


def stream(address: str, frames: list[scheduler_service_pb2.StreamCallsRequest]) -> list[Answer]:
    """Send ``frames`` on one call stream, half-close, and return every answer."""
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        return list(stub.StreamCalls(iter(frames), timeout=DEADLINE))


def test_the_scheduler_announces_chosen_keys_and_answers_them_once(
    local_node: Node, server_loop: LoopThread
) -> None:
    with CloudburstConnection(local_node.address) as conn:
        conn.register(incr, "incr")
    key = secrets.token_hex(16)
    ask = scheduler_service_pb2.StreamCallsRequest(sequence=1, chooses_keys=True)
    ask.call_function.name, ask.call_function.direct_response = "incr", True
    ask.call_function.arguments.add().value.CopyFrom(serialize(0))
    answers_ = stream(local_node.address, [ask, chosen_call(key, sequence=2)])
    hello = [a for a in answers_ if a.sequence == 0]
    assert len(hello) == 1 and hello[0].takes_chosen_keys and hello[0].takes_store_keys
    (only,) = [a for a in answers_ if a.sequence == 2]
    assert only.call_function.response_key == key
    assert deserialize(only.call_function.outcome.value) == 2
    # Stored under the key (and, never released by this caller, expiring like any other). The
    # store follows the answer (held a moment, as the result is releasable): another client
    # waits for it, as the protocol says.
    assert wait_stored(local_node.address, key, timeout=DEADLINE)
    with CloudburstConnection(local_node.address) as conn:
        assert conn.get_object(key) == 2


def test_a_caller_that_does_not_ask_is_not_told(local_node: Node) -> None:
    frame = scheduler_service_pb2.StreamCallsRequest(sequence=1)
    frame.call_function.name = "no-such-function"
    answers_ = stream(local_node.address, [frame])
    assert [a.sequence for a in answers_] == [1]


@pytest.mark.parametrize(
    ("key", "changes"),
    [
        ("not-a-key", {}),
        ("A" * 32, {}),
        ("a" * 31, {}),
        ("a" * 33, {}),
        ("../" + "a" * 29, {}),
        ("a" * 32, {"stream_outcome": False}),
        ("a" * 32, {"direct_response": True}),
        ("a" * 32, {"response_key": "mine"}),
    ],
)
def test_a_bad_chosen_key_is_refused(local_node: Node, key: str, changes: dict[str, Any]) -> None:
    with CloudburstConnection(local_node.address) as conn:
        conn.register(incr, "incr")
    (answer,) = stream(local_node.address, [chosen_call(key, **changes)])
    assert answer.WhichOneof("answer") == "error"
    assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "chosen_response_key" in answer.error.message
    with CloudburstConnection(local_node.address) as conn:
        assert conn.get_object(key) is None
        assert conn.get_object("mine") is None


def test_chosen_keys_expire_unless_kept(start_node: Any, server_loop: LoopThread) -> None:
    config = make_config(scheduler={"call_timeout_seconds": 0.2, "result_ttl_seconds": 0.2})
    node = start_node(start_local(config))
    with CloudburstConnection(node.address) as conn:
        conn.register(incr, "incr")
    expiring, kept, refused = (secrets.token_hex(16) for _ in range(3))
    frames = [
        chosen_call(expiring, sequence=1),
        # Streamed and not releasable: the caller keeps it (keep_results).
        chosen_call(kept, sequence=2, releasable=False),
        # Not accepted: its error is stored under the key, which expires too.
        chosen_call(refused, name="no-such-function", sequence=3),
    ]
    answers_ = {a.sequence: a for a in stream(node.address, frames)}
    assert answers_[3].error.reason == error_pb2.ERROR_REASON_FUNCTION_NOT_FOUND
    with grpc.insecure_channel(node.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        for key in (expiring, kept, refused):  # each stored (a failure for the refused one)
            stub.GetResult(scheduler_service_pb2.GetResultRequest(response_key=key), timeout=30)
    wait_deleted(node, server_loop, [expiring, refused])
    assert stored(node, kept)
