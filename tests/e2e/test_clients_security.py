"""The Go and TypeScript clients on a cluster secured with tokens, and with expired certificates.

A scheduler with a tokens file (from `cbgrpc token`) authenticates each call by
its bearer token. Each client takes the token from ``CLOUDBURST_TOKEN`` (and
the cluster's CA from ``CLOUDBURST_TLS_CA``), sends it as the Python SDK does,
calls functions and reads and writes objects through the scheduler (the KVS
takes client certificates only); a token the scheduler does not know is
refused with UNAUTHENTICATED and a role that may not do something with
PERMISSION_DENIED, each with the server's reason. A client certificate from
the environment (``CLOUDBURST_TLS_*``) authenticates a client to a scheduler
without tokens and to the KVS, which it then uses directly; one out of its
validity dates is refused before connecting, in the Python SDK's words, and
one from another CA, which the servers refuse in the TLS handshake, with
UNAUTHENTICATED saying why. Each test runs once per client (``launch``, in
e2e/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from cloudburst import CloudburstConnection
from cloudburst.errors import UnauthenticatedError
from cloudburst_grpc.security.certs import Issued, issue, write_issued
from e2e.drivers import Launcher
from e2e.test_ts_client_security import CertCluster, client_env, make_certs


def cbgrpc_token(role: str) -> tuple[str, str]:
    """A new token for ``role`` and its line for the tokens file."""
    made = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "token", role, "--name", f"{role}-clients"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip(), made.stderr.strip().removeprefix("add to the tokens file: ")


class TokenCluster(CertCluster):
    """A KVS, an executor and a scheduler with TLS whose scheduler takes tokens of two roles."""

    def __init__(self, directory: Path) -> None:
        certs = make_certs(directory / "certs")
        self.tokens: dict[str, str] = {}
        lines = []
        for role in ("admin", "invoker"):
            self.tokens[role], line = cbgrpc_token(role)
            lines.append(line)
        tokens_file = directory / "tokens"
        tokens_file.write_text("\n".join(lines) + "\n")
        super().__init__(certs, "--tokens-file", str(tokens_file))

    def env(self, token: str) -> dict[str, str]:
        """The variables that give a client the cluster's CA and ``token``."""
        return {"CLOUDBURST_TLS_CA": str(self.certs / "ca.pem"), "CLOUDBURST_TOKEN": token}


@pytest.fixture
def token_cluster(tmp_path: Path) -> Iterator[TokenCluster]:
    cluster = None
    try:
        cluster = TokenCluster(tmp_path)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()


def test_a_token_calls_and_uses_objects_and_its_role_and_validity_are_checked(
    token_cluster: TokenCluster, launch: Launcher
) -> None:
    with CloudburstConnection(
        token_cluster.scheduler.address,
        tls_ca=str(token_cluster.certs / "ca.pem"),
        token=token_cluster.tokens["admin"],
        connect_timeout=30,
        timeout=60,
    ) as cloud:
        cloud.register(lambda _, x: x * 2, "double")
        cloud.register(lambda _, x: x, "kept")

    tokens = token_cluster.tokens
    admin = launch(token_cluster.scheduler.address, env=token_cluster.env(tokens["admin"]))
    assert admin.ok(op="call", name="double", args=[21])["value"] == 42
    admin.ok(op="put", key="token/k", value={"n": [1, 2]})
    assert admin.ok(op="get", key="token/k")["value"] == {"n": [1, 2]}
    assert token_cluster.stored("token/k") == {"n": [1, 2]}
    # The KVS takes client certificates only: objects stay with the scheduler.
    assert admin.ok(op="kvs_address")["address"] == ""

    invoker = launch(
        token_cluster.scheduler.address,
        "off",
        env=token_cluster.env(token_cluster.tokens["invoker"]),
    )
    assert invoker.ok(op="call", name="double", args=[2])["value"] == 4
    invoker.ok(op="put", key="token/invoker", value="mine")
    assert invoker.ok(op="get", key="token/invoker")["value"] == "mine"
    answer = invoker.ask(op="delete_function", name="kept")
    assert not answer["ok"] and answer["code"] == "PermissionDenied", answer
    assert "needs role admin; the caller has role invoker" in answer["message"], answer
    assert admin.ok(op="call", name="kept", args=["still here"])["value"] == "still here"

    wrong = "cbt_wrong-but-well-formed"
    refused = launch(token_cluster.scheduler.address, "off", env=token_cluster.env(wrong))
    for command in (
        {"op": "call", "name": "double", "args": [1]},
        {"op": "put", "key": "token/no"},
    ):
        answer = refused.ask(**command)
        assert not answer["ok"] and answer["code"] == "Unauthenticated", answer
        assert answer["message"] == "the bearer token is not valid", answer
    assert token_cluster.stored("token/no") is None
    for role, token in tokens.items():
        assert token not in token_cluster.scheduler.stderr(), role


def test_an_expired_client_certificate_is_refused_before_connecting(
    launch: Launcher, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    ca = Issued((certs / "ca.pem").read_bytes(), (certs / "ca-key.pem").read_bytes())
    cert, key = write_issued(certs, "client-expired", issue(ca, "admin", days=-2))
    # The Python SDK's message, which each client must give word for word.
    with pytest.raises(UnauthenticatedError) as raised:
        CloudburstConnection(
            "127.0.0.1:1", tls_ca=str(certs / "ca.pem"), tls_cert=str(cert), tls_key=str(key)
        )
    expected = raised.value.message
    end = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    assert f"the client certificate {cert} expired on {end:%Y-%m-%d %H:%M} UTC" in expected
    env = {
        "CLOUDBURST_TLS_CA": str(certs / "ca.pem"),
        "CLOUDBURST_TLS_CERT": str(cert),
        "CLOUDBURST_TLS_KEY": str(key),
    }
    client = launch("127.0.0.1:1", env=env)
    assert client.wait_exit(60) == 1
    assert expected in client.stderr(), client.stderr()


def test_a_client_certificate_from_the_environment_calls_and_uses_the_kvs_directly(
    launch: Launcher, tmp_path: Path
) -> None:
    cluster = CertCluster(make_certs(tmp_path / "certs"))
    try:
        certs = cluster.certs
        with CloudburstConnection(
            cluster.scheduler.address,
            tls_ca=str(certs / "ca.pem"),
            tls_cert=str(certs / "client-admin.pem"),
            tls_key=str(certs / "client-admin-key.pem"),
            connect_timeout=30,
            timeout=60,
        ) as cloud:
            cloud.register(lambda _, x: x + 1, "incr")
        client = launch(cluster.scheduler.address, env=client_env(certs, certs))
        assert client.ok(op="call", name="incr", args=[1])["value"] == 2
        client.ok(op="put", key="cert/k", value=[1])
        assert client.ok(op="kvs_address")["address"] == cluster.kvs.address
        assert cluster.stored("cert/k") == [1]
    finally:
        cluster.close()


def test_a_client_certificate_from_another_ca_is_refused_as_unauthenticated(
    launch: Launcher, tmp_path: Path
) -> None:
    cluster = CertCluster(make_certs(tmp_path / "certs"))
    try:
        other = make_certs(tmp_path / "other")
        client = launch(cluster.scheduler.address, env=client_env(cluster.certs, other))
        for command in ({"op": "call", "name": "double", "args": [1]}, {"op": "put", "key": "k"}):
            answer = client.ask(**command)
            assert not answer["ok"] and answer["code"] == "Unauthenticated", answer
            message = answer["message"]
            assert (
                f"the server at {cluster.scheduler.address} refused this client's certificate "
                f"{other / 'client-admin.pem'} in the TLS handshake: " in message
            ), message
            assert f"not signed by the CA in {cluster.certs / 'ca.pem'}" in message, message
        assert cluster.stored("k") is None
    finally:
        cluster.close()
