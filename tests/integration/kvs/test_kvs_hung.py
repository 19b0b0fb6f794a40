"""A KVS instance that stops answering (hung, not dead) is given up within seconds.

The scheduler and the executors reach the KVS through :class:`EndpointKvs`.
When the instance in use hangs, an operation fails over to another passing
instance (Consul discovery), or, with none, ends with UnavailableError naming
the instance, well before its own deadline. A proxy that stops passing bytes
on plays the hung instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cloudburst.errors import UnavailableError
from cloudburst.serialization import LwwClock, lww, serialize
from cloudburst_grpc.config import ConsulConfig
from cloudburst_grpc.discovery.consul import ConsulClient, Instance, ServiceWatch
from cloudburst_grpc.local import Node
from cloudburst_kvs.access import EndpointKvs, KvsEndpoint
from freezing_proxy import FreezingProxy
from harness import make_config

#: Each operation's bound here; a hung instance waited on would take longer and fail the test.
BOUND = 30.0

CONFIG = make_config()
CLOCK = LwwClock()


@pytest.fixture
async def proxy(kvs_nodes: list[Node]) -> AsyncIterator[FreezingProxy]:
    proxy = FreezingProxy(int(kvs_nodes[0].address.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_an_operation_moves_on_from_a_hung_instance(
    kvs_nodes: list[Node], proxy: FreezingProxy
) -> None:
    # Two passing instances, as Consul would list them; the first (behind the proxy) is used.
    consul = ConsulClient(ConsulConfig())  # never asked: the instances are given below
    watch = ServiceWatch(consul, "cloudburst-kvs")
    watch.instances = [Instance("kvs-a", proxy.address), Instance("kvs-b", kvs_nodes[1].address)]
    endpoint = KvsEndpoint(CONFIG, None, watch)
    kvs = EndpointKvs(endpoint)
    try:
        await asyncio.wait_for(kvs.put("before", lww(serialize(1), CLOCK)), BOUND)
        assert endpoint.address == proxy.address
        proxy.freeze()
        await asyncio.wait_for(kvs.put("during", lww(serialize(2), CLOCK)), BOUND)
        assert endpoint.address == kvs_nodes[1].address
        assert await asyncio.wait_for(kvs.get("during"), BOUND) is not None
    finally:
        await endpoint.close()
        await consul.close()


async def test_with_no_other_instance_an_operation_fails_naming_the_hung_one(
    proxy: FreezingProxy,
) -> None:
    endpoint = KvsEndpoint(CONFIG, proxy.address, None)
    kvs = EndpointKvs(endpoint)
    try:
        await asyncio.wait_for(kvs.put("before", lww(serialize(1), CLOCK)), BOUND)
        proxy.freeze()
        with pytest.raises(UnavailableError, match=f"the KVS at {proxy.address}"):
            await asyncio.wait_for(kvs.get("before"), BOUND)
        proxy.thaw()
        # Continued, it serves again (the next reconnection attempt finds it).
        deadline = asyncio.get_running_loop().time() + BOUND
        while True:
            try:
                assert await asyncio.wait_for(kvs.get("before"), BOUND) is not None
                break
            except UnavailableError:
                assert asyncio.get_running_loop().time() < deadline, "not serving again"
                await asyncio.sleep(0.1)  # the interval between attempts; the deadline bounds it
    finally:
        await endpoint.close()
