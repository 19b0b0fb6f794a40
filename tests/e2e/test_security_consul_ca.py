"""A cluster whose certificates come from Consul's service-mesh CA, through rotation.

Each service obtains its certificate from a real Consul agent's Connect CA
(gRPC ``ConnectCAService.Sign``) and follows its roots; clients trust
Consul's roots and show a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from cloudburst import CloudburstConnection
from cloudburst.errors import CloudburstError
from cloudburst_grpc.config import ConsulConfig
from cloudburst_grpc.discovery.consul import ConsulClient
from cloudburst_grpc.security.certs import create_ca, issue, write_issued
from cloudburst_grpc.security.consul_ca import SIGN_SECONDS, ConsulCaSource, servers_target
from cloudburst_grpc.security.tls import TlsError
from harness import CbgrpcProcess, ConsulAgent, consul_binary, free_ports

FLAGS = ["--tls-source", "consul", "--consul-intentions", "--consul-check-interval", "1"]


@pytest.fixture
def consul() -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_binary(), grpc=True)
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


def consul_request(consul: ConsulAgent, method: str, path: str, body: object) -> None:
    request = urllib.request.Request(
        f"http://{consul.address}{path}", data=json.dumps(body).encode(), method=method
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def write_roots(consul: ConsulAgent, path: Path, active_only: bool = False) -> str:
    """Write Consul's CA roots (or only the active one) to ``path``; returns its id."""
    _, body = consul.get("/v1/connect/ca/roots")
    roots = [r for r in body["Roots"] if r["Active"] or not active_only]
    path.write_text("".join(root["RootCert"].strip() + "\n" for root in roots))
    return str(body["ActiveRootID"])


def served_issuer(address: str) -> str:
    """The issuer of the certificate a TLS server presents now (a fresh handshake)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string()


def admin_token(tmp_path: Path) -> tuple[str, Path]:
    """A new admin token and a tokens file (for a scheduler) that accepts it."""
    token = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", "token", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert token.returncode == 0, token.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text(token.stderr.strip().removeprefix("add to the tokens file: ") + "\n")
    return token.stdout.strip(), tokens


def test_a_cluster_runs_on_consul_certificates_through_a_ca_rotation(
    consul: ConsulAgent, procs: list[CbgrpcProcess], tmp_path: Path
) -> None:
    token, tokens = admin_token(tmp_path)
    env = {
        "CONSUL_HTTP_ADDR": consul.address,
        "CBGRPC_SECURITY_CONSUL_GRPC_ADDRESS": consul.grpc_address,
        "CBGRPC_SCHEDULER_PIN_REPLICAS": "1",
    }
    procs.append(CbgrpcProcess("kvs", "--storage", "memory", *FLAGS, env=env))
    for index in range(2):
        procs.append(CbgrpcProcess("executor", "--id", f"executor-{index}", *FLAGS, env=env))
    scheduler = CbgrpcProcess("scheduler", *FLAGS, "--tokens-file", str(tokens), env=env)
    procs.append(scheduler)
    consul.wait("/v1/health/service/cloudburst-executor?passing=true", lambda body: len(body) == 2)
    consul.wait("/v1/health/service/cloudburst-scheduler?passing=true", lambda body: len(body) == 1)
    roots = tmp_path / "consul-ca.pem"
    first_root = write_roots(consul, roots)
    first_issuer = served_issuer(scheduler.address)

    def connect() -> CloudburstConnection:
        return CloudburstConnection(scheduler.address, tls_ca=str(roots), token=token, timeout=20)

    # The user guide's basic calls: a function, a DAG, the KVS.
    with connect() as cloud:
        incr = cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * 2, "double")
        assert incr(1).get(timeout=30) == 2
        assert cloud.register_dag("incr_double", ["incr", "double"], [("incr", "double")])
        assert cloud.call_dag("incr_double", {"incr": 3}).get(timeout=30) == 8
        assert cloud.put_object("greeting", "hello")
        assert cloud.get_object("greeting") == "hello"

    # A new root: every service signs a new certificate without a restart.
    consul_request(
        consul,
        "PUT",
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}},
    )
    new_root = consul.wait("/v1/connect/ca/roots", lambda body: body["ActiveRootID"] != first_root)[
        "ActiveRootID"
    ]
    for proc in procs:
        proc.wait_for_log(f"(root {new_root})", timeout=90)
    # The next handshake gets the new certificate: it names the new root as its issuer, and
    # a client that trusts only the new root accepts it.
    assert served_issuer(scheduler.address) != first_issuer
    assert write_roots(consul, roots, active_only=True) == new_root
    with connect() as cloud:
        assert cloud.exec_func("incr", [5]).get(timeout=30) == 6
        assert cloud.call_dag("incr_double", {"incr": 4}).get(timeout=30) == 10
        assert cloud.get_object("greeting") == "hello"

    # Intentions still decide who calls whom, on Consul's certificates.
    consul_request(
        consul,
        "PUT",
        "/v1/connect/intentions/exact?source=cloudburst-scheduler&destination=cloudburst-executor",
        {"Action": "deny"},
    )
    with connect() as cloud:
        deadline = time.monotonic() + 30
        error: CloudburstError | None = None
        while error is None:
            assert time.monotonic() < deadline, "the denied intention never took effect"
            try:
                cloud.exec_func("incr", [1]).get(timeout=10)
            except CloudburstError as exc:
                error = exc
    assert "Consul intentions deny cloudburst-scheduler -> cloudburst-executor" in str(error)


def test_a_certificate_is_renewed_before_it_expires(consul: ConsulAgent) -> None:
    # Consul's leaves live 72 hours; renewing after a tiny part of that is after about a second.
    async def renewals() -> tuple[int, bytes, bytes]:
        client = ConsulClient(ConsulConfig(address=consul.address))
        source = ConsulCaSource(
            client, "cloudburst-kvs", ["127.0.0.1"], consul.grpc_address, renew_fraction=1e-5
        )
        try:
            await source.start(deadline_seconds=60)
            first = source.current().cert_pem
            generation = await asyncio.wait_for(source.wait_beyond(source.generation), 60)
            return generation, first, source.current().cert_pem
        finally:
            await source.close()
            await client.close()

    generation, first, renewed = asyncio.run(renewals())
    assert generation >= 2
    assert renewed != first
    assert x509.load_pem_x509_certificate(renewed).serial_number != (
        x509.load_pem_x509_certificate(first).serial_number
    )


def start_source(
    consul_address: str,
    grpc_address: str,
    token: str = "",
    deadline: float = 3,
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    tls_server_name: str = "",
) -> str:
    """Start a Consul CA source for cloudburst-kvs (3 s deadline unless told).

    A start expected to succeed is given a generous deadline: it returns once signed.
    ``ca_file``, ``cert_file`` and ``key_file`` are the Consul TLS files.

    Returns:
        The certificate's URI SAN, or the start error's message.
    """

    async def start() -> str:
        client = ConsulClient(
            ConsulConfig(
                address=consul_address,
                token=token,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
                tls_server_name=tls_server_name,
            )
        )
        source = ConsulCaSource(client, "cloudburst-kvs", ["127.0.0.1"], grpc_address)
        try:
            await source.start(deadline_seconds=deadline)
            leaf = x509.load_pem_x509_certificate(source.current().cert_pem)
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            return str(names.value.get_values_for_type(x509.UniformResourceIdentifier)[0])
        except TlsError as exc:
            return str(exc)
        finally:
            await source.close()
            await client.close()

    return asyncio.run(start())


def test_a_service_finds_a_consul_servers_grpc_api_through_its_agent(
    consul: ConsulAgent,
) -> None:
    # A dev agent is a server: /v1/status/peers names it, and Sign is served on its gRPC port.
    port = consul.grpc_address.rpartition(":")[2]
    assert start_source(consul.address, f"servers:{port}", deadline=60).endswith(
        "/svc/cloudburst-kvs"
    )


def test_a_service_tries_the_next_consul_server_when_one_is_down(consul: ConsulAgent) -> None:
    # The agent listens on 127.0.0.1 only: nothing answers on 127.0.0.2, the first server.
    port = int(consul.grpc_address.rpartition(":")[2])
    target = servers_target(["127.0.0.2:8300", "127.0.0.1:8300"], port)
    assert start_source(consul.address, target, deadline=60).endswith("/svc/cloudburst-kvs")


def test_without_a_servers_grpc_api_the_message_names_the_servers_dialled(
    consul: ConsulAgent,
) -> None:
    message = start_source(consul.address, f"servers:{free_ports(1)[0]}")
    assert "cannot reach Consul's gRPC API at servers:" in message
    assert "(ipv4:127.0.0.1:" in message


def test_a_servers_address_with_a_bad_port_stops_the_start_at_once(consul: ConsulAgent) -> None:
    from cloudburst_grpc.config import ConfigError, load_config
    from cloudburst_grpc.local import start_kvs_node

    config = load_config(
        overrides={
            "consul": {"address": consul.address},
            "security": {"tls_source": "consul", "consul_grpc_address": "servers:grpc"},
        },
        environ={},
    )

    async def start() -> None:
        # Well within the 60 s a start would otherwise retry an unreachable Consul.
        await asyncio.wait_for(start_kvs_node(config), 30)

    with pytest.raises(ConfigError, match=r"security: .* after 'servers:' comes"):
        asyncio.run(start())


def test_without_consuls_grpc_api_a_service_says_where_it_looked(tmp_path: Path) -> None:
    agent = ConsulAgent(consul_binary())  # no gRPC port
    try:
        message = start_source(agent.address, "127.0.0.1:1")
    finally:
        agent.stop()
    assert "no certificate from Consul's CA within 3s" in message
    assert "cannot reach Consul's gRPC API at 127.0.0.1:1" in message


def test_a_consul_that_never_answers_does_not_hold_up_a_start(consul: ConsulAgent) -> None:
    # A port that accepts connections and never speaks: each Sign would wait its own timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"

        async def start() -> str:
            client = ConsulClient(ConsulConfig(address=consul.address))
            source = ConsulCaSource(client, "cloudburst-kvs", ["127.0.0.1"], address)
            try:
                # Without the start's deadline, the first Sign alone would wait SIGN_SECONDS.
                await asyncio.wait_for(source.start(deadline_seconds=2), SIGN_SECONDS - 5)
            except TlsError as exc:
                return str(exc)
            finally:
                await source.close()
                await client.close()
            return ""

        message = asyncio.run(start())
    assert "no certificate from Consul's CA within 2s" in message


def test_without_connect_a_service_says_to_enable_it() -> None:
    agent = ConsulAgent(consul_binary(), grpc=True, hcl="connect { enabled = false }")
    try:
        message = start_source(agent.address, agent.grpc_address)
    finally:
        agent.stop()
    assert "Consul's service-mesh CA is off: enable Connect" in message


ACLS = (
    'acl { enabled = true, default_policy = "deny", '
    'tokens { initial_management = "root", agent = "root" } }'
)


def acl_token(consul: ConsulAgent, rules: str) -> str:
    """A new Consul ACL token whose policy is ``rules``."""

    def put(path: str, body: object) -> dict[str, str]:
        request = urllib.request.Request(
            f"http://{consul.address}{path}",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"X-Consul-Token": "root"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, str] = json.load(response)
            return answer

    # A new leader creates the management token just after it is elected: until then
    # the token is "not found". Wait for it, as a user would.
    deadline = time.monotonic() + 60
    while True:
        request = urllib.request.Request(
            f"http://{consul.address}/v1/acl/token/self", headers={"X-Consul-Token": "root"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30):
                break
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    name = f"policy-{len(rules)}-{time.monotonic_ns()}"
    put("/v1/acl/policy", {"Name": name, "Rules": rules})
    return put("/v1/acl/token", {"Policies": [{"Name": name}]})["SecretID"]


def test_with_acls_a_token_must_be_allowed_to_write_the_service() -> None:
    agent = ConsulAgent(consul_binary(), grpc=True, hcl=ACLS)
    try:
        allowed = acl_token(
            agent,
            'service "cloudburst-kvs" { policy = "write" } node_prefix "" { policy = "read" }',
        )
        other = acl_token(
            agent,
            'service "something-else" { policy = "write" } node_prefix "" { policy = "read" }',
        )
        signed = start_source(agent.address, agent.grpc_address, allowed, deadline=60)
        refused = start_source(agent.address, agent.grpc_address, other)
        # Finding the servers needs nothing more of the token.
        port = agent.grpc_address.rpartition(":")[2]
        via_servers = start_source(agent.address, f"servers:{port}", allowed, deadline=60)
    finally:
        agent.stop()
    assert signed.endswith("/svc/cloudburst-kvs")
    assert via_servers.endswith("/svc/cloudburst-kvs")
    assert "Consul refused to sign a certificate for cloudburst-kvs" in refused
    assert "needs service:write on cloudburst-kvs" in refused


@dataclass(frozen=True)
class TlsConsul:
    """A Consul agent whose gRPC API is served over TLS only, requiring client certificates."""

    agent: ConsulAgent
    ca_file: str
    """The CA that signed the agent's certificate and the client certificate."""
    cert_file: str
    """A client certificate Consul accepts."""
    key_file: str
    other_ca_file: str
    """A CA that did not sign the agent's certificate."""
    other_cert_file: str
    """A client certificate of the other CA, which Consul refuses."""
    other_key_file: str

    @property
    def port(self) -> str:
        return self.agent.grpc_tls_address.rpartition(":")[2]


def start_tls_consul(certs: Path, server_names: list[str]) -> TlsConsul:
    """A Consul serving gRPC on ports.grpc_tls only, requiring client certificates.

    Its server certificate names ``server_names``.
    """
    ca = create_ca()
    ca_file, _ = write_issued(certs, "ca", ca)
    # certs.issue needs a role; Consul reads only the names.
    server_cert, server_key = write_issued(certs, "server", issue(ca, "kvs", server_names))
    client_cert, client_key = write_issued(certs, "client", issue(ca, "admin"))
    other_ca = create_ca()
    other_ca_file, _ = write_issued(certs, "other-ca", other_ca)
    other_cert, other_key = write_issued(certs, "other-client", issue(other_ca, "admin"))
    hcl = (
        f'tls {{ defaults {{ ca_file = "{ca_file}", cert_file = "{server_cert}", '
        f'key_file = "{server_key}" }} grpc {{ verify_incoming = true }} }}'
    )
    return TlsConsul(
        ConsulAgent(consul_binary(), grpc_tls=True, hcl=hcl),
        str(ca_file),
        str(client_cert),
        str(client_key),
        str(other_ca_file),
        str(other_cert),
        str(other_key),
    )


@pytest.fixture(scope="module")
def tls_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsConsul]:
    # As production clusters do: the server certificate names server.<dc>.consul and
    # its address.
    consul = start_tls_consul(
        tmp_path_factory.mktemp("consul-tls"), ["server.dc1.consul", "localhost", "127.0.0.1"]
    )
    try:
        yield consul
    finally:
        consul.agent.stop()


def test_services_get_certificates_through_consuls_grpc_api_over_tls(
    tls_consul: TlsConsul, procs: list[CbgrpcProcess], tmp_path: Path
) -> None:
    consul = tls_consul.agent
    token, tokens = admin_token(tmp_path)
    env = {
        "CONSUL_HTTP_ADDR": consul.address,
        "CONSUL_CACERT": tls_consul.ca_file,
        "CONSUL_CLIENT_CERT": tls_consul.cert_file,
        "CONSUL_CLIENT_KEY": tls_consul.key_file,
    }
    # The KVS dials the server's address, the scheduler every server the agent knows.
    kvs = CbgrpcProcess(
        "kvs",
        "--storage",
        "memory",
        *FLAGS,
        "--consul-grpc",
        f"https://{consul.grpc_tls_address}",
        env=env,
    )
    procs.append(kvs)
    scheduler = CbgrpcProcess(
        "scheduler",
        *FLAGS,
        "--tokens-file",
        str(tokens),
        "--consul-grpc",
        f"https://servers:{tls_consul.port}",
        env=env,
    )
    procs.append(scheduler)
    consul.wait("/v1/health/service/cloudburst-kvs?passing=true", lambda body: len(body) == 1)
    consul.wait("/v1/health/service/cloudburst-scheduler?passing=true", lambda body: len(body) == 1)
    roots = tmp_path / "consul-ca.pem"
    write_roots(consul, roots)
    # Both serve certificates of Consul's CA (not of the CA of Consul's own TLS).
    _, body = consul.get("/v1/connect/ca/roots")
    root = x509.load_pem_x509_certificate(body["Roots"][0]["RootCert"].encode())
    assert served_issuer(kvs.address) == root.subject.rfc4514_string()
    assert served_issuer(scheduler.address) == root.subject.rfc4514_string()
    # Registering a function and storing a value are calls from the scheduler to the KVS,
    # over mutual TLS on those certificates.
    with CloudburstConnection(
        scheduler.address, tls_ca=str(roots), token=token, timeout=20
    ) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        assert "incr" in cloud.list()
        assert cloud.put_object("greeting", "hello")
        assert cloud.get_object("greeting") == "hello"


@pytest.fixture(scope="module")
def custom_name_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsConsul]:
    # Its gRPC certificate names only server.dc1.example (a domain other than consul):
    # not server.dc1.consul, not its address.
    consul = start_tls_consul(tmp_path_factory.mktemp("consul-tls-name"), ["server.dc1.example"])
    try:
        yield consul
    finally:
        consul.agent.stop()


def test_consuls_grpc_certificate_may_name_another_server_name(
    custom_name_consul: TlsConsul,
) -> None:
    consul = custom_name_consul

    def start(address: str, name: str = "") -> str:
        return start_source(
            consul.agent.address,
            address,
            deadline=30 if name == "server.dc1.example" else 3,
            ca_file=consul.ca_file,
            cert_file=consul.cert_file,
            key_file=consul.key_file,
            tls_server_name=name,
        )

    servers = f"https://servers:{consul.port}"
    message = start(servers)
    assert "its certificate does not name the host dialled (with https://servers: " in message
    assert "set consul.tls_server_name / CONSUL_TLS_SERVER_NAME" in message
    # consul.tls_server_name (CONSUL_TLS_SERVER_NAME) names it, for servers and a named host.
    assert start(servers, "server.dc1.example").startswith("spiffe://")
    address = f"https://{consul.agent.grpc_tls_address}"
    assert start(address, "server.dc1.example").startswith("spiffe://")
    message = start(servers, "server.dc2.example")
    assert (
        "its certificate does not name consul.tls_server_name / CONSUL_TLS_SERVER_NAME "
        "(server.dc2.example)" in message
    )


def test_a_consul_grpc_certificate_from_another_ca_is_explained(tls_consul: TlsConsul) -> None:
    def start(address: str) -> str:
        return start_source(
            tls_consul.agent.address,
            address,
            ca_file=tls_consul.other_ca_file,
            cert_file=tls_consul.cert_file,
            key_file=tls_consul.key_file,
        )

    address = f"https://{tls_consul.agent.grpc_tls_address}"
    message = start(address)
    assert f"the TLS connection to Consul's gRPC API at {address} failed" in message
    assert (
        "its certificate is not signed by a CA in consul.ca_file / CONSUL_CACERT "
        f"({tls_consul.other_ca_file})" in message
    )
    assert "CERTIFICATE_VERIFY_FAILED" in message
    # The same through the servers the agent knows: the message names them too.
    message = start(f"https://servers:{tls_consul.port}")
    assert f"at https://servers:{tls_consul.port} (ipv4:127.0.0.1:{tls_consul.port}) failed" in (
        message
    )
    assert "its certificate is not signed by a CA in consul.ca_file" in message


def test_a_consul_that_requires_a_client_certificate_says_so(tls_consul: TlsConsul) -> None:
    address = f"https://{tls_consul.agent.grpc_tls_address}"
    message = start_source(tls_consul.agent.address, address, ca_file=tls_consul.ca_file)
    assert f"the TLS connection to Consul's gRPC API at {address} failed" in message
    assert "set consul.cert_file and key_file (CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY)" in message


def test_a_client_certificate_consul_does_not_trust_is_explained(tls_consul: TlsConsul) -> None:
    address = f"https://{tls_consul.agent.grpc_tls_address}"
    message = start_source(
        tls_consul.agent.address,
        address,
        ca_file=tls_consul.ca_file,
        cert_file=tls_consul.other_cert_file,
        key_file=tls_consul.other_key_file,
    )
    assert f"the TLS connection to Consul's gRPC API at {address} failed" in message
    assert (
        "does it trust the CA of consul.cert_file / CONSUL_CLIENT_CERT "
        f"({tls_consul.other_cert_file})?" in message
    )


def test_a_plaintext_consul_grpc_port_dialled_over_tls_is_explained(consul: ConsulAgent) -> None:
    message = start_source(consul.address, f"https://{consul.grpc_address}")
    assert "it does not speak TLS: that is the plaintext gRPC port" in message


def test_a_corrected_consul_ca_file_is_read_again_without_a_restart(
    tls_consul: TlsConsul, tmp_path: Path
) -> None:
    ca_file = tmp_path / "consul-ca.pem"
    ca_file.write_bytes(Path(tls_consul.other_ca_file).read_bytes())
    right_ca = Path(tls_consul.ca_file).read_bytes()

    async def start() -> bytes:
        refused = asyncio.Event()

        class Refusals(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "is not signed by a CA in consul.ca_file" in record.getMessage():
                    refused.set()

        handler = Refusals()
        logger = logging.getLogger("cloudburst_grpc.security.consul_ca")
        logger.addHandler(handler)
        client = ConsulClient(
            ConsulConfig(
                address=tls_consul.agent.address,
                ca_file=str(ca_file),
                cert_file=tls_consul.cert_file,
                key_file=tls_consul.key_file,
            )
        )
        source = ConsulCaSource(
            client, "cloudburst-kvs", ["127.0.0.1"], f"https://{tls_consul.agent.grpc_tls_address}"
        )
        started = asyncio.create_task(source.start(deadline_seconds=60))
        try:
            await asyncio.wait_for(refused.wait(), 60)
            # Fixed while the start retries: the next attempt trusts the agent.
            ca_file.write_bytes(right_ca)
            await started
            return source.current().cert_pem
        finally:
            logger.removeHandler(handler)
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError, TlsError):
                await started
            await source.close()
            await client.close()

    leaf = x509.load_pem_x509_certificate(asyncio.run(start()))
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert str(names.get_values_for_type(x509.UniformResourceIdentifier)[0]).endswith(
        "/svc/cloudburst-kvs"
    )
