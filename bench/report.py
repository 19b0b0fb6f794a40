"""The report: report.md (tables), report.json (every figure), latencies.json (raw samples),
latency.png (latency distributions) and memory.png (RSS over the memory check)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import diagnose, floor, systems, tracing
from bench.measure import summarize

if TYPE_CHECKING:
    from bench.run import Record

SYSTEM_TITLES = {
    "floor": "floor (grpc.aio client)",
    "floor-sync": "floor (SDK-style client: thread -> loop)",
    "floor-engine": "floor (storage engine, in-process)",
    "unit": "cost units (one handoff, no I/O)",
    "diagnosis": "diagnosis (parts taken away)",
    "serve": "`cbgrpc serve` (executors in child processes)",
    systems.SERVE_INPROCESS: "`cbgrpc serve --isolation none` (executors in-process)",
    systems.CLUSTER_STATIC: "process cluster, static addresses",
    systems.CLUSTER_CONSUL: "process cluster, Consul discovery",
    "ray": "Ray",
    **tracing.TITLES,
}
COLORS = {
    "floor": "#4c72b0",
    "floor-sync": "#8da0cb",
    "floor-engine": "#64b5cd",
    "unit": "#999999",
    "diagnosis": "#e5ae38",
    "serve": "#dd8452",
    systems.SERVE_INPROCESS: "#f0b27a",
    systems.CLUSTER_STATIC: "#c44e52",
    systems.CLUSTER_CONSUL: "#937860",
    "ray": "#55a868",
    "trace-off-a": "#dd8452",
    "trace-off-b": "#dd8452",
    "trace-on": "#8172b3",
    "trace-disabled": "#dd8452",
}

#: The systems under test (their rows are compared with the floor and Ray).
CLOUDBURST = (systems.SERVE, systems.SERVE_INPROCESS, *systems.CLUSTERS)

FLOOR_DEFINITIONS = """\
Every floor server is a bare `grpc.aio` server in its own process (no interceptors, no
protobuf: generic method handlers with raw bytes); each message is an 8-byte id plus the
payload (100 B unless said otherwise). All run on this machine at the same time as
`cbgrpc serve` and the cluster, and are measured in the same interleaved rounds. Their
client, like each system's SDK client, is a process of its own with one event loop (gRPC's
asyncio layer makes every loop of a process pay for the others).

- **unary round trip, 100 B**: the client awaits one unary call to the echo server
  (100 B each way).
- **bidi stream round trip, 100 B**: one message written on an already open bidirectional
  stream to the echo server, until its echo is read back (the floor of the messaging
  round trip: two processes, two one-way transfers).
- **3 hops over open streams (client->A->B->client)**: the client writes a message on its
  open stream to A; A writes it on its open stream to B; B writes it on the client's open
  result stream. Timed until the client reads it: three one-way transfers, three processes,
  no new call per hop. This is the hop structure of a DAG call (client -> scheduler /
  executors -> client).
- **4 hops over open streams (client->A->A2->B->client)**: the same with one more forwarding
  server, the hop count of the DAG `incr -> square` with a direct response (client ->
  scheduler -> executor -> executor -> client). Informational, timed in the three-hop
  floor's sub-blocks: C1 is held to the three-hop floor, and its detail gives this one's
  ratio to it.
- **3 hops over unary calls**: the same path with one unary call per hop (A and B start the
  next hop's call at once and answer their caller without waiting for it; B's call goes to a
  server in the client process). Timed until the client has received both the delivery and
  A's answer.
- **unary call, 1 MiB request / 1 MiB response**: one unary call carrying 1 MiB up (answered
  with 2 bytes), or asking for 1 MiB down: the floor of the 1 MiB `put_object`/`get_object`.
- **storage engine read / write, 100 B (in-process)**: the storage engine the clusters' KVS
  runs with (`--storage`; the report's header names it), called directly in the bench process:
  no gRPC, no event loop, no lattice. *write*: the engine's `write` of one 100 B row (for
  SQLite one transaction with `synchronous=NORMAL`, the KVS's default, in a database of its
  own on the same disk; for the memory engine a call that keeps nothing). *read*: the engine's
  own point read of that row (for SQLite a `SELECT` by primary key; for the memory engine,
  which keeps no copy, a dict lookup, which is where a memory or SQLite KVS keeps every
  value). With Valkey (a Valkey Cluster of 3 primaries with a replica each per cloudburst
  cluster) both are one round trip from the bench process to the key's primary, `SET` and
  `GET` of 100 B, without the `WAIT` for a replica that the KVS's durable writes add.
  The 100 B `get_object`/`put_object` targets (C4) are held to the sum of the unary
  round trip and the engine's read or write, each measured in the same rounds.

Client styles: **floor (grpc.aio client)** times each call inside the client's asyncio loop,
as a grpc.aio program would; its 8 concurrent callers are coroutines sharing one channel
(and, for streams, one stream per hop, demultiplexed by id, as the SDK shares its one
`StreamCalls` stream). **floor (SDK-style client)** makes the same calls the way the
synchronous SDK does: the calling thread hands a coroutine to a background asyncio loop
(`run_coroutine_threadsafe(...).result()`, one handoff each way) and its 8 callers are
threads. The targets compare with the grpc.aio client; the SDK-style figures show how much
of a gap the thread handoff alone explains.

**Cost units** time a single handoff with no I/O at all: a thread running a no-op coroutine
on a background loop and waiting for it (what each synchronous SDK call costs, once per
`_run`), and a coroutine running a no-op on a thread pool (what each function invocation
in an executor costs, `run_in_executor`).

cloudburst workloads use the SDK (`CloudburstConnection`, shared by the 8 caller threads),
against `cbgrpc serve --storage memory` (defaults otherwise: 2 executors, 8 threads each)
and against two clusters of separate processes (`cbgrpc kvs`, two `cbgrpc executor`,
`cbgrpc scheduler`; the KVS with the storage named in the header; `pin_replicas = 1`, so
the two functions of a DAG run on different executor processes): **cluster-static**, whose
processes are given each other's addresses on the command line, and **cluster-consul**,
whose processes find each other through a real Consul agent (`consul agent -dev`), the SDK
too (`consul://`). The locality workload (clusters only) stores an 8 MiB array
(`array('d')`) under a new key, then calls a function with ten `CloudburstReference`s to
it twice in a row: the first call (cold) and the repeat are timed, the store is not; one
pair per sample, the clusters taking turns, after one sample each that is not counted.
The long-chain workload (cluster-static only) registers 4,000 copies of `incr` and the
chain of them (not timed), then times a few calls with a direct response after one that
is not counted.
The messaging round trip is timed inside the `ping` function (send() until recv()
returns), between `ping` and `pong` of one DAG call; the first 20 round trips of each
block are not counted. Latency: one caller, calls one after
another, warmed up first. Throughput: 8 concurrent callers in a closed loop for a fixed
time; calls completed / wall time.
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if 0 < abs(value) < 0.01:
        return f"{value:.2g}"  # e.g. an in-process engine call, in ms
    return f"{value:.{digits}f}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def build(
    meta: dict[str, Any],
    settings: dict[str, Any],
    records: list[Record],
    floor_of: dict[str, str],
    ray_of: dict[str, str],
    ray: dict[str, Any],
    targets: list[dict[str, Any]],
    memory: dict[str, Any] | None,
    profiles: list[dict[str, Any]],
    tracing_overhead: dict[str, Any] | None = None,
    mtls_overhead: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every figure of the run, as one JSON-ready dict."""
    rows: list[dict[str, Any]] = []
    for record in records:
        w = record.workload
        tp = record.tp_calls / record.tp_seconds if record.tp_seconds > 0 else None
        rows.append(
            {
                "system": w.system,
                "workload": w.name,
                "latency": summarize(record.latencies),
                "throughput_per_s": tp,
                "throughput": {
                    "callers": settings["callers"],
                    "calls": record.tp_calls,
                    "seconds": record.tp_seconds,
                    "latency_under_load": summarize(record.tp_latencies),
                    "cpu_seconds": record.tp_cpu_seconds,
                }
                if record.measure_throughput
                else None,
                "error": record.error,
                "notes": list(record.notes),
            }
        )
        if w.system in CLOUDBURST and hasattr(w, "crossed_processes"):
            crossed = w.crossed_processes()
            if crossed is not None:
                rows[-1]["notes"].append(
                    "ping and pong ran in different processes"
                    if crossed
                    else "ping and pong ran in the same process"
                )
    if ray.get("available"):
        for name, entry in ray.get("workloads", {}).items():
            t = entry["throughput"]
            rows.append(
                {
                    "system": "ray",
                    "workload": name,
                    "latency": summarize(entry["latencies"]),
                    "throughput_per_s": t["calls"] / t["seconds"] if t["seconds"] else None,
                    "throughput": {
                        "callers": t["callers"],
                        "calls": t["calls"],
                        "seconds": t["seconds"],
                        "latency_under_load": summarize(entry.get("throughput_latencies", [])),
                    },
                    "error": None,
                    "notes": [],
                }
            )
    index = {(r["system"], r["workload"]): r for r in rows}
    for row in rows:
        if row["system"] not in CLOUDBURST:
            continue
        floor_name = floor_of.get(row["workload"])
        base = index.get(("floor", floor_name)) if floor_name else None
        row["floor"] = floor_name
        row["ratio_to_floor_median"] = _ratio(row, base, "median_ms")
        row["ratio_to_floor_p99"] = _ratio(row, base, "p99_ms")
        row["ratio_to_floor_throughput"] = (
            row["throughput_per_s"] / base["throughput_per_s"]
            if base and base["throughput_per_s"] and row["throughput_per_s"]
            else None
        )
        ray_name = ray_of.get(row["workload"])
        ray_row = index.get(("ray", ray_name)) if ray_name else None
        row["ray"] = ray_name if ray_row else None
        row["ratio_to_ray_median"] = _ratio(row, ray_row, "median_ms")
        row["ratio_to_ray_throughput"] = (
            row["throughput_per_s"] / ray_row["throughput_per_s"]
            if ray_row and ray_row["throughput_per_s"] and row["throughput_per_s"]
            else None
        )
    return {
        "meta": meta,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "targets": targets,
        "workloads": rows,
        "ray": {k: v for k, v in ray.items() if k != "workloads"},
        "memory": memory,
        "tracing_overhead": tracing_overhead,
        "mtls_overhead": mtls_overhead,
        "profiles": profiles,
    }


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, field: str) -> float | None:
    if base is None:
        return None
    mine, theirs = row["latency"].get(field), base["latency"].get(field)
    if not mine or not theirs:
        return None
    return float(mine) / float(theirs)


def write(
    out: Path, data: dict[str, Any], records: list[Record], ray: dict[str, Any]
) -> list[Path]:
    """Write every output file; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "latencies.json", out / "report.md"]
    paths[0].write_text(json.dumps(data, indent=1, default=str))
    samples: dict[str, Any] = {
        r.workload.key: {"latency_s": r.latencies, "under_load_s": r.tp_latencies} for r in records
    }
    for name, entry in ray.get("workloads", {}).items() if ray.get("available") else []:
        samples[f"ray/{name}"] = {
            "latency_s": entry["latencies"],
            "under_load_s": entry.get("throughput_latencies", []),
        }
    paths[1].write_text(json.dumps(samples))
    plots = plot(out, data, samples)
    paths[2].write_text(markdown(data, [p.name for p in plots]))
    return [*paths, *plots]


# -- Markdown ------------------------------------------------------------------------


def markdown(data: dict[str, Any], plots: list[str]) -> str:
    meta = data["meta"]
    ray = data["ray"]
    lines = ["# cloudburst-grpc benchmarks", ""]
    lines.append(
        f"Run {meta.get('started', '')}, {meta.get('mode', '')} mode, "
        f"clusters' KVS storage: {meta.get('storage', 'memory')}, "
        f"{meta.get('seconds', 0):.0f} s. Machine: {meta.get('cpus')} CPUs "
        f"({meta.get('cpu_model')}), {meta.get('memory_gib', '?')} GiB, "
        f"{meta.get('platform')}; Python {meta.get('python')}, grpcio {meta.get('grpcio')} "
        f"({meta.get('grpc_io', 'I/O layer not recorded')}), "
        f"protobuf {meta.get('protobuf')}, Ray "
        + (ray.get("version", "?") if ray.get("available") else "not available")
        + ". Load average (1/5/15 min) at start "
        + "/".join(f"{x:.2f}" for x in meta.get("load_average_at_start", []))
        + ", at end "
        + "/".join(f"{x:.2f}" for x in meta.get("load_average_at_end", []))
        + "."
        + (f" Pinning: {meta['pinning']}." if meta.get("pinning") else "")
        + f" Code: commit {meta.get('commit', 'unknown')}"
        + (
            f" with uncommitted changes in {meta['product_files_changed']} product files"
            if meta.get("product_files_changed")
            else ""
        )
        + "."
    )
    settings = data["settings"]
    lines += [
        "",
        f"Latency: {settings['calls']} timed calls per workload after {settings['warmup']} "
        f"warm-up calls, in {settings['blocks']} interleaved rounds; within each round a "
        "target's workload and its floor take turns in five sub-blocks. Throughput: "
        f"{settings['callers']} concurrent callers, {settings['tp_rounds']} rounds of "
        f"{settings['tp_seconds']} s per workload.",
        "",
        "## Targets",
        "",
        "T1-T6: `cbgrpc serve` (T6: the cluster with static addresses); T1 and T4 are shown "
        "for `cbgrpc serve --isolation none` too, informational. C1-C7: the process "
        "clusters, with static addresses (cluster-static) and with Consul discovery "
        "(cluster-consul); C5 also `cbgrpc serve`; C8 the cluster with static addresses.",
        "",
        "| | system | target | measured | bound | result |",
        "|---|---|---|---|---|---|",
    ]
    for t in data["targets"]:
        verdict = {True: "**PASS**", False: "**MISS**", None: "n/a"}[t["met"]]
        if t.get("informational"):
            verdict = "shown" if t["met"] is not None else "n/a"
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}{_unit(t['unit'])}"
        lines.append(
            f"| {t['id'].split(' ')[0]} | {t.get('system', '')} | {t['target']} | {value} "
            f"({t['detail']}) | {t['comparison']} {t['bound']}{_unit(t['unit'])} | {verdict} |"
        )
    cluster = [t for t in data["targets"] if t["id"].startswith("C")]
    if cluster:
        names = sorted({t["id"].split(" ")[0] for t in cluster}, key=target_order)
        columns = [s for s in CLOUDBURST if any(t.get("system") == s for t in cluster)]
        lines += [
            "",
            "The C targets by system:",
            "",
            "| | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for name in names:
            cells = []
            for column in columns:
                t = next((t for t in cluster if t["id"] == f"{name} {column}"), None)
                if t is None:
                    cells.append("")
                elif t["value"] is None:
                    cells.append("n/a")
                else:
                    verdict = "PASS" if t["met"] else "MISS"
                    cells.append(f"{t['value']:.2f}{_unit(t['unit'])} {verdict}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    missed = [t["id"] for t in data["targets"] if t["met"] is False and not t.get("informational")]
    if missed:
        lines += [
            "",
            f"Missed: {', '.join(missed)}. "
            + (
                "The profiles below show where the time goes."
                if data["profiles"]
                else "(Not profiled in this run: `--profile auto` profiles misses.)"
            ),
        ]
    lines += [
        "",
        "## Latency and throughput",
        "",
        "Milliseconds. *x floor* compares medians (and throughputs) with the floor named; "
        '*vs Ray* compares medians with the Ray workload named ("3.0x faster" means Ray\'s '
        "median is three times this one).",
        "",
        "| system | workload | median | p90 | p99 | n | calls/s, 8 callers | floor | x floor "
        "(median) | x floor (calls/s) | vs Ray (median) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in data["workloads"]:
        lat = row["latency"]
        if row.get("error") and not lat.get("n"):
            lines.append(
                f"| {SYSTEM_TITLES.get(row['system'], row['system'])} | {row['workload']} | "
                f"error: {row['error'][:120]} | | | | | | | | |"
            )
            continue
        vs_ray = ""
        if row.get("ratio_to_ray_median"):
            r = row["ratio_to_ray_median"]
            vs_ray = f"{1 / r:.1f}x faster" if r < 1 else f"{r:.1f}x slower"
            vs_ray += f" ({row['ray']})"
        lines.append(
            f"| {SYSTEM_TITLES.get(row['system'], row['system'])} | {row['workload']} | "
            f"{_fmt(lat.get('median_ms'))} | {_fmt(lat.get('p90_ms'))} | "
            f"{_fmt(lat.get('p99_ms'))} | {lat.get('n', 0)} | {_rate(row['throughput_per_s'])} | "
            f"{row.get('floor') or ''} | {_x(row.get('ratio_to_floor_median'))} | "
            f"{_x(row.get('ratio_to_floor_throughput'))} | {vs_ray} |"
        )
    notes = [
        f"- {SYSTEM_TITLES.get(r['system'], r['system'])} / {r['workload']}: "
        + "; ".join([*r["notes"], *([f"error: {r['error']}"] if r.get("error") else [])])
        for r in data["workloads"]
        if r["notes"] or r.get("error")
    ]
    if notes:
        lines += ["", *notes]
    if not ray.get("available"):
        lines += ["", f"Ray: not measured: {ray.get('reason', 'unknown reason')}"]
    else:
        lines += [
            "",
            f"Ray {ray.get('version')}: a local single-node Ray (`ray.init` with "
            f"{meta.get('cpus')} CPUs, no dashboard), in its own process after the rest; its "
            f"start took {ray.get('init_seconds', 0):.1f} s (not counted). `ray.get` of a "
            "small object reads the driver's in-process store.",
        ]
    lines += _breakdown_section(data)
    lines += _tracing_section(data.get("tracing_overhead"), settings)
    lines += _mtls_section(data.get("mtls_overhead"))
    lines += ["", *(f"![{name}]({name})" for name in plots)]
    lines += ["", "## What each floor measures", "", FLOOR_DEFINITIONS]
    lines += _memory_section(data.get("memory"))
    lines += _profile_section(data["profiles"])
    lines += [
        "",
        "## Reproduce",
        "",
        "`make bench` (installs `bench/requirements.txt`, optionally "
        "`bench/requirements-ray.txt`, then runs `python -m bench.run`); "
        "`python -m bench.run --quick` for a smoke run. Raw samples are in `latencies.json`, "
        "every figure in `report.json`, server logs in `logs/`, raw profiles in `profiles/`.",
        "",
    ]
    return "\n".join(lines)


def _breakdown_section(data: dict[str, Any]) -> list[str]:
    """The serve call with parts taken away, next to the floor and the cost units."""
    index = {(r["system"], r["workload"]): r for r in data["workloads"]}

    def median(system: str, name: str) -> float | None:
        row = index.get((system, name))
        value = row["latency"].get("median_ms") if row else None
        return float(value) if value else None

    columns = [
        (
            "DAG incr->square, direct_response",
            systems.DAG_DIRECT,
            diagnose.DAG_NONE,
            diagnose.DAG_SERVER,
        ),
        (
            "incr(1).get()",
            systems.CALL,
            diagnose.CALL_NONE,
            diagnose.CALL_SERVER,
        ),
    ]
    if not any(median("diagnosis", c[2]) or median("diagnosis", c[3]) for c in columns):
        return []
    values = {
        title: {
            "sdk": median("serve", user),
            "none": median("diagnosis", none),
            "server": median("diagnosis", server),
        }
        for title, user, none, server in columns
    }
    rows = [
        ("SDK as users call it (the calling thread runs the SDK's loop)", "sdk"),
        ("same frames from a coroutine on the SDK's loop, no synchronous API", "none"),
        ("server pipeline only: in-process scheduler + executors, no gRPC, no client", "server"),
    ]
    lines = [
        "",
        "### Where the time of a `cbgrpc serve` call goes",
        "",
        "Medians, ms, from the same interleaved rounds (see `bench/diagnose.py`).",
        "",
        "| | " + " | ".join(title for title, *_ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(values[t][key]) for t, *_ in columns) + " |")

    def diff(t: str, a: str, b: str) -> str:
        x, y = values[t][a], values[t][b]
        return "n/a" if x is None or y is None else f"{x - y:.3f}"

    lines += [
        "| *the synchronous API (first row - second)* | "
        + " | ".join(diff(t, "sdk", "none") for t, *_ in columns)
        + " |",
        "| *gRPC, the stream protocol and the client (second row - third)* | "
        + " | ".join(diff(t, "none", "server") for t, *_ in columns)
        + " |",
    ]
    bidi = median("floor", floor.F_BIDI)
    hop3 = median("floor", floor.F_HOP3_STREAM)
    to_loop = median("unit", diagnose.U_TO_LOOP)
    to_pool = median("unit", diagnose.U_TO_POOL)
    lines += [
        "",
        f"For scale: a bare bidi-stream round trip {_fmt(bidi)} ms, the 3-hop stream floor "
        f"{_fmt(hop3)} ms; one thread -> loop -> thread handoff {_fmt(to_loop)} ms, one "
        f"loop -> thread pool -> loop handoff {_fmt(to_pool)} ms (idle, uncontended). "
        "A DAG call of two quick functions on `cbgrpc serve` runs both on the executor's "
        "event loop, and the SDK's caller runs the client's loop itself: no handoff of either "
        "kind on the way, unless other threads call at the same time.",
    ]
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _mtls_section(summary: dict[str, Any] | None) -> list[str]:
    """The cost of mutual TLS on the process cluster (same run, interleaved rounds)."""
    if not summary or not summary.get("workloads"):
        return []
    aim = summary["aim"]
    lines = [
        "",
        "## Mutual TLS overhead",
        "",
        "The static process cluster (cluster-static) again, every hop mutual TLS with "
        "certificates from "
        "`cbgrpc certs` and the client authenticated by its certificate, against the "
        f"plaintext cluster; aim: within {aim:.0%} on the DAG.",
        "",
        "| workload | plaintext median (ms) | mTLS median (ms) | overhead | aim |",
        "|---|---|---|---|---|",
    ]
    for row in summary["workloads"]:
        overhead = row.get("overhead")
        verdict = "n/a" if overhead is None else ("PASS" if overhead <= aim else "MISS")
        lines.append(
            f"| {row['workload']} | {_fmt(row['plain_median_ms'])} | "
            f"{_fmt(row['mtls_median_ms'])} | {_pct(overhead)} | {verdict} |"
        )
    return lines


def _tracing_section(summary: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    """Tracing off, off again, on and disabled: the same `cbgrpc serve`, side by side."""
    lines = ["", "## Tracing overhead", ""]
    if not summary:
        return [*lines, "Not run."]
    if summary.get("error") and not any("noise_band" in e for e in summary["workloads"].values()):
        return [*lines, f"Not measured: {summary['error']}"]
    tolerance = 100 * summary["min_tolerance"]
    lines += [
        "Four more `cbgrpc serve --storage memory --port 0` processes, running next to "
        "everything else and timed in the same interleaved rounds; within a round the four "
        "variants of a workload take turns in small sub-blocks, in a rotating order. "
        f"{settings['tracing_calls']} timed calls per variant and workload after "
        f"{settings['warmup']} "
        "warm-up calls, one caller. Each server starts without any `OTEL_*` variable of the "
        "bench's environment"
        + (
            f" (removed: {', '.join(summary['otel_variables_removed'])})"
            if summary.get("otel_variables_removed")
            else " (none was set)"
        )
        + "; whether tracing is on is checked in each, by its log and by asking its "
        "DiagnosticsService (`cbgrpc timing`) for the spans of a call.",
        "",
        "| | server | started with (besides `--storage memory --port 0`) | tracing, as checked "
        "| spans kept for one call (GetCallTiming) |",
        "|---|---|---|---|---|",
    ]
    for v in summary["variants"]:
        ch = v.get("check") or {}
        flags = " ".join([*(f"{k}={val}" for k, val in v["env"].items()), *v["args"]])
        state = "on" if ch.get("tracing_on") else "off"
        if ch.get("log_says_tracing_on"):
            state += ' (log: "tracing on")'
        if ch.get("log_says_otel_disabled"):
            state += " (log: OpenTelemetry disabled)"
        if not ch.get("as_expected", False):
            state = f"**{state}: NOT AS INTENDED**"
        lines.append(
            f"| ({v['tag']}) | {v['label']} | {f'`{flags}`' if flags else 'defaults'} | "
            f"{state} | {ch.get('timings_answer', 'n/a')} |"
        )
    lines += [
        "",
        "Milliseconds; *vs (a)* compares medians.",
        "",
        "| workload | server | median | p90 | p99 | n | vs (a) | calls/s, 8 callers |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in summary["workloads"].items():
        a = entry["latency"]["a"].get("median_ms")
        for tag, lat in entry["latency"].items():
            median = lat.get("median_ms")
            vs = _pct(median / a - 1) if median and a else "n/a"
            lines.append(
                f"| {name} | ({tag}) | {_fmt(median)} | {_fmt(lat.get('p90_ms'))} | "
                f"{_fmt(lat.get('p99_ms'))} | {lat.get('n', 0)} | {vs} | "
                f"{_rate(entry['throughput_per_s'].get(tag))} |"
            )
    lines += [
        "",
        f"Noise band = |(b) - (a)| / (a), medians; a difference counts as *within noise* when "
        f"it is at most max(noise band, {tolerance:.0f}%).",
        "",
        "| workload | noise band | tolerance | tracing disabled vs off | verdict | "
        "tracing on vs off (overhead) | |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for name, entry in summary["workloads"].items():
        if "noise_band" not in entry:
            lines.append(f"| {name} | n/a | | | not measured | | |")
            continue
        compared = entry["disabled_compared"]
        verdict = "**within noise**" if entry["disabled_within_noise"] else "**NOT within noise**"
        if not entry.get("valid"):
            verdict += " (a server's tracing state was not as intended: not valid)"
        enabled = (
            f"(c) vs (a): {_pct(entry.get('enabled_overhead'))} "
            f"({entry.get('enabled_overhead_ms', 0) * 1000:+.0f} us); vs (b): "
            f"{_pct(entry.get('enabled_overhead_vs_b'))}"
            if "enabled_overhead" in entry
            else "n/a"
        )
        beyond = (
            "within noise"
            if entry.get("enabled_within_noise")
            else "beyond noise"
            if "enabled_overhead" in entry
            else ""
        )
        lines.append(
            f"| {name} | {100 * entry['noise_band']:.1f}% | {100 * entry['tolerance']:.1f}% | "
            f"({compared}) vs (a): {_pct(entry['disabled_vs_off'])} | {verdict} | {enabled} | "
            f"{beyond} |"
        )
    rounds = []
    for name, entry in summary["workloads"].items():
        per = entry.get("round_medians_ms", {})
        if per.get("a") and per.get("c"):
            overheads = [
                f"{100 * (c / a - 1):+.0f}%"
                for a, c in zip(per["a"], per["c"], strict=False)
                if a and c
            ]
            noise = [
                f"{100 * (b / a - 1):+.0f}%"
                for a, b in zip(per["a"], per.get("b", []), strict=False)
                if a and b
            ]
            rounds.append(
                f"{name}: (c) vs (a) {', '.join(overheads)}; (b) vs (a) {', '.join(noise)}"
            )
    if rounds:
        lines += ["", "Per round (medians of each round): " + "; ".join(rounds) + "."]
    rates = [
        f"{name}: (c) vs (a) {_pct(e['throughput_enabled_change'])}, noise band "
        f"{100 * e['throughput_noise_band']:.1f}%"
        for name, e in summary["workloads"].items()
        if e.get("throughput_enabled_change") is not None
    ]
    if rates:
        lines += [
            "",
            f"Throughput, {settings['callers']} callers ({settings['tp_rounds']} rounds of "
            f"{settings['tp_seconds']} s per server, in rotating halves; coarser than the "
            "latencies): " + "; ".join(rates) + ".",
        ]
    off = summary.get("off_path") or {}
    estimates = [
        f"{name}: {e['span_sites']} span sites x {off['span_us']:.2f} us = "
        f"{e['off_path_estimate_us']:.1f} us, {100 * e['off_path_estimate_share']:.2f}% of (a)"
        for name, e in summary["workloads"].items()
        if e.get("off_path_estimate_us") is not None
    ]
    client = summary.get("client_tracing")
    lines += [
        "",
        "**What is compared.** There is no build of the product without the instrumentation, "
        "so *tracing off* is not compared with un-instrumented code: (a), (b) and (d) all run "
        "the instrumented code with tracing off, where each span site on the hot path is one "
        "call of `telemetry.span()` that checks a module boolean and yields (context "
        "propagation, `inject`/`extract`, checks the same boolean), and no gRPC tracing "
        "interceptor is installed. (d), `OTEL_SDK_DISABLED=true`, takes the same hot path as "
        "(a) and only skips OpenTelemetry's set-up at start: *disabled vs off* therefore "
        "checks that the two off configurations are indistinguishable, and it cannot by "
        "itself see the cost of the boolean checks, which both contain. That cost is bounded "
        "instead by timing the off-path call in the bench process: "
        + (
            f"`span()` with tracing off {off['span_us']:.2f} us per call, `inject()` "
            f"{off['inject_us']:.3f} us"
            + (f"; per call of the workloads: {'; '.join(estimates)}" if estimates else "")
            + " (span sites counted from the spans (c) kept for one call; the DAG's count from "
            "the same DAG called with `.get()`)."
            if off.get("span_us")
            else f"not available ({off.get('error', 'not run')})."
        ),
        "",
        "(c) records every span in memory (`--timings`: a `TracerProvider` with the in-memory "
        "span processor, and the gRPC server interceptor), with no exporter: exporting "
        "(OTLP, console) costs more, in a batch thread. "
        + (
            "The bench's client does not trace (no tracer provider in the SDK's process), "
            "so each call's trace starts in the server and the SDK's own call span is not "
            "part of the overhead measured."
            if client is False
            else "Client-side tracing state: "
            + ("on" if client else "unknown")
            + " (the SDK's call span is then part of every variant alike)."
        ),
    ]
    if summary.get("error"):
        lines += ["", f"Error: {summary['error']}"]
    return lines


def target_order(name: str) -> tuple[int, str]:
    """Sort key of a target id such as ``C4-get``: by number, then by name."""
    return (int(name[1:].split("-")[0]), name)


def _unit(unit: str) -> str:
    return "x" if unit.startswith("x") else f" {unit}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _memory_section(memory: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Memory", ""]
    if not memory:
        return [*lines, "Not run."]
    if memory.get("error"):
        return [*lines, f"The memory check failed: {memory['error']}"]
    mib = 2**20
    lines.append(
        f"A fresh `cbgrpc serve --storage memory`, driven with `incr(1).get()` by "
        f"{memory['callers']} concurrent callers: {memory['calls']:,} calls in "
        f"{memory['seconds']:.0f} s. RSS after the first 1,000 calls "
        f"{memory['rss_after_first_1000_bytes'] / mib:.1f} MiB; peak "
        f"{memory['rss_peak_bytes'] / mib:.1f} MiB "
        f"({memory['peak_over_first_1000']:.2f}x); at the end "
        f"{memory['rss_end_bytes'] / mib:.1f} MiB (RSS sampled every 0.25 s)"
        + (
            f", i.e. {growth:,.0f} bytes more per call after the first 1,000."
            if (growth := _growth_per_call(memory)) is not None
            else "."
        )
    )
    if memory.get("stopped_by_budget"):
        lines.append(
            f"Only {memory['calls']:,} of the {memory['target_calls']:,} calls asked for fit in "
            "the run's time budget (13 minutes on two cores); the figure covers those."
        )
    return lines


def _growth_per_call(memory: dict[str, Any]) -> float | None:
    calls = memory["calls"] - min(1000, memory["calls"])
    if calls <= 0:
        return None
    return float(memory["rss_end_bytes"] - memory["rss_after_first_1000_bytes"]) / calls


def _profile_section(profiles: list[dict[str, Any]]) -> list[str]:
    if not profiles:
        return []
    lines = [
        "",
        "## Profiles",
        "",
        "py-spy in `--gil --nonblocking` mode while one caller repeats the workload: each "
        "sample is the stack of the thread holding the GIL, so counts show where Python-level "
        "CPU goes in each process (native time without the GIL, e.g. grpc core I/O, is not "
        "counted; waiting is not counted). *area* classifies the innermost frame; "
        "*product, inclusive* counts samples with that product function anywhere on the stack.",
    ]
    for entry in profiles:
        lines += ["", f"### {entry['label']}", ""]
        for p in entry["profiles"]:
            if p.get("error"):
                lines.append(f"- {p['process']}: no profile ({p['error']})")
                continue
            if not p["samples"]:
                lines.append(f"- {p['process']}: no samples (it held no GIL: idle)")
                continue
            total = p["samples"]
            possible = p["seconds"] * p["rate"]
            lines += [
                "",
                f"**{p['process']}** (pid {p['pid']}): {p['samples']} GIL samples in "
                f"{p['seconds']:.0f} s at {p['rate']} Hz (the GIL was held about "
                f"{100 * p['samples'] / possible:.0f}% of the time).",
                "",
                "| area (innermost frame) | share | | top self (innermost function) | share |",
                "|---|---:|---|---|---:|",
            ]
            areas = p["by_area"][:10]
            selfs = p["top_self"][:10]
            for i in range(max(len(areas), len(selfs))):
                a = areas[i] if i < len(areas) else None
                s = selfs[i] if i < len(selfs) else None
                lines.append(
                    f"| {a[0] if a else ''} | {f'{100 * a[1] / total:.0f}%' if a else ''} | | "
                    f"{_code(s[0]) if s else ''} | {f'{100 * s[1] / total:.0f}%' if s else ''} |"
                )
            if p["top_product_inclusive"]:
                lines += [
                    "",
                    "Product functions, inclusive: "
                    + "; ".join(
                        f"{_code(name)} {100 * n / total:.0f}%"
                        for name, n in p["top_product_inclusive"][:8]
                    ),
                ]
            if p["by_thread"]:
                lines += [
                    "",
                    "Threads: "
                    + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in p["by_thread"]),
                ]
    return lines


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


# -- plots ---------------------------------------------------------------------------


def plot(out: Path, data: dict[str, Any], samples: dict[str, Any]) -> list[Path]:
    """latency.png (and memory.png when the memory check ran); none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [
        r
        for r in data["workloads"]
        if samples.get(f"{r['system']}/{r['workload']}", {}).get("latency_s")
    ]
    rows.reverse()  # matplotlib draws the first box at the bottom
    written: list[Path] = []
    if rows:
        values = [
            [x * 1000 for x in samples[f"{r['system']}/{r['workload']}"]["latency_s"]] for r in rows
        ]
        labels = [f"{SYSTEM_TITLES.get(r['system'], r['system'])}: {r['workload']}" for r in rows]
        labels = [label.replace("`", "") for label in labels]
        fig, ax = plt.subplots(figsize=(13, 0.34 * len(rows) + 1.6))
        boxes = ax.boxplot(
            values,
            vert=False,
            whis=(1, 99),
            showfliers=False,
            patch_artist=True,
            widths=0.6,
            medianprops={"color": "black"},
        )
        for patch, row in zip(boxes["boxes"], rows, strict=True):
            patch.set_facecolor(COLORS.get(row["system"], "#cccccc"))
        ax.set_yticks(range(1, len(rows) + 1), labels, fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log scale); box: p25-p75, line: median, whiskers: p1-p99")
        ax.set_title(
            f"cloudburst-grpc vs gRPC floor vs Ray, one caller "
            f"({data['meta'].get('cpus')} CPUs, {data['meta'].get('mode')} run)"
        )
        ax.grid(axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    memory = data.get("memory")
    if memory and memory.get("samples"):
        calls = [c for c, _ in memory["samples"]]
        rss = [r / 2**20 for _, r in memory["samples"]]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(calls, rss, color=COLORS["serve"])
        base = memory["rss_after_first_1000_bytes"] / 2**20
        ax.axhline(base, color="grey", linestyle=":", label="after first 1,000 calls")
        ax.axhline(base * 1.5, color="red", linestyle="--", label="1.5x (target bound)")
        ax.set_xlabel("calls")
        ax.set_ylabel("RSS, MiB")
        ax.set_ylim(bottom=0)
        ax.set_title("`cbgrpc serve` RSS over the memory check".replace("`", ""))
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
