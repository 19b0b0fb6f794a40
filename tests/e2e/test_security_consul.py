"""A TLS cluster registered in a real Consul agent, whose intentions decide who calls whom.

Certificates come from `cbgrpc certs`; the services find each other through
Consul (health checks that reach TLS ports), and each asks its local agent
whether a calling service may reach it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError, PermissionDeniedError
from harness import CbgrpcProcess, ConsulAgent, consul_binary

CHECK = ["--consul-check-interval", "1"]


def tls_flags(certs: Path, role: str) -> list[str]:
    return [
        "--tls-cert",
        str(certs / f"{role}.pem"),
        "--tls-key",
        str(certs / f"{role}-key.pem"),
        "--tls-ca",
        str(certs / "ca.pem"),
        "--consul-intentions",
        *CHECK,
    ]


@pytest.fixture
def consul() -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_binary())
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def procs() -> Iterator[list[CbgrpcProcess]]:
    started: list[CbgrpcProcess] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.kill()


def set_intention(consul: ConsulAgent, source: str, destination: str, action: str) -> None:
    request = urllib.request.Request(
        f"http://{consul.address}/v1/connect/intentions/exact"
        f"?source={source}&destination={destination}",
        data=json.dumps({"Action": action}).encode(),
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_intentions_decide_whether_schedulers_reach_executors(
    consul: ConsulAgent, procs: list[CbgrpcProcess], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "certs", str(certs), "--client", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    env = {"CONSUL_HTTP_ADDR": consul.address, "CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
    procs.append(CbgrpcProcess("kvs", "--storage", "memory", *tls_flags(certs, "kvs"), env=env))
    procs.append(
        CbgrpcProcess("executor", "--id", "executor-0", *tls_flags(certs, "executor"), env=env)
    )
    scheduler = CbgrpcProcess("scheduler", *tls_flags(certs, "scheduler"), env=env)
    procs.append(scheduler)
    # The TLS ports pass Consul's checks, so the scheduler discovers the executor.
    consul.wait("/v1/health/service/cloudburst-executor?passing=true", lambda body: len(body) == 1)
    consul.wait("/v1/health/service/cloudburst-scheduler?passing=true", lambda body: len(body) == 1)

    def connect() -> CloudburstConnection:
        return CloudburstConnection(
            scheduler.address,
            tls_ca=str(certs / "ca.pem"),
            tls_cert=str(certs / "client-admin.pem"),
            tls_key=str(certs / "client-admin-key.pem"),
            timeout=20,
        )

    with connect() as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        assert incr(1).get(timeout=30) == 2
    set_intention(consul, "cloudburst-scheduler", "cloudburst-executor", "deny")
    executor_log = procs[1]
    with connect() as cloud:
        # Decisions are reused for a second; within a deadline, calls start failing.
        deadline = time.monotonic() + 30
        error: CloudburstError | None = None
        while error is None:
            assert time.monotonic() < deadline, "the denied intention never took effect"
            try:
                cloud.exec_func("incr", [1]).get(timeout=10)
            except CloudburstError as exc:
                error = exc
    executor_log.wait_for_log("Consul intentions deny cloudburst-scheduler -> cloudburst-executor")
    assert "Consul intentions deny cloudburst-scheduler -> cloudburst-executor" in str(error)
    set_intention(consul, "cloudburst-scheduler", "cloudburst-executor", "allow")
    with connect() as cloud:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert cloud.exec_func("incr", [2]).get(timeout=10) == 3
                break
            except CloudburstError:
                assert time.monotonic() < deadline, "traffic did not resume after allow"


def test_an_insecure_service_says_so_in_its_consul_registration(
    consul: ConsulAgent, procs: list[CbgrpcProcess]
) -> None:
    env = {"CONSUL_HTTP_ADDR": consul.address}
    kvs = CbgrpcProcess(
        "kvs", "--storage", "memory", "--host", "0.0.0.0", "--insecure", *CHECK, env=env
    )
    procs.append(kvs)
    kvs.wait_for_log("INSECURE")
    body = consul.wait("/v1/health/service/cloudburst-kvs?passing=true", lambda b: len(b) == 1)
    assert "insecure" in body[0]["Service"]["Meta"]["security"]


def test_consul_health_checks_reach_tls_ports(
    consul: ConsulAgent, procs: list[CbgrpcProcess], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "certs", str(certs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    token = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "token", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    tokens = tmp_path / "tokens"
    tokens.write_text(token.stderr.strip().removeprefix("add to the tokens file: ") + "\n")
    env = {"CONSUL_HTTP_ADDR": consul.address}
    procs.append(CbgrpcProcess("kvs", "--storage", "memory", *tls_flags(certs, "kvs"), env=env))
    procs.append(
        CbgrpcProcess(
            "scheduler", *tls_flags(certs, "scheduler"), "--tokens-file", str(tokens), env=env
        )
    )
    # A port that demands client certificates gets a TCP check; a scheduler that takes
    # tokens a gRPC health check over TLS. Both pass.
    for name, kind in (("cloudburst-kvs", "tcp"), ("cloudburst-scheduler", "grpc")):
        body = consul.wait(f"/v1/health/service/{name}?passing=true", lambda b: len(b) == 1)
        checks = [c for c in body[0]["Checks"] if c["ServiceName"] == name]
        assert [c["Type"] for c in checks] == [kind]


def test_consul_clients_reach_the_port_their_credential_needs(
    consul: ConsulAgent, procs: list[CbgrpcProcess], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "certs", str(certs), "--client", "invoker"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "token", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    lines = (made.stdout + made.stderr).splitlines()
    token = next(line for line in lines if line.startswith("cbt_"))
    entry = next(line for line in lines if line.startswith("add to the tokens file: "))
    tokens = tmp_path / "tokens"
    tokens.write_text(entry.removeprefix("add to the tokens file: ") + "\n")
    env = {"CONSUL_HTTP_ADDR": consul.address}
    procs.append(CbgrpcProcess("kvs", "--storage", "memory", *tls_flags(certs, "kvs"), env=env))
    procs.append(
        CbgrpcProcess("executor", "--id", "executor-0", *tls_flags(certs, "executor"), env=env)
    )
    scheduler = CbgrpcProcess(
        "scheduler",
        *tls_flags(certs, "scheduler"),
        "--tokens-file",
        str(tokens),
        "--client-cert-port",
        "0",
        env=env,
    )
    procs.append(scheduler)
    # The scheduler advertises its port for clients with certificates beside its own.
    body = consul.wait(
        "/v1/health/service/cloudburst-scheduler?passing=true", lambda b: len(b) == 1
    )
    service = body[0]["Service"]
    cert_port = int(service["Meta"]["client_cert_port"])
    assert scheduler.address == f"127.0.0.1:{service['Port']}" != f"127.0.0.1:{cert_port}"
    consul.wait("/v1/health/service/cloudburst-executor?passing=true", lambda b: len(b) == 1)
    ca = str(certs / "ca.pem")
    address = f"consul://{consul.address}"
    # The token client lands on the token port: an admin by its token, it may register.
    with CloudburstConnection(address, tls_ca=ca, token=token, timeout=30) as admin:
        assert admin.address == scheduler.address
        admin.register(lambda _, a: a + 1, "incr")
        assert admin.exec_func("incr", [1]).get(timeout=30) == 2
    # The certificate client lands on the certificate port, whose handshake takes its
    # certificate (the token port never asks for one and would find no token): it is
    # an invoker there, by its certificate, and may call but not register.
    with CloudburstConnection(
        address,
        tls_ca=ca,
        tls_cert=str(certs / "client-invoker.pem"),
        tls_key=str(certs / "client-invoker-key.pem"),
        timeout=30,
    ) as invoker:
        assert invoker.address == f"127.0.0.1:{cert_port}"
        assert invoker.exec_func("incr", [2]).get(timeout=30) == 3
        with pytest.raises(PermissionDeniedError, match="invoker"):
            invoker.register(lambda _, a: a, "same")
