"""The Go and TypeScript clients on a cluster of `cbgrpc` processes: direct KVS access, keepalive.

Like the Python SDK, each client reads and writes objects at the KVS the
scheduler names (``kvs_addresses``), goes through the scheduler when that
address does not answer, and notices a hung scheduler from its keepalive pings
within seconds. Each client's driver (sdk/go/internal/clientdriver,
sdk/typescript/test/driver.ts; e2e/drivers.py) takes one JSON command per
line and answers each, so a test can stop or kill processes between the steps.
Without Go or Node the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import time

import grpc

from cloudburst import CloudburstConnection
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from e2e.drivers import Launcher
from faults import resume_and_kill
from harness import CbgrpcProcess, free_ports, running_process_cluster
from waiting import wait_until

#: Seconds a hung scheduler may take to fail a waiting call: the Go client pings after 10 s
#: without reading (grpc-go's minimum) and gives up 2 s later, the TypeScript client pings every
#: second. The call's own deadline is far longer, so only keepalive can end it in time.
HUNG_BOUND = 30.0

#: Seconds a new connection to a hung scheduler may take to fail a call: each client gives a
#: connection 3 s to be made and answered (without that, the Go client's takes about 13 s).
NEW_CONNECTION_BOUND = 10.0

#: Seconds a killed scheduler may take to fail a call: its connection is reset at once, so
#: neither keepalive nor the call's deadline (far longer) should be what ends it.
KILLED_BOUND = 10.0


def _stored(kvs_address: str, key: str) -> bytes | None:
    """The value under a user key, read at the KVS itself; None when there is none."""
    with grpc.insecure_channel(kvs_address) as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        response = stub.GetValue(
            kvs_service_pb2.GetValueRequest(key=key, keyspace=lattice_pb2.KEYSPACE_USER),
            timeout=30,
        )
    return bytes(response.lattice.lww.value.data) if response.found else None


def test_objects_go_to_the_kvs_and_not_through_the_scheduler(launch: Launcher) -> None:
    with running_process_cluster() as cluster:
        direct = launch(cluster.address)
        by_option = launch(cluster.address, "off")
        by_environment = launch(cluster.address, env={"CLOUDBURST_DIRECT_KVS": "0"})
        direct.ok(op="put", key="direct/small", value={"from": "direct", "n": [1, 2]})
        assert direct.ok(op="kvs_address")["address"] == cluster.kvs.address
        for proxied in (by_option, by_environment):
            proxied.ok(op="put", key="direct/proxied", value="through the scheduler")
            assert proxied.ok(op="kvs_address")["address"] == ""
        # Both paths reach the one KVS: each reads what the other wrote, and so does Python.
        got = by_option.ok(op="get", key="direct/small")
        assert got == {"ok": True, "found": True, "value": {"from": "direct", "n": [1, 2]}}
        assert direct.ok(op="get", key="direct/proxied")["value"] == "through the scheduler"
        with CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as cloud:
            assert cloud.get_object("direct/small") == {"from": "direct", "n": [1, 2]}

        cluster.scheduler.kill()

        # With the scheduler gone, only the direct path still reaches the KVS.
        direct.ok(op="put", key="direct/after", value=[True, None])
        assert direct.ok(op="get", key="direct/after")["value"] == [True, None]
        assert direct.ok(op="get", key="direct/none") == {"ok": True, "found": False}
        for proxied in (by_option, by_environment):
            answer = proxied.ask(op="put", key="direct/refused", value=1)
            assert not answer["ok"] and answer["code"] == "Unavailable", answer
        assert json.loads(_stored(cluster.kvs.address, "direct/after") or b"null") == [True, None]


def test_an_unreachable_kvs_address_falls_back_to_the_scheduler(launch: Launcher) -> None:
    (closed_port,) = free_ports(1)
    env = {"CBGRPC_SCHEDULER_DIRECT_KVS_ADDRESS": f"127.0.0.1:{closed_port}"}
    with running_process_cluster(scheduler_env=env) as cluster:
        client = launch(cluster.address)
        client.ok(op="put", key="fallback/key", value={"kept": True})
        assert client.ok(op="kvs_address")["address"] == ""
        assert client.ok(op="get", key="fallback/key")["value"] == {"kept": True}
        assert json.loads(_stored(cluster.kvs.address, "fallback/key") or b"null") == {"kept": True}


def test_a_kvs_that_stops_answering_sends_objects_through_the_scheduler(
    launch: Launcher,
) -> None:
    # The scheduler names another KVS to its clients, which the test then kills.
    decoy = CbgrpcProcess("kvs", "--storage", "memory")
    try:
        env = {"CBGRPC_SCHEDULER_DIRECT_KVS_ADDRESS": decoy.address}
        with running_process_cluster(scheduler_env=env) as cluster:
            client = launch(cluster.address)
            client.ok(op="put", key="moved/before", value=1)
            assert client.ok(op="kvs_address")["address"] == decoy.address
            assert json.loads(_stored(decoy.address, "moved/before") or b"null") == 1

            decoy.kill()

            client.ok(op="put", key="moved/after", value=2)
            assert client.ok(op="kvs_address")["address"] == ""
            assert client.ok(op="get", key="moved/after")["value"] == 2
            # The write went to the scheduler's KVS, not to the killed one.
            assert json.loads(_stored(cluster.kvs.address, "moved/after") or b"null") == 2
    finally:
        decoy.kill()


def test_a_kvs_that_answers_again_is_used_directly_again(launch: Launcher) -> None:
    (port,) = free_ports(1)
    first = CbgrpcProcess("kvs", "--storage", "memory", "--port", str(port))
    started = [first]
    try:
        env = {"CBGRPC_SCHEDULER_DIRECT_KVS_ADDRESS": first.address}
        with running_process_cluster(scheduler_env=env) as cluster:
            client = launch(cluster.address)
            client.ok(op="put", key="again/before", value=1)
            assert client.ok(op="kvs_address")["address"] == first.address
            first.kill()
            client.ok(op="put", key="again/lost", value=2)
            assert client.ok(op="kvs_address")["address"] == ""
            # Another KVS on the same address: the client tries it again after 5 s.
            second = CbgrpcProcess("kvs", "--storage", "memory", "--port", str(port))
            started.append(second)
            wait_until(
                lambda: client.ok(op="kvs_address")["address"] == second.address,
                "the client goes to the KVS directly again",
            )
            client.ok(op="put", key="again/back", value=3)
            assert json.loads(_stored(second.address, "again/back") or b"null") == 3
            assert _stored(cluster.kvs.address, "again/back") is None
    finally:
        for kvs in started:
            kvs.kill()


def test_a_hung_scheduler_fails_a_waiting_call_with_unavailable(launch: Launcher) -> None:
    with running_process_cluster() as cluster:
        try:
            client = launch(cluster.address, "off")
            client.ok(op="put", key="hung/warm", value="the connection is up")
            # A result nobody stores: the call waits at the scheduler until its deadline.
            client.send(op="wait_result", key="hung/never", timeout=600)
            os.kill(cluster.scheduler.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            answer = client.receive(timeout=HUNG_BOUND)
            assert not answer["ok"] and answer["code"] == "Unavailable", answer
            assert time.monotonic() - stopped < HUNG_BOUND
        finally:
            resume_and_kill(cluster.scheduler)


def test_a_killed_scheduler_fails_the_waiting_call_and_the_next_with_unavailable(
    launch: Launcher,
) -> None:
    with running_process_cluster() as cluster:
        client = launch(cluster.address, "off")
        client.ok(op="put", key="killed/warm", value="the connection is up")
        client.send(op="wait_result", key="killed/never", timeout=600)
        cluster.scheduler.proc.kill()
        cluster.scheduler.proc.wait(timeout=30)
        killed = time.monotonic()
        answer = client.receive(timeout=KILLED_BOUND)
        assert not answer["ok"] and answer["code"] == "Unavailable", answer
        assert time.monotonic() - killed < KILLED_BOUND
        # The next call finds nobody there and says so, rather than waiting for its deadline.
        started = time.monotonic()
        answer = client.ask(timeout=KILLED_BOUND, op="put", key="killed/after", value=1)
        assert not answer["ok"] and answer["code"] == "Unavailable", answer
        assert time.monotonic() - started < KILLED_BOUND


def test_a_malformed_ping_timeout_is_refused_with_its_name(launch: Launcher) -> None:
    client = launch("127.0.0.1:1", env={"CLOUDBURST_PING_TIMEOUT_SECONDS": "soon"})
    assert client.wait_exit(60) == 1
    assert "CLOUDBURST_PING_TIMEOUT_SECONDS must be a positive number" in client.stderr()


def test_a_new_connection_to_a_hung_scheduler_fails_with_unavailable(launch: Launcher) -> None:
    with running_process_cluster() as cluster:
        try:
            # The kernel accepts the connection for the stopped process, which never answers.
            os.kill(cluster.scheduler.proc.pid, signal.SIGSTOP)
            client = launch(cluster.address, "off")
            assert client.ok(op="kvs_address")["address"] == ""  # the driver runs, unconnected
            started = time.monotonic()
            answer = client.ask(timeout=NEW_CONNECTION_BOUND, op="put", key="hung/new", value=1)
            assert not answer["ok"] and answer["code"] == "Unavailable", answer
            assert time.monotonic() - started < NEW_CONNECTION_BOUND
        finally:
            resume_and_kill(cluster.scheduler)
