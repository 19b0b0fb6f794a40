"""Merge laws and helpers of kvs.lattices (pure functions, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudburst.errors import InvalidArgumentError, LatticeTypeMismatchError
from cloudburst.serialization import LwwClock
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs import lattices

# Small domains on purpose: equal timestamps, equal writers and equal data must
# be common, because that is where a tie-break bug would show.
SERIALIZERS = st.sampled_from(
    [
        value_pb2.SERIALIZER_BYTES,
        value_pb2.SERIALIZER_STRING,
        value_pb2.SERIALIZER_JSON,
        value_pb2.SERIALIZER_CLOUDPICKLE,
    ]
)
DATA = st.one_of(st.sampled_from([b"", b"a", b"b", b"ab"]), st.binary(max_size=6))
VALUES = st.builds(lambda s, d: value_pb2.Value(serializer=s, data=d), SERIALIZERS, DATA)
TIMES = st.one_of(
    st.integers(min_value=1, max_value=3), st.integers(min_value=1, max_value=2**64 - 1)
)
WRITERS = st.one_of(st.sampled_from(["", "w1", "w2"]), st.text(max_size=4))


def _lww(time_ns: int, writer_id: str, value: value_pb2.Value) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(
        lww=lattice_pb2.LwwLattice(
            timestamp=lattice_pb2.LwwTimestamp(time_ns=time_ns, writer_id=writer_id), value=value
        )
    )


def _set(values: list[value_pb2.Value]) -> lattice_pb2.Lattice:
    return lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=values))


LWWS = st.builds(_lww, TIMES, WRITERS, VALUES)
SETS = st.builds(_set, st.lists(VALUES, max_size=6))


def _bytes(lattice: lattice_pb2.Lattice) -> bytes:
    return lattice.SerializeToString(deterministic=True)


@pytest.mark.parametrize("kind", ["lww", "set"])
@given(data=st.data())
def test_merge_is_commutative(kind: str, data: st.DataObject) -> None:
    strategy = LWWS if kind == "lww" else SETS
    a, b = data.draw(strategy), data.draw(strategy)
    assert _bytes(lattices.merge(a, b)) == _bytes(lattices.merge(b, a))


@pytest.mark.parametrize("kind", ["lww", "set"])
@given(data=st.data())
def test_merge_is_associative(kind: str, data: st.DataObject) -> None:
    strategy = LWWS if kind == "lww" else SETS
    a, b, c = data.draw(strategy), data.draw(strategy), data.draw(strategy)
    left = lattices.merge(lattices.merge(a, b), c)
    right = lattices.merge(a, lattices.merge(b, c))
    assert _bytes(left) == _bytes(right)


@pytest.mark.parametrize("kind", ["lww", "set"])
@given(data=st.data())
def test_merge_is_idempotent(kind: str, data: st.DataObject) -> None:
    strategy = LWWS if kind == "lww" else SETS
    a, b = data.draw(strategy), data.draw(strategy)
    assert _bytes(lattices.merge(a, a)) == _bytes(lattices.normalize(a))
    ab = lattices.merge(a, b)
    assert _bytes(lattices.merge(ab, b)) == _bytes(ab)
    assert _bytes(lattices.merge(ab, a)) == _bytes(ab)


@given(a=LWWS, b=LWWS)
def test_lww_keeps_the_greatest_write(a: lattice_pb2.Lattice, b: lattice_pb2.Lattice) -> None:
    winner = max(lattices.lww_order_key(a.lww), lattices.lww_order_key(b.lww))
    assert lattices.lww_order_key(lattices.merge(a, b).lww) == winner


@given(a=SETS, b=SETS)
def test_set_merge_is_a_sorted_deduplicated_union(
    a: lattice_pb2.Lattice, b: lattice_pb2.Lattice
) -> None:
    merged = [(v.serializer, v.data) for v in lattices.merge(a, b).set.values]
    expected = {(v.serializer, v.data) for v in [*a.set.values, *b.set.values]}
    assert merged == sorted(expected)


@given(a=st.one_of(LWWS, SETS), b=st.one_of(LWWS, SETS))
def test_merge_does_not_change_its_arguments(
    a: lattice_pb2.Lattice, b: lattice_pb2.Lattice
) -> None:
    before = (_bytes(a), _bytes(b))
    try:
        lattices.merge(a, b)
    except LatticeTypeMismatchError:
        pass
    assert (_bytes(a), _bytes(b)) == before


def _with_unknown_field(lattice: lattice_pb2.Lattice) -> lattice_pb2.Lattice:
    """The lattice as a newer client could send it: with a field this server does not know."""
    value = lattice.lww.value.SerializeToString() + b"\xf8\x07\x01"  # field 127, varint 1
    raw = lattice.SerializeToString()
    grown = lattice_pb2.Lattice()
    grown.MergeFromString(raw)
    grown.lww.value.Clear()
    grown.lww.value.MergeFromString(value)
    return grown


@given(stored=LWWS, incoming=LWWS)
def test_an_adopted_write_merges_to_the_bytes_of_a_copied_one(
    stored: lattice_pb2.Lattice, incoming: lattice_pb2.Lattice
) -> None:
    incoming = _with_unknown_field(incoming)
    copied = lattices.merge(stored, incoming)
    before = _bytes(stored)
    adopted = lattices.merge(stored, incoming, adopt=True)
    assert _bytes(adopted) == _bytes(copied)
    assert _bytes(stored) == before
    # A write that wins is kept itself, cleaned of what this server does not know;
    # one that loses leaves a copy of the stored lattice.
    assert (adopted is incoming) == (_bytes(copied) != before)
    fresh = _with_unknown_field(incoming)
    normalized = lattices.normalize(fresh, adopt=True)
    assert normalized is fresh and _bytes(normalized) == _bytes(lattices.normalize(incoming))


def test_lww_ties_break_on_writer_then_value() -> None:
    low = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"a")
    high = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"b")
    assert lattices.merge(_lww(5, "w1", high), _lww(5, "w2", low)).lww.timestamp.writer_id == "w2"
    assert lattices.merge(_lww(5, "w", high), _lww(5, "w", low)).lww.value.data == b"b"
    assert lattices.merge(_lww(5, "w", low), _lww(5, "w", high)).lww.value.data == b"b"
    assert lattices.merge(_lww(6, "a", low), _lww(5, "z", high)).lww.timestamp.time_ns == 6


def test_normalize_makes_equal_lattices_byte_identical() -> None:
    x = value_pb2.Value(serializer=value_pb2.SERIALIZER_STRING, data=b"x")
    y = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"y")
    assert _bytes(lattices.normalize(_set([x, y, x]))) == _bytes(lattices.normalize(_set([y, x])))
    bare = lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice())
    explicit = lattice_pb2.Lattice(
        lww=lattice_pb2.LwwLattice(timestamp=lattice_pb2.LwwTimestamp(), value=value_pb2.Value())
    )
    assert _bytes(lattices.normalize(bare)) == _bytes(lattices.normalize(explicit))


def test_merging_different_kinds_raises_type_mismatch() -> None:
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"v")
    with pytest.raises(LatticeTypeMismatchError) as info:
        lattices.merge(_lww(1, "w", value), _set([value]))
    assert info.value.reason == "LATTICE_TYPE_MISMATCH"
    assert info.value.metadata == {"stored_kind": "lww", "incoming_kind": "set"}
    with pytest.raises(LatticeTypeMismatchError):
        lattices.merge(_set([value]), _lww(1, "w", value))


def test_a_lattice_without_kind_is_invalid() -> None:
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"v")
    with pytest.raises(InvalidArgumentError, match="no kind"):
        lattices.merge(_lww(1, "w", value), lattice_pb2.Lattice())
    with pytest.raises(InvalidArgumentError, match="no kind"):
        lattices.merge(lattice_pb2.Lattice(), _lww(1, "w", value))
    with pytest.raises(InvalidArgumentError):
        lattices.normalize(lattice_pb2.Lattice())
    with pytest.raises(InvalidArgumentError):
        lattices.validate(lattice_pb2.Lattice())


def test_validate_rejects_unspecified_serializers() -> None:
    unspecified = value_pb2.Value(data=b"v")
    fine = value_pb2.Value(serializer=value_pb2.SERIALIZER_JSON, data=b"1")
    with pytest.raises(InvalidArgumentError, match="SERIALIZER_UNSPECIFIED"):
        lattices.validate(_lww(1, "w", unspecified))
    with pytest.raises(InvalidArgumentError, match=r"set\.values\[1\]"):
        lattices.validate(_set([fine, unspecified]))
    lattices.validate(_lww(1, "w", fine))
    lattices.validate(_set([]))


def test_stamp_fills_a_missing_timestamp_only() -> None:
    clock = LwwClock("server")
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"v")
    unstamped = lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(value=value))
    first = lattices.stamp(unstamped, clock)
    second = lattices.stamp(unstamped, clock)
    assert first.lww.timestamp.writer_id == "server"
    assert 0 < first.lww.timestamp.time_ns < second.lww.timestamp.time_ns
    assert first.lww.value == value
    assert unstamped.lww.timestamp.time_ns == 0  # the argument is not changed

    stamped = _lww(7, "client", value)
    assert lattices.stamp(stamped, clock) is stamped
    a_set = _set([value])
    assert lattices.stamp(a_set, clock) is a_set


def test_lattice_size_counts_user_data() -> None:
    a = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"abc")
    b = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"de")
    assert lattices.lattice_size(_lww(1, "a-long-writer-id", a)) == 3
    assert lattices.lattice_size(_set([a, b])) == 5
    assert lattices.lattice_size(lattice_pb2.Lattice()) == 0


NOW = 1_700_000_000 * 10**9
SKEW = 60 * 10**9


@pytest.mark.parametrize(
    "time_ns",
    [2**64 - 1, NOW + 3600 * 10**9, NOW + SKEW + 1],
    ids=["max-uint64", "an-hour-fast", "just-over"],
)
def test_a_write_stamped_too_far_ahead_is_refused(time_ns: int) -> None:
    with pytest.raises(InvalidArgumentError, match="ahead of the KVS's clock") as info:
        lattices.check_not_ahead(_lww(time_ns, "w", value_pb2.Value()), NOW, SKEW)
    assert info.value.metadata["max_skew_seconds"] == "60"


@pytest.mark.parametrize("time_ns", [0, 1, NOW - 3600 * 10**9, NOW, NOW + SKEW])
def test_writes_within_the_skew_or_unstamped_pass(time_ns: int) -> None:
    lattices.check_not_ahead(_lww(time_ns, "w", value_pb2.Value()), NOW, SKEW)


def test_sets_carry_no_timestamp_to_check() -> None:
    lattices.check_not_ahead(_set([value_pb2.Value(data=b"a")]), NOW, SKEW)
