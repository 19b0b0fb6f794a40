"""The TypeScript client exchanges values too large for one message with Python, in chunks.

Against a cluster of `cbgrpc` processes (its KVS holding values up to 24 MiB),
the client's driver (sdk/typescript/test/driver.ts, built by `make clients`)
reads a 20 MiB value the Python SDK wrote and writes one Python reads, both at
the KVS directly and through the scheduler's proxy (each compared by hash); a
value over the KVS's ``max_value_bytes`` is refused before it is sent, saying
its size and the limit; a small value still goes in one message. Without Node
the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from cloudburst import CloudburstConnection
from e2e.drivers import Driver, Launcher
from harness import ProcessCluster, running_process_cluster

MIB = 1 << 20
LIMIT = 24 * MIB


@pytest.fixture(scope="module")
def cluster() -> Iterator[ProcessCluster]:
    """A cluster whose KVS holds values of up to :data:`LIMIT` bytes."""
    with running_process_cluster(env={"CBGRPC_KVS_MAX_VALUE_BYTES": str(LIMIT)}) as started:
        yield started


@pytest.fixture(params=["on", "off"])
def driver(request: pytest.FixtureRequest, cluster: ProcessCluster, launch_ts: Launcher) -> Driver:
    """The TypeScript driver, objects at the KVS directly ("on") or through the scheduler."""
    return launch_ts(cluster.address, request.param)


def test_a_20_mib_value_crosses_between_python_and_typescript_intact(
    cluster: ProcessCluster, driver: Driver
) -> None:
    mode = os.urandom(4).hex()
    written = os.urandom(20 * MIB)
    with CloudburstConnection(cluster.address, connect_timeout=30, timeout=120) as cloud:
        cloud.put_object(f"large/py/{mode}", written)
        got = driver.ok(op="get_bytes", key=f"large/py/{mode}", timeout=120)
        assert got["found"] and got["size"] == len(written)
        assert got["sha256"] == hashlib.sha256(written).hexdigest()

        sent = driver.ok(op="put_bytes", key=f"large/ts/{mode}", size=20 * MIB + 3, timeout=120)
        read = cloud.get_object(f"large/ts/{mode}")
        assert isinstance(read, bytes) and len(read) == 20 * MIB + 3
        assert hashlib.sha256(read).hexdigest() == sent["sha256"]


def test_a_value_over_max_value_bytes_is_refused_before_sending(
    cluster: ProcessCluster, driver: Driver
) -> None:
    answer = driver.ask(op="put_bytes", key="large/refused", size=LIMIT + 1)
    assert not answer["ok"] and answer["code"] == "ResourceExhausted", answer
    assert answer["reason"] == "PAYLOAD_TOO_LARGE", answer
    assert f"{LIMIT + 1} bytes" in answer["message"], answer
    assert f"limit of {LIMIT} bytes" in answer["message"], answer
    assert driver.ok(op="get", key="large/refused") == {"ok": True, "found": False}


def test_a_small_value_still_goes_in_one_message(cluster: ProcessCluster, driver: Driver) -> None:
    driver.ok(op="put", key="large/small", value={"small": [1, 2]})
    assert driver.ok(op="get", key="large/small")["value"] == {"small": [1, 2]}
    sent = driver.ok(op="put_bytes", key="large/medium", size=MIB)
    with CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as cloud:
        read = cloud.get_object("large/medium")
    assert isinstance(read, bytes) and hashlib.sha256(read).hexdigest() == sent["sha256"]
