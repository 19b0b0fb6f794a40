"""Moving a KVS value too large for one message: in chunks over a stream.

A value of more than :data:`INLINE_VALUE_BYTES` is written with
``PutValueChunks`` (the write without its bytes, then the bytes in
:data:`CHUNK_BYTES` pieces) and read with ``GetValueChunks`` when ``GetValue``
answers ``chunked``. No process holds the value more than about twice: its
own copy and the one being assembled. The SDK and the executors use the same
functions; the limit on a value's size comes from the KVS (``GetLimits``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cloudburst.rpc import call, error_from_rpc
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2

CHUNK_BYTES = 1 << 20
"""Bytes of a value per chunk."""
INLINE_VALUE_BYTES = 4 << 20
"""A last-writer-wins value larger than this is written in chunks."""


def needs_chunks(lattice: lattice_pb2.Lattice, size: int | None = None) -> bool:
    """Whether a write of ``lattice`` goes in chunks.

    ``size``, the length of its value when the caller knows it, saves reading
    (copying) the bytes out of the message.
    """
    if lattice.WhichOneof("kind") != "lww":
        return False
    return (len(lattice.lww.value.data) if size is None else size) > INLINE_VALUE_BYTES


async def write_chunks(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub,
    key: str,
    lattice: lattice_pb2.Lattice,
    keyspace: lattice_pb2.Keyspace.ValueType,
    timeout: float | None,
    request_id: str = "",
) -> None:
    """Merge a last-writer-wins ``lattice`` into ``key`` through ``PutValueChunks``."""
    data = lattice.lww.value.data

    async def frames() -> AsyncIterator[kvs_service_pb2.PutValueChunksRequest]:
        first = kvs_service_pb2.PutValueChunksRequest()
        put = first.put
        put.key, put.keyspace, put.request_id = key, keyspace, request_id
        put.lattice.lww.timestamp.CopyFrom(lattice.lww.timestamp)
        put.lattice.lww.value.serializer = lattice.lww.value.serializer
        yield first
        view = memoryview(data)
        for start in range(0, len(data), CHUNK_BYTES):
            yield kvs_service_pb2.PutValueChunksRequest(
                chunk=bytes(view[start : start + CHUNK_BYTES])
            )

    await call(
        f"PutValueChunks of key {key!r}",
        lambda: stub.PutValueChunks(frames(), timeout=timeout),
    )


async def read_chunks(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub,
    key: str,
    keyspace: lattice_pb2.Keyspace.ValueType,
    timeout: float | None,
) -> lattice_pb2.Lattice | None:
    """Read ``key`` through ``GetValueChunks``; None when it does not exist."""
    request = kvs_service_pb2.GetValueChunksRequest(key=key, keyspace=keyspace)
    stream = stub.GetValueChunks(request, timeout=timeout)
    lattice: lattice_pb2.Lattice | None = None
    data = bytearray()
    try:
        async for frame in stream:
            if frame.WhichOneof("frame") == "lattice":
                lattice = frame.lattice
            else:
                data += frame.chunk
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, what=f"GetValueChunks of key {key!r}") from None
    finally:
        stream.cancel()
    if lattice is not None and lattice.WhichOneof("kind") == "lww":
        payload = bytes(data)
        data.clear()  # at most two copies at a time: this one and the message's
        lattice.lww.value.data = payload
    return lattice


async def get_limits(
    stub: kvs_service_pb2_grpc.KvsServiceAsyncStub, timeout: float | None
) -> kvs_service_pb2.GetLimitsResponse:
    """The KVS tier's limits."""
    response: kvs_service_pb2.GetLimitsResponse = await call(
        "GetLimits", lambda: stub.GetLimits(kvs_service_pb2.GetLimitsRequest(), timeout=timeout)
    )
    return response
