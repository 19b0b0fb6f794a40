"""Pure functions on ``cloudburst.v1.Lattice``: validate, normalize, merge, stamp, size.

Merges are associative, commutative and idempotent on normalized lattices, so
replicas and retries converge whatever order writes arrive in. Every function
returns a new message and never changes its arguments, so a stored lattice can
be shared with readers without copying. The one exception is asked for:
:func:`normalize` and :func:`merge` with ``adopt`` may return the incoming
last-writer-wins lattice itself, normalized in place, from a caller that gives
it up (a large value is then not copied once more).

Normalized form (what :func:`merge` and :func:`normalize` return):

* last-writer-wins: timestamp and value are both present and carry only their
  known fields;
* set: values are distinct by ``(serializer, data)`` and sorted by it, so two
  equal sets serialize to the same bytes whatever order they were built in.

Unknown fields (from a newer client) are dropped by normalization: keeping them
would make two lattices that order equally serialize differently, which breaks
the merge laws.
"""

from __future__ import annotations

from typing import Literal

from cloudburst.errors import InvalidArgumentError, LatticeTypeMismatchError
from cloudburst.serialization import LwwClock
from cloudburst.v1 import lattice_pb2, value_pb2

LatticeKind = Literal["lww", "set"]

#: The total order of last-writer-wins writes: time, then writer, then the value's bytes.
LwwOrderKey = tuple[int, str, int, bytes]


def kind_of(lattice: lattice_pb2.Lattice, *, what: str = "lattice") -> LatticeKind:
    """Return the lattice's kind.

    Raises:
        InvalidArgumentError: No kind is set (or the kind is unknown to this server).
    """
    kind = lattice.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError(
            f"{what} has no kind; set exactly one of 'lww' (last-writer-wins) or 'set'",
            {"field": what},
        )
    return kind


def validate(lattice: lattice_pb2.Lattice, *, what: str = "lattice") -> None:
    """Check that a lattice can be stored: a kind is set and every value names its serializer.

    Raises:
        InvalidArgumentError: The lattice has no kind, or a value has ``SERIALIZER_UNSPECIFIED``.
    """
    kind = kind_of(lattice, what=what)
    if kind == "lww":
        _check_serializer(lattice.lww.value, f"{what}.lww.value")
    else:
        for index, value in enumerate(lattice.set.values):
            _check_serializer(value, f"{what}.set.values[{index}]")


def _check_serializer(value: value_pb2.Value, what: str) -> None:
    if value.serializer == value_pb2.SERIALIZER_UNSPECIFIED:
        raise InvalidArgumentError(
            f"{what} has serializer SERIALIZER_UNSPECIFIED; say how its bytes are encoded "
            "(e.g. SERIALIZER_BYTES, SERIALIZER_STRING, SERIALIZER_JSON, SERIALIZER_CLOUDPICKLE)",
            {"field": what},
        )


def lww_order_key(lww: lattice_pb2.LwwLattice) -> LwwOrderKey:
    """Return the key that totally orders last-writer-wins writes.

    The value's serializer and bytes come last so that two writers that reuse a
    timestamp and writer id still converge on the same value everywhere.
    """
    return (lww.timestamp.time_ns, lww.timestamp.writer_id, lww.value.serializer, lww.value.data)


def _lww_wins(incoming: lattice_pb2.LwwLattice, stored: lattice_pb2.LwwLattice) -> bool:
    """Whether ``incoming`` orders after ``stored`` by :func:`lww_order_key`.

    The bytes are read (a copy of the value each) only when everything before
    them ties, which distinct writers never do.
    """
    head_in = (incoming.timestamp.time_ns, incoming.timestamp.writer_id, incoming.value.serializer)
    head_stored = (stored.timestamp.time_ns, stored.timestamp.writer_id, stored.value.serializer)
    if head_in != head_stored:
        return head_in > head_stored
    return incoming.value.data > stored.value.data


def _value_key(value: value_pb2.Value) -> tuple[int, bytes]:
    return (value.serializer, value.data)


def _clean_value(value: value_pb2.Value) -> value_pb2.Value:
    return value_pb2.Value(data=value.data, serializer=value.serializer)


def _clean_lww(lww: lattice_pb2.LwwLattice) -> lattice_pb2.Lattice:
    # One copy inside protobuf, then the unknown fields dropped: reading the bytes out
    # into Python and back in would copy a large value twice more.
    clean = lattice_pb2.Lattice()
    clean.lww.CopyFrom(lww)
    clean.DiscardUnknownFields()
    clean.lww.timestamp.SetInParent()  # present even when empty: one encoding per lattice
    clean.lww.value.SetInParent()
    return clean


def _adopt_lww(lattice: lattice_pb2.Lattice) -> lattice_pb2.Lattice:
    # _clean_lww without the copy: the lattice holds nothing but its lww kind.
    lattice.DiscardUnknownFields()
    lattice.lww.timestamp.SetInParent()
    lattice.lww.value.SetInParent()
    return lattice


def _set_of(values: dict[tuple[int, bytes], value_pb2.Value]) -> lattice_pb2.Lattice:
    ordered = [values[key] for key in sorted(values)]
    return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=ordered))


def normalize(lattice: lattice_pb2.Lattice, *, adopt: bool = False) -> lattice_pb2.Lattice:
    """Return the normalized form of a lattice (see the module docstring).

    With ``adopt``, the caller gives ``lattice`` up: a last-writer-wins lattice
    is normalized in place and returned itself.

    Raises:
        InvalidArgumentError: The lattice has no kind.
    """
    if kind_of(lattice) == "lww":
        return _adopt_lww(lattice) if adopt else _clean_lww(lattice.lww)
    distinct: dict[tuple[int, bytes], value_pb2.Value] = {}
    for value in lattice.set.values:
        distinct.setdefault(_value_key(value), _clean_value(value))
    return _set_of(distinct)


def merge(
    stored: lattice_pb2.Lattice, incoming: lattice_pb2.Lattice, *, adopt: bool = False
) -> lattice_pb2.Lattice:
    """Return the least upper bound of two lattices of the same kind, normalized.

    Args:
        stored: The lattice already stored under the key.
        incoming: The lattice being written.
        adopt: The caller gives ``incoming`` up: a last-writer-wins write that
            wins is normalized in place and returned itself.

    Raises:
        InvalidArgumentError: Either lattice has no kind.
        LatticeTypeMismatchError: The lattices are of different kinds.
    """
    stored_kind = kind_of(stored, what="stored lattice")
    incoming_kind = kind_of(incoming)
    if stored_kind != incoming_kind:
        raise LatticeTypeMismatchError(
            f"the key holds a {_KIND_NAMES[stored_kind]} lattice and cannot merge a "
            f"{_KIND_NAMES[incoming_kind]} one; a key keeps one kind for its life, so write "
            "the same kind or delete the key first",
            {"stored_kind": stored_kind, "incoming_kind": incoming_kind},
        )
    if stored_kind == "lww":
        if not _lww_wins(incoming.lww, stored.lww):
            return _clean_lww(stored.lww)
        return _adopt_lww(incoming) if adopt else _clean_lww(incoming.lww)
    union: dict[tuple[int, bytes], value_pb2.Value] = {}
    for value in (*stored.set.values, *incoming.set.values):
        union.setdefault(_value_key(value), _clean_value(value))
    return _set_of(union)


_KIND_NAMES: dict[LatticeKind, str] = {"lww": "last-writer-wins", "set": "set"}


def stamp(lattice: lattice_pb2.Lattice, clock: LwwClock) -> lattice_pb2.Lattice:
    """Return the lattice with a missing last-writer-wins timestamp filled in by ``clock``.

    A timestamp is missing when its ``time_ns`` is 0. Other lattices (sets, or
    already stamped writes) are returned unchanged, as the same object.
    """
    if lattice.WhichOneof("kind") != "lww" or lattice.lww.timestamp.time_ns != 0:
        return lattice
    stamped = lattice_pb2.Lattice()
    stamped.CopyFrom(lattice)
    stamped.lww.timestamp.CopyFrom(clock.now())
    return stamped


def check_not_ahead(lattice: lattice_pb2.Lattice, now_ns: int, max_skew_ns: int) -> None:
    """Refuse a last-writer-wins write stamped more than ``max_skew_ns`` after ``now_ns``.

    A timestamp far in the future (a writer whose clock runs fast, or a forged
    2^64-1) would win every later write to the key for as long as it stays in
    the future: such writes would succeed and stay invisible. Refusing it
    keeps the lattice's order meaningful; an unstamped write (``time_ns`` 0)
    is stamped by the KVS and never refused.
    """
    if lattice.WhichOneof("kind") != "lww":
        return
    ahead_ns = lattice.lww.timestamp.time_ns - now_ns
    if ahead_ns > max_skew_ns:
        raise InvalidArgumentError(
            f"the write's timestamp is {ahead_ns / 1e9:.3f}s ahead of the KVS's clock, more "
            f"than the allowed clock skew of {max_skew_ns / 1e9:g}s; check the writer's clock "
            "(NTP), or leave the timestamp 0 for the KVS to stamp the write",
            {
                "field": "lattice.lww.timestamp.time_ns",
                "max_skew_seconds": f"{max_skew_ns / 1e9:g}",
            },
        )


def lattice_size(lattice: lattice_pb2.Lattice) -> int:
    """Return the bytes of user data a lattice holds (what the payload limit applies to)."""
    kind = lattice.WhichOneof("kind")
    if kind == "lww":
        return len(lattice.lww.value.data)
    if kind == "set":
        return sum(len(value.data) for value in lattice.set.values)
    return 0


__all__ = [
    "LatticeKind",
    "kind_of",
    "lattice_size",
    "lww_order_key",
    "merge",
    "normalize",
    "stamp",
    "validate",
]
