"""Server reflection: both protocol versions, descriptors with their comments."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloudburst_grpc.local import Node

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def ask(node: Node, service: str, request: Any) -> Any:
    """One reflection request on ``service`` (v1 and v1alpha share their messages)."""
    with grpc.insecure_channel(node.address) as channel:
        if service.endswith("v1alpha.ServerReflection"):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        else:
            call = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=Request.SerializeToString,
                response_deserializer=Response.FromString,
            )
            answers = list(call(iter([request]), timeout=10))
    assert len(answers) == 1
    return answers[0]


VERSIONS = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]


@pytest.mark.parametrize("service", VERSIONS)
def test_both_versions_list_the_services(local_node: Node, service: str) -> None:
    answer = ask(local_node, service, Request(list_services=""))
    names = {s.name for s in answer.list_services_response.service}
    assert {"cloudburst.v1.SchedulerService", "cloudburst.v1.KvsService", *VERSIONS} <= names


@pytest.mark.parametrize("service", VERSIONS)
def test_descriptors_carry_the_contracts_comments(local_node: Node, service: str) -> None:
    method = "cloudburst.v1.SchedulerService.GetResult"
    answer = ask(local_node, service, Request(file_containing_symbol=method))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in answer.file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].name == "cloudburst/v1/scheduler_service.proto"
    comments = [loc.leading_comments for loc in files[0].source_code_info.location]
    assert any("GetResult waits for the stored result" in c for c in comments)
    # Every dependency comes along, so a client can build the whole file.
    names = {f.name for f in files}
    assert set(files[0].dependency) <= names


def test_the_v1_service_describes_itself(local_node: Node) -> None:
    answer = ask(local_node, VERSIONS[0], Request(file_containing_symbol=VERSIONS[0]))
    (file,) = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in answer.file_descriptor_response.file_descriptor_proto
    ]
    assert file.package == "grpc.reflection.v1"
    assert file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


def test_an_unknown_symbol_is_not_found(local_node: Node) -> None:
    answer = ask(local_node, VERSIONS[0], Request(file_containing_symbol="no.such.Thing"))
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_error_details_are_served_for_clients_that_decode_them(local_node: Node) -> None:
    answer = ask(local_node, VERSIONS[0], Request(file_containing_symbol="google.rpc.ErrorInfo"))
    first = descriptor_pb2.FileDescriptorProto.FromString(
        answer.file_descriptor_response.file_descriptor_proto[0]
    )
    assert first.name == "google/rpc/error_details.proto"
