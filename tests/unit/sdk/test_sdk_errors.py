"""Error classes and their wire forms (cloudburst.errors, cloudburst.rpc, the runtime's writers)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cloudburst import errors, rpc
from cloudburst.errors import CloudburstError
from cloudburst.v1 import error_pb2
from cloudburst_grpc import interceptors
from cloudburst_grpc.failures import error_to_call_error
from cloudburst_grpc.interceptors import error_to_status

Metadata = tuple[tuple[str, str | bytes], ...]


class FakeRpcError(grpc.RpcError):
    def __init__(
        self, code: grpc.StatusCode, details: str | None, trailing: Metadata | None
    ) -> None:
        super().__init__()
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details

    # The stubs type this as a tuple of `_Metadatum` objects; grpc really returns
    # (key, value) pairs (or None), which is what rpc.error_from_rpc reads.
    def trailing_metadata(self) -> Metadata | None:  # type: ignore[override]
        return self._trailing


def _rpc_error_of(error: CloudburstError) -> FakeRpcError:
    status = rpc_status.to_status(error_to_status(error))
    return FakeRpcError(status.code, status.details, tuple(status.trailing_metadata))


def _details(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    info = error_details_pb2.ErrorInfo()
    names = [d.TypeName() for d in status.details]
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    return info, names


# Every class that owns a reason.
REASONED: list[type[CloudburstError]] = [
    errors.FunctionNotFoundError,
    errors.DagNotFoundError,
    errors.KeyNotFoundError,
    errors.DagAlreadyExistsError,
    errors.InvalidArgumentError,
    errors.InvalidDagError,
    errors.SerializationError,
    errors.LatticeTypeMismatchError,
    errors.FunctionInUseError,
    errors.PayloadTooLargeError,
    errors.QueueFullError,
    errors.UnavailableError,
    errors.NoExecutorError,
    errors.AnswerLostError,
    errors.CloudburstTimeoutError,
    errors.InternalError,
]


# --- error_class --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", REASONED, ids=lambda c: c.__name__)
def test_error_class_maps_reason_to_class(cls: type[CloudburstError]) -> None:
    assert errors.error_class(cls.reason, grpc.StatusCode.UNKNOWN) is cls


def test_every_proto_reason_has_a_class() -> None:
    for name in error_pb2.ErrorReason.keys():
        reason = name.removeprefix("ERROR_REASON_")
        if reason == "UNSPECIFIED":
            continue
        assert errors.error_class(reason, grpc.StatusCode.OK).reason == reason


def test_reason_wins_over_code() -> None:
    cls = errors.error_class("QUEUE_FULL", grpc.StatusCode.NOT_FOUND)
    assert cls is errors.QueueFullError


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.CloudburstTimeoutError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.CANCELLED, errors.CloudburstError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
    ],
)
def test_error_class_falls_back_by_code(code: grpc.StatusCode, cls: type[CloudburstError]) -> None:
    assert errors.error_class(None, code) is cls
    assert errors.error_class("", code) is cls
    assert errors.error_class("NOT_A_REASON", code) is cls


def test_error_class_for_unknown_code_builds_from_message_and_metadata() -> None:
    cls = errors.error_class(None, grpc.StatusCode.UNKNOWN)
    error = cls("something broke", {"k": "v"})
    assert error.message == "something broke"
    assert error.metadata == {"k": "v"}


def test_error_str_is_the_message_and_metadata_is_a_copy() -> None:
    source = {"function": "f"}
    error = errors.FunctionNotFoundError("no such function", source)
    source["function"] = "changed"
    assert str(error) == "no such function"
    assert error.metadata == {"function": "f"}
    assert errors.CloudburstError("m").metadata == {}


def test_error_hierarchy_lets_users_catch_builtin_kinds() -> None:
    assert issubclass(errors.InvalidDagError, ValueError)
    assert issubclass(errors.SerializationError, TypeError)
    assert issubclass(errors.CloudburstTimeoutError, TimeoutError)
    assert issubclass(errors.NoExecutorError, errors.UnavailableError)


# --- CallError round trip -----------------------------------------------------------------


@pytest.mark.parametrize("cls", REASONED, ids=lambda c: c.__name__)
def test_call_error_round_trips_class_message_and_metadata(cls: type[CloudburstError]) -> None:
    original = cls(f"{cls.__name__} happened; do something", {"function": "f", "key": "k"})
    wire = error_to_call_error(original)
    assert wire.code == cls.code.value[0]
    assert error_pb2.ErrorReason.Name(wire.reason) == f"ERROR_REASON_{cls.reason}"
    back = rpc.error_from_call_error(error_pb2.CallError.FromString(wire.SerializeToString()))
    assert type(back) is cls
    assert back.message == original.message
    assert back.metadata == original.metadata


def test_serialization_error_keeps_the_invalid_argument_code() -> None:
    wire = error_to_call_error(errors.SerializationError("bad"))
    assert wire.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    back = rpc.error_from_call_error(wire)
    assert type(back) is errors.SerializationError
    assert isinstance(back, errors.InvalidArgumentError)
    assert back.message == "bad"


def test_call_error_without_reason_falls_back_by_code() -> None:
    wire = error_pb2.CallError(code=grpc.StatusCode.NOT_FOUND.value[0], message="gone")
    back = rpc.error_from_call_error(wire)
    assert type(back) is errors.NotFoundError
    assert back.message == "gone"


def test_call_error_of_unspecified_reason_round_trips() -> None:
    original = errors.CloudburstError("generic failure", {"a": "b"})
    back = rpc.error_from_call_error(error_to_call_error(original))
    assert isinstance(back, CloudburstError)
    assert back.message == "generic failure"


def test_call_error_with_reason_from_a_newer_server_falls_back_by_code() -> None:
    wire = error_pb2.CallError(code=grpc.StatusCode.NOT_FOUND.value[0], message="m", reason=99)  # type: ignore[arg-type]
    back = rpc.error_from_call_error(wire)
    assert type(back) is errors.NotFoundError


# --- error_to_status ----------------------------------------------------------------------


def test_error_to_status_packs_error_info_with_domain_and_reason() -> None:
    error = errors.KeyNotFoundError("key 'k' does not exist", {"key": "k"})
    status = error_to_status(error)
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status.message == "key 'k' does not exist"
    info, names = _details(status)
    assert names == ["google.rpc.ErrorInfo"]
    assert info.domain == "cloudburst.v1" == errors.DOMAIN
    assert info.reason == "KEY_NOT_FOUND"
    assert dict(info.metadata) == {"key": "k"}


@pytest.mark.parametrize("cls", [errors.NoExecutorError, errors.UnavailableError])
def test_error_to_status_adds_retry_info_when_retrying_may_help(
    cls: type[CloudburstError],
) -> None:
    status = error_to_status(cls("no executor"))
    info, names = _details(status)
    assert info.reason == cls.reason
    assert names == ["google.rpc.ErrorInfo", "google.rpc.RetryInfo"]
    retry = error_details_pb2.RetryInfo()
    status.details[1].Unpack(retry)
    assert retry.retry_delay.seconds == interceptors.RETRY_DELAY_SECONDS > 0


def test_error_to_status_has_no_retry_info_for_permanent_errors() -> None:
    _, names = _details(error_to_status(errors.InvalidDagError("cycle")))
    assert names == ["google.rpc.ErrorInfo"]


# --- error_from_rpc -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", REASONED, ids=lambda c: c.__name__)
def test_error_from_rpc_round_trips_status_details(cls: type[CloudburstError]) -> None:
    original = cls("explained failure", {"dag": "d"})
    back = rpc.error_from_rpc(_rpc_error_of(original))
    assert type(back) is cls
    assert back.message == "explained failure"
    assert back.metadata == {"dag": "d"}
    assert back.reason == cls.reason


def test_error_from_rpc_status_details_win_over_code_fallbacks() -> None:
    # NoExecutorError travels as UNAVAILABLE, but its ErrorInfo must keep the subclass.
    back = rpc.error_from_rpc(_rpc_error_of(errors.NoExecutorError("none", {"function": "f"})))
    assert type(back) is errors.NoExecutorError
    assert back.metadata == {"function": "f"}


def test_error_from_rpc_ignores_error_info_of_another_domain() -> None:
    info = error_details_pb2.ErrorInfo(reason="FUNCTION_NOT_FOUND", domain="googleapis.com")
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="foreign")
    status.details.add().Pack(info)
    wire = rpc_status.to_status(status)
    back = rpc.error_from_rpc(FakeRpcError(wire.code, wire.details, tuple(wire.trailing_metadata)))
    assert type(back) is errors.NotFoundError
    assert back.message == "foreign"


def test_error_from_rpc_unavailable_without_details_says_what_to_check() -> None:
    exc = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", None)
    error = rpc.error_from_rpc(exc, what="registering 'f'")
    assert type(error) is errors.UnavailableError
    assert error.message.startswith("registering 'f' failed: the service is unavailable")
    assert "failed to connect to all addresses" in error.message
    assert "cbgrpc serve" in error.message


def test_error_from_rpc_deadline_without_details() -> None:
    exc = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", ())
    error = rpc.error_from_rpc(exc, what="calling 'slow'")
    assert type(error) is errors.CloudburstTimeoutError
    assert error.message == "calling 'slow' did not finish before its deadline"
    assert isinstance(error, TimeoutError)


def test_error_from_rpc_transport_resource_exhausted_is_payload_too_large() -> None:
    exc = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max", ())
    error = rpc.error_from_rpc(exc, what="put")
    assert type(error) is errors.PayloadTooLargeError
    assert "max_payload_bytes" in error.message
    assert "Received message larger than max" in error.message
    assert "than the server accepts" in error.message


def test_error_from_rpc_names_this_process_when_its_own_limit_refused() -> None:
    details = "CLIENT: Sent message larger than max (3145825 vs. 3145728)"
    exc = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details, ())
    error = rpc.error_from_rpc(exc, what="put")
    assert type(error) is errors.PayloadTooLargeError
    assert details in error.message
    assert "than this process accepts (see max_payload_bytes)" in error.message


def test_error_from_rpc_says_where_to_connect_for_a_method_the_server_lacks() -> None:
    exc = FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ())
    error = rpc.error_from_rpc(exc, what="registering 'incr'")
    assert type(error) is errors.NotSupportedError
    assert error.message.startswith("registering 'incr' failed: the server does not serve it")
    assert "a cloudburst scheduler or `cbgrpc serve`" in error.message
    # A service's own UNIMPLEMENTED keeps its words.
    exc = FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "StreamOps is served by the KVS", ())
    assert rpc.error_from_rpc(exc).message == "StreamOps is served by the KVS"


def test_error_from_rpc_other_code_without_details_uses_code_class() -> None:
    error = rpc.error_from_rpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, None, None), what="get")
    assert type(error) is errors.NotFoundError
    assert error.message == "get failed with NOT_FOUND"


def test_error_from_rpc_ignores_unrelated_trailing_metadata() -> None:
    exc = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, "bad", (("x-trace", "abc"), ("other-bin", b"\x00"))
    )
    error = rpc.error_from_rpc(exc)
    assert type(error) is errors.InvalidArgumentError
    assert error.message == "bad"
    assert error.metadata == {}


def test_error_from_rpc_unknown_status_without_details_is_a_cloudburst_error() -> None:
    exc = FakeRpcError(grpc.StatusCode.UNKNOWN, "Exception calling application: boom", ())
    error = rpc.error_from_rpc(exc)
    assert isinstance(error, CloudburstError)
    assert "boom" in error.message


def test_an_error_naming_many_things_stays_small_on_the_wire() -> None:
    names = ",".join(f"function-{i}" for i in range(10_000))
    metadata = {"functions": names, **{f"extra-{i}": "x" for i in range(100)}}
    error = errors.InvalidDagError(f"unknown: {names}", metadata)
    status = error_to_status(error)
    info, _ = _details(status)
    assert status.ByteSize() < 8192
    assert len(status.message) < 2100 and status.message.startswith("unknown: function-0,")
    assert info.metadata["functions"].startswith("function-0,function-1,")
    assert len(info.metadata) == interceptors.MAX_METADATA_ENTRIES
    # The client still gets the error's class and reason.
    assert isinstance(rpc.error_from_rpc(_rpc_error_of(error), what="x"), errors.InvalidDagError)
