"""A client cannot store keys so long that listing the keyspace fails for everyone."""

from __future__ import annotations

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import InvalidArgumentError
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc
from cloudburst_grpc.local import Node
from cloudburst_kvs.store import MAX_KEY_BYTES


def test_long_keys_are_refused_and_listing_keeps_working(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        for _ in range(3):
            with pytest.raises(InvalidArgumentError, match="over the limit"):
                cloud.put_object("k" * (15 * 1024 * 1024), b"v")
        cloud.put_object("x" * MAX_KEY_BYTES, b"longest")
        cloud.put_object("short", b"v")
        assert cloud.get_object("x" * MAX_KEY_BYTES) == b"longest"
    with grpc.insecure_channel(local_node.address) as channel:
        listed = kvs_service_pb2_grpc.KvsServiceStub(channel).ListKeys(
            kvs_service_pb2.ListKeysRequest(), timeout=10
        )
    assert set(listed.keys) == {"x" * MAX_KEY_BYTES, "short"}
