"""A KvsService that forwards to the KVS tier, so clients need only a scheduler's address.

Clients that can reach the KVS themselves call it directly: the scheduler's
``GetLimits`` answer names the KVS instance in use (``kvs_addresses``), and the
SDK goes there, coming back here when that address does not answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from cloudburst.chunks import smaller_limit
from cloudburst.errors import UnavailableError
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc
from cloudburst_grpc.security.authz import peer_host
from cloudburst_grpc.security.node import is_loopback

Context = grpc.aio.ServicerContext
AnyContext = grpc.aio.ServicerContext[Any, Any]

#: The trailing-metadata key of a status's details (where ErrorInfo travels).
_DETAILS_KEY = "grpc-status-details-bin"


def _timeout(context: AnyContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(float(remaining), 0.0)


def _host(address: str) -> str:
    """The host of ``host:port`` or ``[v6]:port``."""
    return address.rsplit(":", 1)[0].strip("[]")


def addresses_for(peer: str, addresses: Iterable[str]) -> list[str]:
    """The KVS addresses to tell the client at ``peer`` (a gRPC peer string).

    A loopback address goes only to a client on loopback: any other client
    would dial a KVS of its own machine.
    """
    local_client = is_loopback(peer_host(peer))
    return [a for a in addresses if local_client or not is_loopback(_host(a))]


def _transport_unavailable(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the KVS could not be reached at all (not an error the KVS answered)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and not any(
        key == _DETAILS_KEY for key, _ in tuple(exc.trailing_metadata() or ())
    )


async def _pass_on(exc: grpc.aio.AioRpcError, context: AnyContext, where: str) -> None:
    """End the call with the KVS's status, its ErrorInfo details unchanged.

    ``where`` names the KVS instance the call went to.
    """
    trailing = tuple(exc.trailing_metadata() or ())
    if _transport_unavailable(exc):
        # The transport's own error: say which hop failed (the client reached this scheduler).
        raise UnavailableError(
            f"this scheduler cannot reach the KVS at {where} ({exc.details()}); check that "
            "`cbgrpc kvs` is running there, answering, and reachable from the scheduler"
        )
    await context.abort(exc.code(), exc.details() or "", trailing)


class KvsProxyServicer(kvs_service_pb2_grpc.KvsServiceServicer):
    """Forwards every KvsService call to the KVS tier (whichever instance is current).

    A unary call whose KVS instance cannot be reached is tried once more on
    another instance when ``unreachable`` (given the channel that failed) says
    there is one: every unary KvsService call is idempotent. ``where`` names
    the instance in use, for the error of one that cannot be reached.

    ``direct_addresses``, when given, returns the KVS addresses that
    ``GetLimits`` tells clients to call directly (see :func:`addresses_for`).
    ``max_message_bytes``, when given, is this server's own limit on a value in
    one message (``server.max_payload_bytes``): ``GetLimits`` reports it when
    it is smaller than the KVS's, so that clients size the writes they send
    here for it.
    """

    def __init__(
        self,
        channel: Callable[[], Awaitable[grpc.aio.Channel]],
        unreachable: Callable[[grpc.aio.Channel], bool] = lambda _: False,
        where: Callable[[], str] = lambda: "the KVS tier",
        direct_addresses: Callable[[], Awaitable[list[str]]] | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self._channel = channel
        self._max_message_bytes = max_message_bytes
        self._unreachable = unreachable
        self._where = where
        self._direct_addresses = direct_addresses
        self._stubs: dict[int, kvs_service_pb2_grpc.KvsServiceAsyncStub] = {}

    def _stub(self, channel: grpc.aio.Channel) -> kvs_service_pb2_grpc.KvsServiceAsyncStub:
        stub = self._stubs.get(id(channel))
        if stub is None:  # one channel at a time: the KVS instance in use
            self._stubs = {id(channel): kvs_service_pb2_grpc.KvsServiceStub(channel)}
            stub = self._stubs[id(channel)]
        return stub

    def _cap(
        self,
        request: (
            kvs_service_pb2.GetValueRequest
            | kvs_service_pb2.BatchGetValuesRequest
            | kvs_service_pb2.GetValueChunksRequest
        ),
    ) -> None:
        """Ask the KVS for messages that fit this server's limit as well as the caller's.

        The KVS would otherwise answer in one message what this server cannot take.
        """
        request.max_message_bytes = smaller_limit(
            request.max_message_bytes, self._max_message_bytes
        )

    async def _unary(self, method: str, request: Any, context: AnyContext) -> Any:
        for attempt in (1, 2):
            channel = await self._channel()
            try:
                return await getattr(self._stub(channel), method)(
                    request, timeout=_timeout(context)
                )
            except grpc.aio.AioRpcError as exc:
                if attempt == 1 and _transport_unavailable(exc) and self._unreachable(channel):
                    continue
                await _pass_on(exc, context, self._where())
                raise
        raise AssertionError("unreachable")

    async def GetValue(
        self,
        request: kvs_service_pb2.GetValueRequest,
        context: Context[kvs_service_pb2.GetValueRequest, kvs_service_pb2.GetValueResponse],
    ) -> kvs_service_pb2.GetValueResponse:
        """Forward GetValue, asking for a value this server can pass on in one message."""
        self._cap(request)
        return await self._unary("GetValue", request, context)  # type: ignore[no-any-return]

    async def PutValue(
        self,
        request: kvs_service_pb2.PutValueRequest,
        context: Context[kvs_service_pb2.PutValueRequest, kvs_service_pb2.PutValueResponse],
    ) -> kvs_service_pb2.PutValueResponse:
        """Forward PutValue."""
        return await self._unary("PutValue", request, context)  # type: ignore[no-any-return]

    async def DeleteValue(
        self,
        request: kvs_service_pb2.DeleteValueRequest,
        context: Context[kvs_service_pb2.DeleteValueRequest, kvs_service_pb2.DeleteValueResponse],
    ) -> kvs_service_pb2.DeleteValueResponse:
        """Forward DeleteValue."""
        return await self._unary("DeleteValue", request, context)  # type: ignore[no-any-return]

    async def BatchGetValues(
        self,
        request: kvs_service_pb2.BatchGetValuesRequest,
        context: Context[
            kvs_service_pb2.BatchGetValuesRequest, kvs_service_pb2.BatchGetValuesResponse
        ],
    ) -> kvs_service_pb2.BatchGetValuesResponse:
        """Forward BatchGetValues, asking for values this server can pass on in one message."""
        self._cap(request)
        return await self._unary("BatchGetValues", request, context)  # type: ignore[no-any-return]

    async def BatchDeleteValues(
        self,
        request: kvs_service_pb2.BatchDeleteValuesRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.BatchDeleteValuesRequest, kvs_service_pb2.BatchDeleteValuesResponse
        ],
    ) -> kvs_service_pb2.BatchDeleteValuesResponse:
        """Forward BatchDeleteValues."""
        return await self._unary("BatchDeleteValues", request, context)  # type: ignore[no-any-return]

    async def ListKeys(
        self,
        request: kvs_service_pb2.ListKeysRequest,
        context: Context[kvs_service_pb2.ListKeysRequest, kvs_service_pb2.ListKeysResponse],
    ) -> kvs_service_pb2.ListKeysResponse:
        """Forward ListKeys."""
        return await self._unary("ListKeys", request, context)  # type: ignore[no-any-return]

    async def WatchValues(
        self,
        request: kvs_service_pb2.WatchValuesRequest,
        context: Context[kvs_service_pb2.WatchValuesRequest, kvs_service_pb2.WatchValuesResponse],
    ) -> AsyncIterator[kvs_service_pb2.WatchValuesResponse]:
        """Forward WatchValues until the caller cancels."""
        channel = await self._channel()
        call = self._stub(channel).WatchValues(request, timeout=_timeout(context))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            if _transport_unavailable(exc):
                self._unreachable(channel)  # the caller's next watch goes elsewhere
            await _pass_on(exc, context, self._where())
        finally:
            call.cancel()

    async def GetValueChunks(
        self,
        request: kvs_service_pb2.GetValueChunksRequest,
        context: Context[
            kvs_service_pb2.GetValueChunksRequest, kvs_service_pb2.GetValueChunksResponse
        ],
    ) -> AsyncIterator[kvs_service_pb2.GetValueChunksResponse]:
        """Forward GetValueChunks, a chunk at a time (never the whole value at once)."""
        self._cap(request)
        channel = await self._channel()
        call = self._stub(channel).GetValueChunks(request, timeout=_timeout(context))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            if _transport_unavailable(exc):
                self._unreachable(channel)
            await _pass_on(exc, context, self._where())
        finally:
            call.cancel()

    async def PutValueChunks(
        self,
        request_iterator: AsyncIterator[kvs_service_pb2.PutValueChunksRequest],
        context: Context[
            kvs_service_pb2.PutValueChunksRequest, kvs_service_pb2.PutValueChunksResponse
        ],
    ) -> kvs_service_pb2.PutValueChunksResponse:
        """Forward PutValueChunks, a chunk at a time as the caller sends them."""
        channel = await self._channel()
        call = self._stub(channel).PutValueChunks(request_iterator, timeout=_timeout(context))
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if _transport_unavailable(exc):
                self._unreachable(channel)
            await _pass_on(exc, context, self._where())
            raise

    async def StreamOps(
        self,
        request_iterator: AsyncIterator[kvs_service_pb2.StreamOpsRequest],
        context: Context[kvs_service_pb2.StreamOpsRequest, kvs_service_pb2.StreamOpsResponse],
    ) -> AsyncIterator[kvs_service_pb2.StreamOpsResponse]:
        """Not forwarded: a caller of this stream falls back to the unary calls, which are.

        Callers that stream ops (executors, schedulers, the SDK) reach the KVS tier directly.
        """
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "StreamOps is served by the KVS, not through a scheduler; use the unary calls "
            "(GetValue, PutValue, DeleteValue)",
        )
        yield kvs_service_pb2.StreamOpsResponse()  # not reached: abort raises

    async def GetLimits(
        self,
        request: kvs_service_pb2.GetLimitsRequest,
        context: Context[kvs_service_pb2.GetLimitsRequest, kvs_service_pb2.GetLimitsResponse],
    ) -> kvs_service_pb2.GetLimitsResponse:
        """Forward GetLimits, adding the KVS addresses clients may call directly.

        The KVS's ``serves_op_streams`` is cleared: this service forwards no StreamOps.
        Its ``max_message_bytes`` becomes this server's own limit when that is smaller:
        a write sent here must pass both.
        """
        response: kvs_service_pb2.GetLimitsResponse = await self._unary(
            "GetLimits", request, context
        )
        response.serves_op_streams = False
        response.max_message_bytes = smaller_limit(
            response.max_message_bytes, self._max_message_bytes
        )
        if self._direct_addresses is not None:
            response.kvs_addresses.extend(
                addresses_for(context.peer() or "", await self._direct_addresses())
            )
        return response
