"""Functions that use the user library run in greenlets on the executor's event loop.

Once a function's stretches of code between library calls have shown
themselves quick on worker threads, its calls run in a greenlet on the loop:
each library call switches to the loop and back. Each function here reports
the thread it ran on: executor worker threads are named ``cb-<executor id>_<n>``,
anything else is the executor's event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError, MailboxNotFoundError
from cloudburst_executors import cooperative
from cloudburst_executors.inline import QUICK_RUNS
from cloudburst_grpc.local import Node, start_local
from harness import LoopThread, ProcessCluster, make_config, running_process_cluster

# Generous, so that no stretch of these tiny functions on a busy machine counts as slow;
# SLOW_FACTOR times it (0.25 s) is what a stretch on the loop may take before a strike.
LIMIT = 0.05


def on_a_worker(thread_name: str) -> bool:
    return thread_name.startswith("cb-")


def where(_: Any) -> str:
    return threading.current_thread().name


def put_then_get(cloudburst: Any, key: str, value: int, delay: float = 0.0) -> tuple[str, Any]:
    cloudburst.put_object(key, value)
    if delay:
        time.sleep(delay)  # a long stretch of user code between library calls
    return threading.current_thread().name, cloudburst.get_object(key)


def wait_for_missing(cloudburst: Any, key: str, wait: float) -> tuple[str, Any]:
    return threading.current_thread().name, cloudburst.get_object(key, timeout=wait)


def waiter(cloudburst: Any, key: str, wait: float) -> tuple[str, Any]:
    cloudburst.put_object(key, cloudburst.get_id())
    return threading.current_thread().name, cloudburst.recv(timeout=wait)


def poller(cloudburst: Any, key: str, seconds: float) -> tuple[str, Any, int]:
    """Polls recv() without a timeout, never sleeping, for up to ``seconds``."""
    cloudburst.put_object(key, cloudburst.get_id())
    end = time.monotonic() + seconds
    polls = 0
    while True:
        polls += 1
        messages = cloudburst.recv()
        if messages or time.monotonic() > end:
            return threading.current_thread().name, messages, polls


def put_with_its_own_loop(cloudburst: Any, key: str, value: int) -> tuple[str, Any]:
    async def later() -> int:
        await asyncio.sleep(0)
        return value

    cloudburst.put_object(key, asyncio.run(later()))
    return threading.current_thread().name, cloudburst.get_object(key)


def get_from_a_thread(cloudburst: Any, key: str) -> tuple[str, Any]:
    """Reads the KVS from a thread of its own, and waits for it."""
    found: list[Any] = []
    reader = threading.Thread(target=lambda: found.append(cloudburst.get_object(key)))
    reader.start()
    reader.join(30)
    return threading.current_thread().name, found


def await_key(cloudburst: Any, key: str) -> Any:
    return cloudburst.get_object(key, timeout=30)


def send_to(cloudburst: Any, dest: str, message: Any) -> str:
    cloudburst.send(dest, message)
    me: str = cloudburst.get_id()
    return me


def send_to_nobody(cloudburst: Any, dest: str) -> tuple[str, str]:
    try:
        cloudburst.send(dest, "hello")
    except MailboxNotFoundError as exc:
        return threading.current_thread().name, type(exc).__name__
    return threading.current_thread().name, "sent"


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return start_node(start_local(make_config(executor={"inline_max_seconds": LIMIT, "count": 1})))


@pytest.fixture
def cloud(node: Node) -> Iterator[CloudburstConnection]:
    with CloudburstConnection(node.address) as connection:
        yield connection


def test_a_function_using_the_library_moves_to_the_loop_once_its_stretches_are_quick(
    cloud: CloudburstConnection,
) -> None:
    fn = cloud.register(put_then_get, "put_then_get")
    # Each run is two stretches (before and after put_object's wait, then after get_object's).
    first = [fn("coop/a", i).get() for i in range(QUICK_RUNS // 3)]
    assert all(on_a_worker(name) for name, _ in first), first
    assert [value for _, value in first] == list(range(QUICK_RUNS // 3))
    later = [fn("coop/a", i).get() for i in range(3)]
    assert [value for _, value in later] == [0, 1, 2], "the library works from the loop"
    assert not on_a_worker(later[-1][0]), "it earned the loop"
    assert cloud.get_object("coop/a") == 2


def test_a_slow_stretch_sends_it_back_to_threads_but_a_long_library_wait_does_not(
    cloud: CloudburstConnection,
) -> None:
    slow = cloud.register(put_then_get, "put_then_get")
    for i in range(QUICK_RUNS):
        slow("coop/b", i).get()
    name, value = slow("coop/b", 7, 0.3).get()
    assert not on_a_worker(name) and value == 7, "the slow run still finishes, on the loop"
    assert on_a_worker(slow("coop/b", 8).get()[0]), "then it is back on threads"

    waits = cloud.register(wait_for_missing, "wait_for_missing")
    for _ in range(QUICK_RUNS):
        waits("coop/missing", 0.01).get()
    # Waiting 0.4 s for a key (over SLOW_FACTOR * LIMIT) holds nothing: the loop runs on.
    name, value = waits("coop/missing", 0.4).get()
    assert not on_a_worker(name) and value is None
    assert not on_a_worker(waits("coop/missing", 0.01).get()[0]), "no strike for waiting"


def test_while_a_greenlet_run_waits_other_calls_run_on_threads(
    cloud: CloudburstConnection,
) -> None:
    quick = cloud.register(where, "where")
    for _ in range(QUICK_RUNS):
        quick().get()
    assert not on_a_worker(quick().get()), "where runs on the loop when it is free"
    wait = cloud.register(waiter, "waiter")
    for i in range(QUICK_RUNS // 2):
        wait(f"coop/warm/{i}", 0.01).get()
    rendezvous = cloud.register(await_key, "await_key")
    sender = cloud.register(send_to, "send_to")

    waiting = wait("coop/waiter", 30)
    mailbox = rendezvous("coop/waiter").get(timeout=60)
    assert on_a_worker(quick().get()), "a greenlet run waits on the loop: others use threads"
    sent_from = sender(mailbox, "wake up").get(timeout=60)
    name, messages = waiting.get(timeout=60)
    assert not on_a_worker(name), "the waiter ran in a greenlet on the loop"
    assert messages == [(sent_from, "wake up")]
    assert not on_a_worker(quick().get()), "and the loop is free again"


def test_polling_recv_without_a_timeout_lets_the_loop_deliver(
    cloud: CloudburstConnection,
) -> None:
    poll = cloud.register(poller, "poller")
    for i in range(QUICK_RUNS // 2):
        poll(f"coop/poll/{i}", 0).get()
    rendezvous = cloud.register(await_key, "await_key")
    sender = cloud.register(send_to, "send_to")

    polling = poll("coop/poller", 30)
    # Both need the loop while the poller spins there: reading the KVS, delivering.
    mailbox = rendezvous("coop/poller").get(timeout=60)
    sent_from = sender(mailbox, "found you").get(timeout=60)
    name, messages, polls = polling.get(timeout=60)
    assert not on_a_worker(name), "the poller ran in a greenlet on the loop"
    assert messages == [(sent_from, "found you")]
    assert polls > 1


def test_code_in_a_greenlet_may_run_an_event_loop_of_its_own(
    cloud: CloudburstConnection,
) -> None:
    fn = cloud.register(put_with_its_own_loop, "put_with_its_own_loop")
    results = [fn("coop/own-loop", i).get() for i in range(QUICK_RUNS)]
    assert [value for _, value in results] == list(range(QUICK_RUNS))
    assert not on_a_worker(results[-1][0]), "the last runs were in a greenlet on the loop"


def test_a_function_calling_the_library_from_its_own_threads_stays_on_threads(
    cloud: CloudburstConnection,
) -> None:
    """On the loop it would wait for its thread while that thread waits for the loop."""
    cloud.put_object("coop/threaded", 5)
    fn = cloud.register(get_from_a_thread, "get_from_a_thread")
    results = [fn("coop/threaded").get(timeout=60) for _ in range(QUICK_RUNS * 2)]
    assert all(found == [5] for _, found in results), results
    assert all(on_a_worker(name) for name, _ in results), results


def test_library_errors_reach_the_function_in_its_greenlet(
    cloud: CloudburstConnection,
) -> None:
    fn = cloud.register(send_to_nobody, "send_to_nobody")
    mailbox_id = cloud.register(lambda cloudburst: cloudburst.get_id(), "finished")().get()
    gone = "never-issued-1@" + mailbox_id.rpartition("@")[2]
    for _ in range(QUICK_RUNS):
        fn(gone).get()
    name, raised = fn(gone).get()
    assert not on_a_worker(name)
    assert raised == "MailboxNotFoundError"


def test_stopping_a_node_ends_a_greenlet_run_that_waits(
    start_node: Callable[..., Node], server_loop: LoopThread
) -> None:
    node = start_node(start_local(make_config(executor={"inline_max_seconds": LIMIT, "count": 1})))
    with CloudburstConnection(node.address, timeout=30) as cloud:
        wait = cloud.register(waiter, "waiter")
        for i in range(QUICK_RUNS // 2):
            wait(f"coop/warm/{i}", 0.01).get()
        rendezvous = cloud.register(await_key, "await_key")
        waiting = wait("coop/stopping", 120)
        rendezvous("coop/stopping").get(timeout=60)
        assert server_loop.run(greenlet_in_progress()), "the waiter waits in a greenlet"
        # The greenlet would wait two minutes; stopping (with 0.2 s of grace) must not.
        server_loop.run(node.stop(0.2), timeout=30)
        with pytest.raises(CloudburstError):  # the call ends with the server
            waiting.get(timeout=30)


async def greenlet_in_progress() -> bool:
    return cooperative.loop_busy(asyncio.get_running_loop())


# -- across executor processes ----------------------------------------------------------


def ping(cloudburst: Any, tag: str, rounds: int) -> dict[str, Any]:
    me = cloudburst.get_id()
    cloudburst.put_object(f"{tag}/ping", me)
    peer = cloudburst.get_object(f"{tag}/pong", timeout=20)
    log: list[int] = []
    for i in range(rounds):
        cloudburst.send(peer, i)
        log.extend(message for _, message in cloudburst.recv(timeout=20))
    return {"log": log, "thread": threading.current_thread().name, "me": me, "peer": peer}


def pong(cloudburst: Any, tag: str, rounds: int) -> str:
    cloudburst.put_object(f"{tag}/pong", cloudburst.get_id())
    answered = 0
    while answered < rounds:
        messages = cloudburst.recv(timeout=20)
        if not messages:
            raise TimeoutError(f"no ping after {answered} rounds")
        for sender, message in messages:
            cloudburst.send(sender, message)
            answered += 1
    return threading.current_thread().name


def both(cloudburst: Any, exchange: dict[str, Any], pong_thread: str) -> dict[str, Any]:
    return {**exchange, "pong_thread": pong_thread}


@pytest.fixture
def greenlet_cluster() -> Iterator[ProcessCluster]:
    """Two executor processes with the generous limit, a KVS and a scheduler."""
    with running_process_cluster("--inline-max-seconds", str(LIMIT)) as cluster:
        yield cluster


def test_ping_pong_runs_in_greenlets_across_executor_processes(
    greenlet_cluster: ProcessCluster,
) -> None:
    rounds = 100
    with CloudburstConnection(greenlet_cluster.address) as cloud:
        cloud.register(ping, "ping")
        cloud.register(pong, "pong")
        cloud.register(both, "both")
        assert cloud.register_dag(
            "pp", ["ping", "pong", "both"], [("ping", "both"), ("pong", "both")]
        )
        # Each exchange meets through keys of its own: never a finished pong's id.
        results = [
            cloud.call_dag(
                "pp",
                {"ping": [f"coop/pp/{i}", rounds], "pong": [f"coop/pp/{i}", rounds]},
                direct_response=True,
                timeout=60,
            )
            for i in range(2)
        ]
    for result in results:
        assert result["log"] == list(range(rounds))
        assert result["me"].rpartition("@")[2] != result["peer"].rpartition("@")[2]
    first, second = results
    assert on_a_worker(first["thread"]) and on_a_worker(first["pong_thread"])
    assert not on_a_worker(second["thread"]), "ping earned the loop in its first run"
    assert not on_a_worker(second["pong_thread"]), "so did pong"
