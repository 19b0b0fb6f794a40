"""gRPC server reflection that serves descriptors with their comments, as v1 and v1alpha.

grpcio-reflection serves descriptors as the generated code holds them, without
the source information that carries comments, and only as
``grpc.reflection.v1alpha``. This servicer answers from a descriptor set
generated with source information (``cloudburst_v1.binpb``, written by
``tools/gen_protos.py`` beside this module), so ``grpcurl describe`` shows the
contract's comments, and serves the same protocol under both
``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``: the two are the same
messages in two packages, so one implementation, with the v1alpha message
classes, answers both.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2

logger = logging.getLogger(__name__)

#: The descriptor set of protos/ with source information (comments).
DESCRIPTOR_SET = Path(__file__).with_name("cloudburst_v1.binpb")
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
_METHOD = "ServerReflectionInfo"

# grpcio-reflection ships no type information: its messages are Any to mypy.
Request: TypeAlias = Any
Response: TypeAlias = Any
_Response = reflection_pb2.ServerReflectionResponse


def _v1_file(v1alpha: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The grpc.reflection.v1 file: the v1alpha file with its package renamed."""
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(v1alpha)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    v1.ClearField("options")
    for message in v1.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace("reflection.v1alpha.", "reflection.v1.")
    for method in v1.service[0].method:
        method.input_type = method.input_type.replace("v1alpha.", "v1.")
        method.output_type = method.output_type.replace("v1alpha.", "v1.")
    return v1


class ReflectionServicer:
    """Answers reflection requests for a fixed set of services."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self._services = sorted({*service_names, V1, V1ALPHA})
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._pool = descriptor_pool.DescriptorPool()
        default = descriptor_pool.Default()
        commented = {}
        if DESCRIPTOR_SET.exists():
            for file in descriptor_pb2.FileDescriptorSet.FromString(
                DESCRIPTOR_SET.read_bytes()
            ).file:
                commented[file.name] = file
        else:
            logger.warning("%s is missing: reflection serves no comments", DESCRIPTOR_SET.name)
        for name in self._services:
            if name == V1:
                continue
            self._add(default.FindFileContainingSymbol(name), commented)
        self._add_proto(_v1_file(self._files["grpc_reflection/v1alpha/reflection.proto"]))
        # Error details, so that reflection clients (grpcurl) can show google.rpc.ErrorInfo.
        self._add(error_details_pb2.DESCRIPTOR, commented)

    def _add(self, file: Any, commented: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        if file.name in self._files:
            return
        for dependency in file.dependencies:
            self._add(dependency, commented)
        proto = commented.get(file.name)
        if proto is None:
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
        self._add_proto(proto)

    def _add_proto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._files[proto.name] = proto
        self._pool.Add(proto)

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Response]:
        """Answer each request of the stream in order."""
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Request) -> Response:
        """The response to one reflection request."""
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                return _Response(
                    original_request=request,
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[reflection_pb2.ServiceResponse(name=n) for n in self._services]
                    ),
                )
            if kind == "file_by_filename":
                return self._file(request, self._files[request.file_by_filename].name)
            if kind == "file_containing_symbol":
                return self._file(request, self._file_of(request.file_containing_symbol))
            if kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
                return _Response(
                    original_request=request,
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                )
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, "not found")
        if kind == "file_containing_extension":
            return _error(request, grpc.StatusCode.NOT_FOUND, "no extensions are served")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "unknown reflection request")

    def _file_of(self, symbol: str) -> str:
        """The file that defines a symbol; a method, field or enum value is found by its parent.

        Raises:
            KeyError: No file defines it.
        """
        name = symbol
        while name:
            try:
                return str(self._pool.FindFileContainingSymbol(name).name)
            except KeyError:
                name = name.rpartition(".")[0]
        raise KeyError(symbol)

    def _file(self, request: Request, name: str) -> Response:
        """The file and every file it depends on, the file first."""
        ordered: list[str] = []

        def visit(file_name: str) -> None:
            if file_name in ordered:
                return
            ordered.append(file_name)
            for dependency in self._files[file_name].dependency:
                visit(dependency)

        visit(name)
        return _Response(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self._files[n].SerializeToString() for n in ordered]
            ),
        )


def _error(request: Request, code: grpc.StatusCode, message: str) -> Response:
    return _Response(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(
            error_code=code.value[0], error_message=message
        ),
    )


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection (v1 and v1alpha) for the given services on ``server``."""
    servicer = ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=_Response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(name, {_METHOD: handler}) for name in (V1, V1ALPHA)]
    )
