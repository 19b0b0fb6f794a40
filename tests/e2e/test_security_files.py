"""A cluster of `cbgrpc` processes secured with files from `cbgrpc certs` and `cbgrpc token`.

Real processes, real TLS: the user guide runs unchanged with credentials
from the environment, a certificate rewritten on disk is served to new
connections without a restart, and a wildcard bind without TLS refuses to
start.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from cloudburst import CloudburstConnection
from cloudburst.errors import PermissionDeniedError, UnauthenticatedError
from cloudburst_grpc.security.certs import Issued, issue
from harness import CbgrpcProcess

HERE = Path(__file__).resolve().parent


def cbgrpc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def tls_flags(certs: Path, role: str) -> list[str]:
    return [
        "--tls-cert",
        str(certs / f"{role}.pem"),
        "--tls-key",
        str(certs / f"{role}-key.pem"),
        "--tls-ca",
        str(certs / "ca.pem"),
    ]


class SecuredCluster:
    def __init__(self, tmp_path: Path) -> None:
        self.certs = tmp_path / "certs"
        made = cbgrpc("certs", str(self.certs), "--client", "admin")
        assert made.returncode == 0, made.stderr
        self.tokens: dict[str, str] = {}
        lines = []
        for role in ("admin", "invoker"):
            result = cbgrpc("token", role, "--name", f"{role}-e2e")
            assert result.returncode == 0, result.stderr
            self.tokens[role] = result.stdout.strip()
            lines.append(result.stderr.strip().removeprefix("add to the tokens file: "))
        self.tokens_file = tmp_path / "tokens"
        self.tokens_file.write_text("\n".join(lines) + "\n")
        self.procs: list[CbgrpcProcess] = []
        env = {"CBGRPC_SCHEDULER_PIN_REPLICAS": "1"}
        self.kvs = self.start("kvs", "--storage", "memory", *tls_flags(self.certs, "kvs"), env=env)
        executors = [
            self.start(
                "executor",
                "--kvs",
                self.kvs.address,
                "--id",
                name,
                *tls_flags(self.certs, "executor"),
                env=env,
            )
            for name in ("executor-a", "executor-b")
        ]
        self.executors = executors
        self.scheduler = self.start(
            "scheduler",
            "--kvs",
            self.kvs.address,
            *[arg for e in executors for arg in ("--executor", e.address)],
            *tls_flags(self.certs, "scheduler"),
            "--tokens-file",
            str(self.tokens_file),
            env=env,
        )

    def start(self, command: str, *args: str, env: dict[str, str]) -> CbgrpcProcess:
        proc = CbgrpcProcess(command, *args, env=env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredCluster]:
    cluster = None
    try:
        cluster = SecuredCluster(tmp_path)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()


def served_certificate(address: str, ca: Path) -> x509.Certificate:
    """The certificate the server shows a new connection (speaking h2, as gRPC does)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    context.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_user_guide_runs_on_a_cluster_secured_with_files(
    secured: SecuredCluster, tmp_path: Path
) -> None:
    guide = HERE / "data" / "function-execution.md"
    env = {
        **os.environ,
        "CLOUDBURST_TLS_CA": str(secured.certs / "ca.pem"),
        "CLOUDBURST_TOKEN": secured.tokens["admin"],
    }
    result = subprocess.run(
        [sys.executable, str(HERE / "guide_runner.py"), str(guide), secured.scheduler.address],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "guide ok: 4 outputs checked" in result.stdout
    # The token appears in no service's output.
    for proc in secured.procs:
        assert secured.tokens["admin"] not in proc.stderr()


def test_roles_and_missing_credentials_are_refused(secured: SecuredCluster) -> None:
    ca = str(secured.certs / "ca.pem")
    with CloudburstConnection(secured.scheduler.address, tls_ca=ca, tls=True) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.list()
    token = secured.tokens["invoker"]
    with CloudburstConnection(secured.scheduler.address, tls_ca=ca, token=token) as invoker:
        with pytest.raises(PermissionDeniedError, match="needs role admin"):
            invoker.register(lambda _, x: x, "mine")
    secured.scheduler.wait_for_log("refused /cloudburst.v1.SchedulerService/CreateFunction")
    assert token not in secured.scheduler.stderr()


def test_a_rewritten_certificate_is_served_without_a_restart(secured: SecuredCluster) -> None:
    ca_path = secured.certs / "ca.pem"
    before = served_certificate(secured.scheduler.address, ca_path)
    ca = Issued(ca_path.read_bytes(), (secured.certs / "ca-key.pem").read_bytes())
    fresh = issue(ca, "scheduler", ["127.0.0.1"])
    # Key first, then certificate: the server uses the pair once both match.
    (secured.certs / "scheduler-key.pem").write_bytes(fresh.key_pem)
    (secured.certs / "scheduler.pem").write_bytes(fresh.cert_pem)
    after = served_certificate(secured.scheduler.address, ca_path)
    assert after.serial_number != before.serial_number
    assert after.serial_number == x509.load_pem_x509_certificate(fresh.cert_pem).serial_number
    with CloudburstConnection(
        secured.scheduler.address, tls_ca=str(ca_path), token=secured.tokens["admin"]
    ) as cloud:
        incr = cloud.register(lambda _, x: x + 1, "incr")
        assert incr(1).get() == 2
    assert secured.scheduler.proc.poll() is None


def test_a_wildcard_bind_without_tls_refuses_to_start_unless_insecure() -> None:
    result = cbgrpc("serve", "--host", "0.0.0.0", "--port", "0", "--storage", "memory")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without TLS" in result.stderr
    assert "--insecure" in result.stderr
    proc = CbgrpcProcess("serve", "--host", "0.0.0.0", "--storage", "memory", "--insecure")
    try:
        proc.wait_for_log("INSECURE")
    finally:
        proc.kill()


def test_secrets_appear_in_no_log_trace_metric_or_error(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert cbgrpc("certs", str(certs)).returncode == 0
    made = cbgrpc("token", "admin")
    token = made.stdout.strip()
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(made.stderr.strip().removeprefix("add to the tokens file: ") + "\n")
    wrong = "cbt_wrong-but-secret-looking-token"
    key_text = (certs / "serve-key.pem").read_text().splitlines()[1]  # a line of the key
    server = CbgrpcProcess(
        "serve",
        "--storage",
        "memory",
        "--metrics-port",
        "0",
        "--log-level",
        "DEBUG",
        "--timings",
        "10",
        "--tokens-file",
        str(tokens_file),
        *tls_flags(certs, "serve"),
        env={"OTEL_TRACES_EXPORTER": "console"},
    )
    try:
        ca = str(certs / "ca.pem")
        with CloudburstConnection(server.address, tls_ca=ca, token=token) as cloud:
            incr = cloud.register(lambda _, x: x + 1, "incr")
            future = incr(1)
            assert future.get() == 2
        # `cbgrpc timing` reaches a secured server with the CA and an admin token.
        token_file = tmp_path / "admin.token"
        token_file.write_text(token + "\n")
        timing = cbgrpc(
            "timing",
            future.obj_id,
            "--address",
            server.address,
            "--tls-ca",
            ca,
            "--token-file",
            str(token_file),
        )
        assert timing.returncode == 0, timing.stderr
        assert "incr" in timing.stdout
        with CloudburstConnection(server.address, tls_ca=ca, token=wrong) as cloud:
            with pytest.raises(UnauthenticatedError) as raised:
                cloud.list()
        server.wait_for_log("refused /cloudburst.v1.SchedulerService/ListFunctions")
        url = server.wait_for_log("metrics on http://", stdout=True).rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
        assert "cloudburst_auth_failures" in metrics
        server.wait_for_log('"name": "/cloudburst.v1.SchedulerService/ListFunctions"', stdout=True)
    finally:
        server.stop()
    everything = "\n".join(
        [
            server.stderr(),
            "".join(server.stdout_lines),
            metrics,
            str(raised.value),
            timing.stdout + timing.stderr,
        ]
    )
    for secret in (token, wrong, key_text):
        assert secret not in everything
