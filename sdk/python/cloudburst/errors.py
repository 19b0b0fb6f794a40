"""The exception tree shared by the SDK and the services.

Every error a user can cause has a class here. Each declares the gRPC status
code and the ``cloudburst.v1.ErrorReason`` it travels as; servers raise these
classes and an interceptor turns them into a ``google.rpc.Status`` with an
``ErrorInfo`` detail, and the SDK turns that status back into the same class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc

DOMAIN = "cloudburst.v1"


class CloudburstError(Exception):
    """Base of every error raised by cloudburst.

    Attributes:
        message: What was wrong and what to do about it.
        metadata: The offending identifiers (function, key, limit ...).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason: ClassVar[str] = "UNSPECIFIED"

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return self.message


class NotFoundError(CloudburstError):
    """Something named does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FunctionNotFoundError(NotFoundError):
    """No function is registered under the name."""

    reason = "FUNCTION_NOT_FOUND"


class DagNotFoundError(NotFoundError):
    """No DAG is registered under the name."""

    reason = "DAG_NOT_FOUND"


class KeyNotFoundError(NotFoundError):
    """The KVS key does not exist."""

    reason = "KEY_NOT_FOUND"


class MailboxNotFoundError(NotFoundError):
    """No mailbox ever had the id, or it is not a mailbox id.

    (A send to a mailbox whose function has finished is dropped and returns
    False instead; see docs/porting.md.)
    """

    reason = "MAILBOX_NOT_FOUND"


class AlreadyExistsError(CloudburstError):
    """A name is already taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class DagAlreadyExistsError(AlreadyExistsError):
    """A DAG with the name is already registered."""

    reason = "DAG_ALREADY_EXISTS"


class InvalidArgumentError(CloudburstError, ValueError):
    """A request is malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class InvalidDagError(InvalidArgumentError):
    """A DAG is malformed: unknown function, cycle, several sinks, unconnected function."""

    reason = "INVALID_DAG"


class SerializationError(InvalidArgumentError, TypeError):
    """A value could not be serialized or deserialized."""

    reason = "SERIALIZATION_FAILED"


class NotSupportedError(CloudburstError, NotImplementedError):
    """An argument of the original Cloudburst API that this implementation does not offer.

    Raised in the caller, before anything is sent, and naming the argument,
    so that a ported program fails clearly instead of running differently.
    """

    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPreconditionError(CloudburstError):
    """The system is not in a state that allows the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LatticeTypeMismatchError(FailedPreconditionError):
    """A put merges a lattice of another kind than the one stored."""

    reason = "LATTICE_TYPE_MISMATCH"


class FunctionInUseError(FailedPreconditionError):
    """A function cannot be deleted while a DAG uses it."""

    reason = "FUNCTION_IN_USE"


class ProtocolMismatchError(FailedPreconditionError):
    """The peer speaks another version of the wire protocol (another release).

    The metadata holds both versions (``server_protocol``, ``client_protocol``);
    the message says what to do: run one release across the deployment.
    """

    reason = "PROTOCOL_MISMATCH"


class ResourceExhaustedError(CloudburstError):
    """A limit was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PayloadTooLargeError(ResourceExhaustedError):
    """A value is larger than the configured limit."""

    reason = "PAYLOAD_TOO_LARGE"


class QueueFullError(ResourceExhaustedError):
    """A queue is full; retry later."""

    reason = "QUEUE_FULL"


class UnavailableError(CloudburstError):
    """A service or peer cannot be reached; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "PEER_UNAVAILABLE"


class NoExecutorError(UnavailableError):
    """No executor is available to run the function."""

    reason = "NO_EXECUTOR"


class AnswerLostError(UnavailableError):
    """The call ran, but its answer was lost with the connection to the executor that sent it.

    Not retried on its own: running the call again may not be safe.
    """

    reason = "ANSWER_LOST"


class UnauthenticatedError(CloudburstError):
    """The caller showed no valid credentials (token or client certificate)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(CloudburstError):
    """The caller's role may not do this; the message names the role needed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class CloudburstTimeoutError(CloudburstError, TimeoutError):
    """A deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class InternalError(CloudburstError):
    """A bug in a service; the details are in that service's log."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class RemoteFunctionError(CloudburstError):
    """A user function raised; carries the remote exception's type, message and traceback.

    Attributes:
        remote_type: The qualified name of the remote exception's type.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: The traceback formatted where it was raised.
        function_name: The function that raised.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str,
        function_name: str = "",
    ) -> None:
        where = f" in function {function_name!r}" if function_name else ""
        super().__init__(
            f"{remote_type}: {remote_message} (raised{where}; remote traceback:\n"
            f"{remote_traceback.rstrip()}\n)",
            {"function": function_name, "type": remote_type},
        )
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.function_name = function_name


_BY_REASON: dict[str, type[CloudburstError]] = {}
_BY_CODE: dict[grpc.StatusCode, type[CloudburstError]] = {}


def _register(cls: type[CloudburstError]) -> None:
    for sub in cls.__subclasses__():
        # RemoteFunctionError is built from a Failure, never from a status.
        if sub is not RemoteFunctionError:
            if sub.reason != "UNSPECIFIED":
                _BY_REASON.setdefault(sub.reason, sub)
            _BY_CODE.setdefault(sub.code, sub)
        _register(sub)


_register(CloudburstError)
# Generic classes win over their first-registered subclasses for a bare code.
_BY_CODE[grpc.StatusCode.UNKNOWN] = CloudburstError
for _generic in (
    NotFoundError,
    AlreadyExistsError,
    InvalidArgumentError,
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
):
    _BY_CODE[_generic.code] = _generic


def error_class(reason: str | None, code: grpc.StatusCode) -> type[CloudburstError]:
    """Return the exception class for a reason, falling back to the status code."""
    if reason and reason in _BY_REASON:
        return _BY_REASON[reason]
    return _BY_CODE.get(code, CloudburstError)
