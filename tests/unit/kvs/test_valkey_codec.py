"""The Valkey layout of keys, values and change messages (pure; no server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudburst.errors import InvalidArgumentError
from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs import lattices
from cloudburst_kvs import valkey_codec as codec
from cloudburst_kvs.valkey_store import parse_url

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM

keys = st.text(min_size=1, max_size=20)


def make_lww(time_ns: int, writer: str, serializer: int, data: bytes) -> lattice_pb2.Lattice:
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.time_ns = time_ns
    lattice.lww.timestamp.writer_id = writer
    lattice.lww.value.serializer = serializer  # type: ignore[assignment]
    lattice.lww.value.data = data
    return lattice


lwws = st.builds(
    make_lww,
    st.integers(0, 2**64 - 1),
    st.text(max_size=8),
    st.sampled_from([1, 2, 3, 4]),
    st.binary(max_size=16),
)


@given(keys)
def test_escape_round_trips_and_leaves_no_braces(key: str) -> None:
    escaped = codec.escape(key)
    assert "{" not in escaped and "}" not in escaped
    assert codec.unescape(escaped) == key


@given(keys, keys)
def test_escape_preserves_prefixes(a: str, b: str) -> None:
    assert codec.escape(a + b).startswith(codec.escape(a))


@given(keys, st.sampled_from([USER, SYSTEM]))
def test_data_keys_map_back_to_their_keys(key: str, keyspace: int) -> None:
    stored = codec.data_key(keyspace, key)
    assert codec.key_of(keyspace, stored) == key
    other = SYSTEM if keyspace == USER else USER
    assert codec.key_of(other, stored) is None
    assert codec.key_of(keyspace, codec.stage_key(keyspace, key, "x")) is None


def test_a_key_its_stage_and_its_channel_share_a_hash_tag() -> None:
    for key in ["a", "{a}", "}{", "x}y"]:
        tag = b"{" + codec.escape(key).encode() + b"}"
        for name in (
            codec.data_key(USER, key),
            codec.stage_key(USER, key, "1"),
            codec.channel(USER, key),
        ):
            assert name.index(b"{") == name.index(tag)
    assert codec.channel(SYSTEM, "a") == codec.channel(SYSTEM, "b")


def test_scan_patterns_escape_glob_characters() -> None:
    assert codec.scan_pattern(USER, "a*?[") == rb"cb:u:{a\*\?\[*"
    assert codec.scan_pattern(SYSTEM, "fn/") == b"cb:s:{sys}fn/*"


@given(lwws)
def test_lww_values_round_trip(lattice: lattice_pb2.Lattice) -> None:
    stored = codec.encode_lww(lattice.lww)
    assert codec.decode_lww(stored) == lattice
    assert stored.startswith(codec.lww_header(lattice.lww))


@given(lwws)
def test_the_value_size_of_a_stored_lww_is_its_values_length(lattice: lattice_pb2.Lattice) -> None:
    stored = codec.encode_lww(lattice.lww)
    assert codec.lww_value_size(stored) == len(codec.decode_lww(stored).lww.value.data)
    assert codec.lww_value_size(stored) == len(lattice.lww.value.data)


@given(lwws, lwws)
def test_fixed_header_fields_order_like_the_lattice_code(
    a: lattice_pb2.Lattice, b: lattice_pb2.Lattice
) -> None:
    # What the server-side merge compares, field by field, as bytes.
    def fields(lattice: lattice_pb2.Lattice) -> tuple[bytes, bytes, bytes, bytes]:
        stored = codec.encode_lww(lattice.lww)
        writer_len = int.from_bytes(stored[13:17], "big")
        return (stored[1:9], stored[17 : 17 + writer_len], stored[9:13], stored[17 + writer_len :])

    key_a, key_b = lattices.lww_order_key(a.lww), lattices.lww_order_key(b.lww)
    assert (fields(a) < fields(b)) == (key_a < key_b)
    assert (fields(a) == fields(b)) == (key_a == key_b)


def test_sets_round_trip_with_the_marker() -> None:
    lattice = lattice_pb2.Lattice(
        set=lattice_pb2.SetLattice(
            values=[
                value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"b"),
                value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b""),
            ]
        )
    )
    members = codec.encode_members(lattice)
    assert codec.SET_MARKER in members
    assert codec.decode_members(set(members)) == lattices.normalize(lattice)
    assert codec.decode_members([codec.SET_MARKER]) == lattice_pb2.Lattice(
        set=lattice_pb2.SetLattice()
    )


def test_change_messages() -> None:
    lattice = make_lww(5, "w", 1, b"data")
    value = codec.decode_change(codec.VALUE + codec.key_id("ké") + codec.encode_lww(lattice.lww))
    assert value == codec.Change(codec.VALUE, "ké", lattice)
    assert codec.decode_change(codec.DELETED + codec.key_id("k")) == (codec.DELETED, "k", None)
    with pytest.raises(ValueError):
        codec.decode_change(b"X")


def test_urls() -> None:
    assert parse_url("redis://a:1,b:2") == ([("a", 1), ("b", 2)], {})
    assert parse_url("rediss://u:p%40ss@[::1]:7000") == (
        [("::1", 7000)],
        {"username": "u", "password": "p@ss", "ssl": True},
    )
    for bad in ("http://a:1", "redis://a", "redis://a:x"):
        with pytest.raises(InvalidArgumentError):
            parse_url(bad)
