"""Failures as the runtime writes them (cloudburst_grpc.failures), read back by the SDK."""

from __future__ import annotations

import pytest

from cloudburst import errors
from cloudburst.errors import FunctionNotFoundError, QueueFullError, RemoteFunctionError
from cloudburst.serialization import deserialize, failure_to_error
from cloudburst.v1 import value_pb2
from cloudburst_grpc import failures
from cloudburst_grpc.failures import failure_from_exception, failure_value


class CustomError(Exception):
    pass


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_failure_of_builtin_exception_round_trips_as_remote_function_error() -> None:
    failure = failure_from_exception(_raised(ValueError("bad input")), "parse")
    assert failure.type == "ValueError"
    assert failure.function_name == "parse"
    assert "Traceback" in failure.traceback
    with pytest.raises(RemoteFunctionError) as info:
        deserialize(failure_value(failure))
    error = info.value
    assert error.remote_type == "ValueError"
    assert error.remote_message == "bad input"
    assert error.remote_traceback == failure.traceback
    assert "ValueError: bad input" in error.remote_traceback
    assert error.function_name == "parse"
    assert "in function 'parse'" in str(error)
    assert error.metadata == {"function": "parse", "type": "ValueError"}


def test_failure_of_custom_exception_has_a_qualified_type() -> None:
    failure = failure_from_exception(_raised(CustomError("boom")), "f")
    assert failure.type == f"{__name__}.CustomError"
    assert failure.message == "boom"


def test_failure_value_uses_the_failure_serializer() -> None:
    failure = value_pb2.Failure(type="KeyError", message="'k'", traceback="tb")
    value = failure_value(failure)
    assert value.serializer == value_pb2.SERIALIZER_FAILURE
    assert value_pb2.Failure.FromString(value.data) == failure


@pytest.mark.parametrize(
    ("reason", "cls"),
    [("FUNCTION_NOT_FOUND", FunctionNotFoundError), ("QUEUE_FULL", QueueFullError)],
)
def test_runtime_failure_is_read_back_as_its_error_class(
    reason: str, cls: type[errors.CloudburstError]
) -> None:
    failure = failures.runtime_failure(reason, "it went wrong")
    error = failure_to_error(failure)
    assert type(error) is cls
    assert error.message == "it went wrong"
    with pytest.raises(cls):
        deserialize(failure_value(failure))
