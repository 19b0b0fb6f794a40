"""Typed async access to a remote KVS over a ``grpc.aio`` channel.

Every call raises cloudburst exceptions (through :func:`cloudburst.rpc.call`),
never raw gRPC errors, and a ``timeout`` becomes the call's gRPC deadline.

Small reads and merges, and deletes, go over one long-lived ``StreamOps`` stream
per client, and merges of larger values that fit in one message over a second
(see :class:`~cloudburst.opstream.OpStreams`; a message on an open stream costs
the KVS about half a unary call), answered and failing exactly as their unary
calls would; ops that queue up while one is being written go out in one message,
when the KVS reads batches. Everything else, and every op when the streams are
off or the KVS lacks them, is a unary call.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import grpc

from cloudburst import chunks
from cloudburst.errors import CloudburstTimeoutError
from cloudburst.opstream import (
    MAX_STREAMED_GET_BYTES,
    STREAM_ENV,
    OpRequest,
    OpStream,
    OpStreams,
    stream_allowed,
)
from cloudburst.rpc import call, error_from_rpc
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2
from cloudburst_grpc import telemetry
from cloudburst_kvs.store import MAX_BATCH_KEYS, Keyspace, WatchEvent

logger = logging.getLogger(__name__)

_USER = lattice_pb2.KEYSPACE_USER


def stream_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether KVS clients of this process send small ops over a stream.

    On unless ``CLOUDBURST_KVS_STREAM`` is 0, false, no or off (see
    :func:`cloudburst.opstream.stream_allowed`). With tracing on, ops stay
    unary calls, each with its own client span.
    """
    return stream_allowed(environ) and not telemetry.tracing()


class KvsClient:
    """Calls the KvsService of a server reachable over ``channel``.

    The channel belongs to the caller, who closes it.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        stream: bool | None = None,
        name: str = "the KVS",
        max_message_bytes: int = 0,
    ) -> None:
        """Create a client; no call is made until a method is awaited.

        Args:
            channel: The channel to the KVS.
            stream: Send small reads and merges, and deletes, over one stream; None: unless
                turned off (see :func:`stream_enabled`).
            name: What the channel connects to, for the log (e.g. "the KVS at host:port").
            max_message_bytes: The largest value the channel takes in one message (its
                ``max_payload_bytes``): reads ask the KVS for no larger, and a merge of a
                larger value goes in chunks. 0: whatever the KVS sends.
        """
        self._max_message_bytes = max_message_bytes
        self._inline_bytes = chunks.smaller_limit(chunks.INLINE_VALUE_BYTES, max_message_bytes)
        # What a read on the op stream asks for (see MAX_STREAMED_GET_BYTES).
        self._streamed_read_bytes = chunks.smaller_limit(MAX_STREAMED_GET_BYTES, max_message_bytes)
        self._stub: kvs_service_pb2_grpc.KvsServiceAsyncStub = kvs_service_pb2_grpc.KvsServiceStub(
            channel
        )
        if stream is None:
            stream = stream_enabled()
        self._ops: OpStreams | None = OpStreams(self._stub, name) if stream else None

    async def close(self) -> None:
        """End the op streams, if open (the channel stays open); idempotent."""
        if self._ops is not None:
            await self._ops.close()

    def retire(self) -> None:
        """End the op streams once the ops in flight are answered (call on the loop).

        For a client replaced by one on a new channel, which takes the later
        ops; any that still come here are unary calls.
        """
        if self._ops is not None:
            self._ops.retire()

    def _streamed(self, write_bytes: int = 0) -> OpStream | None:
        """The op stream for an op (``write_bytes``: a merge's value), if one is in use."""
        if self._ops is None:
            return None
        ops = self._ops.for_write(write_bytes)
        return ops if ops.available and not ops.retiring else None

    async def get(
        self,
        key: str,
        keyspace: Keyspace = _USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> lattice_pb2.Lattice | None:
        """Return the key's lattice, or None when it does not exist.

        Args:
            key: The key.
            keyspace: The key's keyspace.
            wait: Wait until the key exists (up to ``timeout`` and the server's wait limit).
            timeout: Seconds before the call's deadline; None for no deadline.

        Returns:
            The lattice, or None when the key does not exist or, with ``wait``, did
            not appear before the timeout.

        Raises:
            CloudburstTimeoutError: The deadline passed for a call that did not wait.
        """
        response = await self._get_value(key, keyspace, wait, timeout)
        if response is None:
            return None
        if response.chunked:  # too large for one message
            return await chunks.read_chunks(
                self._stub, key, keyspace, timeout, self._max_message_bytes
            )
        return response.lattice if response.found else None

    async def _get_value(
        self, key: str, keyspace: Keyspace, wait: bool, timeout: float | None
    ) -> kvs_service_pb2.GetValueResponse | None:
        """One GetValue call; None when a wait ended at the deadline."""
        what = f"GetValue of key {key!r}"
        try:
            ops = self._streamed()
            if ops is not None:
                frame = OpRequest()
                frame.get.key = key
                frame.get.keyspace = keyspace
                frame.get.wait = wait
                frame.get.max_message_bytes = self._streamed_read_bytes
                answer = await ops.request(frame, what, timeout)
                if answer is not None:
                    return answer.get
            request = kvs_service_pb2.GetValueRequest(
                key=key, keyspace=keyspace, wait=wait, max_message_bytes=self._max_message_bytes
            )
            return await call(what, lambda: self._stub.GetValue(request, timeout=timeout))
        except CloudburstTimeoutError:
            # The deadline racing the server's own "not found yet" answer is the
            # expected end of a wait, so both read the same to the caller.
            if wait:
                return None
            raise

    async def get_stored(
        self,
        key: str,
        keyspace: Keyspace = _USER,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> chunks.Stored | None:
        """As :meth:`get`, but a last-writer-wins value too large for one message stays in chunks.

        It comes as a :class:`~cloudburst.chunks.LargeValue`: its size is known
        without a copy and its bytes are joined only when read (on a worker
        thread, the GIL released), so no whole copy is made on the event loop.
        """
        response = await self._get_value(key, keyspace, wait, timeout)
        if response is None:
            return None
        if response.chunked:
            received = await chunks.receive(
                self._stub, key, keyspace, timeout, self._max_message_bytes
            )
            if received is None or received.kind == "lww":
                return received
            return received.to_lattice()
        return response.lattice if response.found else None

    async def limits(self, timeout: float | None = 10.0) -> kvs_service_pb2.GetLimitsResponse:
        """The KVS tier's limits: the largest value, the largest message."""
        return await chunks.get_limits(self._stub, timeout)

    async def put(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: Keyspace = _USER,
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> lattice_pb2.Lattice:
        """Merge ``lattice`` into the key and return the stored lattice after the merge.

        A last-writer-wins lattice without a timestamp is stamped by the server.
        A retry with the same ``request_id`` is not merged twice.
        """
        response = await self._put(key, lattice, keyspace, request_id, timeout, omit=False)
        return response.lattice

    async def merge(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: Keyspace = _USER,
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> None:
        """Merge ``lattice`` into the key, as :meth:`put`, without reading the result back.

        The server then answers without the stored lattice, which for a large
        value halves what travels. A large value goes in chunks.
        """
        if lattice.WhichOneof("kind") == "lww":
            value = lattice.lww.value
            data = value.data  # read (copied) out of the message once, to size and to send
            if len(data) > self._inline_bytes:
                await chunks.write_value(
                    self._stub,
                    key,
                    lattice.lww.timestamp,
                    value.serializer,
                    data,
                    keyspace,
                    timeout,
                    request_id,
                )
                return
            size = len(data)
            del data
        else:
            size = None
        await self._put(key, lattice, keyspace, request_id, timeout, omit=True, size=size)

    async def _put(
        self,
        key: str,
        lattice: lattice_pb2.Lattice,
        keyspace: Keyspace,
        request_id: str,
        timeout: float | None,
        omit: bool,
        size: int | None = None,
    ) -> kvs_service_pb2.PutValueResponse:
        """Send one PutValue, on an op stream when streams are in use.

        ``size`` is the bytes of a last-writer-wins value when the caller measured
        them: measuring the lattice would encode (copy) it once more.
        """
        what = f"PutValue of key {key!r}"
        if size is None and self._streamed() is not None:  # not for unary calls only
            size = lattice.ByteSize()
        ops = self._streamed(size) if size is not None else None
        if ops is not None:
            frame = OpRequest()
            put = frame.put
            put.key = key
            put.keyspace = keyspace
            put.request_id = request_id
            put.omit_lattice = omit
            put.lattice.CopyFrom(lattice)
            answer = await ops.request(frame, what, timeout)
            if answer is not None:
                return answer.put
        request = kvs_service_pb2.PutValueRequest(
            key=key, keyspace=keyspace, request_id=request_id, omit_lattice=omit
        )
        request.lattice.CopyFrom(lattice)  # one copy; a nested constructor copies at each level
        response: kvs_service_pb2.PutValueResponse = await call(
            what, lambda: self._stub.PutValue(request, timeout=timeout)
        )
        return response

    async def delete(
        self,
        key: str,
        keyspace: Keyspace = _USER,
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> bool:
        """Delete the key and return whether it existed."""
        what = f"DeleteValue of key {key!r}"
        ops = self._streamed()
        if ops is not None:
            frame = OpRequest()
            delete = frame.delete
            delete.key = key
            delete.keyspace = keyspace
            delete.request_id = request_id
            answer = await ops.request(frame, what, timeout)
            if answer is not None:
                return answer.delete.existed
        request = kvs_service_pb2.DeleteValueRequest(
            key=key, keyspace=keyspace, request_id=request_id
        )
        response = await call(what, lambda: self._stub.DeleteValue(request, timeout=timeout))
        return response.existed

    async def batch_get(
        self,
        keys: Sequence[str],
        keyspace: Keyspace = _USER,
        *,
        timeout: float | None = None,
    ) -> dict[str, lattice_pb2.Lattice | None]:
        """Return the lattice (or None) of every key; more than 1000 keys take several calls.

        ``timeout`` applies to each call.
        """
        result: dict[str, lattice_pb2.Lattice | None] = {}
        for start in range(0, len(keys), MAX_BATCH_KEYS):
            request = kvs_service_pb2.BatchGetValuesRequest(
                keys=keys[start : start + MAX_BATCH_KEYS],
                keyspace=keyspace,
                max_message_bytes=self._max_message_bytes,
            )
            response = await call(
                f"BatchGetValues of {len(request.keys)} keys",
                functools.partial(self._stub.BatchGetValues, request, timeout=timeout),
            )
            for entry in response.entries:
                if entry.chunked:  # too large for the batch's message
                    result[entry.key] = await chunks.read_chunks(
                        self._stub, entry.key, keyspace, timeout, self._max_message_bytes
                    )
                else:
                    result[entry.key] = entry.lattice if entry.found else None
        return result

    async def batch_delete(
        self,
        keys: Sequence[str],
        keyspace: Keyspace = _USER,
        *,
        timeout: float | None = None,
    ) -> int:
        """Delete every key and return how many existed; more than 1000 keys take several calls.

        ``timeout`` applies to each call.
        """
        deleted = 0
        for start in range(0, len(keys), MAX_BATCH_KEYS):
            request = kvs_service_pb2.BatchDeleteValuesRequest(
                keys=keys[start : start + MAX_BATCH_KEYS], keyspace=keyspace
            )
            response = await call(
                f"BatchDeleteValues of {len(request.keys)} keys",
                functools.partial(self._stub.BatchDeleteValues, request, timeout=timeout),
            )
            deleted += response.deleted
        return deleted

    async def list_keys(
        self,
        prefix: str = "",
        keyspace: Keyspace = _USER,
        *,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> list[str]:
        """Return every key that starts with ``prefix``, ascending, reading all pages.

        ``page_size`` (0 for the server's default) and ``timeout`` apply to each page.
        """
        keys: list[str] = []
        token = ""
        while True:
            request = kvs_service_pb2.ListKeysRequest(
                keyspace=keyspace, prefix=prefix, page_size=page_size, page_token=token
            )
            response = await call(
                f"ListKeys of prefix {prefix!r}",
                functools.partial(self._stub.ListKeys, request, timeout=timeout),
            )
            keys.extend(response.keys)
            token = response.next_page_token
            if not token:
                return keys

    async def watch(
        self,
        keys: Iterable[str] = (),
        keyspace: Keyspace = _USER,
        *,
        prefix: str = "",
        timeout: float | None = None,
    ) -> WatchStream:
        """Start watching keys and/or a key prefix; returns once the server is watching.

        No change committed after this returns is missed. Iterate the returned
        stream for :class:`~cloudburst_kvs.store.WatchEvent` items, and close it (or use it
        as an async context manager) to stop.

        Args:
            keys: The keys to watch.
            keyspace: Their keyspace.
            prefix: Also watch every key that starts with it, when not empty.
            timeout: Seconds after which the whole stream ends; None to watch until closed.
        """
        request = kvs_service_pb2.WatchValuesRequest(
            keys=list(keys), keyspace=keyspace, key_prefix=prefix
        )
        stream = WatchStream(self._stub.WatchValues(request, timeout=timeout))
        try:
            await stream._started()
        except BaseException:
            stream.close()
            raise
        return stream


class WatchStream:
    """The changes streamed by a WatchValues call, as an async iterator of WatchEvent."""

    _WHAT = "WatchValues"

    def __init__(
        self,
        rpc: grpc.aio.UnaryStreamCall[
            kvs_service_pb2.WatchValuesRequest, kvs_service_pb2.WatchValuesResponse
        ],
    ) -> None:
        self._rpc = rpc
        self._first: kvs_service_pb2.WatchValuesResponse | None = None
        self._ended = False

    async def _started(self) -> None:
        # The server sends its headers once it registered the watch.
        try:
            await self._rpc.initial_metadata()
        except grpc.RpcError as exc:
            self._ended = True
            raise error_from_rpc(exc, what=self._WHAT) from None
        if self._rpc.done():
            # Refused or ended at once (bad request, server shutting down): say so
            # now rather than at the first read.
            self._first = await self._read()

    async def _read(self) -> kvs_service_pb2.WatchValuesResponse | None:
        try:
            item = await self._rpc.read()
        except grpc.RpcError as exc:
            self._ended = True
            raise error_from_rpc(exc, what=self._WHAT) from None
        if not isinstance(item, kvs_service_pb2.WatchValuesResponse):  # grpc.aio.EOF
            self._ended = True
            return None
        return item

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> WatchEvent:
        response, self._first = self._first, None
        if response is None:
            if self._ended:
                raise StopAsyncIteration
            response = await self._read()
            if response is None:
                raise StopAsyncIteration
        entry = response.entry
        lattice = entry.lattice if entry.found and not response.deleted else None
        return WatchEvent(entry.key, lattice, response.deleted)

    def close(self) -> None:
        """Stop watching (cancels the call); idempotent."""
        self._ended = True
        self._rpc.cancel()

    async def aclose(self) -> None:
        """Stop watching; same as :meth:`close`."""
        self.close()

    async def __aenter__(self) -> WatchStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["STREAM_ENV", "KvsClient", "OpStream", "WatchStream", "stream_enabled"]
