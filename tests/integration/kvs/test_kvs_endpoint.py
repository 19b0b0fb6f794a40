"""A KVS endpoint that moves to another instance closes its old channel once that is unused.

Two real KVS servers on 127.0.0.1, listed as a discovered tier; the endpoint's
channels go idle after a second without calls (gRPC's minimum), so a replaced
channel closes within the test's deadline instead of after half an hour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from cloudburst.errors import UnavailableError
from cloudburst.serialization import LwwClock, lattice_value, lww, serialize
from cloudburst_grpc.discovery.consul import ConsulClient, Instance, ServiceWatch
from cloudburst_grpc.local import Node
from cloudburst_kvs.access import EndpointKvs, KvsEndpoint
from cloudburst_kvs.storage import MemoryEngine
from cloudburst_kvs.store import LatticeStore
from harness import free_ports, make_config
from kvs_interceptors import USER, SharedStoreKvs, Writes

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


async def test_a_write_or_delete_tried_again_on_another_instance_is_the_same_one(
    consul: ConsulClient,
) -> None:
    """The first instance applies each write and delete, and its answer is lost.

    Both instances serve one store, as instances over one Valkey do; this one
    remembers request ids, so the retry of the delete does not delete the value
    written between the two attempts.
    """
    store = LatticeStore(MemoryEngine())
    await store.start()
    limit = CONFIG.server.max_payload_bytes
    lost = await SharedStoreKvs(store, Writes(lose_answers=True), limit).start()
    other = await SharedStoreKvs(store, Writes(), limit).start()

    async def write_between(key: str) -> None:
        await store.put(USER, key, lww(serialize("written in between"), CLOCK))

    lost.writes.between = write_between
    try:
        operations: list[tuple[str, Callable[[EndpointKvs], Awaitable[object]]]] = [
            ("put", lambda kvs: kvs.put("key", lww(serialize("first"), CLOCK))),
            ("delete", lambda kvs: kvs.delete("key")),
        ]
        for name, operation in operations:
            # An endpoint of its own: after a lost answer it sets the first instance aside.
            watch = ServiceWatch(consul, "cloudburst-kvs")
            watch.instances = [Instance("kvs-a", lost.address), Instance("kvs-b", other.address)]
            endpoint = KvsEndpoint(CONFIG, None, watch)
            try:
                await asyncio.wait_for(operation(EndpointKvs(endpoint)), DEADLINE)
                assert endpoint.address == other.address, name
            finally:
                await endpoint.close()
            attempts = lost.writes.received + other.writes.received
            assert lost.writes.received and other.writes.received, (name, attempts)
            request_ids = {request.request_id for _, request in attempts}
            assert len(request_ids) == 1 and "" not in request_ids, (name, attempts)
            lost.writes.received.clear()
            other.writes.received.clear()
        stored = await store.read(USER, "key")
        assert stored is not None and lattice_value(stored) == "written in between"
    finally:
        for kvs in (lost, other):
            if kvs.server is not None:
                await kvs.server.stop(0)
        await store.close()


async def test_a_watch_of_a_kvs_that_does_not_answer_names_it() -> None:
    """As every other op does: which KVS, and what to check (not a client's hint)."""
    (port,) = free_ports(1)  # nothing listens there
    address = f"127.0.0.1:{port}"
    endpoint = KvsEndpoint(CONFIG, address, None)
    kvs = EndpointKvs(endpoint)
    try:
        for watch in (kvs.watch_keys("function/"), kvs.watch_values(["key"])):
            with pytest.raises(UnavailableError) as raised:
                async with asyncio.timeout(DEADLINE):
                    await anext(aiter(watch))
            message = str(raised.value)
            assert f"the KVS at {address} is unavailable" in message
            assert "check that `cbgrpc kvs` is running and answering there" in message
            assert "cbgrpc serve" not in message
    finally:
        await endpoint.close()
