"""The scheduler's KvsService proxy passes every KVS error through unchanged.

A client that knows only a scheduler's address reaches the KVS through it; an
error the KVS raises must reach that client with the same status code,
ErrorInfo reason and metadata as when it asks the KVS directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from cloudburst.errors import (
    CloudburstError,
    InvalidArgumentError,
    PayloadTooLargeError,
    UnavailableError,
)
from cloudburst.rpc import error_from_rpc
from cloudburst.serialization import LwwClock, lww, serialize
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc
from cloudburst_grpc.local import Node, start_executor_node, start_kvs_node, start_scheduler_node
from harness import Cluster, make_config

#: Small enough that a value over it still fits in one gRPC message.
LIMIT = 64 * 1024

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = kvs_service_pb2_grpc.KvsServiceAsyncStub
    Call = Callable[[Stub], Awaitable[Any]]


def _put(key: str, size: int) -> Call:
    def call(stub: Stub) -> Awaitable[Any]:
        request = kvs_service_pb2.PutValueRequest(
            key=key, lattice=lww(serialize(b"x" * size), LwwClock())
        )
        return stub.PutValue(request, timeout=10)

    return call


def _batch_get(keys: list[str]) -> Call:
    def call(stub: Stub) -> Awaitable[Any]:
        return stub.BatchGetValues(kvs_service_pb2.BatchGetValuesRequest(keys=keys), timeout=10)

    return call


def _get(key: str) -> Call:
    def call(stub: Stub) -> Awaitable[Any]:
        return stub.GetValue(kvs_service_pb2.GetValueRequest(key=key), timeout=10)

    return call


async def _error(address: str, call: Call) -> tuple[grpc.StatusCode, CloudburstError]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(stub)
    return info.value.code(), error_from_rpc(info.value)


@pytest.fixture
def small_cluster(start_node: Callable[..., Node], server_loop: Any) -> Cluster:
    config = make_config(server={"max_payload_bytes": LIMIT})
    kvs = start_node(start_kvs_node(config))
    executor = start_node(start_executor_node(config, kvs.address, "executor-0"))
    scheduler = start_node(start_scheduler_node(config, kvs.address, [executor.address]))
    return Cluster(server_loop, kvs, [executor], scheduler)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (_put("big", LIMIT + 1), PayloadTooLargeError),
        (_put("", 1), InvalidArgumentError),
        (_get(""), InvalidArgumentError),
        (_batch_get(["a", ""]), InvalidArgumentError),
    ],
    ids=["payload-too-large", "empty-key-put", "empty-key-get", "empty-key-batch"],
)
def test_kvs_errors_pass_through_the_scheduler(
    small_cluster: Cluster, call: Call, expected: type[CloudburstError]
) -> None:
    loop = small_cluster.loop
    direct_code, direct = loop.run(_error(small_cluster.kvs.address, call))
    proxied_code, proxied = loop.run(_error(small_cluster.address, call))
    assert type(direct) is expected
    assert type(proxied) is expected
    assert proxied_code == direct_code
    assert proxied.reason == direct.reason
    assert proxied.metadata == direct.metadata
    assert str(proxied) == str(direct)


def test_an_unreachable_kvs_is_unavailable_through_the_scheduler(small_cluster: Cluster) -> None:
    loop = small_cluster.loop
    loop.run(small_cluster.kvs.stop(grace=0))
    code, error = loop.run(_error(small_cluster.address, _get("k")))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(error, UnavailableError)
