"""The Go client exchanges values too large for one message with the Python SDK.

A cluster of `cbgrpc` processes whose KVS holds values up to :data:`LIMIT`: a
value of :data:`SIZE` moves in chunks (``PutValueChunks``, ``GetValueChunks``)
both at the KVS itself and through the scheduler's proxy. The Go driver
(sdk/go/internal/clientdriver) generates and hashes the bytes itself, so that
no test pipes megabytes of JSON. Without Go the test skips, except under CI,
where it fails.
"""

from __future__ import annotations

import hashlib
import os

from cloudburst import CloudburstConnection
from e2e.drivers import Launcher
from harness import running_process_cluster

#: The KVS's limit on a value (kvs.max_value_bytes).
LIMIT = 24 << 20
#: The size of the values exchanged: far over a message, under the limit.
SIZE = 20 << 20
#: Over gRPC-Go's default limit on a message received (4 MiB), under the cluster's message
#: limit (16 MiB): the KVS sends it, and the executor the result of that size, in one message.
MIDDLE = 6 << 20


def repeat(_: object, size: int) -> str:
    return "r" * size


def test_go_and_python_exchange_values_too_large_for_one_message(launch_go: Launcher) -> None:
    with running_process_cluster(env={"CBGRPC_KVS_MAX_VALUE_BYTES": str(LIMIT)}) as cluster:
        data = os.urandom(SIZE)
        middle = os.urandom(MIDDLE)
        with CloudburstConnection(cluster.address, connect_timeout=30, timeout=120) as cloud:
            cloud.put_object("large/from-python", data)
            cloud.put_object("middle/from-python", middle)
            cloud.register(repeat, "repeat")
            for mode, kvs_address in (("on", cluster.kvs.address), ("off", "")):
                driver = launch_go(cluster.address, mode)
                read = driver.ok(op="get_digest", key="large/from-python")
                assert read == {
                    "ok": True,
                    "found": True,
                    "size": SIZE,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "serializer": "SERIALIZER_BYTES",
                }
                read = driver.ok(op="get_digest", key="middle/from-python")
                assert (read["size"], read["sha256"]) == (
                    MIDDLE,
                    hashlib.sha256(middle).hexdigest(),
                )
                # A result over gRPC-Go's default receive limit, under the cluster's.
                result = driver.ok(op="call_digest", name="repeat", args=[MIDDLE])
                assert (result["size"], result["sha256"]) == (
                    MIDDLE,
                    hashlib.sha256(b"r" * MIDDLE).hexdigest(),
                )

                key = f"large/from-go-{mode}"
                written = driver.ok(op="put_bytes", key=key, size=SIZE)
                assert written["size"] == SIZE
                value = cloud.get_object(key)
                assert isinstance(value, bytes) and len(value) == SIZE
                assert hashlib.sha256(value).hexdigest() == written["sha256"]
                # Go reads back what it wrote.
                assert driver.ok(op="get_digest", key=key)["sha256"] == written["sha256"]

                # Over the KVS's limit: refused by the client, before sending, saying so.
                refused = driver.ask(op="put_bytes", key="large/over", size=LIMIT + 1)
                assert not refused["ok"], refused
                assert refused["reason"] == "PAYLOAD_TOO_LARGE", refused
                for said in (f"{LIMIT + 1} bytes", f"limit of {LIMIT} bytes", "smaller pieces"):
                    assert said in refused["message"], refused
                assert driver.ok(op="get", key="large/over") == {"ok": True, "found": False}

                # A small value goes as before.
                driver.ok(op="put", key=f"small/{mode}", value={"n": [1, 2]})
                assert cloud.get_object(f"small/{mode}") == {"n": [1, 2]}
                assert driver.ok(op="get", key=f"small/{mode}")["value"] == {"n": [1, 2]}

                assert driver.ok(op="kvs_address")["address"] == kvs_address
                driver.close()
