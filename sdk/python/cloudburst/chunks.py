"""Moving a KVS value too large for one message: in chunks over a stream.

A value of more than :data:`INLINE_VALUE_BYTES` (or than the KVS tier's
message limit, when that is smaller) is written with
``PutValueChunks`` (the write without its bytes, then the bytes in
:data:`CHUNK_BYTES` pieces) and read with ``GetValueChunks`` when ``GetValue``
answers ``chunked``. A set lattice too large for one message is read the same
way: the first frame names its kind, the chunks joined are its encoded
``SetLattice``.

Copies are what limits the size of a value a process can move, so they are
counted here. A write sends slices of the caller's bytes (no copy of the
whole). A read appends the chunks to one buffer (:class:`LargeValue`), which
is either decoded directly (the SDK's ``get_object``: the buffer and the
decoded value, then the value alone) or parsed into a lattice message (one
copy, and the buffer is freed at once). The SDK and the executors use the same
functions; the limit on a value's size comes from the KVS (``GetLimits``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cloudburst.rpc import call, error_from_rpc
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2

CHUNK_BYTES = 1 << 20
"""Bytes of a value per chunk."""
INLINE_VALUE_BYTES = 4 << 20
"""A last-writer-wins value larger than this is written in chunks."""

#: Bytes reserved before the received bytes for the tag and length of ``Value.data`` (a
#: tag byte and a varint of at most 10 bytes), so that the buffer parses as an encoded
#: ``Value`` without the bytes being copied out first.
_PREFIX_BYTES = 11
#: The tag of ``Value.data`` (field 1, length-delimited).
_DATA_TAG = 0x0A

#: What a value's bytes may be given as.
Buffer = bytes | bytearray | memoryview


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


class LargeValue:
    """A value received in chunks: its lattice without the bytes, and the bytes in one buffer.

    Take the bytes out once, with :meth:`take` (to decode them directly) or
    :meth:`to_lattice` (to have the whole lattice); the buffer is empty after.
    """

    def __init__(self, lattice: lattice_pb2.Lattice) -> None:
        """Start assembling the value of ``lattice`` (its first frame)."""
        self.lattice = lattice
        """The lattice without its bytes: an lww's timestamp and serializer, or an empty set."""
        self._buffer = bytearray(_PREFIX_BYTES)

    @property
    def kind(self) -> str | None:
        """The lattice's kind (``"lww"`` or ``"set"``)."""
        return self.lattice.WhichOneof("kind")

    @property
    def serializer(self) -> value_pb2.Serializer.ValueType:
        """How a last-writer-wins value's bytes are encoded."""
        return self.lattice.lww.value.serializer

    def __len__(self) -> int:
        """The bytes received so far."""
        return len(self._buffer) - _PREFIX_BYTES

    def add(self, chunk: bytes) -> None:
        """Append the next chunk."""
        self._buffer += chunk

    def take(self) -> bytearray:
        """The bytes received, as they are (no copy); the buffer is empty after."""
        buffer, self._buffer = self._buffer, bytearray(_PREFIX_BYTES)
        del buffer[:_PREFIX_BYTES]  # CPython moves the start of the buffer: no copy
        return buffer

    def to_lattice(self) -> lattice_pb2.Lattice:
        """The whole lattice, its bytes copied into it once; the buffer is freed."""
        buffer, self._buffer = self._buffer, bytearray(_PREFIX_BYTES)
        size = len(buffer) - _PREFIX_BYTES
        if self.kind == "lww":
            # The buffer becomes an encoded Value holding only `data`: parsing it copies
            # the bytes once, where bytes(buffer) and then the field's setter would copy twice.
            header = bytes([_DATA_TAG]) + _varint(size)
            start = _PREFIX_BYTES - len(header)
            buffer[start:_PREFIX_BYTES] = header
            # protobuf parses any buffer (its stubs say bytes); the message copies what it keeps.
            with memoryview(buffer) as view, view[start:] as encoded:
                self.lattice.lww.value.MergeFromString(encoded)  # type: ignore[arg-type]
        elif size:
            with memoryview(buffer) as view, view[_PREFIX_BYTES:] as encoded:
                self.lattice.set.MergeFromString(encoded)  # type: ignore[arg-type]
        return self.lattice


async def write_value(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub,
    key: str,
    timestamp: lattice_pb2.LwwTimestamp,
    serializer: value_pb2.Serializer.ValueType,
    data: Buffer,
    keyspace: lattice_pb2.Keyspace.ValueType,
    timeout: float | None,
    request_id: str = "",
) -> None:
    """Merge the last-writer-wins value ``data`` into ``key`` through ``PutValueChunks``.

    The chunks are slices of ``data``: the whole value is never copied.
    """

    async def frames() -> AsyncIterator[kvs_service_pb2.PutValueChunksRequest]:
        first = kvs_service_pb2.PutValueChunksRequest()
        put = first.put
        put.key, put.keyspace, put.request_id = key, keyspace, request_id
        put.lattice.lww.timestamp.CopyFrom(timestamp)
        put.lattice.lww.value.serializer = serializer
        yield first
        with memoryview(data) as whole, whole.cast("B") as view:
            for start in range(0, len(view), CHUNK_BYTES):
                yield kvs_service_pb2.PutValueChunksRequest(
                    chunk=bytes(view[start : start + CHUNK_BYTES])
                )

    await call(
        f"PutValueChunks of key {key!r}",
        lambda: stub.PutValueChunks(frames(), timeout=timeout),
    )


async def receive(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub,
    key: str,
    keyspace: lattice_pb2.Keyspace.ValueType,
    timeout: float | None,
) -> LargeValue | None:
    """Read ``key`` through ``GetValueChunks``, its bytes left in one buffer; None when missing."""
    request = kvs_service_pb2.GetValueChunksRequest(key=key, keyspace=keyspace)
    stream = stub.GetValueChunks(request, timeout=timeout)
    received: LargeValue | None = None
    try:
        async for frame in stream:
            if frame.WhichOneof("frame") == "lattice":
                received = LargeValue(frame.lattice)
            elif received is not None:
                received.add(frame.chunk)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, what=f"GetValueChunks of key {key!r}") from None
    finally:
        stream.cancel()
    return received


async def read_chunks(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub,
    key: str,
    keyspace: lattice_pb2.Keyspace.ValueType,
    timeout: float | None,
) -> lattice_pb2.Lattice | None:
    """Read ``key`` through ``GetValueChunks`` into a whole lattice; None when it does not exist."""
    received = await receive(stub, key, keyspace, timeout)
    return None if received is None else received.to_lattice()


async def get_limits(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub, timeout: float | None
) -> kvs_service_pb2.GetLimitsResponse:
    """The KVS tier's limits."""
    response: kvs_service_pb2.GetLimitsResponse = await call(
        "GetLimits", lambda: stub.GetLimits(kvs_service_pb2.GetLimitsRequest(), timeout=timeout)
    )
    return response
