"""A discovered KVS tier of two releases: the endpoint uses the instances of its own.

Two real KVS servers on 127.0.0.1, listed as a discovered tier whose Consul
meta names the wire protocol version each speaks (as ``cbgrpc kvs`` registers it).
"""

from __future__ import annotations

import asyncio

import pytest

from cloudburst.errors import ProtocolMismatchError
from cloudburst.protocol import ADVICE, META_KEY, protocol_version
from cloudburst.serialization import LwwClock, lww, serialize
from cloudburst.v1 import lattice_pb2
from cloudburst_grpc.discovery.consul import ConsulClient, Instance, ServiceWatch
from cloudburst_grpc.local import Node
from cloudburst_kvs.access import EndpointKvs, KvsEndpoint
from harness import make_config

DEADLINE = 30.0
CONFIG = make_config()
CLOCK = LwwClock()
OURS = str(protocol_version())
OTHER = str(protocol_version() + 1)
USER = lattice_pb2.KEYSPACE_USER


async def test_the_endpoint_uses_only_instances_of_its_release(
    kvs_nodes: list[Node], consul: ConsulClient
) -> None:
    old, current = kvs_nodes
    watch = ServiceWatch(consul, "cloudburst-kvs")
    # The other release's instance comes first, as Consul might list it.
    watch.instances = [
        Instance("kvs-a", old.address, {META_KEY: OTHER}),
        Instance("kvs-b", current.address, {META_KEY: OURS}),
    ]
    endpoint = KvsEndpoint(CONFIG, None, watch)
    kvs = EndpointKvs(endpoint)
    try:
        await asyncio.wait_for(kvs.put("key", lww(serialize(1), CLOCK)), DEADLINE)
        assert endpoint.address == current.address
        assert old.store is not None and current.store is not None
        assert await old.store.read(USER, "key") is None
        assert await current.store.read(USER, "key") is not None
        # Losing it leaves no instance of this release to move to.
        assert not endpoint.unreachable(await endpoint.channel())

        # One that names no version (a release before versions were registered) is taken.
        watch.instances = [
            Instance("kvs-a", old.address, {META_KEY: OTHER}),
            Instance("kvs-c", current.address, {}),
        ]
        assert await asyncio.wait_for(kvs.get("key"), DEADLINE) is not None

        # Only the other release's instance passes: calls fail, naming what Consul knows.
        watch.instances = [Instance("kvs-a", old.address, {META_KEY: OTHER})]
        with pytest.raises(ProtocolMismatchError) as caught:
            await asyncio.wait_for(kvs.get("key"), DEADLINE)
        assert str(caught.value) == (
            f"Consul knows no passing KVS of this process's cloudburst-grpc wire protocol "
            f"{OURS}, only of other releases (kvs-a at {old.address} speaks {OTHER}); {ADVICE}"
        )
        assert caught.value.metadata == {"server_protocol": OTHER, "client_protocol": OURS}
        assert endpoint.address == current.address
    finally:
        await endpoint.close()
