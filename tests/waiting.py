"""Functions that wait for each other, and what every deployment must do with them.

Each scenario takes a connection to a deployment with default executor
settings (two executors of eight threads); the integration and e2e tests run
them on ``cbgrpc serve`` (in this process and as a subprocess) and on a
cluster of separate processes. Every wait has a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError
from cloudburst.v1 import executor_service_pb2, executor_service_pb2_grpc

#: Seconds any one result may take (a deadline, not a speed target).
RESULT_TIMEOUT = 120.0
#: Functions in the rendezvous: far more than the 16 threads of the default deployment.
RENDEZVOUS = 100


def poll(cloudburst: Any, key: str) -> Any:
    """Busy-polls ``key`` until it exists (the gossip and SUMMA programs' pattern)."""
    v = cloudburst.get(key)
    while v is None:
        v = cloudburst.get(key)
    return v


def square(_: Any, x: int) -> int:
    return x * x


def rendezvous(cloudburst: Any, group: str, index: int, count: int) -> list[int]:
    """Publishes its mailbox id, polls until it has seen all others', messages two peers."""
    cloudburst.put(f"{group}/{index}", cloudburst.get_id())
    ids: dict[int, str] = {}
    while len(ids) < count:
        for i in range(count):
            if i not in ids:
                found = cloudburst.get(f"{group}/{i}")
                if found is not None:
                    ids[i] = found
    cloudburst.send(ids[(index + 1) % count], index)
    cloudburst.send(ids[(index - 1) % count], index)
    received: list[int] = []
    while len(received) < 2:
        received.extend(message for _, message in cloudburst.recv(timeout=5.0))
    return sorted(received)


def busy_poll(cloud: CloudburstConnection) -> None:
    """Call ``poll`` 20 times on a key that exists, then on a missing one the client writes.

    Other calls and the client's own KVS calls are answered while it polls.
    """
    poller = cloud.register(poll, "poll")
    squarer = cloud.register(square, "square")
    present, missing = f"present-{uuid.uuid4().hex}", f"missing-{uuid.uuid4().hex}"
    cloud.put_object(present, 7)
    for _ in range(20):
        assert poller(present).get(timeout=RESULT_TIMEOUT) == 7
    pending = poller(missing)
    for x in range(5):
        assert squarer(x).get(timeout=RESULT_TIMEOUT) == x * x
        assert cloud.get_object(present) == 7
    cloud.put_object(missing, "here")
    assert pending.get(timeout=RESULT_TIMEOUT) == "here"
    assert squarer(9).get(timeout=RESULT_TIMEOUT) == 81


def rendezvous_all(cloud: CloudburstConnection, count: int = RENDEZVOUS) -> None:
    """``count`` one-shot functions rendezvous through the KVS and message their neighbours."""
    handle = cloud.register(rendezvous, "rendezvous")
    group = f"group-{uuid.uuid4().hex}"
    futures = [handle(group, i, count) for i in range(count)]
    for i, future in enumerate(futures):
        assert future.get(timeout=RESULT_TIMEOUT) == sorted([(i - 1) % count, (i + 1) % count])


def overdue_then_ordinary(
    cloud: CloudburstConnection, idle: Callable[[], bool], calls: int = 24
) -> None:
    """Pollers outlive their calls' deadline; their threads come back, and a call succeeds.

    The deployment's call timeout must be short (a few seconds); ``idle`` says
    whether no executor has a call in progress.
    """
    poller = cloud.register(poll, "poll")
    squarer = cloud.register(square, "square")
    futures = [poller(f"never-{uuid.uuid4().hex}") for _ in range(calls)]
    for future in futures:
        with pytest.raises(CloudburstError):
            future.get(timeout=RESULT_TIMEOUT)
    # Past its deadline each poller's next library call raised: its run ended.
    wait_until(idle, "the pollers ended")
    assert squarer(5).get(timeout=10) == 25


def active_calls(address: str) -> int:
    """The calls in progress on the executor at ``address``, as it reports them."""
    with grpc.insecure_channel(address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        status = stub.GetExecutorStatus(executor_service_pb2.GetExecutorStatusRequest(), timeout=10)
    return status.active_calls


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` (a state query) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)
