"""Value conversion, failures and LWW clocks (cloudburst.serialization), no I/O."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import cloudpickle
import pytest

from cloudburst import serialization
from cloudburst.errors import (
    CloudburstError,
    FunctionNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    RemoteFunctionError,
    SerializationError,
)
from cloudburst.serialization import LwwClock, deserialize, serialize
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_grpc.failures import failure_value


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class CustomError(Exception):
    pass


# --- round trips --------------------------------------------------------------------------


def test_bytes_travel_as_bytes_serializer() -> None:
    value = serialize(b"\x00\xffraw")
    assert value.serializer == value_pb2.SERIALIZER_BYTES
    assert value.data == b"\x00\xffraw"
    assert deserialize(value) == b"\x00\xffraw"
    assert type(deserialize(value)) is bytes


def test_str_travels_as_utf8_string_serializer() -> None:
    value = serialize("héllo ✓")
    assert value.serializer == value_pb2.SERIALIZER_STRING
    assert value.data == "héllo ✓".encode()
    assert deserialize(value) == "héllo ✓"


def test_empty_bytes_and_str_keep_their_types() -> None:
    assert deserialize(serialize(b"")) == b""
    assert deserialize(serialize("")) == ""


@pytest.mark.parametrize(
    "obj",
    [0, -7, 3.5, None, True, [1, "a", b"b"], {"k": (1, 2)}, {1, 2}, Point(1, 2), bytearray(b"x")],
)
def test_other_objects_are_cloudpickled_and_round_trip(obj: object) -> None:
    value = serialize(obj)
    assert value.serializer == value_pb2.SERIALIZER_CLOUDPICKLE
    restored = deserialize(value)
    assert restored == obj
    assert type(restored) is type(obj)


def test_lambda_round_trips() -> None:
    restored = deserialize(serialize(lambda x: x * 3))
    assert restored(4) == 12


def test_closure_round_trips_with_captured_state() -> None:
    def make_adder(n: int) -> Callable[[int], int]:
        def add(x: int) -> int:
            return x + n

        return add

    restored = deserialize(serialize(make_adder(10)))
    assert restored(5) == 15


def test_json_values_deserialize() -> None:
    value = value_pb2.Value(
        data=b'{"a": [1, 2.5, null, true]}', serializer=value_pb2.SERIALIZER_JSON
    )
    assert deserialize(value) == {"a": [1, 2.5, None, True]}


def test_malformed_json_raises_serialization_error() -> None:
    value = value_pb2.Value(data=b"{not json", serializer=value_pb2.SERIALIZER_JSON)
    with pytest.raises(SerializationError, match="cannot deserialize a SERIALIZER_JSON value"):
        deserialize(value)


def test_garbage_pickle_raises_serialization_error() -> None:
    value = value_pb2.Value(data=b"not a pickle", serializer=value_pb2.SERIALIZER_CLOUDPICKLE)
    with pytest.raises(SerializationError, match="SERIALIZER_CLOUDPICKLE"):
        deserialize(value)


def test_unspecified_serializer_raises_serialization_error() -> None:
    with pytest.raises(SerializationError, match="unknown serializer 0"):
        deserialize(value_pb2.Value(data=b"x"))


# --- errors on serialize ------------------------------------------------------------------


def test_payload_over_limit_raises_with_the_limit_in_the_message() -> None:
    with pytest.raises(PayloadTooLargeError, match="over the limit of 10 bytes") as info:
        serialize(b"x" * 11, what="argument 1 of 'f'", limit=10)
    assert "argument 1 of 'f' is 11 bytes" in str(info.value)
    assert info.value.metadata == {"what": "argument 1 of 'f'", "size": "11", "limit": "10"}


def test_payload_at_the_limit_is_accepted() -> None:
    assert serialize("y" * 10, limit=10).data == b"y" * 10


def test_limit_applies_to_pickled_size() -> None:
    with pytest.raises(PayloadTooLargeError):
        serialize(list(range(1000)), limit=100)


def test_unpicklable_object_raises_serialization_error_naming_what() -> None:
    with pytest.raises(SerializationError, match="cannot serialize argument 2 of 'g'") as info:
        serialize(threading.Lock(), what="argument 2 of 'g'")
    assert "lock" in str(info.value)
    assert info.value.metadata["what"] == "argument 2 of 'g'"
    assert isinstance(info.value, TypeError)


# --- failures -----------------------------------------------------------------------------


def test_runtime_failure_without_traceback_decodes_to_its_own_class() -> None:
    failure = value_pb2.Failure(
        type="cloudburst.errors.FUNCTION_NOT_FOUND", message="function 'gone' is not registered"
    )
    error = serialization.failure_to_error(failure)
    assert type(error) is FunctionNotFoundError
    assert error.message == "function 'gone' is not registered"
    with pytest.raises(FunctionNotFoundError):
        deserialize(failure_value(failure))


def test_runtime_failure_of_other_reason_decodes_to_its_class() -> None:
    failure = value_pb2.Failure(type="cloudburst.errors.QUEUE_FULL", message="full")
    assert type(serialization.failure_to_error(failure)) is QueueFullError


def test_runtime_prefixed_failure_with_traceback_stays_a_remote_function_error() -> None:
    failure = value_pb2.Failure(
        type="cloudburst.errors.FUNCTION_NOT_FOUND", message="m", traceback="Traceback ..."
    )
    assert type(serialization.failure_to_error(failure)) is RemoteFunctionError


def test_runtime_failure_of_unspecified_reason_decodes_to_a_cloudburst_error() -> None:
    # cloudburst_grpc.failures.outcome_value stores error outcomes like this; a CallError whose
    # reason is ERROR_REASON_UNSPECIFIED becomes type "cloudburst.errors.UNSPECIFIED".
    failure = value_pb2.Failure(type="cloudburst.errors.UNSPECIFIED", message="upstream failed")
    error = serialization.failure_to_error(failure)
    assert isinstance(error, CloudburstError)
    assert "upstream failed" in str(error)


# --- LWW clock and lattices ---------------------------------------------------------------


def test_lww_clock_strictly_increases_when_time_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 1_000)
    clock = LwwClock("w")
    stamps = [clock.now().time_ns for _ in range(5)]
    assert stamps == [1_000, 1_001, 1_002, 1_003, 1_004]


def test_lww_clock_strictly_increases_when_time_goes_backwards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter([5_000, 4_000, 3_000, 9_000, 1])
    monkeypatch.setattr(time, "time_ns", lambda: next(readings))
    clock = LwwClock("w")
    stamps = [clock.now().time_ns for _ in range(5)]
    assert stamps == [5_000, 5_001, 5_002, 9_000, 9_001]


def test_lww_clock_uses_its_writer_id() -> None:
    assert LwwClock("writer-1").now().writer_id == "writer-1"
    first, second = LwwClock(), LwwClock()
    assert first.writer_id and second.writer_id
    assert first.writer_id != second.writer_id


def test_lww_clock_is_strictly_increasing_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 42)
    clock = LwwClock("w")
    stamps: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        mine = [clock.now().time_ns for _ in range(200)]
        with lock:
            stamps.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(stamps) == list(range(42, 42 + 800))


def test_lattice_value_of_lww_lattice() -> None:
    lattice = serialization.lww(serialize({"n": 1}), LwwClock("w"))
    assert lattice.WhichOneof("kind") == "lww"
    assert lattice.lww.timestamp.writer_id == "w"
    assert serialization.lattice_value(lattice) == {"n": 1}


def test_lattice_value_of_set_lattice_is_a_list_of_values() -> None:
    lattice = lattice_pb2.Lattice(
        set=lattice_pb2.SetLattice(values=[serialize("a"), serialize(b"b"), serialize(3)])
    )
    assert serialization.lattice_value(lattice) == ["a", b"b", 3]


def test_lattice_value_of_empty_lattice_is_none() -> None:
    assert serialization.lattice_value(lattice_pb2.Lattice()) is None


def test_lattice_value_of_stored_failure_raises() -> None:
    failure = value_pb2.Failure(type="ZeroDivisionError", message="division by zero", traceback="t")
    lattice = serialization.lww(failure_value(failure), LwwClock("w"))
    with pytest.raises(RemoteFunctionError, match="ZeroDivisionError: division by zero"):
        serialization.lattice_value(lattice)


@pytest.mark.parametrize("scalar", [0, -7, 2**70, 1.5, float("inf"), True, False, None, 1 + 2j])
def test_scalars_are_pickled_exactly_as_cloudpickle_would(scalar: object) -> None:
    value = serialize(scalar, what="a scalar", limit=1 << 20)
    assert value.serializer == value_pb2.SERIALIZER_CLOUDPICKLE
    assert value.data == cloudpickle.dumps(scalar)
    restored = deserialize(value)
    assert restored == scalar and type(restored) is type(scalar)


# --- serializers a caller accepts ----------------------------------------------------------

JSON = value_pb2.SERIALIZER_JSON
STRING = value_pb2.SERIALIZER_STRING
BYTES = value_pb2.SERIALIZER_BYTES
PICKLE = value_pb2.SERIALIZER_CLOUDPICKLE


@pytest.mark.parametrize(
    ("obj", "data"),
    [
        (None, b"null"),
        (True, b"true"),
        (-3, b"-3"),
        (2**70, b"1180591620717411303424"),
        (0.5, b"0.5"),
        ("é", '"é"'.encode()),
        ([1, [2, {"k": None}]], b'[1,[2,{"k":null}]]'),
        ((1, "a"), b'[1,"a"]'),
        ({}, b"{}"),
    ],
)
def test_json_carries_json_representable_values(obj: object, data: bytes) -> None:
    value = serialization.serialize_as(obj, [JSON])
    assert value.serializer == JSON
    assert value.data == data
    back = deserialize(value)
    assert back == (list(obj) if isinstance(obj, tuple) else obj)


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        ({1, 2}, "the value is of type set"),
        ({"a": [1, b"x"]}, "the value['a'][1] is of type bytes"),
        ({1: "x"}, "has a key of type int"),
        (float("inf"), "JSON has no number"),
        (Point(1, 2), "is of type Point"),
        (1 + 2j, "is of type complex"),
    ],
)
def test_a_value_json_cannot_carry_raises_naming_where(obj: object, says: str) -> None:
    with pytest.raises(SerializationError) as caught:
        serialization.serialize_as(obj, [JSON], what="the result of 'f'")
    assert says in str(caught.value)
    assert "the result of 'f'" in str(caught.value)
    assert caught.value.reason == "SERIALIZATION_FAILED"


def test_the_first_accepted_serializer_that_fits_wins() -> None:
    assert serialization.serialize_as("s", [JSON, STRING]).serializer == JSON
    assert serialization.serialize_as("s", [STRING, JSON]).serializer == STRING
    assert serialization.serialize_as(b"b", [STRING, BYTES]).serializer == BYTES
    assert serialization.serialize_as({1}, [JSON, PICKLE]).serializer == PICKLE
    assert deserialize(serialization.serialize_as("s", [PICKLE])) == "s"
    with pytest.raises(SerializationError, match=r"\(STRING, BYTES\)"):
        serialization.serialize_as(1, [STRING, BYTES])


def test_encode_for_keeps_accepted_values_and_failures_as_they_are() -> None:
    pickled = serialize(Point(1, 2))
    assert serialization.encode_for(pickled, []) is pickled
    assert serialization.encode_for(pickled, [PICKLE]) is pickled
    failure = failure_value(value_pb2.Failure(type="ValueError"))
    assert serialization.encode_for(failure, [JSON]) is failure
    number = serialize(5)
    assert serialization.encode_for(number, [JSON]).data == b"5"
    with pytest.raises(PayloadTooLargeError):
        serialization.encode_for(serialize(list(range(100))), [JSON], what="v", limit=10)


@pytest.mark.parametrize(
    "bad", [value_pb2.SERIALIZER_UNSPECIFIED, value_pb2.SERIALIZER_FAILURE, 99]
)
def test_accept_lists_only_result_serializers(bad: int) -> None:
    serialization.check_accept([JSON, STRING, BYTES, PICKLE])
    with pytest.raises(CloudburstError, match="accept_serializers lists"):
        serialization.check_accept([JSON, bad])  # type: ignore[list-item]


def test_json_and_string_values_read_as_natural_python_values() -> None:
    assert deserialize(value_pb2.Value(data=b'{"a": [1, 2.5]}', serializer=JSON)) == {"a": [1, 2.5]}
    assert deserialize(value_pb2.Value(data="é".encode(), serializer=STRING)) == "é"
    assert deserialize(value_pb2.Value(data=b"\x00", serializer=BYTES)) == b"\x00"
