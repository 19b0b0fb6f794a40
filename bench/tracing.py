"""Tracing overhead: the same `cbgrpc serve` with tracing off, off again, on, and disabled.

Four `cbgrpc serve --storage memory` processes run next to the rest of the
bench and are timed in its interleaved rounds (within a round, the variants of
one workload take turns in small sub-blocks, in a rotating order):

- (a) defaults: no ``OTEL_*`` variable, no ``--timings``: tracing off;
- (b) the same again: a second identical server, whose difference from (a)
  is the run-to-run noise of the comparison;
- (c) ``--timings 100000``: tracing on, every span recorded in memory (what
  ``cbgrpc timing`` reads); no exporter;
- (d) ``OTEL_SDK_DISABLED=true``: OpenTelemetry switched off outright.

Every server starts without any ``OTEL_*`` variable of this environment (only
(d) gets its one); whether tracing is really on or off in each is checked, not
assumed: by its log line and by asking its DiagnosticsService for the spans of
a call.

What the comparison can and cannot show: there is no build of the product
without the instrumentation, so (a), (b) and (d) all run the instrumented code
with tracing off, where each span site costs one call that checks a module
boolean and does nothing else (no gRPC tracing interceptors are installed).
(d) differs from (a) only at start-up (OpenTelemetry is not set up at all).
The bench also times that off-path span call in this process, so the report
can say what the off path costs per call at most.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from bench import systems
from bench.measure import SyncWorkload, Workload, summarize
from bench.procs import Processes, log

#: Spans kept by the tracing-on server: more than the calls of a run, so none are evicted.
TIMINGS = 100_000
#: The verdict's tolerance: a difference is "within noise" when at most this or the noise band.
MIN_TOLERANCE = 0.03
#: The workloads measured on every variant; throughput only for the first.
WORKLOADS = (systems.DAG_DIRECT, systems.CALL)


@dataclass(frozen=True)
class Variant:
    """One way of starting `cbgrpc serve`."""

    system: str
    """The system name of its workloads (``trace-off-a`` ...)."""
    tag: str
    """(a), (b), (c) or (d)."""
    label: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    expect_tracing: bool = False


VARIANTS = (
    Variant("trace-off-a", "a", "tracing off (defaults)"),
    Variant("trace-off-b", "b", "tracing off, a second identical server (noise)"),
    Variant(
        "trace-on",
        "c",
        "tracing on (every span kept in memory, no exporter)",
        args=("--timings", str(TIMINGS)),
        expect_tracing=True,
    ),
    Variant(
        "trace-disabled",
        "d",
        "OpenTelemetry disabled",
        env=(("OTEL_SDK_DISABLED", "true"),),
    ),
)
TITLES = {v.system: f"`cbgrpc serve` ({v.tag}) {v.label}" for v in VARIANTS}


@dataclass
class Started:
    """A running variant: its deployment and what the start-up check found."""

    variant: Variant
    system: systems.System
    check: dict[str, Any] = field(default_factory=dict)


def otel_variables() -> list[str]:
    """The names of the ``OTEL_*`` variables set in this environment."""
    return sorted(k for k in os.environ if k.startswith("OTEL_"))


def start(procs: Processes) -> list[Started]:
    """Start the four servers, connect to each and register the bench's functions."""
    unset = otel_variables()
    started = []
    for variant in VARIANTS:
        child = procs.start_cbgrpc(
            variant.system,
            "serve",
            "--storage",
            "memory",
            *variant.args,
            env=dict(variant.env),
            unset=unset,
            cpu=procs.cores.server(),
        )
        system = systems.System(variant.system, child.address, [child])
        systems.describe_start(system)
        systems.register_all(systems.connect(system))
        started.append(Started(variant, system))
    return started


def workloads(one: Started) -> list[Workload]:
    """The DAG ``incr -> square`` with direct_response, and ``incr(1).get()``."""
    conn = one.system.conn
    assert conn is not None
    handle = conn.get_function("incr")
    assert handle is not None
    s = one.variant.system
    return [
        SyncWorkload(
            s,
            systems.DAG_DIRECT,
            lambda: conn.call_dag(systems.CHAIN_DAG, {"incr": 1}, direct_response=True),
            check=lambda r: r == 4,
        ),
        SyncWorkload(s, systems.CALL, lambda: handle(1).get(), check=lambda r: r == 2),
    ]


def check(one: Started) -> dict[str, Any]:
    """Whether tracing is on in the server: its log, and the spans it kept of two calls."""
    import grpc

    from cloudburst.v1 import diagnostics_service_pb2 as diag
    from cloudburst.v1 import diagnostics_service_pb2_grpc as diag_grpc

    conn = one.system.conn
    assert conn is not None
    child = one.system.children[0]
    text = child.log_path.read_text(errors="replace") if child.log_path.exists() else ""
    result: dict[str, Any] = {
        "log_says_tracing_on": "tracing on" in text,
        "log_says_otel_disabled": "OpenTelemetry disabled by OTEL_SDK_DISABLED" in text,
        "spans_per_call": {},
    }
    handle = conn.get_function("incr")
    assert handle is not None
    futures = {
        systems.CALL: handle(1),
        # The direct_response DAG returns no id to look its spans up by; the same DAG
        # with .get() runs the same stages.
        systems.DAG_DIRECT: conn.call_dag(systems.CHAIN_DAG, {"incr": 1}),
    }
    answers = []
    with grpc.insecure_channel(one.system.address) as channel:
        stub = diag_grpc.DiagnosticsServiceStub(channel)
        for name, future in futures.items():
            future.get()
            try:
                response = stub.GetCallTiming(
                    diag.GetCallTimingRequest(call_id=future.obj_id), timeout=10
                )
            except grpc.RpcError as exc:
                answers.append(exc.code().name)
                result.setdefault("timings_errors", []).append(str(exc.details()))
                continue
            result["spans_per_call"][name] = [span.name for span in response.spans]
            answers.append(f"{len(response.spans)} spans")
    result["timings_answer"] = ", ".join(
        f"{name.split(',')[0]}: {answer}" for name, answer in zip(futures, answers, strict=True)
    )
    tracing = result["log_says_tracing_on"] or bool(result["spans_per_call"])
    result["tracing_on"] = tracing
    result["as_expected"] = tracing == one.variant.expect_tracing and (
        one.variant.tag != "d" or result["log_says_otel_disabled"]
    )
    return result


def off_path_cost(iterations: int = 200_000) -> dict[str, Any]:
    """Time, in this process with tracing off, the hot path's span call and context injection."""
    try:
        from cloudburst_grpc import telemetry
    except ImportError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if telemetry.tracing():
        return {"error": "tracing is on in the bench process"}
    span = telemetry.span
    inject = telemetry.inject
    clock = time.perf_counter
    begin = clock()
    for _ in range(iterations):
        with span("bench"):
            pass
    span_s = (clock() - begin) / iterations
    carrier: dict[str, str] = {}
    begin = clock()
    for _ in range(iterations):
        inject(carrier)
    inject_s = (clock() - begin) / iterations
    return {"span_us": span_s * 1e6, "inject_us": inject_s * 1e6, "iterations": iterations}


def summarize_overhead(
    started: list[Started],
    latencies: dict[str, list[float]],
    rounds: dict[str, list[list[float]]],
    throughput: dict[str, float | None],
    off_path: dict[str, Any],
    error: str | None = None,
) -> dict[str, Any]:
    """The figures and verdicts of the tracing-overhead section.

    ``latencies``, ``rounds`` (per-round samples) and ``throughput`` are keyed by
    workload key (``trace-off-a/<workload>``).
    """
    result: dict[str, Any] = {
        "variants": [
            {
                "tag": v.tag,
                "system": v.system,
                "label": v.label,
                "args": list(v.args),
                "env": dict(v.env),
                "check": next((s.check for s in started if s.variant == v), None),
            }
            for v in VARIANTS
        ],
        "otel_variables_removed": otel_variables(),
        "client_tracing": _client_tracing(),
        "min_tolerance": MIN_TOLERANCE,
        "off_path": off_path,
        "workloads": {},
        "error": error,
    }
    by_tag = {v.tag: v.system for v in VARIANTS}
    for name in WORKLOADS:
        stats = {
            tag: summarize(latencies.get(f"{system}/{name}", [])) for tag, system in by_tag.items()
        }
        medians = {tag: s.get("median_ms") for tag, s in stats.items()}
        a, b, c, d = (medians[t] for t in "abcd")
        rates = {tag: throughput.get(f"{system}/{name}") for tag, system in by_tag.items()}
        entry: dict[str, Any] = {
            "latency": stats,
            "throughput_per_s": rates,
            "round_medians_ms": {
                tag: [summarize(r).get("median_ms") for r in rounds.get(f"{system}/{name}", [])]
                for tag, system in by_tag.items()
            },
        }
        if a and b:
            noise = abs(a - b) / a
            tolerance = max(noise, MIN_TOLERANCE)
            compared = "d" if d else "b"
            other = d if d else b
            assert other is not None
            entry.update(
                noise_band=noise,
                tolerance=tolerance,
                disabled_compared=compared,
                disabled_vs_off=(other - a) / a,
                disabled_within_noise=abs(other - a) / a <= tolerance,
            )
            if rates["a"] and rates["b"] and rates["c"]:
                entry.update(
                    throughput_noise_band=abs(rates["a"] - rates["b"]) / rates["a"],
                    throughput_enabled_change=rates["c"] / rates["a"] - 1,
                )
            if c:
                entry.update(
                    enabled_overhead=(c - a) / a,
                    enabled_overhead_vs_b=(c - b) / b,
                    enabled_overhead_ms=c - a,
                    enabled_within_noise=abs(c - a) / a <= tolerance,
                )
            checks = [s.check for s in started]
            entry["valid"] = len(checks) == len(VARIANTS) and all(
                ch.get("as_expected") for ch in checks
            )
            spans = _spans_of(started, name)
            if spans and off_path.get("span_us"):
                entry["off_path_estimate_us"] = spans * off_path["span_us"]
                entry["off_path_estimate_share"] = spans * off_path["span_us"] / 1000 / a
                entry["span_sites"] = spans
        result["workloads"][name] = entry
    return result


def _spans_of(started: list[Started], name: str) -> int | None:
    for one in started:
        got = one.check.get("spans_per_call", {}).get(name)
        if got:
            return len(got)
    return None


def _client_tracing() -> bool | None:
    try:
        from cloudburst import tracing as sdk_tracing
    except ImportError:
        return None
    return bool(sdk_tracing.enabled())


def log_summary(summary: dict[str, Any]) -> None:
    """One progress line per workload."""
    for name, entry in summary["workloads"].items():
        if "noise_band" not in entry:
            log(f"tracing overhead, {name}: not measured")
            continue
        log(
            f"tracing overhead, {name}: noise {100 * entry['noise_band']:.1f}%, "
            f"({entry['disabled_compared']}) vs (a) {100 * entry['disabled_vs_off']:+.1f}% "
            f"({'within noise' if entry['disabled_within_noise'] else 'NOT within noise'}), "
            f"tracing on {100 * entry.get('enabled_overhead', float('nan')):+.1f}%"
        )
