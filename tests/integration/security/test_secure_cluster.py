"""A cluster whose services talk mutual TLS, with clients authenticated by token or certificate.

Every server, channel and handshake is real: certificates from ``cbgrpc certs``'s
code, a tokens file of salted hashes, nodes started by the code `cbgrpc` uses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import PermissionDeniedError, UnauthenticatedError, UnavailableError
from cloudburst.v1 import (
    executor_service_pb2,
    executor_service_pb2_grpc,
    kvs_service_pb2,
    kvs_service_pb2_grpc,
    lattice_pb2,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
    value_pb2,
)
from cloudburst_executors.library import UserLibrary
from cloudburst_grpc.config import ConfigError
from cloudburst_grpc.local import Node, start_executor_node, start_kvs_node, start_scheduler_node
from cloudburst_grpc.security.certs import Issued, create_bundle, create_ca, issue, write_issued
from cloudburst_grpc.security.tls import TlsSource
from cloudburst_grpc.security.tokens import hash_token
from cloudburst_grpc.server import PeerChannel
from harness import LoopThread, make_config

TOKENS = {
    "admin": "cbt_admin-test-token-0123456789",
    "invoker": "cbt_invoker-test-token-0123456789",
    "invoker-restricted": "cbt_restricted-test-token-0123456789",
}


@dataclasses.dataclass
class SecureCluster:
    certs: Path
    tokens_file: Path
    kvs: Node
    executors: list[Node]
    scheduler: Node

    def connect(self, **kwargs: str) -> CloudburstConnection:
        return CloudburstConnection(
            self.scheduler.address,
            tls_ca=str(self.certs / "ca.pem"),
            connect_timeout=10,
            timeout=20,
            **kwargs,  # type: ignore[arg-type]
        )

    def channel(self, address: str, role: str | None = None, token: str = "") -> grpc.Channel:
        ca = (self.certs / "ca.pem").read_bytes()
        key = cert = None
        if role is not None:
            name = role if role in ("scheduler", "executor", "kvs", "serve") else f"client-{role}"
            key = (self.certs / f"{name}-key.pem").read_bytes()
            cert = (self.certs / f"{name}.pem").read_bytes()
        credentials = grpc.ssl_channel_credentials(ca, key, cert)
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(address, credentials)


def security_for(certs: Path, role: str, tokens_file: Path | None = None) -> dict[str, object]:
    return {
        "tls_cert": str(certs / f"{role}.pem"),
        "tls_key": str(certs / f"{role}-key.pem"),
        "tls_ca": str(certs / "ca.pem"),
        "tokens_file": str(tokens_file) if tokens_file else "",
    }


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    create_bundle(directory, ["127.0.0.1", "localhost"], ["admin", "invoker", "invoker-restricted"])
    return directory


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(
        "".join(
            f"{role} {hash_token(t, iterations=1000)} {role}-token\n" for role, t in TOKENS.items()
        )
    )
    return path


@pytest.fixture
def secure(start_node: Callable[..., Node], certs: Path, tokens_file: Path) -> SecureCluster:
    def config(role: str, tokens: Path | None = None):  # type: ignore[no-untyped-def]
        return make_config(
            scheduler={"pin_replicas": 1}, security=security_for(certs, role, tokens)
        )

    kvs = start_node(start_kvs_node(config("kvs")))
    executors = [
        start_node(start_executor_node(config("executor"), kvs.address, f"executor-{i}"))
        for i in range(2)
    ]
    scheduler = start_node(
        start_scheduler_node(
            config("scheduler", tokens_file), kvs.address, [e.address for e in executors]
        )
    )
    return SecureCluster(certs, tokens_file, kvs, executors, scheduler)


def double(_: UserLibrary, x: int) -> int:
    return x * 2


def shout(_: UserLibrary, text: str) -> str:
    return text.upper() + "!"


def test_an_admin_registers_and_runs_a_dag_over_mutual_tls(secure: SecureCluster) -> None:
    with secure.connect(token=TOKENS["admin"]) as cloud:
        cloud.register(double, "double")
        cloud.register(double, "again")
        assert cloud.register_dag("quad", ["double", "again"], [("double", "again")])
        assert cloud.call_dag("quad", {"double": [3]}).get() == 12
        cloud.put_object("k", [1, 2])
        assert cloud.get_object("k") == [1, 2]


def test_a_client_without_a_token_is_unauthenticated(secure: SecureCluster) -> None:
    with secure.channel(secure.scheduler.address) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListFunctions(scheduler_service_pb2.ListFunctionsRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in (raised.value.details() or "")


def test_a_wrong_token_is_unauthenticated_and_never_echoed(
    secure: SecureCluster, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "cbt_not-a-real-token-at-all"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(UnauthenticatedError) as raised:
            with secure.connect(token=wrong) as cloud:
                cloud.list()
    assert "not valid" in str(raised.value)
    assert wrong not in str(raised.value)
    assert "refused" in caplog.text
    for token in [wrong, *TOKENS.values()]:
        assert token not in caplog.text


def test_an_invoker_may_call_but_not_register(secure: SecureCluster) -> None:
    with secure.connect(token=TOKENS["admin"]) as admin:
        admin.register(double, "double")
    with secure.connect(token=TOKENS["invoker"]) as cloud:
        with pytest.raises(PermissionDeniedError) as raised:
            cloud.register(shout, "shout")
        assert "needs role admin" in str(raised.value)
        assert "the caller has role invoker" in str(raised.value)
        assert cloud.exec_func("double", [21]).get() == 42


def test_a_restricted_invoker_may_send_data_but_not_pickles(secure: SecureCluster) -> None:
    with secure.connect(token=TOKENS["admin"]) as admin:
        admin.register(shout, "shout")
    with secure.connect(token=TOKENS["invoker-restricted"]) as cloud:
        assert cloud.exec_func("shout", ["hi"]).get() == "HI!"  # a string: not executable
        with pytest.raises(PermissionDeniedError) as raised:
            cloud.exec_func("shout", [{"a": 1}]).get()  # cloudpickle
        assert "SERIALIZER_CLOUDPICKLE" in str(raised.value)
        with pytest.raises(PermissionDeniedError):
            cloud.put_object("k", {"a": 1})
        cloud.put_object("k", "text")
    # A JSON argument, as a client in another language would send it.
    with secure.channel(secure.scheduler.address, token=TOKENS["invoker-restricted"]) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        response = stub.CallFunction(
            scheduler_service_pb2.CallFunctionRequest(
                name="shout",
                arguments=[
                    value_pb2.Argument(
                        value=value_pb2.Value(data=b'"json"', serializer=value_pb2.SERIALIZER_JSON)
                    )
                ],
                direct_response=True,
            ),
            timeout=20,
        )
    assert response.outcome.value.data == b"JSON!"


def test_a_client_cannot_execute_on_an_executor_directly(secure: SecureCluster) -> None:
    executor = secure.executors[0].address
    with secure.channel(executor, role="admin") as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ExecuteFunction(executor_service_pb2.ExecuteFunctionRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "one of executor, scheduler, serve" in (raised.value.details() or "")
    # Without any client certificate the handshake itself fails.
    with secure.channel(executor) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetExecutorStatus(executor_service_pb2.GetExecutorStatusRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def _put_system(stub: kvs_service_pb2_grpc.KvsServiceStub) -> None:
    stub.PutValue(
        kvs_service_pb2.PutValueRequest(
            key="function/evil",
            keyspace=lattice_pb2.KEYSPACE_SYSTEM,
            lattice=lattice_pb2.Lattice(
                lww=lattice_pb2.LwwLattice(
                    value=value_pb2.Value(data=b"x", serializer=value_pb2.SERIALIZER_BYTES)
                )
            ),
        ),
        timeout=10,
    )


def test_only_schedulers_write_the_system_keyspace(secure: SecureCluster) -> None:
    # An admin client through the scheduler's KVS proxy.
    with secure.channel(secure.scheduler.address, token=TOKENS["admin"]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _put_system(kvs_service_pb2_grpc.KvsServiceStub(channel))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "writing the system keyspace needs role one of scheduler, serve" in (
        raised.value.details() or ""
    )
    # An executor straight at the KVS may read it but not write it.
    with secure.channel(secure.kvs.address, role="executor") as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            _put_system(stub)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.GetValue(
            kvs_service_pb2.GetValueRequest(key="x", keyspace=lattice_pb2.KEYSPACE_SYSTEM),
            timeout=10,
        )
    with secure.channel(secure.kvs.address, role="scheduler") as channel:
        _put_system(kvs_service_pb2_grpc.KvsServiceStub(channel))


def test_a_client_certificate_authenticates_where_no_tokens_are_configured(
    start_node: Callable[..., Node], certs: Path, secure: SecureCluster, tmp_path: Path
) -> None:
    config = make_config(security=security_for(certs, "scheduler"))
    scheduler = start_node(
        start_scheduler_node(config, secure.kvs.address, [e.address for e in secure.executors])
    )
    ca = str(certs / "ca.pem")

    def connect(name: str) -> CloudburstConnection:
        return CloudburstConnection(
            scheduler.address,
            tls_ca=ca,
            tls_cert=str(certs / f"{name}.pem"),
            tls_key=str(certs / f"{name}-key.pem"),
            connect_timeout=5,
            timeout=20,
        )

    with connect("client-admin") as cloud:
        cloud.register(double, "double")
        assert cloud.exec_func("double", [4]).get() == 8
    # A certificate from another CA, and an expired one, are authentication errors that
    # name the cause (the server only closes the handshake; the client tells why).
    foreign_ca = create_ca()
    write_issued(tmp_path / "foreign", "client-admin", issue(foreign_ca, "admin"))
    ours = Issued((certs / "ca.pem").read_bytes(), (certs / "ca-key.pem").read_bytes())
    write_issued(tmp_path / "expired", "client-admin", issue(ours, "admin", days=-1))
    causes = {
        "foreign": r"refused this client's certificate .* in the TLS handshake: the client "
        r"certificate .* is not signed by the CA in .*ca\.pem",
        "expired": r"the client certificate .* expired on \d{4}-\d\d-\d\d",
    }
    for bad, cause in causes.items():
        with pytest.raises(UnauthenticatedError, match=cause) as raised:
            CloudburstConnection(
                scheduler.address,
                tls_ca=ca,
                tls_cert=str(tmp_path / bad / "client-admin.pem"),
                tls_key=str(tmp_path / bad / "client-admin-key.pem"),
                connect_timeout=3,
            ).list()
        assert "cbgrpc certs DIR --client ROLE" in str(raised.value)
    # A client that trusts another CA says why it cannot connect.
    (tmp_path / "other-ca.pem").write_bytes(foreign_ca.cert_pem)
    with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        CloudburstConnection(
            scheduler.address,
            tls_ca=str(tmp_path / "other-ca.pem"),
            tls_cert=str(certs / "client-admin.pem"),
            tls_key=str(certs / "client-admin-key.pem"),
            connect_timeout=3,
        )


def test_one_scheduler_takes_tokens_and_client_certificates(
    start_node: Callable[..., Node], certs: Path, tokens_file: Path, secure: SecureCluster
) -> None:
    security = {**security_for(certs, "scheduler", tokens_file), "client_cert_port": 0}
    scheduler = start_node(
        start_scheduler_node(
            make_config(security=security),
            secure.kvs.address,
            [e.address for e in secure.executors],
        )
    )
    assert scheduler.security is not None
    cert_port = scheduler.security.client_cert_port
    assert cert_port is not None and cert_port != scheduler.port
    ca = str(certs / "ca.pem")
    with CloudburstConnection(
        scheduler.address, tls_ca=ca, token=TOKENS["admin"], connect_timeout=10, timeout=20
    ) as cloud:
        cloud.register(double, "double")
        assert cloud.exec_func("double", [2]).get() == 4
    with CloudburstConnection(
        f"127.0.0.1:{cert_port}",
        tls_ca=ca,
        tls_cert=str(certs / "client-invoker.pem"),
        tls_key=str(certs / "client-invoker-key.pem"),
        connect_timeout=10,
        timeout=20,
    ) as cloud:
        assert cloud.exec_func("double", [5]).get() == 10
        # The certificate's role holds there: an invoker may not register.
        with pytest.raises(PermissionDeniedError):
            cloud.register(double, "double2")
    # Without a certificate, the certificate port refuses the handshake; with neither
    # certificate nor token, the token port refuses the call.
    with pytest.raises(UnavailableError):
        CloudburstConnection(
            f"127.0.0.1:{cert_port}", tls_ca=ca, token=TOKENS["admin"], connect_timeout=3
        ).list()
    with pytest.raises(UnauthenticatedError, match="bearer token"):
        with CloudburstConnection(scheduler.address, tls_ca=ca, connect_timeout=10) as cloud:
            cloud.list()


def test_a_client_cert_port_needs_tokens(certs: Path) -> None:
    with pytest.raises(ConfigError, match="client_cert_port is for a scheduler with"):
        make_config(security={**security_for(certs, "scheduler"), "client_cert_port": 0})


def test_a_client_certificate_reaches_the_kvs_directly_with_its_role_checked_there(
    start_node: Callable[..., Node], certs: Path, secure: SecureCluster
) -> None:
    config = make_config(security=security_for(certs, "scheduler"))  # no tokens: certificates
    scheduler = start_node(
        start_scheduler_node(config, secure.kvs.address, [e.address for e in secure.executors])
    )

    def connect(name: str) -> CloudburstConnection:
        return CloudburstConnection(
            scheduler.address,
            tls_ca=str(certs / "ca.pem"),
            tls_cert=str(certs / f"{name}.pem"),
            tls_key=str(certs / f"{name}-key.pem"),
            connect_timeout=10,
            timeout=20,
        )

    with connect("client-invoker") as cloud:
        assert cloud.kvs_address == secure.kvs.address
        cloud.put_object("direct/key", {"n": 1})
        assert cloud.get_object("direct/key") == {"n": 1}
    with connect("client-invoker-restricted") as cloud:
        assert cloud.kvs_address == secure.kvs.address
        cloud.put_object("direct/json", b"bytes are allowed")
        with pytest.raises(PermissionDeniedError, match="cloudpickle values need role invoker"):
            cloud.put_object("direct/pickle", {1, 2})
    # At the KVS, as at the scheduler, a client may not touch the system keyspace.
    with secure.channel(secure.kvs.address, role="admin") as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            _put_system(stub)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetValue(
                kvs_service_pb2.GetValueRequest(key="x", keyspace=lattice_pb2.KEYSPACE_SYSTEM),
                timeout=10,
            )
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_client_uses_the_kvs_through_the_scheduler(secure: SecureCluster) -> None:
    with secure.connect(token=TOKENS["invoker"]) as cloud:
        # The KVS's port demands a client certificate, which a token client lacks.
        assert cloud.kvs_address is None
        cloud.put_object("proxied/key", [1, 2])
        assert cloud.get_object("proxied/key") == [1, 2]
    with secure.channel(secure.kvs.address, token=TOKENS["admin"]) as channel:
        stub = kvs_service_pb2_grpc.KvsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetValue(kvs_service_pb2.GetValueRequest(key="proxied/key"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_are_rotated_without_a_restart(secure: SecureCluster) -> None:
    fresh = "cbt_fresh-rotated-token-0123456789"
    with secure.connect(token=TOKENS["admin"]) as cloud:
        cloud.list()
    secure.tokens_file.write_text(f"admin {hash_token(fresh, iterations=1000)} rotated\n")
    with secure.connect(token=fresh) as cloud:
        cloud.list()
    with pytest.raises(UnauthenticatedError):
        with secure.connect(token=TOKENS["admin"]) as cloud:
            cloud.list()


def test_a_non_loopback_bind_without_tls_is_refused(server_loop: LoopThread) -> None:
    config = make_config(server={"host": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0 without TLS"):
        server_loop.run(start_kvs_node(config))


def test_insecure_mode_warns(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(server={"host": "0.0.0.0"}, security={"insecure": True})
    with caplog.at_level(logging.WARNING):
        node = start_node(start_kvs_node(config))
    assert "INSECURE" in caplog.text
    assert node.security is not None and node.security.insecure_warning


def test_failed_authentication_blocks_the_peer_but_a_missing_role_does_not(
    secure: SecureCluster,
) -> None:
    with secure.channel(secure.scheduler.address, token=TOKENS["invoker"]) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        for _ in range(12):
            with pytest.raises(grpc.RpcError) as raised:
                stub.DeleteDag(scheduler_service_pb2.DeleteDagRequest(name="x"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.ListFunctions(scheduler_service_pb2.ListFunctionsRequest(), timeout=10)
    with secure.channel(secure.scheduler.address, token="cbt_guess") as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        for _ in range(10):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListFunctions(scheduler_service_pb2.ListFunctionsRequest(), timeout=10)
            assert raised.value.details() == "the bearer token is not valid"
    # This address is now refused without its token being looked at, even a good one.
    with secure.channel(secure.scheduler.address, token=TOKENS["admin"]) as channel:
        stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListFunctions(scheduler_service_pb2.ListFunctionsRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "too many failed attempts from this address" in (raised.value.details() or "")


def test_peer_channels_take_a_rewritten_certificate(
    secure: SecureCluster, server_loop: LoopThread, tmp_path: Path
) -> None:
    own = tmp_path / "own"
    own.mkdir()
    for name in ("scheduler.pem", "scheduler-key.pem", "ca.pem"):
        (own / name).write_bytes((secure.certs / name).read_bytes())
    tls = TlsSource(own / "scheduler.pem", own / "scheduler-key.pem", own / "ca.pem")
    request = executor_service_pb2.GetExecutorStatusRequest()

    async def scenario() -> tuple[bool, str, str]:
        peer = PeerChannel(
            secure.executors[0].address,
            1024 * 1024,
            tls,
            "executor",
            executor_service_pb2_grpc.ExecutorServiceStub,
        )
        try:
            first = peer.channel
            before = await peer.stub().GetExecutorStatus(request, timeout=10)
            ca = Issued(
                (secure.certs / "ca.pem").read_bytes(), (secure.certs / "ca-key.pem").read_bytes()
            )
            fresh = issue(ca, "scheduler")
            (own / "scheduler-key.pem").write_bytes(fresh.key_pem)
            (own / "scheduler.pem").write_bytes(fresh.cert_pem)
            after = await peer.stub().GetExecutorStatus(request, timeout=10)
            return peer.channel is not first, before.executor_id, after.executor_id
        finally:
            await peer.close()

    changed, before, after = server_loop.run(scenario())
    assert changed
    assert before == after == "executor-0"


def test_a_client_certificate_holds_answer_streams_and_nothing_else_at_executors(
    start_node: Callable[..., Node], certs: Path, secure: SecureCluster
) -> None:
    config = make_config(scheduler={"pin_replicas": 1}, security=security_for(certs, "scheduler"))
    scheduler = start_node(
        start_scheduler_node(config, secure.kvs.address, [e.address for e in secure.executors])
    )
    assert scheduler.scheduler is not None
    executor_ids = {e.executors[0].executor_id for e in secure.executors}
    with CloudburstConnection(
        scheduler.address,
        tls_ca=str(certs / "ca.pem"),
        tls_cert=str(certs / "client-admin.pem"),
        tls_key=str(certs / "client-admin-key.pem"),
        connect_timeout=10,
        timeout=20,
    ) as cloud:
        assert cloud.answer_executors == executor_ids
        cloud.register(double, "double")
        assert cloud.register_dag("doubled", ["double"], [])
        assert cloud.call_dag("doubled", {"double": 21}, direct_response=True) == 42
    assert scheduler.scheduler.answered_directly == 1
    assert scheduler.scheduler.relayed_outcomes == 0
    # The certificate opens answer streams, not the runtime's own streams.
    with secure.channel(secure.executors[0].address, role="admin") as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        triggers = stub.StreamTriggers(iter([executor_service_pb2.StreamTriggersRequest()]))
        with pytest.raises(grpc.RpcError) as raised:
            next(triggers)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        answers = stub.StreamAnswers(
            executor_service_pb2.StreamAnswersRequest(answer_stream_id="0" * 32), timeout=10
        )
        assert next(answers).registered
        answers.cancel()


def test_a_token_client_is_answered_by_the_scheduler(secure: SecureCluster) -> None:
    assert secure.scheduler.scheduler is not None
    with secure.connect(token=TOKENS["admin"]) as cloud:
        # Executors' ports demand a client certificate, which a token client lacks.
        assert cloud.answer_executors == frozenset()
        cloud.register(double, "double")
        assert cloud.register_dag("doubled", ["double"], [])
        assert cloud.call_dag("doubled", {"double": 4}, direct_response=True) == 8
    assert secure.scheduler.scheduler.answered_directly == 0
    assert secure.scheduler.scheduler.relayed_outcomes == 1
