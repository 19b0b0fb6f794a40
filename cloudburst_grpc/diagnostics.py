"""DiagnosticsService: the timing breakdown of recent calls, for users without a tracing backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry.trace import StatusCode

from cloudburst.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cloudburst.v1 import diagnostics_service_pb2, diagnostics_service_pb2_grpc
from cloudburst_grpc import telemetry
from cloudburst_grpc.security.identity import EXECUTOR
from cloudburst_grpc.server import peer_channel

if TYPE_CHECKING:
    from cloudburst_grpc.security.tls import CertificateSource

#: Span attributes worth showing in a breakdown.
SHOWN = ("cloudburst.executor", "cloudburst.outcome", "cloudburst.key", "cloudburst.messages")


#: Trailing metadata with the absolute start (ns since the epoch) of a breakdown's first span.
ORIGIN_KEY = "cbgrpc-origin-ns"
#: How long the server waits for an executor process's part of a breakdown.
CHILD_TIMEOUT = 5.0


def _entries(spans: list[Any]) -> list[tuple[int, diagnostics_service_pb2.SpanTiming]]:
    """Each span as (absolute start in ns, entry without its offset), nesting from parents."""
    by_id = {s.context.span_id: s for s in spans}

    def depth(span: Any) -> int:
        level = 0
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            level += 1
        return level

    entries = []
    for span in spans:
        entry = diagnostics_service_pb2.SpanTiming(
            name=span.name,
            depth=depth(span),
            error=span.status.status_code == StatusCode.ERROR,
        )
        entry.duration.FromNanoseconds((span.end_time or span.start_time) - span.start_time)
        for key in SHOWN:
            value = (span.attributes or {}).get(key)
            if value is not None:
                entry.attributes[key.removeprefix("cloudburst.")] = str(value)
        entries.append((int(span.start_time), entry))
    return entries


def _response(
    call_id: str, entries: list[tuple[int, diagnostics_service_pb2.SpanTiming]]
) -> diagnostics_service_pb2.GetCallTimingResponse:
    response = diagnostics_service_pb2.GetCallTimingResponse(call_id=call_id)
    if not entries:
        return response
    origin = min(start for start, _ in entries)
    for start, entry in sorted(entries, key=lambda item: item[0]):
        added = response.spans.add()
        added.CopyFrom(entry)
        added.start_offset.FromNanoseconds(start - origin)
    return response


def timing(call_id: str, spans: list[Any]) -> diagnostics_service_pb2.GetCallTimingResponse:
    """Turn a call's spans into a breakdown: nesting depth, offsets, durations, attributes."""
    return _response(call_id, _entries(spans))


def origin_of(spans: list[Any]) -> int:
    """The absolute start (ns) of the first of ``spans``, the origin of their offsets."""
    return int(min(s.start_time for s in spans))


class DiagnosticsServicer(diagnostics_service_pb2_grpc.DiagnosticsServiceServicer):
    """Answers GetCallTiming from the spans kept by ``--timings``.

    A ``cbgrpc serve`` whose executors are child processes adds their parts of
    the breakdown (the runs of functions) to its own, asking each child.
    """

    def __init__(
        self,
        executor_addresses: Callable[[], list[str]] | None = None,
        max_payload_bytes: int = 0,
        tls: CertificateSource | None = None,
    ) -> None:
        """Serve the spans of this process, and of the executors at ``executor_addresses()``.

        With ``tls`` (the material the executors trust) the executors are asked over TLS.
        """
        self._executor_addresses = executor_addresses
        self._max_payload_bytes = max_payload_bytes
        self._tls = tls

    async def _from_executor(
        self, address: str, call_id: str
    ) -> list[tuple[int, diagnostics_service_pb2.SpanTiming]]:
        channel = peer_channel(
            address, self._max_payload_bytes or 4 * 1024 * 1024, self._tls, EXECUTOR
        )
        async with channel:
            stub = diagnostics_service_pb2_grpc.DiagnosticsServiceStub(channel)
            call = stub.GetCallTiming(
                diagnostics_service_pb2.GetCallTimingRequest(call_id=call_id),
                timeout=CHILD_TIMEOUT,
            )
            try:
                response = await call
                trailing = await call.trailing_metadata()
            except grpc.aio.AioRpcError:
                return []  # it knows nothing of the call (or is restarting): its part is missing
        origin = next((int(v) for k, v in trailing or () if k == ORIGIN_KEY), None)
        if origin is None:
            return []
        return [(origin + s.start_offset.ToNanoseconds(), s) for s in response.spans]

    async def GetCallTiming(
        self,
        request: diagnostics_service_pb2.GetCallTimingRequest,
        context: grpc.aio.ServicerContext[
            diagnostics_service_pb2.GetCallTimingRequest,
            diagnostics_service_pb2.GetCallTimingResponse,
        ],
    ) -> diagnostics_service_pb2.GetCallTimingResponse:
        """Return the breakdown of one recent call."""
        if not request.call_id:
            raise InvalidArgumentError("call_id must not be empty")
        recent = telemetry.recent_calls()
        if recent is None:
            raise FailedPreconditionError(
                "call timings are off; start cbgrpc serve with --timings N to keep the last N calls"
            )
        spans = recent.spans(request.call_id)
        entries = _entries(spans)
        addresses = self._executor_addresses() if self._executor_addresses else []
        if addresses:
            parts = await asyncio.gather(
                *(self._from_executor(a, request.call_id) for a in addresses)
            )
            nested = 1 if entries else 0  # the executors' spans run under the scheduler's
            for part in parts:
                for start, entry in part:
                    entry.depth += nested
                    entries.append((start, entry))
        if not entries:
            raise NotFoundError(
                f"no recent call {request.call_id!r}: it is unknown or older than the calls kept "
                "(raise --timings to keep more)",
                {"call_id": request.call_id},
            )
        if spans and not addresses:
            # An executor process's part: the server adds it to its own by absolute time.
            context.set_trailing_metadata(((ORIGIN_KEY, str(origin_of(spans))),))
        return _response(request.call_id, entries)


def format_timing(response: diagnostics_service_pb2.GetCallTimingResponse) -> str:
    """A compact text table of a breakdown."""
    lines = [f"call {response.call_id}"]
    for span in response.spans:
        start = span.start_offset.ToNanoseconds() / 1e6
        took = span.duration.ToNanoseconds() / 1e6
        attributes = " ".join(f"{k}={v}" for k, v in sorted(span.attributes.items()))
        flag = " ERROR" if span.error else ""
        lines.append(
            f"  +{start:8.3f} ms {took:8.3f} ms  {'  ' * span.depth}{span.name}"
            f"{'  [' + attributes + ']' if attributes else ''}{flag}"
        )
    return "\n".join(lines)
