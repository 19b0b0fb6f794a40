"""Tasks of stages and of stores end on their own: they leave the books, and failures are logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from cloudburst.errors import UnavailableError
from cloudburst.serialization import serialize
from cloudburst.v1 import execution_pb2, executor_service_pb2, function_pb2
from cloudburst_executors import runner
from cloudburst_executors.executor import Executor
from cloudburst_executors.servicer import ExecutorServicer, when_stored
from cloudburst_grpc.config import ExecutorConfig
from cloudburst_grpc.executor_client import PeerDirectory

HERE, OTHER = "executor-here", "executor-other"


def incr(cloudburst: Any, n: int) -> int:
    return n + 1


class BrokenPeer:
    """A peer whose triggers fail with an error the runtime does not expect."""

    address = "127.0.0.1:1"

    async def trigger(
        self, trigger: execution_pb2.Trigger, schedule: Any, *, written: bool = False
    ) -> None:
        raise RuntimeError("the peer broke")


class Recorder(logging.Handler):
    """Sets an event once a record with ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.text in record.getMessage():
            self.seen.set()


def executor(peers: PeerDirectory | None = None) -> Executor:
    made = Executor(HERE, "local:here", ExecutorConfig(threads=1), None, peers, 1 << 20, 30.0)  # type: ignore[arg-type]
    made._functions["incr"] = runner.LoadedFunction(
        "incr", 1, function_pb2.FUNCTION_KIND_FUNCTION, incr
    )
    return made


def source_trigger(call_id: str, sink_on: str) -> tuple[execution_pb2.Trigger, Any]:
    """The start trigger of ``incr -> square``, ``square`` placed on ``sink_on``."""
    dag = function_pb2.Dag(name="d", version=1, functions=["incr", "square"])
    dag.connections.add(upstream="incr", downstream="square")
    schedule = execution_pb2.DagSchedule(call_id=call_id, dag=dag, direct_response=True)
    schedule.placements["incr"], schedule.placements["square"] = HERE, sink_on
    schedule.executor_addresses[OTHER] = BrokenPeer.address
    for name in ("incr", "square"):
        schedule.function_versions[name] = 1
        schedule.function_arguments[name].SetInParent()
    schedule.function_arguments["incr"].arguments.add(value=serialize(1))
    schedule.deadline_time.FromNanoseconds(int((time.time() + 30) * 1e9))
    return execution_pb2.Trigger(target_function="incr", call_id=call_id), schedule


def sink_trigger(call_id: str) -> tuple[execution_pb2.Trigger, Any]:
    """The trigger of a one-function DAG's only stage (``incr``, the sink), direct response."""
    dag = function_pb2.Dag(name="one", version=1, functions=["incr"])
    schedule = execution_pb2.DagSchedule(call_id=call_id, dag=dag, direct_response=True)
    schedule.placements["incr"] = HERE
    schedule.function_versions["incr"] = 1
    schedule.function_arguments["incr"].arguments.add(value=serialize(41))
    schedule.deadline_time.FromNanoseconds(int((time.time() + 30) * 1e9))
    return execution_pb2.Trigger(target_function="incr", call_id=call_id), schedule


async def test_finished_stages_leave_no_task_behind() -> None:
    ex = executor()
    try:
        for index in range(20):
            call_id = f"call-{index}"
            result = ex.results.expect(call_id, 30.0)
            ex.trigger(*sink_trigger(call_id))
            outcome = await asyncio.wait_for(result, 10)
            assert runner.unpickle(outcome.value) == 42
        await asyncio.wait_for(asyncio.gather(*list(ex._tasks)), 10)  # their last steps
        assert not ex._tasks, "every stage's task removed itself when it ended"
    finally:
        await ex.close()


async def test_a_stage_that_fails_in_the_runtime_is_logged_and_leaves() -> None:
    peers = PeerDirectory(lambda executor_id, address: BrokenPeer())  # type: ignore[arg-type,return-value]
    ex = executor(peers)
    logger = logging.getLogger("cloudburst_executors.executor")
    recorder = Recorder(f"executor {HERE} task failed")
    logger.addHandler(recorder)
    try:
        ex.trigger(*source_trigger("call-broken", OTHER))
        await asyncio.wait_for(recorder.seen.wait(), 10)
        failed = [r for r in recorder.records if "task failed" in r.getMessage()]
        assert failed[0].exc_info is not None
        assert "the peer broke" in str(failed[0].exc_info[1])
        await asyncio.wait_for(asyncio.gather(*list(ex._tasks)), 10)
        assert not ex._tasks
    finally:
        logger.removeHandler(recorder)
        await ex.close()


class Kvs:
    """Records what is stored; fails every store with ``error``, if given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.stored: dict[str, Any] = {}

    async def put(self, key: str, value: Any) -> None:
        if self.error is not None:
            raise self.error
        self.stored[key] = value


def one_shot(key: str) -> executor_service_pb2.ExecuteFunctionRequest:
    request = executor_service_pb2.ExecuteFunctionRequest(
        function_name="incr",
        function_version=1,
        call_id=f"call-{key}",
        response_key=key,
        direct_response=True,
    )
    request.arguments.add(value=serialize(1))
    return request


async def test_a_result_answered_first_is_stored_after_and_leaves_the_books() -> None:
    kvs = Kvs()
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), kvs, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    ex._functions["incr"] = runner.LoadedFunction(
        "incr", 1, function_pb2.FUNCTION_KIND_FUNCTION, incr
    )
    try:
        response = await ex.execute(one_shot("k1"))
        assert runner.unpickle(response.outcome.value) == 2, "answered first"
        storing = ex.storing["k1"]
        await asyncio.wait_for(storing, 10)
        assert "k1" in kvs.stored
        assert "k1" not in ex.storing
        assert not ex._tasks
    finally:
        await ex.close()


async def test_a_store_that_fails_is_logged_and_leaves_the_books() -> None:
    kvs = Kvs(UnavailableError("the KVS is away"))
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), kvs, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    ex._functions["incr"] = runner.LoadedFunction(
        "incr", 1, function_pb2.FUNCTION_KIND_FUNCTION, incr
    )
    logger = logging.getLogger("cloudburst_executors.executor")
    recorder = Recorder("cannot store the result at 'k2'")
    logger.addHandler(recorder)
    try:
        await ex.execute(one_shot("k2"))
        await asyncio.wait_for(ex.storing["k2"], 10)
        assert recorder.seen.is_set()
        assert "k2" not in ex.storing
        assert not ex._tasks
    finally:
        logger.removeHandler(recorder)
        await ex.close()


async def test_a_call_from_a_trigger_stream_leaves_the_detached_calls_once_answered() -> None:
    kvs = Kvs()
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), kvs, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    ex._functions["incr"] = runner.LoadedFunction(
        "incr", 1, function_pb2.FUNCTION_KIND_FUNCTION, incr
    )
    served = ExecutorServicer(ex)
    frames: asyncio.Queue[executor_service_pb2.StreamTriggersRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[executor_service_pb2.StreamTriggersRequest]:
        while (frame := await frames.get()) is not None:
            yield frame

    frames.put_nowait(
        executor_service_pb2.StreamTriggersRequest(hello=executor_service_pb2.TriggerHello())
    )
    frames.put_nowait(
        executor_service_pb2.StreamTriggersRequest(sequence=7, execute_function=one_shot("k3"))
    )
    answers = cast(
        AsyncGenerator[executor_service_pb2.StreamTriggersResponse, None],
        served.StreamTriggers(requests(), None),  # type: ignore[arg-type]
    )
    try:
        seen: list[executor_service_pb2.StreamTriggersResponse] = []
        async with asyncio.timeout(10):
            async for answer in answers:
                seen.extend(answer.batch or (answer,))
                if any(a.HasField("result_stored") for a in seen):
                    break
        answered = [a for a in seen if a.HasField("execute_function")]
        assert answered[0].sequence == 7
        assert runner.unpickle(answered[0].execute_function.outcome.value) == 2
        assert "k3" in kvs.stored
        await asyncio.wait_for(asyncio.gather(*list(served._detached)), 10)
        assert not served._detached, "the call's task left as it ended"
    finally:
        frames.put_nowait(None)
        await answers.aclose()
        await ex.close()


async def test_a_store_cancelled_as_the_executor_closes_is_reported_like_any_other_end() -> None:
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), Kvs(), None, 1 << 20, 30.0)  # type: ignore[arg-type]
    try:
        store: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        ex.storing["k4"] = store
        reported = asyncio.Event()
        when_stored(ex, "k4", lambda _dropped: reported.set())
        assert not reported.is_set()
        store.cancel()
        await asyncio.wait_for(reported.wait(), 10)
    finally:
        await ex.close()


def held(key: str) -> executor_service_pb2.ExecuteFunctionRequest:
    request = one_shot(key)
    request.hold_store = True
    return request


async def test_held_stores_end_as_they_are_told(monkeypatch: Any) -> None:
    """Dropped: never stored, settles True; stored now; wanted first: never held."""
    monkeypatch.setattr("cloudburst_executors.executor.HOLD_SECONDS", 60.0)
    kvs = Kvs()
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), kvs, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    ex._functions["incr"] = runner.LoadedFunction(
        "incr", 1, function_pb2.FUNCTION_KIND_FUNCTION, incr
    )
    try:
        await ex.execute(held("dropped"))
        await ex.execute(held("wanted-later"))
        ex.end_hold(store=["wanted-first"])
        await ex.execute(held("wanted-first"))
        assert set(ex._holds) == {"dropped", "wanted-later"}
        dropped, later = ex.storing["dropped"], ex.storing["wanted-later"]
        ex.end_hold(drop=["dropped", "unknown"], store=["wanted-later"])
        async with asyncio.timeout(10):
            assert await dropped is True
            assert await later is False
        await asyncio.sleep(0)
        assert set(kvs.stored) == {"wanted-first", "wanted-later"}
        assert not ex.storing and not ex._holds and not ex._tasks
    finally:
        await ex.close()


async def test_draining_stores_what_is_held(monkeypatch: Any) -> None:
    monkeypatch.setattr("cloudburst_executors.executor.HOLD_SECONDS", 60.0)
    kvs = Kvs()
    ex = Executor(HERE, "local:here", ExecutorConfig(threads=1), kvs, None, 1 << 20, 30.0)  # type: ignore[arg-type]
    ex._functions["incr"] = runner.LoadedFunction(
        "incr", 1, function_pb2.FUNCTION_KIND_FUNCTION, incr
    )
    try:
        await ex.execute(held("k"))
        assert "k" in ex._holds
        await ex.drain(10)
        assert "k" in kvs.stored
    finally:
        await ex.close()
