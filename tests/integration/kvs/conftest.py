"""Fixtures shared by the KVS integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cloudburst_grpc.config import ConsulConfig
from cloudburst_grpc.discovery.consul import ConsulClient
from cloudburst_grpc.local import Node, start_kvs_node
from harness import make_config


@pytest.fixture
async def kvs_nodes() -> AsyncIterator[list[Node]]:
    """Two KVS servers on 127.0.0.1, each with its own in-memory store."""
    nodes = [await start_kvs_node(make_config()) for _ in range(2)]
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop(0)


@pytest.fixture
async def consul() -> AsyncIterator[ConsulClient]:
    """A Consul client that is never asked: the tests set a watch's instances themselves."""
    client = ConsulClient(ConsulConfig())
    try:
        yield client
    finally:
        await client.close()
