"""OpenTelemetry tracing and metrics, configured by the standard ``OTEL_*`` variables.

Tracing is off unless an exporter is configured (``OTEL_TRACES_EXPORTER``,
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or
``--timings`` asks for the in-memory call breakdown; ``OTEL_SDK_DISABLED=true``
turns everything off. While off, the hot paths skip all trace work behind one
boolean, so it costs nothing measurable.

One call is one trace: the SDK's call span is the root, the scheduler's
placement span its child, every DAG stage a child of its first upstream's
stage (the other upstreams of a join are links), and the user library's KVS
accesses and messages children of the stage that made them. Context crosses
unary RPCs in gRPC metadata (the OpenTelemetry gRPC instrumentation) and
long-lived streams in each message's ``trace_context`` map.

Metrics use the OpenTelemetry API (no-ops until a provider is set) and are
exposed on a Prometheus endpoint by ``--metrics-port``.
"""

from __future__ import annotations

import collections
import logging
import threading
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

logger = logging.getLogger(__name__)

_tracer: trace.Tracer = trace.get_tracer("cloudburst")
METER = metrics.get_meter("cloudburst")

_tracing = False
_recent: RecentCalls | None = None


def recent_calls() -> RecentCalls | None:
    """The recorder of recent calls when ``--timings`` turned it on."""
    return _recent


def tracing() -> bool:
    """Whether spans are recorded in this process."""
    return _tracing


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context into a message's ``trace_context`` map."""
    if _tracing:
        propagate.inject(carrier)


def extract(carrier: Mapping[str, str]) -> otel_context.Context | None:
    """The trace context carried by a message, or None."""
    if not _tracing or not carrier:
        return None
    return propagate.extract(dict(carrier))


def link_to(carrier: Mapping[str, str]) -> trace.Link | None:
    """A link to the span whose context a message carries."""
    ctx = extract(carrier)
    if ctx is None:
        return None
    span_context = trace.get_current_span(ctx).get_span_context()
    return trace.Link(span_context) if span_context.is_valid else None


def span(
    name: str,
    parent: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[trace.Link] = (),
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> AbstractContextManager[trace.Span | None]:
    """A span (current while the block runs), or None and no work at all while tracing is off.

    ``parent`` is a message's ``trace_context`` map to continue. An empty map
    (the sender does not trace) starts a new trace, linked to the current span,
    so calls sharing a long-lived stream do not share its trace. With no map
    at all (None) the current context is the parent.
    """
    if not _tracing:
        return _NO_SPAN  # a shared object: hot paths pay no generator per span
    return _span(name, parent, attributes, links, kind)


_NO_SPAN: AbstractContextManager[None] = nullcontext()


@contextmanager
def _span(
    name: str,
    parent: Mapping[str, str] | None,
    attributes: Mapping[str, Any] | None,
    links: Sequence[trace.Link],
    kind: trace.SpanKind,
) -> Iterator[trace.Span | None]:
    ctx: otel_context.Context | None = None
    if parent is not None:
        if parent:
            ctx = extract(parent)
        else:
            ctx = otel_context.Context()
            enclosing = trace.get_current_span().get_span_context()
            if enclosing.is_valid:
                links = [*links, trace.Link(enclosing)]
    with _tracer.start_as_current_span(
        name, context=ctx, kind=kind, attributes=dict(attributes or {}), links=list(links)
    ) as current:
        yield current


def fail(current: trace.Span | None, exc: BaseException | None, message: str = "") -> None:
    """Mark a span as failed, recording the exception."""
    if current is None:
        return
    if exc is not None:
        current.record_exception(exc)
    current.set_status(trace.Status(trace.StatusCode.ERROR, message or str(exc or "")))


def record_failure(current: trace.Span | None, error_type: str, message: str, stack: str) -> None:
    """Mark a span as failed by an exception that was raised elsewhere (a user function)."""
    if current is None:
        return
    current.add_event(
        "exception",
        {"exception.type": error_type, "exception.message": message, "exception.stacktrace": stack},
    )
    current.set_status(trace.Status(trace.StatusCode.ERROR, f"{error_type}: {message}"))


# -- metrics ----------------------------------------------------------------------------------

FUNCTION_CALLS = METER.create_counter(
    "cloudburst.function.calls", unit="{call}", description="Function runs, by function and outcome"
)
FUNCTION_DURATION = METER.create_histogram(
    "cloudburst.function.duration", unit="s", description="Time a function run took, by function"
)
LOOP_STALLS = METER.create_counter(
    "cloudburst.function.loop_stalls",
    unit="{run}",
    description="Runs of a function on an executor's event loop that held it up (each sends "
    "the function back to worker threads), by function",
)
QUEUED_CALLS = METER.create_counter(
    "cloudburst.executor.queued_calls",
    unit="{call}",
    description="Times a function waited for a free thread (every slot busy), by executor",
)
DAG_CALLS = METER.create_counter(
    "cloudburst.dag.calls", unit="{call}", description="DAG calls finished, by DAG and outcome"
)
DAG_DURATION = METER.create_histogram(
    "cloudburst.dag.duration", unit="s", description="Time from placement to sink result, by DAG"
)
RESULTS_RELEASED = METER.create_counter(
    "cloudburst.results.released",
    unit="{result}",
    description="Call results deleted because their caller released them",
)
RESULTS_DROPPED = METER.create_counter(
    "cloudburst.results.dropped",
    unit="{result}",
    description="Call results never stored because their caller released them while held",
)
MESSAGES_DROPPED = METER.create_counter(
    "cloudburst.messaging.dropped",
    unit="{message}",
    description="Messages dropped because their mailbox had closed (its function finished)",
)
KVS_DURATION = METER.create_histogram(
    "cloudburst.kvs.operation.duration", unit="s", description="KVS operation latency, by operation"
)
KVS_ENGINE_DURATION = METER.create_histogram(
    "cloudburst.kvs.engine.duration",
    unit="s",
    description="Round trips to the KVS's storage engine (Valkey), retries included, by operation",
)

_executors: weakref.WeakSet[Any] = weakref.WeakSet()


def _queue_depth(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    for executor in list(_executors):
        yield metrics.Observation(executor.slots.queued, {"executor": executor.executor_id})


def _waiting(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    for executor in list(_executors):
        yield metrics.Observation(executor.slots.waiting, {"executor": executor.executor_id})


def _utilisation(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    for executor in list(_executors):
        slots = executor.slots
        yield metrics.Observation(slots.running / slots.size, {"executor": executor.executor_id})


METER.create_observable_gauge(
    "cloudburst.executor.queue_depth",
    [_queue_depth],
    unit="{call}",
    description="Calls waiting for a free thread (every runnable slot busy), by executor",
)
METER.create_observable_gauge(
    "cloudburst.executor.waiting_calls",
    [_waiting],
    unit="{call}",
    description="Functions waiting in user-library calls (their threads' slots given up), by "
    "executor",
)
METER.create_observable_gauge(
    "cloudburst.executor.utilization",
    [_utilisation],
    unit="1",
    description="Share of an executor's threads running user code",
)


def observe_executor(executor: Any) -> None:
    """Report an executor's queue depth and utilisation."""
    _executors.add(executor)


_answer_stream_holders: weakref.WeakSet[Any] = weakref.WeakSet()


def _open_answer_streams(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    for holder in list(_answer_stream_holders):
        yield metrics.Observation(holder.open_answer_streams, {"executor": holder.executor_id})


METER.create_observable_gauge(
    "cloudburst.executor.answer_streams",
    [_open_answer_streams],
    unit="{stream}",
    description="Callers' answer streams (StreamAnswers) an executor holds open",
)


def observe_answer_streams(holder: Any) -> None:
    """Report ``holder.open_answer_streams``, labelled with ``holder.executor_id``."""
    _answer_stream_holders.add(holder)


CACHE_READS = METER.create_counter(
    "cloudburst.executor.cache.reads",
    unit="{read}",
    description="Reads of user keys through an executor's value cache, by result (hit, miss)",
)
CACHE_EVICTIONS = METER.create_counter(
    "cloudburst.executor.cache.evictions",
    unit="{entry}",
    description="Values an executor's cache dropped to stay within its memory budget",
)
_caches: weakref.WeakSet[Any] = weakref.WeakSet()


def _cache_bytes(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
    for cache in list(_caches):
        yield metrics.Observation(cache.bytes, {"executor": cache.name})


METER.create_observable_gauge(
    "cloudburst.executor.cache.bytes",
    [_cache_bytes],
    unit="By",
    description="Bytes of values an executor's cache holds",
)


def observe_cache(cache: Any) -> None:
    """Report the bytes an executor's value cache holds."""
    _caches.add(cache)


# -- the in-memory breakdown of recent calls ---------------------------------------------------


@dataclass
class _Trace:
    spans: list[ReadableSpan] = field(default_factory=list)


class RecentCalls(SpanProcessor):
    """Keeps the spans of the last ``capacity`` traces, found by call id or response key."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._traces: collections.OrderedDict[int, _Trace] = collections.OrderedDict()
        self._by_call: dict[str, int] = {}
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        """Remember an ended span."""
        if span.context is None:
            return
        trace_id = span.context.trace_id
        with self._lock:
            record = self._traces.get(trace_id)
            if record is None:
                record = self._traces[trace_id] = _Trace()
                while len(self._traces) > self._capacity:
                    old_id, _ = self._traces.popitem(last=False)
                    self._by_call = {k: v for k, v in self._by_call.items() if v != old_id}
            record.spans.append(span)
            for attribute in ("cloudburst.call_id", "cloudburst.response_key"):
                value = (span.attributes or {}).get(attribute)
                if isinstance(value, str) and value:
                    self._by_call[value] = trace_id

    def spans(self, call_id: str) -> list[ReadableSpan]:
        """The spans of a recent call, in start order (empty when unknown)."""
        with self._lock:
            trace_id = self._by_call.get(call_id)
            record = self._traces.get(trace_id) if trace_id is not None else None
            spans = list(record.spans) if record else []
        return sorted(spans, key=lambda s: s.start_time or 0)

    def shutdown(self) -> None:
        """Nothing to flush."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing to flush."""
        return True


# -- set-up -----------------------------------------------------------------------------------


@dataclass
class Telemetry:
    """What :func:`setup` started; :meth:`shutdown` flushes and stops it."""

    tracer_provider: Any = None
    meter_provider: Any = None
    recent: RecentCalls | None = None
    metrics_server: Any = None
    metrics_port: int | None = None

    def shutdown(self) -> None:
        """Flush spans and stop the metrics endpoint; idempotent."""
        global _tracing
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
            self.meter_provider = None
        if self.tracer_provider is not None:
            _tracing = False
            self.tracer_provider.shutdown()
            self.tracer_provider = None


def _exporters(environ: Mapping[str, str]) -> list[str]:
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = ["otlp"]
    return [n for n in names if n != "none"]


#: Where other processes serve metrics this one's endpoint includes (``add_metrics_source``).
_metric_sources: list[Callable[[], dict[str, str]]] = []
#: How long a scrape waits for another process's metrics.
OTHER_METRICS_TIMEOUT = 2.0


def add_metrics_source(urls: Callable[[], dict[str, str]]) -> None:
    """Serve, with this process's metrics, those of other processes (serve's executors).

    ``urls()`` maps a name for each process to the URL of its metrics; its
    samples get the label ``process`` with that name. Families of the same
    name are merged, so the endpoint stays valid exposition: one block per
    metric.
    """
    _metric_sources.append(urls)


class _MergedCollector:
    """This process's metrics plus those of the processes in ``_metric_sources``."""

    def __init__(self, own: Any) -> None:
        self._own = own

    def describe(self) -> list[Any]:
        """Nothing: registering must not collect (the reader has no meter provider yet)."""
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[tuple[str, str], Any] = {}

        def add(family: Any) -> None:
            existing = families.get((family.name, family.type))
            if existing is None:
                families[(family.name, family.type)] = family
            else:
                existing.samples.extend(family.samples)

        for family in self._own.collect():
            add(family)
        for source in list(_metric_sources):
            for process, url in source().items():
                try:
                    with urllib.request.urlopen(url, timeout=OTHER_METRICS_TIMEOUT) as response:
                        text = response.read().decode()
                except OSError:
                    continue  # a process restarting: its metrics are back at the next scrape
                for family in text_string_to_metric_families(text):
                    if family.name == "target_info":
                        continue
                    family.samples = [
                        sample._replace(labels={**sample.labels, "process": process})
                        for sample in family.samples
                    ]
                    add(family)
        return list(families.values())


def _merge_other_processes(reader: Any) -> None:
    from prometheus_client import REGISTRY

    own = getattr(reader, "_collector", None)
    if own is None:  # pragma: no cover - another exporter version: own metrics only
        return
    REGISTRY.unregister(own)
    REGISTRY.register(_MergedCollector(own))


def setup(
    service_name: str,
    environ: Mapping[str, str],
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    timings: int = 0,
) -> Telemetry:
    """Configure tracing and metrics for this process from the environment and flags.

    Args:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` says otherwise.
        environ: The environment (read for ``OTEL_*`` variables).
        metrics_port: Serve Prometheus metrics on this port (0 picks one); None for none.
        metrics_host: Address the metrics endpoint binds.
        timings: Keep the spans of this many recent calls for ``cbgrpc timing``; 0 for none.
    """
    global _tracing
    result = Telemetry()
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        logger.info("OpenTelemetry disabled by OTEL_SDK_DISABLED")
        return result
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or service_name})
    exporters = _exporters(environ)
    if exporters or timings > 0:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=resource)
        for name in exporters:
            if name == "otlp":
                try:
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                        OTLPSpanExporter,
                    )
                except ImportError:
                    logger.error(
                        "OTEL_TRACES_EXPORTER asks for otlp, which needs the 'otlp' extra: "
                        "pip install 'cloudburst-grpc[otlp]'; spans are not exported"
                    )
                    continue
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            elif name == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            else:
                logger.error("unknown OTEL_TRACES_EXPORTER %r (use otlp, console or none)", name)
        if timings > 0:
            global _recent
            result.recent = _recent = RecentCalls(timings)
            provider.add_span_processor(result.recent)
        use_tracer_provider(provider)
        result.tracer_provider = provider
        logger.info(
            "tracing on (exporters: %s%s)",
            ", ".join(exporters) or "none",
            f"; keeping the last {timings} calls" if timings else "",
        )
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import start_http_server

        reader = PrometheusMetricReader()
        _merge_other_processes(reader)
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        server, _thread = start_http_server(metrics_port, addr=metrics_host)
        result.meter_provider = meter_provider
        result.metrics_server = server
        result.metrics_port = int(server.server_port)
        logger.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, result.metrics_port)
    return result


def use_tracer_provider(provider: Any) -> None:
    """Make ``provider`` the process's tracer provider and turn the hot-path work on."""
    global _tracing, _tracer
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("cloudburst")
    _tracing = True


def stop_tracing() -> None:
    """Turn the hot-path trace work off again (tests)."""
    global _tracing
    _tracing = False


def server_interceptors() -> list[Any]:
    """The tracing server interceptor (health checks excluded) when tracing is on."""
    if not _tracing:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any]:
    """The tracing client interceptors when tracing is on."""
    if not _tracing:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    return list(aio_client_interceptors(filter_=filters.negate(filters.health_check())))  # type: ignore[no-untyped-call]
