"""Moving a KVS value too large for one message: in chunks over a stream.

A value of more than :data:`INLINE_VALUE_BYTES` (or than the message limit
of the service it is written to, when that is smaller: :func:`inline_bytes`)
is written with
``PutValueChunks`` (the write without its bytes, then the bytes in
:data:`CHUNK_BYTES` pieces) and read with ``GetValueChunks`` when ``GetValue``
answers ``chunked``. A set lattice too large for one message is read the same
way: the first frame names its kind, the chunks joined are its encoded
``SetLattice``.

Copies are what limits the size of a value a process can move, so they are
counted here. A write sends slices of the caller's bytes (no copy of the
whole). A read keeps the chunks (:class:`LargeValue`) and joins them once, off
any event loop where it matters and with the GIL released: the joined bytes are
decoded directly (the SDK's ``get_object``, an executor's reference argument:
``bytes`` decode to themselves, a pickle into the object) or parsed into a
lattice message (one copy more, the joined bytes freed at once). The SDK and
the executors use the same functions; the limit on a value's size comes from
the KVS (``GetLimits``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cloudburst import malloc
from cloudburst.rpc import call, error_from_rpc
from cloudburst.serialization import decode, lattice_bytes, lattice_value
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2

CHUNK_BYTES = 1 << 20
"""Bytes of a value per chunk."""
INLINE_VALUE_BYTES = 4 << 20
"""A last-writer-wins value larger than this is written in chunks."""

#: The tag of ``Value.data`` (field 1, length-delimited).
_DATA_TAG = 0x0A


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


#: What a value's bytes may be given as.
Buffer = bytes | bytearray | memoryview


class LargeValue:
    """A value received in chunks: its lattice without the bytes, and the chunks received.

    The chunks are kept as they arrived and joined only when the bytes are
    needed: joining releases the GIL (``bytes.join`` of ``bytes`` does, for
    anything over 1 MiB), so a thread joining 1 GiB holds up no other thread
    for the length of the copy, where copying an assembled buffer would. The
    joined bytes replace the chunks, so at most two copies are held, and only
    while joining.

    Take the bytes out once, with :meth:`take` (to decode them directly) or
    :meth:`to_lattice` (to have the whole lattice), after which the value is
    empty; or read them, as often as needed, with :attr:`data`.
    """

    def __init__(self, lattice: lattice_pb2.Lattice) -> None:
        """Start assembling the value of ``lattice`` (its first frame)."""
        self.lattice = lattice
        """The lattice without its bytes: an lww's timestamp and serializer, or an empty set."""
        self._chunks: list[bytes] = []
        self._size = 0
        # Two threads reading a cached value at once join it once.
        self._joining = threading.Lock()

    @property
    def kind(self) -> str | None:
        """The lattice's kind (``"lww"`` or ``"set"``)."""
        return self.lattice.WhichOneof("kind")

    @property
    def serializer(self) -> value_pb2.Serializer.ValueType:
        """How a last-writer-wins value's bytes are encoded."""
        return self.lattice.lww.value.serializer

    def __len__(self) -> int:
        """The bytes received so far (known without reading them)."""
        return self._size

    def add(self, chunk: bytes) -> None:
        """Append the next chunk (kept as it is, not copied)."""
        self._chunks.append(chunk)
        self._size += len(chunk)

    @property
    def data(self) -> bytes:
        """The bytes received, joined into one ``bytes`` the first time (the chunks go).

        For a large value, read it on a worker thread: the join is a copy of the
        whole, which releases the GIL but not the thread.
        """
        with self._joining:
            chunks = self._chunks
            if len(chunks) == 1:
                return chunks[0]
            joined = b"".join(chunks)
            self._chunks = [joined]
            del chunks
            _freed(len(joined))
            return joined

    def take(self) -> bytes:
        """The bytes received (see :attr:`data`); the value is empty after."""
        data = self.data
        self._chunks, self._size = [], 0
        return data

    def to_lattice(self) -> lattice_pb2.Lattice:
        """The whole lattice, the bytes parsed into it; the value is empty after.

        The chunks are joined behind the encoded field's tag and length (the GIL
        released) and freed, then parsed, which copies the bytes into the message.
        """
        chunks, size = self._chunks, self._size
        self._chunks, self._size = [], 0
        if self.kind == "lww":
            # An encoded Value holding only `data`: parsing it copies the bytes once.
            encoded = b"".join([bytes([_DATA_TAG]), _varint(size), *chunks])
            del chunks
            _freed(size)
            self.lattice.lww.value.MergeFromString(encoded)
        elif size:
            encoded = b"".join(chunks)
            del chunks
            _freed(size)
            self.lattice.set.MergeFromString(encoded)
        return self.lattice


def _freed(size: int) -> None:
    """After ``size`` bytes of chunks were freed: give a large amount back to the system at once.

    The chunks came from malloc's heaps, which may keep freed memory (see
    :func:`cloudburst.malloc.trim`); the next whole copy would then come on top of it.
    """
    if size >= malloc.TRIM_AFTER_BYTES:
        malloc.trim()


Stored = lattice_pb2.Lattice | LargeValue
"""A value as read from the KVS: a lattice, or a last-writer-wins value that came in chunks."""


def stored_value(stored: Stored) -> Any:
    """The Python value a user sees for a stored value (as ``serialization.lattice_value``).

    A :class:`LargeValue` is decoded from its joined bytes and kept (it may be
    read again); call this on a worker thread for a large one.
    """
    if isinstance(stored, LargeValue):
        if stored.kind == "lww":
            return decode(stored.data, stored.serializer)
        return lattice_value(as_lattice(stored))
    return lattice_value(stored)


def stored_bytes(stored: Stored) -> Any:
    """The stored bytes of a value as they are (as ``serialization.lattice_bytes``)."""
    if isinstance(stored, LargeValue):
        if stored.kind == "lww":
            return stored.data
        return lattice_bytes(as_lattice(stored))
    return lattice_bytes(stored)


def as_lattice(stored: Stored) -> lattice_pb2.Lattice:
    """A stored value as a whole lattice; a :class:`LargeValue` is copied into a new one."""
    if not isinstance(stored, LargeValue):
        return stored
    lattice = lattice_pb2.Lattice()
    lattice.CopyFrom(stored.lattice)
    if stored.kind == "lww":
        lattice.lww.value.data = stored.data
    elif len(stored):
        lattice.set.MergeFromString(stored.data)
    return lattice


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
    max_message_bytes: int = 0,
) -> LargeValue | None:
    """Read ``key`` through ``GetValueChunks``, its chunks kept as they came; None when missing.

    ``max_message_bytes`` is the largest message the caller's channel takes (0: any the
    server sends).
    """
    request = kvs_service_pb2.GetValueChunksRequest(
        key=key, keyspace=keyspace, max_message_bytes=max_message_bytes
    )
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
    max_message_bytes: int = 0,
) -> lattice_pb2.Lattice | None:
    """Read ``key`` through ``GetValueChunks`` into a whole lattice; None when it does not exist.

    The chunks are joined and parsed on a worker thread: not on the caller's event loop.
    ``max_message_bytes`` is as :func:`receive` takes it.
    """
    received = await receive(stub, key, keyspace, timeout, max_message_bytes)
    return None if received is None else await asyncio.to_thread(received.to_lattice)


def smaller_limit(limit: int, other: int | None) -> int:
    """The smaller of two byte limits, where 0 (or None) is no limit."""
    return other if other and (not limit or other < limit) else limit


def inline_bytes(limits: kvs_service_pb2.GetLimitsResponse | None) -> int:
    """The largest value written in one message to a service with ``limits``; larger: chunks.

    ``limits`` is that service's own ``GetLimits`` answer (None: it gave none).
    """
    if limits is None or not limits.max_message_bytes:
        return INLINE_VALUE_BYTES
    return min(INLINE_VALUE_BYTES, int(limits.max_message_bytes))


async def get_limits(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub, timeout: float | None
) -> kvs_service_pb2.GetLimitsResponse:
    """The KVS tier's limits."""
    response: kvs_service_pb2.GetLimitsResponse = await call(
        "GetLimits", lambda: stub.GetLimits(kvs_service_pb2.GetLimitsRequest(), timeout=timeout)
    )
    return response
