"""DiagnosticsService: the timing breakdown of recent calls, for users without a tracing backend."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.trace import StatusCode

from cloudburst.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from cloudburst.v1 import diagnostics_service_pb2, diagnostics_service_pb2_grpc
from cloudburst_grpc import telemetry

#: Span attributes worth showing in a breakdown.
SHOWN = ("cloudburst.executor", "cloudburst.outcome", "cloudburst.key", "cloudburst.messages")


def timing(call_id: str, spans: list[Any]) -> diagnostics_service_pb2.GetCallTimingResponse:
    """Turn a call's spans into a breakdown: nesting depth, offsets, durations, attributes."""
    response = diagnostics_service_pb2.GetCallTimingResponse(call_id=call_id)
    if not spans:
        return response
    by_id = {s.context.span_id: s for s in spans}
    origin = min(s.start_time for s in spans)

    def depth(span: Any) -> int:
        level = 0
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            level += 1
        return level

    for span in spans:
        entry = response.spans.add(
            name=span.name,
            depth=depth(span),
            error=span.status.status_code == StatusCode.ERROR,
        )
        entry.start_offset.FromNanoseconds(span.start_time - origin)
        entry.duration.FromNanoseconds((span.end_time or span.start_time) - span.start_time)
        for key in SHOWN:
            value = (span.attributes or {}).get(key)
            if value is not None:
                entry.attributes[key.removeprefix("cloudburst.")] = str(value)
    return response


class DiagnosticsServicer(diagnostics_service_pb2_grpc.DiagnosticsServiceServicer):
    """Answers GetCallTiming from the spans kept by ``--timings``."""

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
        if not spans:
            raise NotFoundError(
                f"no recent call {request.call_id!r}: it is unknown or older than the calls kept "
                "(raise --timings to keep more)",
                {"call_id": request.call_id},
            )
        return timing(request.call_id, spans)


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
