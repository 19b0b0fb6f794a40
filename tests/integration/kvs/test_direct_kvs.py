"""Clients of a cluster read and write objects at the KVS itself, one hop instead of two.

The scheduler names the KVS in its ``GetLimits`` answer; the SDK calls it
there, and goes through the scheduler's proxy when that address does not
answer. Closing the connection waits for neither a hung KVS nor, beyond a
short grace, a hung scheduler. The clusters are real: `cbgrpc` processes, or
nodes started by the code `cbgrpc` runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import UnavailableError
from cloudburst.reference import CloudburstReference
from cloudburst.serialization import lattice_value
from cloudburst.transport import PING_TIMEOUT_ENV
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc
from cloudburst_grpc.local import Node, start_executor_node, start_kvs_node, start_scheduler_node
from freezing_proxy import FreezingProxy
from harness import LoopThread, free_ports, make_config, running_process_cluster

#: Larger than one message's inline limit: written and read in chunks.
LARGE = 5 << 20


def read_ref(_: Any, value: Any) -> Any:
    return value


def incr(_: Any, x: int) -> int:
    return x + 1


def size_of(_: Any, value: bytes) -> int:
    return len(value)


def write_copy(cloudburst: Any, key: str, value: bytes) -> int:
    cloudburst.put(key, value + b"!")
    return len(cloudburst.get(key))


def test_objects_go_to_the_kvs_and_not_through_the_scheduler() -> None:
    with running_process_cluster() as cluster:
        direct = CloudburstConnection(cluster.address, connect_timeout=30, timeout=60)
        proxied = CloudburstConnection(
            cluster.address, connect_timeout=30, timeout=60, direct_kvs=False
        )
        try:
            assert direct.kvs_address == cluster.kvs.address
            assert proxied.kvs_address is None
            # Both paths reach the one KVS: each reads what the other wrote.
            direct.put_object("direct/small", "from the direct path")
            proxied.put_object("direct/large", b"x" * LARGE)
            assert proxied.get_object("direct/small") == "from the direct path"
            assert direct.get_object("direct/large") == b"x" * LARGE
            # Read-your-writes across the paths: a function reads the client's write, and
            # the client reads the result an executor stored.
            reader = direct.register(read_ref, "read_ref")
            for value in range(3):
                direct.put_object("direct/counter", value)
                assert reader(CloudburstReference("direct/counter")).get(timeout=60) == value
            future = direct.register(incr, "incr")(41)
            assert future.get(timeout=60) == 42
            assert direct.get_object(future) == 42
            cluster.scheduler.stop()
            # With the scheduler gone, only the direct path still reaches the KVS.
            direct.put_object("direct/after", b"still here")
            assert direct.get_object("direct/after") == b"still here"
            assert direct.get_object(["direct/small", "direct/none"]) == {
                "direct/small": "from the direct path",
                "direct/none": None,
            }
            assert direct.delete_object("direct/after") is True
            with pytest.raises(UnavailableError):
                proxied.put_object("direct/refused", 1)
        finally:
            direct.close()
            proxied.close()


def test_an_unreachable_kvs_address_falls_back_to_the_scheduler() -> None:
    (closed_port,) = free_ports(1)
    nowhere = f"127.0.0.1:{closed_port}"
    env = {"CBGRPC_SCHEDULER_DIRECT_KVS_ADDRESS": nowhere}
    with (
        running_process_cluster(scheduler_env=env) as cluster,
        CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as cloud,
    ):
        assert cloud.kvs_address is None
        cloud.put_object("fallback/key", b"v" * LARGE)
        assert cloud.get_object("fallback/key") == b"v" * LARGE
        reader = cloud.register(read_ref, "read_ref")
        cloud.put_object("fallback/small", 7)
        assert reader(CloudburstReference("fallback/small")).get(timeout=60) == 7


def test_direct_access_turned_off_names_no_kvs() -> None:
    env = {"CBGRPC_SCHEDULER_DIRECT_KVS": "false"}
    with (
        running_process_cluster(scheduler_env=env) as cluster,
        CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as cloud,
    ):
        assert cloud.kvs_address is None
        cloud.put_object("off/key", 1)
        assert cloud.get_object("off/key") == 1


def test_a_kvs_that_stops_answering_sends_objects_through_the_scheduler(
    start_node: Callable[..., Node], server_loop: LoopThread
) -> None:
    config = make_config()
    kvs = start_node(start_kvs_node(config))
    # The scheduler names another KVS to its clients, which the test then stops.
    decoy = start_node(start_kvs_node(config))
    executor = start_node(start_executor_node(config, kvs.address, "executor-0"))
    scheduler_config = make_config(scheduler={"direct_kvs_address": decoy.address})
    scheduler = start_node(start_scheduler_node(scheduler_config, kvs.address, [executor.address]))
    with CloudburstConnection(scheduler.address, connect_timeout=30, timeout=60) as cloud:
        assert cloud.kvs_address == decoy.address
        cloud.put_object("moved/before", 1)
        server_loop.run(decoy.stop(0.5))
        cloud.put_object("moved/after", 2)
        assert cloud.kvs_address is None
        assert cloud.get_object("moved/after") == 2
    # The write went to the scheduler's KVS, not to the stopped one.
    with grpc.insecure_channel(kvs.address) as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        response = stub.GetValue(kvs_service_pb2.GetValueRequest(key="moved/after"), timeout=10)
    assert response.found and lattice_value(response.lattice) == 2


@pytest.fixture
def freezable(
    server_loop: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], FreezingProxy]]:
    """Starts proxies to addresses, to freeze; closes them at the end.

    Keepalive would cut a hung peer off within seconds: not what these tests
    look at, so connections made meanwhile wait a minute for a ping's answer.
    """
    monkeypatch.setenv(PING_TIMEOUT_ENV, "60")
    proxies: list[FreezingProxy] = []

    def start(address: str) -> FreezingProxy:
        proxy = FreezingProxy(int(address.rsplit(":", 1)[1]))
        server_loop.run(proxy.start())
        proxies.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in proxies:
            server_loop.run(proxy.close())


def closed_while_frozen(cloud: CloudburstConnection, proxy: FreezingProxy) -> float:
    """Freeze ``proxy``, then close ``cloud``; returns the seconds close() took."""
    proxy.freeze()
    began = time.monotonic()
    cloud.close()
    return time.monotonic() - began


def test_close_returns_promptly_while_the_kvs_does_not_answer(
    start_node: Callable[..., Node], freezable: Callable[[str], FreezingProxy]
) -> None:
    """Closing cancels the op stream to a hung KVS rather than waiting for it to end its side."""
    config = make_config()
    kvs = start_node(start_kvs_node(config))
    proxy = freezable(kvs.address)
    executor = start_node(start_executor_node(config, kvs.address, "executor-0"))
    scheduler_config = make_config(scheduler={"direct_kvs_address": proxy.address})
    scheduler = start_node(start_scheduler_node(scheduler_config, kvs.address, [executor.address]))
    cloud = CloudburstConnection(scheduler.address, connect_timeout=30, timeout=60)
    try:
        assert cloud.kvs_address == proxy.address
        cloud.put_object("hung/before", 1)  # opens the op stream, through the proxy
    finally:
        took = closed_while_frozen(cloud, proxy)
    # Waiting for the hung KVS to end the op stream took 2 s before.
    assert took < 1.0, f"close() took {took:.2f}s"


def test_close_waits_for_a_scheduler_that_does_not_answer_at_most_its_grace(
    start_node: Callable[..., Node], freezable: Callable[[str], FreezingProxy]
) -> None:
    """The scheduler gets CLOSE_GRACE_SECONDS to read the last frames and end the call stream."""
    config = make_config()
    kvs = start_node(start_kvs_node(config))
    executor = start_node(start_executor_node(config, kvs.address, "executor-0"))
    scheduler = start_node(start_scheduler_node(config, kvs.address, [executor.address]))
    proxy = freezable(scheduler.address)
    cloud = CloudburstConnection(proxy.address, connect_timeout=30, timeout=60)
    try:
        # Opens the call stream, through the proxy.
        assert cloud.register(incr, "incr")(1).get() == 2
    finally:
        took = closed_while_frozen(cloud, proxy)
    # The SDK's CLOSE_GRACE_SECONDS (1 s) and a margin; waiting for the hung scheduler to end
    # the call stream took 5 s before.
    assert took < 3.0, f"close() took {took:.2f}s"


def test_a_scheduler_with_a_smaller_message_limit_gets_writes_and_reads_sized_for_it() -> None:
    """The scheduler reports its own message limit, not the KVS's larger one, and reads through
    it come in messages it can pass on, as do reads by a client with a smaller limit."""
    limit = 1 << 20
    env = {"CBGRPC_SERVER_MAX_PAYLOAD_BYTES": str(limit)}
    with running_process_cluster(scheduler_env=env) as cluster:
        request = kvs_service_pb2.GetLimitsRequest()
        with grpc.insecure_channel(cluster.address) as channel:
            limits = kvs_service_pb2_grpc.KvsServiceStub(channel).GetLimits(request, timeout=30)
        assert limits.max_message_bytes == limit
        # Over twice the scheduler's limit: more than one message to it may carry.
        value = b"p" * (3 * limit)
        with (
            CloudburstConnection(
                cluster.address, connect_timeout=30, timeout=60, direct_kvs=False
            ) as proxied,
            CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as direct,
        ):
            assert proxied.put_object("proxied/large", value) is True
            assert direct.kvs_address == cluster.kvs.address
            assert direct.get_object("proxied/large") == value
            # The KVS would answer it in one message, which the scheduler could not take.
            assert proxied.get_object("proxied/large") == value
            assert proxied.get_object(["proxied/large"]) == {"proxied/large": value}

        with grpc.insecure_channel(cluster.address) as channel:
            read = kvs_service_pb2.GetValueRequest(key="proxied/large")
            answer = kvs_service_pb2_grpc.KvsServiceStub(channel).GetValue(read, timeout=30)
            assert answer.found and answer.chunked
            frames = list(
                kvs_service_pb2_grpc.KvsServiceStub(channel).GetValueChunks(
                    kvs_service_pb2.GetValueChunksRequest(key="proxied/large"), timeout=30
                )
            )
        assert all(len(frame.chunk) < limit for frame in frames)
        assert b"".join(frame.chunk for frame in frames) == value

        # A client whose own limit is smaller than the KVS's says so in its reads, and sizes
        # its writes by it.
        for goes_direct in (True, False):
            with CloudburstConnection(
                cluster.address,
                connect_timeout=30,
                timeout=60,
                max_payload_bytes=limit,
                direct_kvs=goes_direct,
            ) as small:
                assert small.kvs_address == (cluster.kvs.address if goes_direct else None)
                assert small.get_object("proxied/large") == value
                assert small.get_object(["proxied/large"]) == {"proxied/large": value}
                assert small.put_object(f"small/{goes_direct}", value) is True
                assert small.get_object(f"small/{goes_direct}") == value


def test_an_executor_with_a_smaller_message_limit_reads_and_writes_large_values() -> None:
    """The executor asks the KVS for messages its own limit takes, and writes in chunks what
    does not fit in one."""
    limit = 1 << 20
    value = b"e" * (3 * limit)  # the KVS would send it in one message, over twice the limit
    with (
        running_process_cluster("--max-payload-bytes", str(limit)) as cluster,
        CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as cloud,
    ):
        assert cloud.put_object("executor/large", value) is True
        sizer = cloud.register(size_of, "size_of")
        assert sizer(CloudburstReference("executor/large")).get(timeout=60) == len(value)
        copier = cloud.register(write_copy, "write_copy")
        reference = CloudburstReference("executor/large")
        assert copier("executor/copy", reference).get(timeout=60) == len(value) + 1
        assert cloud.get_object("executor/copy") == value + b"!"
