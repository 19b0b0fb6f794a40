"""A KVS endpoint that moves to another instance closes its old channel once that is unused.

Two real KVS servers on 127.0.0.1, listed as a discovered tier; the endpoint's
channels go idle after a second without calls (gRPC's minimum), so a replaced
channel closes within the test's deadline instead of after half an hour.
"""

from __future__ import annotations

import asyncio

import grpc

from cloudburst.serialization import LwwClock, lww, serialize
from cloudburst_grpc.discovery.consul import ConsulClient, Instance, ServiceWatch
from cloudburst_grpc.local import Node
from cloudburst_kvs.access import EndpointKvs, KvsEndpoint
from cloudburst_kvs.store import LatticeStore
from harness import make_config

DEADLINE = 30.0
IDLE_SECONDS = 1.0
CONFIG = make_config()
CLOCK = LwwClock()


async def test_a_replaced_channel_closes_once_its_calls_have_ended(
    kvs_nodes: list[Node], consul: ConsulClient
) -> None:
    first, second = (node.address for node in kvs_nodes)
    watch = ServiceWatch(consul, "cloudburst-kvs")
    watch.instances = [Instance("kvs-a", first)]
    endpoint = KvsEndpoint(CONFIG, None, watch, idle_seconds=IDLE_SECONDS)
    kvs = EndpointKvs(endpoint)
    waiting: asyncio.Task[object] | None = None
    try:
        await asyncio.wait_for(kvs.put("before", lww(serialize(1), CLOCK)), DEADLINE)
        old = await endpoint.channel()
        # A read waiting at the first instance when the tier moves goes on there.
        old_client = await endpoint.client()
        waiting = asyncio.create_task(old_client.get("awaited", wait=True, timeout=DEADLINE))
        deadline = asyncio.get_running_loop().time() + DEADLINE
        store = kvs_nodes[0].store
        assert isinstance(store, LatticeStore)
        while store.waiter_count() < 1:
            assert asyncio.get_running_loop().time() < deadline, "the read never waited"
            await asyncio.sleep(0.01)
        watch.instances = [Instance("kvs-b", second)]
        await asyncio.wait_for(kvs.put("after", lww(serialize(2), CLOCK)), DEADLINE)
        assert endpoint.address == second
        assert endpoint.retired == 1
        # The write the read waits for, at the first instance over the old channel: the
        # read gets it (the channel stayed open for them), then the old channel, unused,
        # closes.
        await asyncio.wait_for(old_client.merge("awaited", lww(serialize(3), CLOCK)), DEADLINE)
        assert await asyncio.wait_for(waiting, DEADLINE) is not None
        async with asyncio.timeout(DEADLINE):
            await endpoint.retired_closed()
        assert old.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        assert endpoint.retired == 0
        assert await asyncio.wait_for(kvs.get("after"), DEADLINE) is not None
    finally:
        if waiting is not None:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        await endpoint.close()
