"""The TypeScript client on clusters of `cbgrpc` processes: client certificates and resets.

A cluster secured with files from `cbgrpc certs` whose scheduler has no tokens
file authenticates clients by certificate. The TypeScript client takes its
certificate as the Python SDK does (here from ``CLOUDBURST_TLS_*``), calls
functions, reads and writes objects at the KVS itself, and is refused with
UNAUTHENTICATED, saying why, when its certificate comes from another CA. A
call cut off because its server died is UNAVAILABLE, not connect-node's
ABORTED. The driver is sdk/typescript/test/driver.ts (`make clients` builds it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from e2e.drivers import Launcher
from harness import CbgrpcProcess, running_process_cluster
from waiting import wait_until


def make_certs(directory: Path) -> Path:
    """A CA, the services' certificates and an admin client certificate, by `cbgrpc certs`."""
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "certs", str(directory), "--client", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    return directory


def tls_flags(certs: Path, role: str) -> list[str]:
    return [
        *("--tls-cert", str(certs / f"{role}.pem")),
        *("--tls-key", str(certs / f"{role}-key.pem")),
        *("--tls-ca", str(certs / "ca.pem")),
    ]


def client_env(ca: Path, certs: Path) -> dict[str, str]:
    """The variables that give a client the CA ``ca`` and the admin certificate of ``certs``."""
    return {
        "CLOUDBURST_TLS_CA": str(ca / "ca.pem"),
        "CLOUDBURST_TLS_CERT": str(certs / "client-admin.pem"),
        "CLOUDBURST_TLS_KEY": str(certs / "client-admin-key.pem"),
    }


class CertCluster:
    """A KVS, an executor and a scheduler with TLS; clients authenticate by certificate.

    The scheduler is given ``scheduler_args`` too.
    """

    def __init__(self, certs: Path, *scheduler_args: str) -> None:
        self.certs = certs
        self.procs: list[CbgrpcProcess] = []
        try:
            self.kvs = self.start("kvs", "--storage", "memory", *tls_flags(certs, "kvs"))
            executor = self.start(
                "executor", "--kvs", self.kvs.address, *tls_flags(certs, "executor")
            )
            self.scheduler = self.start(
                "scheduler",
                *("--kvs", self.kvs.address, "--executor", executor.address),
                *tls_flags(certs, "scheduler"),
                *scheduler_args,
            )
        except BaseException:
            self.close()  # what did start, when a later process does not
            raise

    def start(self, command: str, *args: str) -> CbgrpcProcess:
        proc = CbgrpcProcess(command, *args)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()

    def stored(self, key: str) -> Any:
        """The JSON value under a user key, read at the KVS itself with the admin certificate."""
        credentials = grpc.ssl_channel_credentials(
            (self.certs / "ca.pem").read_bytes(),
            (self.certs / "client-admin-key.pem").read_bytes(),
            (self.certs / "client-admin.pem").read_bytes(),
        )
        with grpc.secure_channel(self.kvs.address, credentials) as channel:
            response = kvs_service_pb2_grpc.KvsServiceStub(channel).GetValue(
                kvs_service_pb2.GetValueRequest(key=key, keyspace=lattice_pb2.KEYSPACE_USER),
                timeout=30,
            )
        return json.loads(response.lattice.lww.value.data) if response.found else None


@pytest.fixture
def cert_cluster(tmp_path: Path) -> Iterator[CertCluster]:
    cluster = None
    try:
        cluster = CertCluster(make_certs(tmp_path / "certs"))
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()


def test_a_client_certificate_calls_functions_and_uses_the_kvs_directly(
    cert_cluster: CertCluster, launch_ts: Launcher
) -> None:
    certs = cert_cluster.certs
    with CloudburstConnection(
        cert_cluster.scheduler.address,
        tls_ca=str(certs / "ca.pem"),
        tls_cert=str(certs / "client-admin.pem"),
        tls_key=str(certs / "client-admin-key.pem"),
        connect_timeout=30,
        timeout=60,
    ) as cloud:
        cloud.register(lambda _, x: x * 2, "double")
    client = launch_ts(cert_cluster.scheduler.address, env=client_env(certs, certs))
    assert client.ok(op="call", name="double", args=[21])["value"] == 42
    client.ok(op="put", key="tls/before", value={"n": [1, 2]})
    assert client.ok(op="kvs_address")["address"] == cert_cluster.kvs.address
    assert cert_cluster.stored("tls/before") == {"n": [1, 2]}

    # The servers' certificates are checked against the name given, not the address dialled.
    named = launch_ts(
        cert_cluster.scheduler.address,
        "off",
        env={
            **client_env(certs, certs),
            "CLOUDBURST_TLS_SERVER_NAME": "scheduler.cloudburst.local",
        },
    )
    assert named.ok(op="call", name="double", args=[1])["value"] == 2
    misnamed = launch_ts(
        cert_cluster.scheduler.address,
        "off",
        env={**client_env(certs, certs), "CLOUDBURST_TLS_SERVER_NAME": "elsewhere.example"},
    )
    answer = misnamed.ask(op="call", name="double", args=[1])
    assert not answer["ok"] and answer["code"] == "Unavailable", answer
    assert "is not trusted" in answer["message"] and "elsewhere.example" in answer["message"]

    cert_cluster.scheduler.kill()

    # With the scheduler gone, only the direct path over TLS still reaches the KVS.
    client.ok(op="put", key="tls/after", value=["direct", None])
    assert client.ok(op="get", key="tls/after")["value"] == ["direct", None]
    assert client.ok(op="get", key="tls/before")["value"] == {"n": [1, 2]}
    assert cert_cluster.stored("tls/after") == ["direct", None]


def test_a_client_certificate_dials_the_certificate_port_of_a_scheduler_with_tokens(
    launch_ts: Launcher, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "token", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text(made.stderr.strip().removeprefix("add to the tokens file: ") + "\n")
    cluster = CertCluster(certs, "--tokens-file", str(tokens), "--client-cert-port", "0")
    try:
        line = cluster.scheduler.wait_for_log("takes clients with certificates on")
        cert_address = line.rsplit(" ", 1)[1].strip()
        assert cert_address != cluster.scheduler.address
        with CloudburstConnection(
            cluster.scheduler.address,
            tls_ca=str(certs / "ca.pem"),
            token=made.stdout.strip(),
            connect_timeout=30,
            timeout=60,
        ) as cloud:
            cloud.register(lambda _, x: x + 1, "incr")
        client = launch_ts(cert_address, env=client_env(certs, certs))
        assert client.ok(op="call", name="incr", args=[1])["value"] == 2
        client.ok(op="put", key="port/k", value=[1])
        assert client.ok(op="kvs_address")["address"] == cluster.kvs.address
        assert cluster.stored("port/k") == [1]
    finally:
        cluster.close()


def test_a_certificate_from_another_ca_is_refused_as_unauthenticated(
    cert_cluster: CertCluster, launch_ts: Launcher, tmp_path: Path
) -> None:
    other = make_certs(tmp_path / "other")
    client = launch_ts(cert_cluster.scheduler.address, env=client_env(cert_cluster.certs, other))
    for command in ({"op": "call", "name": "double", "args": [1]}, {"op": "put", "key": "k"}):
        answer = client.ask(**command)
        assert not answer["ok"] and answer["code"] == "Unauthenticated", answer
        message = answer["message"]
        assert "refused this client's certificate" in message, message
        assert str(other / "client-admin.pem") in message, message
        assert f"not signed by the CA in {cert_cluster.certs / 'ca.pem'}" in message, message
    assert cert_cluster.stored("k") is None
    # A client that trusts another CA does not trust the servers' certificates.
    distrustful = launch_ts(cert_cluster.scheduler.address, env=client_env(other, other))
    answer = distrustful.ask(op="call", name="double", args=[1])
    assert not answer["ok"] and answer["code"] == "Unavailable", answer
    assert "is not trusted" in answer["message"], answer


def test_a_key_that_does_not_match_its_certificate_is_refused_at_connect(
    launch_ts: Launcher, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    env = {**client_env(certs, certs), "CLOUDBURST_TLS_KEY": str(certs / "kvs-key.pem")}
    client = launch_ts("127.0.0.1:1", env=env)
    assert client.wait_exit(60) == 1
    assert "does not match the certificate" in client.stderr()
    assert "CLOUDBURST_TLS_KEY" in client.stderr()
    unreadable = launch_ts("127.0.0.1:1", env={"CLOUDBURST_TLS_CA": str(tmp_path / "none.pem")})
    assert unreadable.wait_exit(60) == 1
    assert "cannot read TLS file" in unreadable.stderr()


def block(cloudburst: Any, marker: str) -> None:
    """Says that it runs, then outlasts the test (whose processes are killed at its end)."""
    import time

    cloudburst.put(marker, True)
    time.sleep(600)


def test_a_call_cut_off_by_its_schedulers_death_is_unavailable(launch_ts: Launcher) -> None:
    with running_process_cluster() as cluster:
        with CloudburstConnection(cluster.address, connect_timeout=30, timeout=60) as cloud:
            cloud.register(block, "block")
            # A long ping timeout: only the reset, not keepalive, can end the call.
            client = launch_ts(
                cluster.address, "off", env={"CLOUDBURST_PING_TIMEOUT_SECONDS": "600"}
            )
            client.send(op="call", name="block", args=["reset/started"], timeout=600)
            wait_until(lambda: cloud.get_object("reset/started") is True, "the function runs", 120)
        cluster.scheduler.kill()
        answer = client.receive(timeout=60)
        assert not answer["ok"] and answer["code"] == "Unavailable", answer
        assert "reset" in answer["message"], answer
