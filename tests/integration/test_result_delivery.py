"""How results reach callers over the unary RPCs: serializers, direct responses, GetResult, expiry.

Each test talks to `cbgrpc serve`'s composition through the generated stubs, as a client in
another language does. Deletion is observed with a watch on the node's store, never by sleeping.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from cloudburst import CloudburstConnection
from cloudburst.v1 import (
    error_pb2,
    kvs_service_pb2,
    kvs_service_pb2_grpc,
    lattice_pb2,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
    value_pb2,
)
from cloudburst_grpc.local import Node
from harness import LoopThread, make_config, stored, wait_deleted, wait_stored

JSON = value_pb2.SERIALIZER_JSON
STRING = value_pb2.SERIALIZER_STRING
BYTES = value_pb2.SERIALIZER_BYTES
Stub = scheduler_service_pb2_grpc.SchedulerServiceStub


def json_value(obj: Any) -> value_pb2.Argument:
    return value_pb2.Argument(value=value_pb2.Value(data=json.dumps(obj).encode(), serializer=JSON))


def describe(_: object, *args: Any) -> Any:
    """Return what arrived, with its Python types (JSON, str and bytes arrive natural)."""
    return {"types": [type(a).__name__ for a in args], "args": [_plain(a) for a in args]}


def _plain(a: Any) -> Any:
    return a.decode() if isinstance(a, bytes) else a


def returns(_: object, kind: str) -> Any:
    return {
        "str": "text",
        "bytes": b"\x00\x01",
        "int": 7,
        "nested": {"a": [1, 2.5, None, True, {"b": "c"}]},
        "tuple": (1, 2),
        "set": {1},
        "int-keys": {1: "one"},
        "nan": float("nan"),
    }[kind]


def boom(_: object) -> None:
    raise ValueError("no good")


@pytest.fixture
def stub(local_node: Node) -> Any:
    with CloudburstConnection(local_node.address) as cloud:
        cloud.register(describe, "describe")
        cloud.register(returns, "returns")
        cloud.register(boom, "boom")
        assert cloud.register_dag("pair", ["describe"], [])
    with grpc.insecure_channel(local_node.address) as channel:
        yield Stub(channel)


def call(stub: Stub, name: str, *args: value_pb2.Argument, **fields: Any) -> Any:
    request = scheduler_service_pb2.CallFunctionRequest(name=name, arguments=args, **fields)
    return stub.CallFunction(request, timeout=30)


def test_json_string_and_bytes_arguments_arrive_as_natural_python_values(stub: Stub) -> None:
    args = (
        json_value({"k": [1, None]}),
        value_pb2.Argument(value=value_pb2.Value(data="é".encode(), serializer=STRING)),
        value_pb2.Argument(value=value_pb2.Value(data=b"raw", serializer=BYTES)),
    )
    response = call(stub, "describe", *args, direct_response=True, accept_serializers=[JSON])
    assert response.outcome.value.serializer == JSON
    assert json.loads(response.outcome.value.data) == {
        "types": ["dict", "str", "bytes"],
        "args": [{"k": [1, None]}, "é", "raw"],
    }


@pytest.mark.parametrize(
    ("kind", "accept", "serializer", "data"),
    [
        ("nested", [JSON], JSON, b'{"a":[1,2.5,null,true,{"b":"c"}]}'),
        ("int", [JSON], JSON, b"7"),
        ("tuple", [JSON], JSON, b"[1,2]"),
        ("str", [JSON, STRING], STRING, b"text"),
        ("str", [JSON], JSON, b'"text"'),
        ("bytes", [JSON, BYTES], BYTES, b"\x00\x01"),
    ],
)
def test_results_come_in_an_accepted_serializer(
    stub: Stub, kind: str, accept: list[int], serializer: int, data: bytes
) -> None:
    response = call(
        stub, "returns", json_value(kind), direct_response=True, accept_serializers=accept
    )
    assert response.outcome.value.serializer == serializer
    assert response.outcome.value.data == data


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("set", "is of type set"),
        ("int-keys", "keys must be str"),
        ("nan", "JSON has no number"),
        ("bytes", "is of type bytes"),
    ],
)
def test_a_result_json_cannot_carry_is_a_serialization_failure(
    stub: Stub, kind: str, says: str
) -> None:
    response = call(
        stub, "returns", json_value(kind), direct_response=True, accept_serializers=[JSON]
    )
    error = response.outcome.error
    assert error.reason == error_pb2.ERROR_REASON_SERIALIZATION_FAILED
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert says in error.message


def test_without_accept_serializers_results_are_pickled_as_before(stub: Stub) -> None:
    response = call(stub, "returns", json_value("int"), direct_response=True)
    assert response.outcome.value.serializer == value_pb2.SERIALIZER_CLOUDPICKLE


def test_a_failure_is_sent_whatever_the_caller_accepts(stub: Stub) -> None:
    response = call(stub, "boom", direct_response=True, accept_serializers=[JSON])
    assert response.outcome.failure.type == "ValueError"
    assert response.outcome.failure.message == "no good"


def test_accept_serializers_must_name_result_serializers(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, "returns", json_value("int"), accept_serializers=[value_pb2.SERIALIZER_FAILURE])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SERIALIZER_FAILURE" in (caught.value.details() or "")


def user_keys(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        kvs = kvs_service_pb2_grpc.KvsServiceStub(channel)
        request = kvs_service_pb2.ListKeysRequest(keyspace=lattice_pb2.KEYSPACE_USER)
        return list(kvs.ListKeys(request, timeout=30).keys)


def test_a_direct_function_call_stores_nothing(stub: Stub, local_node: Node) -> None:
    before = user_keys(local_node.address)
    response = call(stub, "returns", json_value("int"), direct_response=True)
    assert response.response_key == ""
    assert response.outcome.HasField("value")
    # The executor stores before it answers, so a stored result would be listed by now.
    assert user_keys(local_node.address) == before
    stored_call = call(stub, "returns", json_value("int"))
    stub.GetResult(
        scheduler_service_pb2.GetResultRequest(response_key=stored_call.response_key), timeout=30
    )
    assert user_keys(local_node.address) == sorted([*before, stored_call.response_key])


def test_a_direct_dag_call_answers_no_key(stub: Stub) -> None:
    request = scheduler_service_pb2.CallDagRequest(
        name="pair", direct_response=True, accept_serializers=[JSON]
    )
    request.function_arguments["describe"].arguments.append(json_value(1))
    response = stub.CallDag(request, timeout=30)
    assert response.response_key == ""
    assert json.loads(response.outcome.value.data) == {"types": ["int"], "args": [1]}


@pytest.mark.parametrize("dag", [False, True])
def test_direct_response_with_a_response_key_is_refused(stub: Stub, dag: bool) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        if dag:
            stub.CallDag(
                scheduler_service_pb2.CallDagRequest(
                    name="pair", direct_response=True, response_key="mine"
                ),
                timeout=30,
            )
        else:
            call(stub, "returns", json_value("int"), direct_response=True, response_key="mine")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stores nothing" in (caught.value.details() or "")


def test_get_result_waits_for_a_stored_result_and_releases_it(
    stub: Stub, local_node: Node, server_loop: LoopThread
) -> None:
    key = call(stub, "returns", json_value("nested"), accept_serializers=[JSON]).response_key
    assert key
    kept = stub.GetResult(scheduler_service_pb2.GetResultRequest(response_key=key), timeout=30)
    assert json.loads(kept.outcome.value.data)["a"][4] == {"b": "c"}
    assert stored(local_node, key)
    released = stub.GetResult(
        scheduler_service_pb2.GetResultRequest(response_key=key, release=True), timeout=30
    )
    assert released.outcome == kept.outcome
    wait_deleted(local_node, server_loop, [key])


def test_get_result_answers_a_failure_as_a_failure(stub: Stub) -> None:
    key = call(stub, "boom").response_key
    response = stub.GetResult(
        scheduler_service_pb2.GetResultRequest(response_key=key, release=True), timeout=30
    )
    assert response.outcome.failure.type == "ValueError"
    assert response.outcome.failure.function_name == "boom"


def test_get_result_of_a_key_never_stored_ends_at_the_deadline(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetResult(
            scheduler_service_pb2.GetResultRequest(response_key="never-stored"), timeout=1.0
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_get_result_needs_a_key(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetResult(scheduler_service_pb2.GetResultRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_uncollected_results_expire_but_named_ones_stay(
    start_node: Any, server_loop: LoopThread
) -> None:
    from cloudburst_grpc.local import start_local

    config = make_config(scheduler={"call_timeout_seconds": 0.2, "result_ttl_seconds": 0.2})
    node = start_node(start_local(config))
    with CloudburstConnection(node.address) as cloud:
        cloud.register(returns, "returns")
    with grpc.insecure_channel(node.address) as channel:
        stub = Stub(channel)
        named = call(stub, "returns", json_value("int"), response_key="mine").response_key
        chosen = call(stub, "returns", json_value("int")).response_key
        assert named == "mine"
        # Wait until both are stored, then for the chosen one to expire.
        for key in (named, chosen):
            stub.GetResult(scheduler_service_pb2.GetResultRequest(response_key=key), timeout=30)
        wait_deleted(node, server_loop, [chosen])
        assert stored(node, named)


def test_stream_frames_negotiate_serializers_and_half_close_answers_every_call(
    stub: Stub, local_node: Node
) -> None:
    before = user_keys(local_node.address)
    frames = [
        scheduler_service_pb2.StreamCallsRequest(
            sequence=1,
            call_function=scheduler_service_pb2.CallFunctionRequest(
                name="returns",
                arguments=[json_value("nested")],
                direct_response=True,
                accept_serializers=[JSON],
            ),
        ),
        scheduler_service_pb2.StreamCallsRequest(
            sequence=2,
            call_function=scheduler_service_pb2.CallFunctionRequest(
                name="returns", arguments=[json_value("set")], accept_serializers=[JSON]
            ),
            stream_outcome=True,
            releasable=True,
        ),
    ]
    # The request iterator ends after the frames: the stream is half-closed at once, and the
    # scheduler still answers both calls before it ends the stream.
    answers = list(stub.StreamCalls(iter(frames), timeout=30))
    by_sequence: dict[int, list[Any]] = {}
    for answer in answers:
        by_sequence.setdefault(answer.sequence, []).append(answer.call_function)
    (direct,) = by_sequence[1]
    assert direct.response_key == ""
    assert json.loads(direct.outcome.value.data) == {"a": [1, 2.5, None, True, {"b": "c"}]}
    final = by_sequence[2][-1]
    assert final.response_key
    assert final.outcome.error.reason == error_pb2.ERROR_REASON_SERIALIZATION_FAILED
    # Only the stored call left a key behind (the direct one stored nothing); it is stored
    # after its answer (held a moment, as it is releasable): wait for it first.
    assert wait_stored(local_node.address, final.response_key, timeout=30)
    assert user_keys(local_node.address) == sorted([*before, final.response_key])
