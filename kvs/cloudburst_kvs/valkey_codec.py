"""How lattices, keys and change messages are laid out in Valkey (pure functions).

Keys. A user key ``k`` is stored under ``cb:u:{E(k)}``, where ``E`` escapes
``%``, ``{`` and ``}`` so that the braces are the key's hash tag: the data key,
its staging keys ``cb:t:{E(k)}<id>`` and its change channel ``cb:n:{E(k)}``
all hash to the same slot, so one primary owns all three. Every key of the
system keyspace shares the hash tag ``{sys}`` (``cb:s:{sys}k``): the system
keyspace is small (functions, DAGs, pins), and one slot gives it one channel
whose changes every subscriber sees in the order the primary applied them.

Values. A last-writer-wins lattice is a string: a fixed header
(``L``, time_ns as 8 bytes, serializer + 2**31 as 4 bytes, length of the writer
id as 4 bytes, all big-endian), the writer id (UTF-8), then the value's bytes.
Comparing the fixed-width fields byte by byte orders them as numbers, and UTF-8
byte order is code point order, so the server-side merge orders writes exactly
as :func:`cloudburst_kvs.lattices.lww_order_key` does. A set lattice is a Valkey
set whose members are serializer + 2**31 (4 bytes) then the value's bytes, plus
the empty member, which keeps an empty set in existence.

The storage format (:data:`cloudburst_kvs.storage.STORAGE_FORMAT`) is the decimal
string under :data:`FORMAT_KEY`, in the system keyspace's slot but outside the
prefixes of data, staging and channel keys, so no key a client names is it and no
listing returns it.

Change messages, published on the key's channel: ``V`` + key id + the stored
string (a small last-writer-wins value, delivered as is), ``R`` + key id (read
the key again: a large value or a set), ``D`` + key id (deleted); the key id is
the key's length (4 bytes) and UTF-8 bytes.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cloudburst.v1 import lattice_pb2

USER_PREFIX = b"cb:u:"
SYSTEM_PREFIX = b"cb:s:{sys}"
STAGE_PREFIX = b"cb:t:"
CHANNEL_PREFIX = b"cb:n:"
SYSTEM_TAG = b"{sys}"
#: The key holding the storage format of the data in the cluster.
FORMAT_KEY = b"cb:format:" + SYSTEM_TAG

#: The fixed part of a stored last-writer-wins value.
LWW_HEADER = struct.Struct(">cQII")
LWW_MAGIC = b"L"
SERIALIZER_OFFSET = 2**31

#: The member that marks a set as existing even when it holds no value.
SET_MARKER = b""

_ESCAPES = {"%": "%25", "{": "%7B", "}": "%7D"}
_GLOB_SPECIAL = frozenset(b"*?[]\\")


def escape(key: str) -> str:
    """Return ``key`` with ``%``, ``{`` and ``}`` escaped; preserves prefixes."""
    return "".join(_ESCAPES.get(ch, ch) for ch in key)


def unescape(escaped: str) -> str:
    """Invert :func:`escape`."""
    out: list[str] = []
    index = 0
    while index < len(escaped):
        if escaped[index] == "%":
            out.append(chr(int(escaped[index + 1 : index + 3], 16)))
            index += 3
        else:
            out.append(escaped[index])
            index += 1
    return "".join(out)


def _is_system(keyspace: int) -> bool:
    return keyspace == lattice_pb2.KEYSPACE_SYSTEM


def data_key(keyspace: int, key: str) -> bytes:
    """The Valkey key holding ``key``'s lattice."""
    if _is_system(keyspace):
        return SYSTEM_PREFIX + key.encode()
    return USER_PREFIX + b"{" + escape(key).encode() + b"}"


def _tag(keyspace: int, key: str) -> bytes:
    if _is_system(keyspace):
        return SYSTEM_TAG
    return b"{" + escape(key).encode() + b"}"


def stage_key(keyspace: int, key: str, unique: str) -> bytes:
    """A staging key in ``key``'s slot, where a large value waits for the merge."""
    return STAGE_PREFIX + _tag(keyspace, key) + unique.encode()


def channel(keyspace: int, key: str) -> bytes:
    """The sharded channel that announces changes of ``key`` (one for all system keys)."""
    return CHANNEL_PREFIX + _tag(keyspace, key)


def key_of(keyspace: int, stored: bytes) -> str | None:
    """The user-visible key of a Valkey data key, or None when it is not one of ``keyspace``'s."""
    if _is_system(keyspace):
        if stored.startswith(SYSTEM_PREFIX):
            return stored[len(SYSTEM_PREFIX) :].decode()
        return None
    if stored.startswith(USER_PREFIX + b"{") and stored.endswith(b"}"):
        return unescape(stored[len(USER_PREFIX) + 1 : -1].decode())
    return None


def _glob_escape(raw: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in raw)


def scan_pattern(keyspace: int, prefix: str) -> bytes:
    """The SCAN MATCH pattern of the data keys that start with ``prefix``."""
    if _is_system(keyspace):
        return _glob_escape(SYSTEM_PREFIX + prefix.encode()) + b"*"
    return _glob_escape(USER_PREFIX + b"{" + escape(prefix).encode()) + b"*"


# Values


def encode_lww(lww: lattice_pb2.LwwLattice) -> bytes:
    """The stored string of a last-writer-wins lattice."""
    writer = lww.timestamp.writer_id.encode()
    header = LWW_HEADER.pack(
        LWW_MAGIC,
        lww.timestamp.time_ns,
        lww.value.serializer + SERIALIZER_OFFSET,
        len(writer),
    )
    return header + writer + lww.value.data


def lww_header(lww: lattice_pb2.LwwLattice) -> bytes:
    """The header and writer id of :func:`encode_lww` (what the merge compares first)."""
    writer = lww.timestamp.writer_id.encode()
    return (
        LWW_HEADER.pack(
            LWW_MAGIC,
            lww.timestamp.time_ns,
            lww.value.serializer + SERIALIZER_OFFSET,
            len(writer),
        )
        + writer
    )


def decode_lww(stored: bytes) -> lattice_pb2.Lattice:
    """The lattice of a stored last-writer-wins string.

    Raises:
        ValueError: The string is not one :func:`encode_lww` wrote.
    """
    if len(stored) < LWW_HEADER.size or stored[:1] != LWW_MAGIC:
        raise ValueError("not a stored last-writer-wins value")
    _, time_ns, serializer, writer_len = LWW_HEADER.unpack_from(stored)
    start = LWW_HEADER.size
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.time_ns = time_ns
    lattice.lww.timestamp.writer_id = stored[start : start + writer_len].decode()
    lattice.lww.value.serializer = serializer - SERIALIZER_OFFSET
    lattice.lww.value.data = stored[start + writer_len :]
    return lattice


def lww_value_size(stored: bytes) -> int:
    """The bytes of the value in a stored last-writer-wins string (no copy of them is made).

    Exactly ``len(decode_lww(stored).lww.value.data)``; ``stored`` must be valid
    for :func:`decode_lww`.
    """
    writer_len: int = LWW_HEADER.unpack_from(stored)[3]
    return len(stored) - LWW_HEADER.size - writer_len


def encode_members(lattice: lattice_pb2.Lattice) -> list[bytes]:
    """The set members of a set lattice, with the marker that keeps an empty set."""
    members = [SET_MARKER]
    for value in lattice.set.values:
        members.append(struct.pack(">I", value.serializer + SERIALIZER_OFFSET) + value.data)
    return members


def decode_members(members: list[bytes] | set[bytes]) -> lattice_pb2.Lattice:
    """The (normalized) set lattice of a Valkey set's members."""
    values: list[tuple[int, bytes]] = []
    for member in members:
        if len(member) < 4:
            continue  # the marker
        (serializer,) = struct.unpack_from(">I", member)
        values.append((serializer - SERIALIZER_OFFSET, member[4:]))
    values.sort()
    lattice = lattice_pb2.Lattice()
    lattice.set.SetInParent()
    for serializer, data in values:
        lattice.set.values.add(serializer=serializer, data=data)
    return lattice


# Change messages

VALUE = b"V"
REREAD = b"R"
DELETED = b"D"


def key_id(key: str) -> bytes:
    """The key's id inside a change message."""
    raw = key.encode()
    return struct.pack(">I", len(raw)) + raw


class Change(NamedTuple):
    """A decoded change message."""

    kind: bytes
    """``V``, ``R`` or ``D``."""
    key: str
    """The key that changed."""
    lattice: lattice_pb2.Lattice | None
    """The new lattice for ``V``; None otherwise."""


def decode_change(message: bytes) -> Change:
    """Decode a change message.

    Raises:
        ValueError: The message is not one this module's merge functions publish.
    """
    kind = message[:1]
    if kind not in (VALUE, REREAD, DELETED) or len(message) < 5:
        raise ValueError("not a KVS change message")
    (length,) = struct.unpack_from(">I", message, 1)
    key = message[5 : 5 + length].decode()
    lattice = decode_lww(message[5 + length :]) if kind == VALUE else None
    return Change(kind, key, lattice)


__all__ = [
    "Change",
    "channel",
    "data_key",
    "decode_change",
    "decode_lww",
    "decode_members",
    "encode_lww",
    "encode_members",
    "escape",
    "key_id",
    "key_of",
    "lww_header",
    "scan_pattern",
    "stage_key",
    "unescape",
]
