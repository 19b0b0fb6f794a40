"""A KvsService that forwards to the KVS tier, so clients need only a scheduler's address."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from cloudburst.errors import UnavailableError
from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc

Context = grpc.aio.ServicerContext
AnyContext = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

#: The trailing-metadata key of a status's details (where ErrorInfo travels).
_DETAILS_KEY = "grpc-status-details-bin"


def _timeout(context: AnyContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(float(remaining), 0.0)


async def _forward(call: Awaitable[T], context: AnyContext) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        await _pass_on(exc, context)
        raise


async def _pass_on(exc: grpc.aio.AioRpcError, context: AnyContext) -> None:
    """End the call with the KVS's status, its ErrorInfo details unchanged."""
    trailing = tuple(exc.trailing_metadata() or ())
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not any(
        key == _DETAILS_KEY for key, _ in trailing
    ):
        # The transport's own error: say which hop failed (the client reached this scheduler).
        raise UnavailableError(
            f"this scheduler cannot reach the KVS tier ({exc.details()}); check that "
            "`cbgrpc kvs` is running and reachable from the scheduler"
        )
    await context.abort(exc.code(), exc.details() or "", trailing)


class KvsProxyServicer(kvs_service_pb2_grpc.KvsServiceServicer):
    """Forwards every KvsService call to the KVS tier (whichever instance is current)."""

    def __init__(self, channel: Callable[[], Awaitable[grpc.aio.Channel]]) -> None:
        self._channel = channel
        self._stubs: dict[int, kvs_service_pb2_grpc.KvsServiceAsyncStub] = {}

    async def _stub(self) -> kvs_service_pb2_grpc.KvsServiceAsyncStub:
        channel = await self._channel()
        stub = self._stubs.get(id(channel))
        if stub is None:
            self._stubs = {id(channel): kvs_service_pb2_grpc.KvsServiceStub(channel)}
            stub = self._stubs[id(channel)]
        return stub

    async def GetValue(
        self,
        request: kvs_service_pb2.GetValueRequest,
        context: Context[kvs_service_pb2.GetValueRequest, kvs_service_pb2.GetValueResponse],
    ) -> kvs_service_pb2.GetValueResponse:
        """Forward GetValue."""
        return await _forward(
            (await self._stub()).GetValue(request, timeout=_timeout(context)), context
        )

    async def PutValue(
        self,
        request: kvs_service_pb2.PutValueRequest,
        context: Context[kvs_service_pb2.PutValueRequest, kvs_service_pb2.PutValueResponse],
    ) -> kvs_service_pb2.PutValueResponse:
        """Forward PutValue."""
        return await _forward(
            (await self._stub()).PutValue(request, timeout=_timeout(context)), context
        )

    async def DeleteValue(
        self,
        request: kvs_service_pb2.DeleteValueRequest,
        context: Context[kvs_service_pb2.DeleteValueRequest, kvs_service_pb2.DeleteValueResponse],
    ) -> kvs_service_pb2.DeleteValueResponse:
        """Forward DeleteValue."""
        return await _forward(
            (await self._stub()).DeleteValue(request, timeout=_timeout(context)), context
        )

    async def BatchGetValues(
        self,
        request: kvs_service_pb2.BatchGetValuesRequest,
        context: Context[
            kvs_service_pb2.BatchGetValuesRequest, kvs_service_pb2.BatchGetValuesResponse
        ],
    ) -> kvs_service_pb2.BatchGetValuesResponse:
        """Forward BatchGetValues."""
        return await _forward(
            (await self._stub()).BatchGetValues(request, timeout=_timeout(context)), context
        )

    async def BatchDeleteValues(
        self,
        request: kvs_service_pb2.BatchDeleteValuesRequest,
        context: grpc.aio.ServicerContext[
            kvs_service_pb2.BatchDeleteValuesRequest, kvs_service_pb2.BatchDeleteValuesResponse
        ],
    ) -> kvs_service_pb2.BatchDeleteValuesResponse:
        """Forward BatchDeleteValues."""
        return await _forward(
            (await self._stub()).BatchDeleteValues(request, timeout=_timeout(context)), context
        )

    async def ListKeys(
        self,
        request: kvs_service_pb2.ListKeysRequest,
        context: Context[kvs_service_pb2.ListKeysRequest, kvs_service_pb2.ListKeysResponse],
    ) -> kvs_service_pb2.ListKeysResponse:
        """Forward ListKeys."""
        return await _forward(
            (await self._stub()).ListKeys(request, timeout=_timeout(context)), context
        )

    async def WatchValues(
        self,
        request: kvs_service_pb2.WatchValuesRequest,
        context: Context[kvs_service_pb2.WatchValuesRequest, kvs_service_pb2.WatchValuesResponse],
    ) -> AsyncIterator[kvs_service_pb2.WatchValuesResponse]:
        """Forward WatchValues until the caller cancels."""
        call = (await self._stub()).WatchValues(request, timeout=_timeout(context))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await _pass_on(exc, context)
        finally:
            call.cancel()
