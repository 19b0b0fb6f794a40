"""Assembling a value read in chunks (cloudburst.chunks.LargeValue), no I/O."""

from __future__ import annotations

import array
import tracemalloc
from collections.abc import Iterator

import cloudpickle
import pytest

from cloudburst.chunks import CHUNK_BYTES, LargeValue, as_lattice, stored_bytes, stored_value
from cloudburst.serialization import decode
from cloudburst.v1 import lattice_pb2, value_pb2

MIB = 1 << 20


def lww_header(serializer: value_pb2.Serializer.ValueType) -> lattice_pb2.Lattice:
    header = lattice_pb2.Lattice()
    header.lww.timestamp.time_ns = 7
    header.lww.value.serializer = serializer
    return header


def pieces(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def received(data: bytes, serializer: value_pb2.Serializer.ValueType) -> LargeValue:
    value = LargeValue(lww_header(serializer))
    for chunk in pieces(data, 1000):
        value.add(chunk)
    return value


# Lengths around each size where the encoded length of the value grows by a byte.
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
def test_the_bytes_go_into_the_lattice_whole_whatever_their_length(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    value = received(data, value_pb2.SERIALIZER_BYTES)
    assert len(value) == size
    lattice = value.to_lattice()
    assert lattice.lww.value.data == data
    assert lattice.lww.value.serializer == value_pb2.SERIALIZER_BYTES
    assert lattice.lww.timestamp.time_ns == 7
    assert len(value) == 0, "the buffer is freed"


def test_taken_bytes_are_the_value_and_decode_by_their_serializer() -> None:
    obj = {"weights": list(range(1000))}
    value = received(cloudpickle.dumps(obj), value_pb2.SERIALIZER_CLOUDPICKLE)
    taken = value.take()
    assert isinstance(taken, bytes)
    assert decode(taken, value.serializer) == obj
    assert len(value) == 0
    text = received("naïve".encode() * 1000, value_pb2.SERIALIZER_STRING)
    assert decode(text.take(), text.serializer) == "naïve" * 1000


def test_a_set_comes_as_its_encoded_values() -> None:
    values = [
        value_pb2.Value(data=bytes([n]) * 3000, serializer=value_pb2.SERIALIZER_BYTES)
        for n in range(5)
    ]
    encoded = lattice_pb2.SetLattice(values=values).SerializeToString()
    header = lattice_pb2.Lattice()
    header.set.SetInParent()
    value = LargeValue(header)
    for chunk in pieces(encoded, 4096):
        value.add(chunk)
    assert list(value.to_lattice().set.values) == values


def test_assembling_and_decoding_holds_at_most_the_buffer_and_the_result() -> None:
    """Python's own allocations while 64 MiB arrive in 1 MiB chunks and become bytes.

    The chunks are joined once into the bytes returned, which decode to
    themselves; a buffer assembled on the way, or copied, would add a whole
    copy. Only the chunks' own memory is outside the count: they are made
    before tracing starts (one chunk, added again and again).
    """
    size = 64 * MIB
    chunk = array.array("B", range(256)).tobytes() * (CHUNK_BYTES // 256)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        value = LargeValue(lww_header(value_pb2.SERIALIZER_BYTES))
        for _ in range(size // CHUNK_BYTES):
            value.add(chunk)
        result = decode(value.take(), value.serializer)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert len(result) == size and result[:CHUNK_BYTES] == chunk and result[-256:] == chunk[:256]
    assert peak < 1.5 * size, f"peak {peak / size:.2f} copies of the value"


def test_data_joins_the_chunks_once_and_the_value_keeps_them() -> None:
    data = bytes(range(256)) * 40
    value = received(data, value_pb2.SERIALIZER_BYTES)
    joined = value.data
    assert joined == data and type(joined) is bytes
    assert value.data is joined, "joined once, then kept as the only chunk"
    assert len(value) == len(data)
    assert stored_value(value) is joined, "bytes decode to themselves: no copy"
    assert stored_bytes(value) is joined
    lattice = as_lattice(value)
    assert lattice.lww.value.data == data and lattice.lww.timestamp.time_ns == 7
    assert value.take() is joined and len(value) == 0


def test_stored_values_read_lattices_as_before() -> None:
    lattice = lattice_pb2.Lattice()
    lattice.lww.value.data = cloudpickle.dumps([1, 2])
    lattice.lww.value.serializer = value_pb2.SERIALIZER_CLOUDPICKLE
    assert stored_value(lattice) == [1, 2]
    assert stored_bytes(lattice) == lattice.lww.value.data
    assert as_lattice(lattice) is lattice
