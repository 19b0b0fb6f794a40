"""Server interceptors shared by every service.

:class:`ErrorMappingInterceptor` is the one place where exceptions become gRPC
statuses: a :class:`~cloudburst.errors.CloudburstError` is sent with its code,
message and a ``google.rpc.ErrorInfo`` detail; anything else is a bug, logged
with its traceback and sent as a generic ``INTERNAL``. A request (or a frame of
a request stream) that is not a valid message is ``INVALID_ARGUMENT``: gRPC
itself would report a failed deserialization as ``INTERNAL``.

:class:`ProtocolInterceptor` refuses a caller that speaks another version of
the wire protocol (see :mod:`cloudburst.protocol`) before anything else runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cloudburst import protocol
from cloudburst.errors import (
    DOMAIN,
    CloudburstError,
    InvalidArgumentError,
    NoExecutorError,
    ProtocolMismatchError,
    UnavailableError,
)

logger = logging.getLogger(__name__)

#: Seconds a client should wait before retrying an UNAVAILABLE error.
RETRY_DELAY_SECONDS = 1

#: How long a refused stream waits for its caller's first frame before it ends.
_FIRST_FRAME_SECONDS = 1.0


#: Bounds on what an error sends, so its status always fits in gRPC's trailing metadata.
MAX_MESSAGE_CHARS = 2048
MAX_METADATA_ENTRIES = 16
MAX_METADATA_VALUE_CHARS = 256


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more)"


def error_to_status(error: CloudburstError) -> status_pb2.Status:
    """Build the ``google.rpc.Status`` of a cloudburst error, with ErrorInfo (and RetryInfo).

    The message and metadata are clipped (see the bounds above): an error
    naming many things must still reach the caller.
    """
    metadata = {
        _clip(key, 64): _clip(value, MAX_METADATA_VALUE_CHARS)
        for key, value in list(error.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if isinstance(error, UnavailableError | NoExecutorError):
        retry = any_pb2.Any()
        retry.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=RETRY_DELAY_SECONDS)
            )
        )
        details.append(retry)
    return status_pb2.Status(
        code=error.code.value[0],
        message=_clip(error.message, MAX_MESSAGE_CHARS),
        details=details,
    )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, CloudburstError):
        status = rpc_status.to_status(error_to_status(exc))
        await context.abort(status.code, status.details, status.trailing_metadata)
    logger.exception("internal error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, "internal error; the details are in the service's log"
    )


class RefusedFrame:
    """Stands for a frame of a request stream that authorization refused on its own.

    On a stream that answers frame by frame (``KvsService.StreamOps``), one
    refused frame is answered with its error, and the stream goes on serving
    the others: the servicer receives this in the frame's place.
    """

    __slots__ = ("error", "frame")

    def __init__(self, frame: Any, error: CloudburstError) -> None:
        """Record the refused frame and the error to answer it with."""
        self.frame = frame
        self.error = error


class _Malformed:
    """Stands for a request that could not be parsed, so the servicer side can refuse it."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self, what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{what} is not a valid message: {self.problem}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns :class:`_Malformed` instead of raising."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError
            return _Malformed(f"{type(exc).__name__}: {str(exc)[:200]}")

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise request.error("the request")
    return request


async def _checked_frames(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            raise request.error("a frame of the request stream")
        yield request


def _wrap_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    streaming_request: bool = False,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if streaming_request:
                request = _checked_frames(request)
            else:
                _checked(request)
            return await behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return wrapped


def _wrap_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any],
    streaming_request: bool = False,
) -> Any:
    """Wrap a streaming handler: an async generator, or a coroutine that writes itself.

    gRPC tells the two apart by their function type, so each keeps its own.
    """
    if inspect.iscoroutinefunction(behavior):
        return _wrap_unary(behavior, streaming_request)
    return _wrap_generator(behavior, streaming_request)


def _wrap_generator(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
    streaming_request: bool = False,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            if streaming_request:
                request = _checked_frames(request)
            else:
                _checked(request)
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return wrapped


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises grpc.aio.AbortError; it must pass through untouched.
    return isinstance(exc, grpc.aio.AbortError)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by servicers into gRPC statuses (all four RPC shapes)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Wrap the handler's behaviour so raised errors become statuses."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, streaming_request=True),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, streaming_request=True),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class ProtocolInterceptor(grpc.aio.ServerInterceptor):
    """Refuses callers that speak another version of the wire protocol (another release).

    The caller's version travels in its ``user-agent`` (see :mod:`cloudburst.protocol`);
    it is read once per call or stream, when it opens, never per message. A
    caller that names no version is served. A refusal is ``FAILED_PRECONDITION``
    with reason ``PROTOCOL_MISMATCH`` and both versions in its ``ErrorInfo``,
    logged once per peer address and version.
    """

    def __init__(self, role: str, version: int | None = None) -> None:
        """Speak ``version`` (this process's, by default) as ``role`` (e.g. "scheduler")."""
        self.role = role
        self.version = protocol.protocol_version() if version is None else version
        self._logged: set[tuple[str, int]] = set()

    def _caller_version(self, details: grpc.HandlerCallDetails) -> int | None:
        for key, value in details.invocation_metadata or ():
            if key == "user-agent":
                return protocol.version_in(value if isinstance(value, str) else value.decode())
        return None

    def _refusal(self, method: str, caller: int, streaming: bool) -> Callable[..., Awaitable[None]]:
        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if streaming:
                # Ending a stream while its caller writes a frame loses the status at the
                # caller (grpc/grpc#36066: it reads INTERNAL): take its first frame first.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_FIRST_FRAME_SECONDS):
                        await anext(aiter(request), None)
            peer = context.peer() or "an unknown address"
            error = ProtocolMismatchError(
                protocol.mismatch_message(
                    f"this {self.role}", self.version, f"the caller at {peer}", caller
                ),
                {
                    protocol.SERVER_KEY: str(self.version),
                    protocol.CLIENT_KEY: str(caller),
                    protocol.ROLE_KEY: self.role,
                },
            )
            host = peer.rsplit(":", 1)[0]
            if (host, caller) not in self._logged and len(self._logged) < 1024:
                self._logged.add((host, caller))
                logger.error("refused %s: %s", method, error)
            status = rpc_status.to_status(error_to_status(error))
            await context.abort(status.code, status.details, status.trailing_metadata)

        return refuse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Pass the call on unchanged, unless its caller speaks another version."""
        caller = self._caller_version(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None or caller is None or caller == self.version:
            return handler
        streaming = bool(handler.stream_unary or handler.stream_stream)
        refuse = self._refusal(handler_call_details.method, caller, streaming)
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
        return grpc.stream_stream_rpc_method_handler(refuse, **serializers)


__all__ = ["ErrorMappingInterceptor", "ProtocolInterceptor", "RefusedFrame", "error_to_status"]
