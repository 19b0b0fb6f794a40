"""A write stamped far in the future cannot lock a key: the KVS refuses it.

Without the bound, one write stamped 2^64-1 (or from a client whose clock runs
an hour fast) made every later write to the key succeed and stay invisible.
The writes here come from a raw gRPC client, as any language's client could
send them.
"""

from __future__ import annotations

import time

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import InvalidArgumentError
from cloudburst.rpc import error_from_rpc
from cloudburst.serialization import serialize
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from cloudburst_grpc.local import Node


def _put_stamped(address: str, key: str, value: str, time_ns: int) -> None:
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.time_ns = time_ns
    lattice.lww.timestamp.writer_id = "raw-writer"
    lattice.lww.value.CopyFrom(serialize(value))
    with grpc.insecure_channel(address) as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        try:
            stub.PutValue(kvs_service_pb2.PutValueRequest(key=key, lattice=lattice), timeout=10)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None


@pytest.mark.parametrize("ahead_ns", [None, 3600 * 10**9], ids=["max-uint64", "an-hour-fast"])
def test_a_future_write_is_refused_and_later_writes_stay_visible(
    local_node: Node, ahead_ns: int | None
) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.put_object("k", "before")
        stamp = 2**64 - 1 if ahead_ns is None else time.time_ns() + ahead_ns
        with pytest.raises(InvalidArgumentError, match="ahead of the KVS's clock"):
            _put_stamped(local_node.address, "k", "forged", stamp)
        assert cloud.get_object("k") == "before"
        cloud.put_object("k", "after")
        assert cloud.get_object("k") == "after"


def test_a_writer_within_the_allowed_skew_is_accepted(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        _put_stamped(local_node.address, "k", "slightly fast", time.time_ns() + 5 * 10**9)
        assert cloud.get_object("k") == "slightly fast"
