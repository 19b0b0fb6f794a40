"""The SDK's call spans: the root of each call's trace, when the application traces.

OpenTelemetry is optional for the SDK: install the ``tracing`` extra
(``pip install 'cloudburst-grpc-sdk[tracing]'``, which brings
``opentelemetry-api`` and the gRPC instrumentation) and configure a tracer
provider in the application (with ``opentelemetry-sdk``). Every call then gets
a CLIENT span whose context travels in the call frame's ``trace_context``; the
span ends when the outcome arrives. Without OpenTelemetry, or without a
configured provider, these functions do nothing and :func:`enabled` says so.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import MutableMapping
from typing import Any

try:
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - the SDK works without OpenTelemetry
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]


def enabled() -> bool:
    """Whether the application has configured OpenTelemetry tracing."""
    return trace is not None and not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )


def client_interceptors() -> list[Any]:
    """GRPC client interceptors that carry the trace context of unary calls, when tracing."""
    if not enabled():
        return []
    try:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
    except ImportError:  # pragma: no cover - the instrumentation is optional for the SDK
        return []
    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]


def start(name: str, attributes: dict[str, str], carrier: MutableMapping[str, str]) -> Any:
    """Start a call span and write its context into ``carrier``; None when not tracing."""
    if not enabled():
        return None
    span = trace.get_tracer("cloudburst.sdk").start_span(
        name, kind=trace.SpanKind.CLIENT, attributes=attributes
    )
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span


def finish(span: Any, error: BaseException | None = None, failed: str = "") -> None:
    """End a call span, marking it failed when the call failed."""
    if span is None:
        return
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    elif failed:
        span.set_status(trace.Status(trace.StatusCode.ERROR, failed))
    span.end()


def end_with(span: Any, outcome: concurrent.futures.Future[Any] | None) -> None:
    """End ``span`` when the streamed ``outcome`` arrives (or now, when there is none)."""
    if span is None:
        return
    if outcome is None:
        finish(span)
        return

    def done(future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            finish(span, failed="cancelled")
        elif future.exception() is not None:
            finish(span, future.exception())
        else:
            kind = future.result().WhichOneof("result")
            finish(span, failed="" if kind == "value" else f"the call ended with a {kind}")

    outcome.add_done_callback(done)
