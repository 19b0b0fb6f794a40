"""Values larger than one message move in chunks, up to the limit the KVS tier reports."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import PayloadTooLargeError
from cloudburst.reference import CloudburstReference
from harness import ProcessCluster, ServeProcess

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
