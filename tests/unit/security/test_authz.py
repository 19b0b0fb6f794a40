"""The authorization table and request checks, without sockets."""

from __future__ import annotations

import grpc
import pytest

from cloudburst.v1 import kvs_service_pb2, lattice_pb2, scheduler_service_pb2, value_pb2
from cloudburst_grpc.security.authz import (
    METHOD_ROLES,
    Denied,
    FailureLimiter,
    check_method,
    check_request,
    peer_host,
)
from cloudburst_grpc.security.identity import Identity

S = "/cloudburst.v1.SchedulerService/"
K = "/cloudburst.v1.KvsService/"


def who(role: str) -> Identity:
    return Identity(role, "token")


def test_every_rpc_of_every_service_has_an_entry() -> None:
    from cloudburst.v1 import (
        diagnostics_service_pb2,
        executor_service_pb2,
        kvs_service_pb2,
        messaging_service_pb2,
        scheduler_service_pb2,
    )

    for module in (
        diagnostics_service_pb2,
        executor_service_pb2,
        kvs_service_pb2,
        messaging_service_pb2,
        scheduler_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in METHOD_ROLES


@pytest.mark.parametrize(
    ("method", "role", "allowed"),
    [
        (S + "CreateFunction", "admin", True),
        (S + "CreateFunction", "invoker", False),
        (S + "CallDag", "invoker-restricted", True),
        (S + "CallDag", "executor", False),
        ("/cloudburst.v1.ExecutorService/ExecuteFunction", "admin", False),
        ("/cloudburst.v1.ExecutorService/ExecuteFunction", "scheduler", True),
        ("/cloudburst.v1.ExecutorService/StreamTriggers", "executor", True),
        ("/cloudburst.v1.MessagingService/StreamMessages", "executor", True),
        ("/cloudburst.v1.MessagingService/StreamMessages", "scheduler", False),
        ("/cloudburst.v1.MessagingService/StreamMessages", "invoker", False),
        (K + "GetValue", "kvs", False),
        ("/cloudburst.v1.DiagnosticsService/GetCallTiming", "admin", True),
        ("/cloudburst.v1.DiagnosticsService/GetCallTiming", "serve", True),
        ("/cloudburst.v1.DiagnosticsService/GetCallTiming", "invoker", False),
        ("/cloudburst.v1.DiagnosticsService/GetCallTiming", "executor", False),
        ("/cloudburst.v1.Unknown/Thing", "admin", False),
    ],
)
def test_check_method(method: str, role: str, allowed: bool) -> None:
    if allowed:
        check_method(method, who(role))
    else:
        with pytest.raises(Denied) as raised:
            check_method(method, who(role))
        assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_the_denial_names_the_role_needed() -> None:
    with pytest.raises(Denied, match="needs role admin; the caller has role invoker"):
        check_method(S + "DeleteDag", who("invoker"))


def put(
    keyspace: lattice_pb2.Keyspace.ValueType,
    serializer: value_pb2.Serializer.ValueType = value_pb2.SERIALIZER_BYTES,
) -> kvs_service_pb2.PutValueRequest:
    value = value_pb2.Value(data=b"x", serializer=serializer)
    return kvs_service_pb2.PutValueRequest(
        key="k",
        keyspace=keyspace,
        lattice=lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(value=value)),
    )


def get(keyspace: lattice_pb2.Keyspace.ValueType) -> kvs_service_pb2.GetValueRequest:
    return kvs_service_pb2.GetValueRequest(key="k", keyspace=keyspace)


def op(
    request: kvs_service_pb2.GetValueRequest | kvs_service_pb2.PutValueRequest,
) -> kvs_service_pb2.StreamOpsRequest:
    if isinstance(request, kvs_service_pb2.GetValueRequest):
        return kvs_service_pb2.StreamOpsRequest(sequence=1, get=request)
    return kvs_service_pb2.StreamOpsRequest(sequence=1, put=request)


@pytest.mark.parametrize(
    ("role", "method", "request_", "allowed"),
    [
        ("scheduler", K + "PutValue", put(lattice_pb2.KEYSPACE_SYSTEM), True),
        ("executor", K + "PutValue", put(lattice_pb2.KEYSPACE_SYSTEM), False),
        ("admin", K + "PutValue", put(lattice_pb2.KEYSPACE_SYSTEM), False),
        ("admin", K + "PutValue", put(lattice_pb2.KEYSPACE_USER), True),
        (
            "executor",
            K + "GetValue",
            kvs_service_pb2.GetValueRequest(key="k", keyspace=lattice_pb2.KEYSPACE_SYSTEM),
            True,
        ),
        (
            "admin",
            K + "ListKeys",
            kvs_service_pb2.ListKeysRequest(keyspace=lattice_pb2.KEYSPACE_SYSTEM),
            False,
        ),
        (
            "invoker-restricted",
            K + "PutValue",
            put(lattice_pb2.KEYSPACE_USER, value_pb2.SERIALIZER_CLOUDPICKLE),
            False,
        ),
        (
            "invoker-restricted",
            K + "PutValue",
            put(lattice_pb2.KEYSPACE_USER, value_pb2.SERIALIZER_JSON),
            True,
        ),
        (
            "invoker",
            K + "PutValue",
            put(lattice_pb2.KEYSPACE_USER, value_pb2.SERIALIZER_CLOUDPICKLE),
            True,
        ),
        # A StreamOps frame is checked as the unary call it carries.
        ("scheduler", K + "StreamOps", op(put(lattice_pb2.KEYSPACE_SYSTEM)), True),
        ("executor", K + "StreamOps", op(put(lattice_pb2.KEYSPACE_SYSTEM)), False),
        ("executor", K + "StreamOps", op(get(lattice_pb2.KEYSPACE_SYSTEM)), True),
        ("admin", K + "StreamOps", op(get(lattice_pb2.KEYSPACE_SYSTEM)), False),
        ("admin", K + "StreamOps", op(put(lattice_pb2.KEYSPACE_USER)), True),
        ("kvs", K + "StreamOps", op(get(lattice_pb2.KEYSPACE_USER)), False),
        (
            "invoker-restricted",
            K + "StreamOps",
            op(put(lattice_pb2.KEYSPACE_USER, value_pb2.SERIALIZER_CLOUDPICKLE)),
            False,
        ),
        (
            "invoker-restricted",
            K + "StreamOps",
            op(put(lattice_pb2.KEYSPACE_USER, value_pb2.SERIALIZER_JSON)),
            True,
        ),
    ],
)
def test_check_request(role: str, method: str, request_: object, allowed: bool) -> None:
    if allowed:
        check_request(method, who(role), request_)
    else:
        with pytest.raises(Denied):
            check_request(method, who(role), request_)


def argument(serializer: value_pb2.Serializer.ValueType) -> value_pb2.Argument:
    return value_pb2.Argument(value=value_pb2.Value(data=b"1", serializer=serializer))


def test_a_restricted_invoker_sends_no_pickles_in_any_call_shape() -> None:
    pickled = argument(value_pb2.SERIALIZER_CLOUDPICKLE)
    json_ = argument(value_pb2.SERIALIZER_JSON)
    reference = value_pb2.Argument(reference=value_pb2.Reference(key="k"))
    restricted = who("invoker-restricted")
    function = scheduler_service_pb2.CallFunctionRequest(name="f", arguments=[json_, reference])
    check_request(S + "CallFunction", restricted, function)
    bad_function = scheduler_service_pb2.CallFunctionRequest(name="f", arguments=[json_, pickled])
    dag = scheduler_service_pb2.CallDagRequest(
        name="d", function_arguments={"f": value_pb2.ArgumentList(arguments=[pickled])}
    )
    for method, request in [
        (S + "CallFunction", bad_function),
        (S + "CallDag", dag),
        (S + "StreamCalls", scheduler_service_pb2.StreamCallsRequest(call_dag=dag)),
        (S + "StreamCalls", scheduler_service_pb2.StreamCallsRequest(call_function=bad_function)),
        (
            S + "StreamCalls",
            scheduler_service_pb2.StreamCallsRequest(
                batch=[
                    scheduler_service_pb2.StreamCallsRequest(
                        call_function=scheduler_service_pb2.CallFunctionRequest(name="f")
                    ),
                    scheduler_service_pb2.StreamCallsRequest(call_function=bad_function),
                ]
            ),
        ),
    ]:
        with pytest.raises(Denied, match="not SERIALIZER_CLOUDPICKLE"):
            check_request(method, restricted, request)
        check_request(method, who("invoker"), request)


def test_the_failure_limiter_blocks_a_peer_for_the_rest_of_the_window() -> None:
    limiter = FailureLimiter(limit=3, window_seconds=60)
    for i in range(3):
        assert limiter.blocked_for("10.0.0.1", now=100.0 + i) == 0
        limiter.failed("10.0.0.1", now=100.0 + i)
    assert limiter.blocked_for("10.0.0.1", now=110.0) == pytest.approx(50.0)
    assert limiter.blocked_for("10.0.0.2", now=110.0) == 0
    assert limiter.blocked_for("10.0.0.1", now=160.5) == 0


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:10.0.0.1:5000", "10.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("unix:/x", "unix:/x")],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host
