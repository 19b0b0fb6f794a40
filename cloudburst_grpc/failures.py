"""How the runtime reports what went wrong to callers: user failures and runtime errors.

A user function that raises is not an RPC error: its exception becomes a
``Failure`` (:func:`failure_from_exception`), answered in an outcome or stored
as a ``SERIALIZER_FAILURE`` value (:func:`failure_value`). A runtime error
answered on a stream becomes a ``CallError`` (:func:`error_to_call_error`).
The SDK reads all three back (:func:`cloudburst.serialization.deserialize`,
:func:`cloudburst.rpc.error_from_call_error`).
"""

from __future__ import annotations

import traceback

from cloudburst.errors import CloudburstError
from cloudburst.rpc import reason_name
from cloudburst.serialization import RUNTIME_ERROR_PREFIX
from cloudburst.v1 import error_pb2, execution_pb2, value_pb2


def failure_from_exception(exc: BaseException, function_name: str) -> value_pb2.Failure:
    """Describe an exception raised by user code."""
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return value_pb2.Failure(
        type=name,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        function_name=function_name,
    )


def runtime_failure(reason: str, message: str) -> value_pb2.Failure:
    """Describe a runtime error (by its ErrorInfo reason) as a failure, for storing as a result.

    The SDK raises it as the error class of ``reason``, not as a remote function error.
    """
    return value_pb2.Failure(type=f"{RUNTIME_ERROR_PREFIX}{reason}", message=message)


def failure_value(failure: value_pb2.Failure) -> value_pb2.Value:
    """Wrap a failure as a storable ``Value``."""
    return value_pb2.Value(
        data=failure.SerializeToString(), serializer=value_pb2.SERIALIZER_FAILURE
    )


def error_to_call_error(error: CloudburstError) -> error_pb2.CallError:
    """Describe a cloudburst exception for a stream answer."""
    try:
        reason = error_pb2.ErrorReason.Value(f"ERROR_REASON_{error.reason}")
    except ValueError:
        reason = error_pb2.ERROR_REASON_UNSPECIFIED
    return error_pb2.CallError(
        code=error.code.value[0], message=error.message, reason=reason, metadata=error.metadata
    )


def outcome_value(outcome: execution_pb2.Outcome) -> value_pb2.Value:
    """The value stored in the KVS for an outcome: the value, or the failure as a failure value."""
    kind = outcome.WhichOneof("result")
    if kind == "value":
        return outcome.value
    if kind == "failure":
        return failure_value(outcome.failure)
    error = outcome.error
    reason = reason_name(error.reason)
    return failure_value(runtime_failure(reason, error.message))
