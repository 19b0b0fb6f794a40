"""Functions that wait for each other on `cbgrpc serve`'s composition, default executor settings.

A function busy-polling the KVS must not wedge the executor's event loop;
more functions waiting for each other than there are threads must all
finish; and a function still polling when its call's deadline passes must
end there and give its thread back. The scenarios live in ``waiting.py``;
``tests/e2e/test_waiting_processes.py`` runs them on subprocesses.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import waiting
from cloudburst import CloudburstConnection
from cloudburst.errors import QueueFullError
from cloudburst_executors.inline import HOG_WINDOW
from cloudburst_grpc.config import ExecutorConfig
from cloudburst_grpc.local import Node, start_local
from harness import make_config

DEFAULTS = ExecutorConfig()


@pytest.fixture
def serve(start_node: Callable[..., Node]) -> Callable[..., Node]:
    """`cbgrpc serve`'s composition with the default executor settings, and ``changes``."""

    def start(**changes: Any) -> Node:
        executor = {
            "count": DEFAULTS.count,
            "threads": DEFAULTS.threads,
            **changes.pop("executor", {}),
        }
        return start_node(start_local(make_config(executor=executor, **changes)))

    return start


def test_busy_polling_function_does_not_wedge_the_server(serve: Callable[..., Node]) -> None:
    node = serve()
    with CloudburstConnection(node.address) as cloud:
        waiting.busy_poll(cloud)


def where_polling(cloudburst: Any, key: str) -> tuple[str, Any]:
    v = cloudburst.get(key)
    while v is None:
        v = cloudburst.get(key)
    return threading.current_thread().name, v


def test_polling_on_the_loop_loses_its_place_there_for_good(
    serve: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    # A generous limit, so that the quick runs surely earn the loop on a busy machine.
    node = serve(executor={"count": 1, "threads": DEFAULTS.threads, "inline_max_seconds": 0.05})
    present, missing = f"present-{uuid.uuid4().hex}", f"missing-{uuid.uuid4().hex}"
    with CloudburstConnection(node.address) as cloud, caplog.at_level(logging.INFO):
        handle = cloud.register(where_polling, "where_polling")
        cloud.put_object(present, 1)
        threads = [handle(present).get(timeout=30)[0] for _ in range(20)]
        assert not threads[-1].startswith("cb-")  # earned the loop: a greenlet there
        pending = handle(missing)
        waiting.wait_until(
            lambda: "held the executor's event loop" in caplog.text,
            f"a poll on the loop judged within a few {HOG_WINDOW} s windows",
        )
        # The loop serves other calls meanwhile.
        assert cloud.register(waiting.square, "square")(6).get(timeout=30) == 36
        cloud.put_object(missing, 2)
        assert pending.get(timeout=30)[1] == 2
        for _ in range(10):  # threads from now on
            assert handle(present).get(timeout=30)[0].startswith("cb-")


def test_a_hundred_functions_rendezvous(serve: Callable[..., Node]) -> None:
    node = serve()
    with CloudburstConnection(node.address) as cloud:
        waiting.rendezvous_all(cloud)


def test_calls_past_their_deadline_give_their_threads_back(
    serve: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = serve(scheduler={"call_timeout_seconds": 2.0})
    with CloudburstConnection(node.address) as cloud, caplog.at_level(logging.WARNING):
        waiting.overdue_then_ordinary(
            cloud, lambda: all(e.active_calls == 0 for e in node.executors)
        )
    assert all(e.slots.running == e.slots.waiting == e.slots.queued == 0 for e in node.executors)


def test_calls_beyond_max_threads_are_refused_naming_the_limit(
    serve: Callable[..., Node],
) -> None:
    node = serve(executor={"count": 1, "threads": 1, "max_threads": 1})
    missing = f"missing-{uuid.uuid4().hex}"
    with CloudburstConnection(node.address) as cloud:
        pending = cloud.register(waiting.poll, "poll")(missing)
        executor = node.executors[0]
        waiting.wait_until(lambda: executor.active_calls == 1, "the poller runs")
        with pytest.raises(QueueFullError, match=r"executor.max_threads = 1"):
            cloud.register(waiting.square, "square")(2).get(timeout=30)
        cloud.put_object(missing, 1)
        assert pending.get(timeout=30) == 1
        assert cloud.register(waiting.square, "square")(3).get(timeout=30) == 9


class Waiter:
    """A class whose runs wait in the library while holding their pinned instance's lock."""

    def run(self, cloudburst: Any, key: str) -> Any:
        return cloudburst.get_object(key, timeout=60)


def test_a_run_waiting_for_its_pinned_instance_frees_its_slot(
    serve: Callable[..., Node],
) -> None:
    # One slot: the run holding the instance must get it back from the one waiting for it.
    node = serve(executor={"count": 1, "threads": 1})
    first, second = f"first-{uuid.uuid4().hex}", f"second-{uuid.uuid4().hex}"
    with CloudburstConnection(node.address) as cloud:
        cloud.register((Waiter, ()), "waiter")
        assert cloud.register_dag("waiters", ["waiter"], [])
        futures = [cloud.call_dag("waiters", {"waiter": key}) for key in (first, second)]
        executor = node.executors[0]
        waiting.wait_until(lambda: executor.active_calls == 2, "both runs started")
        cloud.put_object(first, 1)
        cloud.put_object(second, 2)
        assert [f.get(timeout=60) for f in futures] == [1, 2]
