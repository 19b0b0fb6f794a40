"""Turning gRPC errors back into cloudburst exceptions on the client side."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from cloudburst.errors import (
    DOMAIN,
    CloudburstError,
    CloudburstTimeoutError,
    PayloadTooLargeError,
    UnavailableError,
    error_class,
)
from cloudburst.v1 import error_pb2

T = TypeVar("T")

_DETAILS_KEY = "grpc-status-details-bin"

#: What an UNAVAILABLE error without details of its own asks the user to check.
UNAVAILABLE_HINT = "check that `cbgrpc serve` (or the scheduler) is running at the address given"


def new_request_id() -> str:
    """A random id for one write or delete (``request_id``), sent with each of its attempts.

    A KVS that remembers request ids does not apply again a retry of a write or
    delete it already applied (see docs/protocol.md, "Objects at the KVS itself").
    """
    return os.urandom(8).hex()


def error_from_rpc(exc: grpc.RpcError, *, what: str = "request") -> CloudburstError:
    """Return the cloudburst exception that a failed RPC carries.

    The ``ErrorInfo`` detail, when present, picks the class; otherwise the
    status code does, with a message that says what to check.
    """
    # grpc.RpcError declares none of these; every error a call raises implements them.
    rpc: Any = exc
    code: grpc.StatusCode = rpc.code()
    details: str = rpc.details() or ""
    reason: str | None = None
    metadata: dict[str, str] = {}
    trailing = rpc.trailing_metadata() or ()
    for key, value in trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    if info.domain == DOMAIN:
                        reason = info.reason
                        metadata = dict(info.metadata)
    if reason is None:
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"{what} failed: the service is unavailable ({details}); {UNAVAILABLE_HINT}"
            return UnavailableError(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CloudburstTimeoutError(f"{what} did not finish before its deadline")
        if code == grpc.StatusCode.UNIMPLEMENTED and details == "Method not found!":
            # gRPC's own answer for a method the server does not serve.
            return error_class(None, code)(
                f"{what} failed: the server does not serve it ({details}); check that the "
                "address is a cloudburst scheduler or `cbgrpc serve` of this SDK's release, "
                "not a KVS or an executor"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # gRPC names the side whose limit refused the message ("CLIENT: ..." for this one).
            whose = "this process" if "CLIENT:" in (details or "") else "the server"
            return PayloadTooLargeError(
                f"{what} was refused by the transport: {details}; the message is larger "
                f"than {whose} accepts (see max_payload_bytes)"
            )
    cls = error_class(reason, code)
    error = cls(details or f"{what} failed with {code.name}", metadata)
    return error


def error_from_call_error(error: error_pb2.CallError) -> CloudburstError:
    """Return the cloudburst exception of an error answered on a stream."""
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return error_class(reason_name(error.reason), code)(error.message, dict(error.metadata))


def reason_name(reason: int) -> str:
    """The ErrorInfo reason of an ErrorReason number; "UNSPECIFIED" for one this client lacks."""
    try:
        return error_pb2.ErrorReason.Name(reason).removeprefix("ERROR_REASON_")  # type: ignore[arg-type]
    except ValueError:
        return "UNSPECIFIED"


_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def call(what: str, rpc: Callable[[], Awaitable[T]]) -> T:
    """Await an RPC, raising its error as a cloudburst exception."""
    try:
        return await rpc()
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, what=what) from None
