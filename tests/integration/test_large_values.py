"""Values larger than one message move in chunks, up to the limit the KVS tier reports."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import PayloadTooLargeError
from cloudburst.reference import CloudburstReference
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2
from harness import ProcessCluster, ServeProcess, running_process_cluster

MIB = 1 << 20


def digest(_: Any, data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def store_large(cloudburst: Any, key: str, size: int) -> tuple[int, str]:
    data = big(size)
    cloudburst.put_object(key, data)
    return digest(cloudburst, cloudburst.get_object(key))


def big(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def test_a_value_over_a_message_goes_through_a_cluster_and_into_a_function(
    process_cluster: ProcessCluster,
) -> None:
    value = big(40 * MIB)  # the default message limit is 16 MiB
    expected = (len(value), hashlib.sha256(value).hexdigest())
    with CloudburstConnection(process_cluster.address) as cloud:
        assert cloud.max_value_bytes == 1 << 30, "learned from the KVS tier"
        assert cloud.put_object("large/model", value)
        assert cloud.get_object("large/model") == value
        summarize = cloud.register(digest, "digest")
        ref = CloudburstReference("large/model")
        assert summarize(ref).get(timeout=120) == expected
        assert summarize(ref).get(timeout=120) == expected  # again (now cached there)
        writer = cloud.register(store_large, "store_large")
        written = writer("large/written", 24 * MIB).get(timeout=120)
        assert written == (24 * MIB, hashlib.sha256(big(24 * MIB)).hexdigest())
        assert cloud.get_object("large/written") == big(24 * MIB)
        cloud.put_object("large/model", value[: 20 * MIB])
        half = value[: 20 * MIB]
        assert summarize(ref).get(timeout=120) == (len(half), hashlib.sha256(half).hexdigest())


def test_the_kvs_limit_is_the_one_clients_use(
    serve_process: Callable[..., ServeProcess],
) -> None:
    proc = serve_process("--storage", "memory", env={"CBGRPC_KVS_MAX_VALUE_BYTES": str(24 * MIB)})
    with CloudburstConnection(proc.address) as cloud:
        assert cloud.max_value_bytes == 24 * MIB
        value = big(20 * MIB)
        assert cloud.put_object("large/fits", value)
        assert cloud.get_object("large/fits") == value
        with pytest.raises(PayloadTooLargeError):
            cloud.put_object("large/over", big(30 * MIB))


def summarize_listed(cloudburst: Any, values: list[bytes]) -> tuple[list[str], list[str], str]:
    listed = cloudburst.get_object(["large/set", "large/lww"])
    return (
        sorted(hashlib.sha256(v).hexdigest() for v in values),
        sorted(hashlib.sha256(v).hexdigest() for v in listed["large/set"]),
        hashlib.sha256(listed["large/lww"]).hexdigest(),
    )


def test_values_over_a_message_are_read_in_chunks_alone_and_in_lists() -> None:
    """A set grows by merges of values that each fit in a message, past what one message holds.

    Read alone or with other keys (a list read), by the client and in a function, it
    comes in chunks, as a last-writer-wins value over a message does.
    """
    limit = MIB  # every process's message limit, so the values need not be large
    members = [bytes([n]) * (512 << 10) for n in range(10)]  # 5 MiB: over 3 MiB, a message
    one = big(6 * MIB)
    with (
        running_process_cluster(env={"CBGRPC_SERVER_MAX_PAYLOAD_BYTES": str(limit)}) as cluster,
        grpc.insecure_channel(cluster.kvs.address) as channel,
    ):
        kvs = kvs_service_pb2_grpc.KvsServiceStub(channel)
        for member in members:
            value = value_pb2.Value(data=member, serializer=value_pb2.SERIALIZER_BYTES)
            request = kvs_service_pb2.PutValueRequest(
                key="large/set",
                lattice=lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value])),
                omit_lattice=True,
            )
            kvs.PutValue(request, timeout=60)
        with CloudburstConnection(cluster.address, max_payload_bytes=limit) as cloud:
            assert cloud.put_object("large/lww", one)
            # Over the KVS's message limit, under the SDK's own threshold for chunks: chunked too.
            assert cloud.put_object("large/two", big(2 * MIB))
            assert cloud.get_object("large/two") == big(2 * MIB)
            assert sorted(cloud.get_object("large/set")) == members
            assert sorted(cloud.get_object("large/set", deserialize=False)) == members
            listed = cloud.get_object(["large/set", "large/lww", "large/missing"])
            assert sorted(listed["large/set"]) == members
            assert listed["large/lww"] == one
            assert listed["large/missing"] is None
            summarize = cloud.register(summarize_listed, "summarize_listed")
            digests = sorted(hashlib.sha256(v).hexdigest() for v in members)
            expected = (digests, digests, hashlib.sha256(one).hexdigest())
            assert summarize(CloudburstReference("large/set")).get(timeout=120) == expected


def read_twice(cloudburst: Any, data: bytes, key: str) -> tuple[tuple[int, str], tuple[int, str]]:
    return digest(cloudburst, data), digest(cloudburst, cloudburst.get_object(key))


def test_an_executor_reading_a_large_value_keeps_answering_health_checks() -> None:
    """A function reading 256 MiB, by reference and with get_object, while health checks are tight.

    The scheduler asks every executor for its status every 0.2 s and sets aside one
    that does not answer within 0.5 s, failing the calls running there. Copying the
    value whole on the executor's event loop (or on a thread holding the GIL) for
    longer than that would lose the call.
    """
    size = 256 * MIB
    value = big(size)
    expected = (size, hashlib.sha256(value).hexdigest())
    health = {
        "CBGRPC_SCHEDULER_HEALTH_INTERVAL_SECONDS": "0.2",
        "CBGRPC_SCHEDULER_HEALTH_TIMEOUT_SECONDS": "0.5",
    }
    with (
        running_process_cluster(scheduler_env=health) as cluster,
        CloudburstConnection(cluster.address, timeout=300) as cloud,
    ):
        reader = cloud.register(read_twice, "read_twice")
        assert cloud.put_object("large/small", b"x")
        small = (1, hashlib.sha256(b"x").hexdigest())
        # The function is loaded on the executors before the large read.
        assert reader(b"x", "large/small").get(timeout=120) == (small, small)
        assert cloud.put_object("large/big", value)
        del value
        got = reader(CloudburstReference("large/big"), "large/big").get(timeout=300)
        assert got == (expected, expected)
        down = [line for line in cluster.scheduler.stderr_lines if " is down (" in line]
        assert not down, down
