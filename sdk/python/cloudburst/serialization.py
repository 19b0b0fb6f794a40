"""Conversion between Python values and ``cloudburst.v1.Value`` messages.

Bytes and strings travel as ``SERIALIZER_BYTES`` and ``SERIALIZER_STRING`` so
that clients in other languages can read and write them; everything else is
pickled with cloudpickle. A caller that cannot read pickles lists the
serializers it accepts, and :func:`encode_for` re-encodes a result for it
(JSON for None, bool, int, float, str, lists and string-keyed dicts). A
failure raised by user code is stored as ``SERIALIZER_FAILURE`` and raises
:class:`~cloudburst.errors.RemoteFunctionError` when read.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import cloudpickle
import grpc

from cloudburst.errors import (
    CloudburstError,
    InvalidArgumentError,
    PayloadTooLargeError,
    RemoteFunctionError,
    SerializationError,
    error_class,
)
from cloudburst.v1 import lattice_pb2, value_pb2

#: The type prefix of runtime errors stored as failures (a reason follows, e.g. ``QUEUE_FULL``).
RUNTIME_ERROR_PREFIX = "cloudburst.errors."
#: Types pickled the same by pickle and cloudpickle (no code, no classes of their own).
_SCALARS = frozenset({int, float, bool, complex, type(None)})
#: The default largest serialized value, in bytes (16 MiB).
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


def serialize(obj: Any, *, what: str = "value", limit: int | None = None) -> value_pb2.Value:
    """Serialize a Python value.

    Args:
        obj: The value.
        what: How to name the value in an error, e.g. ``"argument 1 of 'incr'"``.
        limit: The largest allowed size in bytes, or None for no check.

    Raises:
        SerializationError: The value cannot be pickled.
        PayloadTooLargeError: The serialized value is larger than ``limit``.
    """
    data, serializer = encode(obj, what=what)
    # Measured before it goes in: reading the bytes back out of the message would copy them.
    check_length(len(data), what=what, limit=limit)
    return value_pb2.Value(data=data, serializer=serializer)


def encode(obj: Any, *, what: str = "value") -> tuple[bytes, value_pb2.Serializer.ValueType]:
    """The bytes and serializer of a Python value (what :func:`serialize` wraps).

    Raises:
        SerializationError: The value cannot be pickled.
    """
    if isinstance(obj, bytes):
        return obj, value_pb2.SERIALIZER_BYTES
    if isinstance(obj, str):
        return obj.encode(), value_pb2.SERIALIZER_STRING
    if type(obj) in _SCALARS:
        # The same bytes cloudpickle writes, without its pickler's set-up (~1.3 us).
        data = pickle.dumps(obj, protocol=cloudpickle.DEFAULT_PROTOCOL)
        return data, value_pb2.SERIALIZER_CLOUDPICKLE
    try:
        data = cloudpickle.dumps(obj)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {what} of type {type(obj).__qualname__}: "
            f"{type(exc).__name__}: {exc}. Pass a value cloudpickle can pickle "
            "(no open sockets, locks, generators or similar).",
            {"what": what, "type": type(obj).__qualname__},
        ) from exc
    return data, value_pb2.SERIALIZER_CLOUDPICKLE


#: Serializers a caller may list as accepted for results.
RESULT_SERIALIZERS = frozenset(
    {
        value_pb2.SERIALIZER_CLOUDPICKLE,
        value_pb2.SERIALIZER_BYTES,
        value_pb2.SERIALIZER_STRING,
        value_pb2.SERIALIZER_JSON,
    }
)


def check_accept(accept: Sequence[value_pb2.Serializer.ValueType]) -> None:
    """Reject an accepted-serializers list that names no result serializer.

    Raises:
        InvalidArgumentError: An entry is unspecified, FAILURE (always accepted) or unknown.
    """
    for kind in accept:
        if kind not in RESULT_SERIALIZERS:
            known = kind in value_pb2.Serializer.values()
            name = value_pb2.Serializer.Name(kind) if known else str(kind)
            raise InvalidArgumentError(
                f"accept_serializers lists {name}; list only SERIALIZER_CLOUDPICKLE, "
                "SERIALIZER_BYTES, SERIALIZER_STRING or SERIALIZER_JSON (failures are always sent)",
                {"serializer": name},
            )


def encode_for(
    value: value_pb2.Value,
    accept: Sequence[value_pb2.Serializer.ValueType],
    *,
    what: str = "value",
    limit: int | None = None,
) -> value_pb2.Value:
    """Return ``value`` in a serializer the caller accepts (``accept``; empty accepts all).

    A value whose serializer is accepted, and any failure, is returned as it
    is; otherwise it is read and encoded with the first accepted serializer
    that can represent it.

    Raises:
        SerializationError: No accepted serializer can represent the value, or it cannot be read.
        PayloadTooLargeError: The re-encoded value is larger than ``limit``.
    """
    if not accept or value.serializer in accept or value.serializer == value_pb2.SERIALIZER_FAILURE:
        return value
    return serialize_as(deserialize(value), accept, what=what, limit=limit)


def serialize_as(
    obj: Any,
    accept: Sequence[value_pb2.Serializer.ValueType],
    *,
    what: str = "value",
    limit: int | None = None,
) -> value_pb2.Value:
    """Serialize ``obj`` with the first serializer of ``accept`` that can represent it.

    Raises:
        SerializationError: None of them can.
        PayloadTooLargeError: The serialized value is larger than ``limit``.
    """
    reasons: list[str] = []
    for kind in accept:
        if kind == value_pb2.SERIALIZER_CLOUDPICKLE:
            value = serialize(obj, what=what)
            if value.serializer != value_pb2.SERIALIZER_CLOUDPICKLE:
                value = value_pb2.Value(
                    data=cloudpickle.dumps(obj), serializer=value_pb2.SERIALIZER_CLOUDPICKLE
                )
            check_size(value, what=what, limit=limit)
            return value
        if kind == value_pb2.SERIALIZER_BYTES:
            if isinstance(obj, bytes | bytearray):
                value = value_pb2.Value(data=bytes(obj), serializer=kind)
                check_size(value, what=what, limit=limit)
                return value
            reasons.append("BYTES carries only bytes")
        elif kind == value_pb2.SERIALIZER_STRING:
            if isinstance(obj, str):
                value = value_pb2.Value(data=obj.encode(), serializer=kind)
                check_size(value, what=what, limit=limit)
                return value
            reasons.append("STRING carries only str")
        elif kind == value_pb2.SERIALIZER_JSON:
            problem = json_problem(obj, "")
            if problem is None:
                data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                value = value_pb2.Value(data=data.encode(), serializer=kind)
                check_size(value, what=what, limit=limit)
                return value
            reasons.append(f"JSON cannot carry it: {problem}")
    accepted = ", ".join(value_pb2.Serializer.Name(k).removeprefix("SERIALIZER_") for k in accept)
    raise SerializationError(
        f"{what} of type {type(obj).__qualname__} cannot be sent in any serializer the caller "
        f"accepts ({accepted}): {'; '.join(reasons)}. Return JSON-representable values "
        "(None, bool, int, float, str, list, dict with str keys) to callers in other languages.",
        {"what": what, "type": type(obj).__qualname__, "accepted": accepted},
    )


#: The most nesting :func:`json_problem` follows (json.dumps itself recurses).
_JSON_MAX_DEPTH = 500


def json_problem(obj: Any, path: str, depth: int = 0) -> str | None:
    """Say why ``obj`` is not JSON-representable (naming where), or None when it is.

    JSON here means None, bool, int, float (finite), str, list or tuple, and
    dict with str keys, nested; nothing else, so that every value reads back
    the same in any language.
    """
    where = f"the value{path}"
    if depth > _JSON_MAX_DEPTH:
        return f"{where} is nested more than {_JSON_MAX_DEPTH} levels deep"
    if obj is None or type(obj) in (bool, int, str):
        return None
    if type(obj) is float:
        return None if math.isfinite(obj) else f"{where} is {obj!r}, which JSON has no number for"
    if type(obj) in (list, tuple):
        for index, item in enumerate(obj):
            problem = json_problem(item, f"{path}[{index}]", depth + 1)
            if problem is not None:
                return problem
        return None
    if type(obj) is dict:
        for key, item in obj.items():
            if type(key) is not str:
                kind = type(key).__qualname__
                return f"{where} has a key of type {kind} ({key!r}); keys must be str"
            problem = json_problem(item, f"{path}[{key!r}]", depth + 1)
            if problem is not None:
                return problem
        return None
    return f"{where} is of type {type(obj).__qualname__}"


def check_size(value: value_pb2.Value, *, what: str, limit: int | None) -> None:
    """Raise PayloadTooLargeError when ``value`` is larger than ``limit`` bytes."""
    if limit is not None:
        check_length(len(value.data), what=what, limit=limit)


def check_length(size: int, *, what: str, limit: int | None) -> None:
    """Raise PayloadTooLargeError when ``size`` serialized bytes are over ``limit``."""
    if limit is not None and size > limit:
        raise PayloadTooLargeError(
            f"{what} is {size} bytes serialized, over the limit of {limit} bytes; "
            "store large data in smaller pieces or raise the limit (max_payload_bytes).",
            {"what": what, "size": str(size), "limit": str(limit)},
        )


def deserialize(value: value_pb2.Value) -> Any:
    """Return the Python value of a ``Value``; a stored failure raises it.

    Raises:
        RemoteFunctionError: The value is a failure of a user function.
        SerializationError: The bytes cannot be read.
    """
    return decode(value.data, value.serializer)


def decode(data: bytes | bytearray, kind: value_pb2.Serializer.ValueType) -> Any:
    """Return the Python value of bytes encoded with serializer ``kind`` (see :func:`encode`).

    ``data`` may be a ``bytearray`` (a value assembled from chunks): it is read
    in place, and only ``SERIALIZER_BYTES`` copies it (into the ``bytes`` returned).

    Raises:
        RemoteFunctionError: The value is a failure of a user function.
        SerializationError: The bytes cannot be read.
    """
    try:
        if kind == value_pb2.SERIALIZER_CLOUDPICKLE:
            return cloudpickle.loads(data)
        if kind == value_pb2.SERIALIZER_BYTES:
            return bytes(data)
        if kind == value_pb2.SERIALIZER_STRING:
            return data.decode()
        if kind == value_pb2.SERIALIZER_JSON:
            return json.loads(data)
    except Exception as exc:
        raise SerializationError(
            f"cannot deserialize a {value_pb2.Serializer.Name(kind)} value: "
            f"{type(exc).__name__}: {exc}. A pickled value needs the same modules "
            "importable where it is read.",
        ) from exc
    if kind == value_pb2.SERIALIZER_FAILURE:
        try:
            failure = value_pb2.Failure.FromString(bytes(data))
        except Exception as exc:  # protobuf's DecodeError
            raise SerializationError(
                f"a SERIALIZER_FAILURE value does not hold a Failure message ({exc})"
            ) from None
        raise failure_to_error(failure)
    raise SerializationError(f"unknown serializer {kind}; upgrade the client")


def failure_to_error(failure: value_pb2.Failure) -> CloudburstError:
    """Return the client-side exception of a failure.

    A runtime error stored as a result (type ``cloudburst.errors.<REASON>``, e.g.
    a function deleted before its call ran) comes back as its own class.
    """
    if failure.type.startswith(RUNTIME_ERROR_PREFIX) and not failure.traceback:
        reason = failure.type.removeprefix(RUNTIME_ERROR_PREFIX)
        return error_class(reason, grpc.StatusCode.UNKNOWN)(failure.message)
    return RemoteFunctionError(
        failure.type, failure.message, failure.traceback, failure.function_name
    )


class LwwClock:
    """Makes last-writer-wins timestamps that strictly increase for one writer.

    Wall-clock nanoseconds order writes across writers; a per-writer counter
    keeps them increasing when the clock stands still or steps back, and the
    writer id breaks ties deterministically.
    """

    def __init__(self, writer_id: str | None = None) -> None:
        self.writer_id = writer_id or f"{uuid.uuid4().hex[:16]}-{os.getpid()}"
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> lattice_pb2.LwwTimestamp:
        """Return a timestamp greater than every one this clock returned before."""
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return lattice_pb2.LwwTimestamp(time_ns=self._last, writer_id=self.writer_id)


def lww(value: value_pb2.Value, clock: LwwClock) -> lattice_pb2.Lattice:
    """Wrap a value in a last-writer-wins lattice stamped by ``clock``."""
    # Filled in place: nested constructors would copy a large value once per level.
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.CopyFrom(clock.now())
    lattice.lww.value.CopyFrom(value)
    return lattice


def lww_of(
    obj: Any, clock: LwwClock, *, what: str = "value", limit: int | None = None
) -> lattice_pb2.Lattice:
    """Serialize ``obj`` into a last-writer-wins lattice stamped by ``clock``.

    The serialized bytes are copied once, into the lattice (:func:`serialize`
    and then :func:`lww` would copy them twice).

    Raises:
        SerializationError: The value cannot be pickled.
        PayloadTooLargeError: The serialized value is larger than ``limit``.
    """
    data, serializer = encode(obj, what=what)
    check_length(len(data), what=what, limit=limit)
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.CopyFrom(clock.now())
    lattice.lww.value.data, lattice.lww.value.serializer = data, serializer
    return lattice


def lattice_value(lattice: lattice_pb2.Lattice) -> Any:
    """Return the Python value a user sees for a stored lattice.

    A last-writer-wins lattice gives its value; a set lattice gives a list of
    its values.
    """
    kind = lattice.WhichOneof("kind")
    if kind == "lww":
        return deserialize(lattice.lww.value)
    if kind == "set":
        return [deserialize(v) for v in lattice.set.values]
    return None


def lattice_bytes(lattice: lattice_pb2.Lattice) -> Any:
    """Return the stored bytes of a lattice as they are, without deserializing them.

    A last-writer-wins lattice gives its value's bytes; a set lattice gives a
    list of its values' bytes. (``deserialize=False`` in the original API.)
    """
    kind = lattice.WhichOneof("kind")
    if kind == "lww":
        return bytes(lattice.lww.value.data)
    if kind == "set":
        return [bytes(v.data) for v in lattice.set.values]
    return None
