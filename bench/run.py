"""Run the benchmark suite and write report.md, report.json, latencies.json and latency.png.

Usage (from the repository root): ``python -m bench.run [--quick] [--out DIR]``
(``make bench`` installs the bench requirements and runs this).

One run, one machine, so ratios hold on a noisy machine: the floor servers,
`cbgrpc serve` and the process clusters (static addresses, and Consul
discovery) all run at once, and the latency measurement visits every workload
in turn, in several rounds (interleaved blocks), so a slow spell of the
machine hits them all alike. Ray runs after, in its own process. The memory
check runs last, on a fresh `cbgrpc serve` with nothing else running.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
if not __package__:  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import clients, diagnose, floor, memory, profiling, report, systems, tracing
from bench.diagnose import U_TO_LOOP, U_TO_POOL
from bench.floor import (
    F_BIDI,
    F_ENGINE_READ,
    F_ENGINE_WRITE,
    F_GET_LARGE,
    F_HOP3_STREAM,
    F_HOP4_STREAM,
    F_PUT_LARGE,
    F_UNARY,
)
from bench.measure import AioLoop, AioWorkload, SyncWorkload, Workload, summarize
from bench.procs import ROOT, Cores, Processes, cpu_seconds, interrupt_on_sigterm, log
from cloudburst_grpc.affinity import pin

#: Which floor and which Ray workload each cloudburst workload is compared with.
FLOOR_OF = {
    systems.CALL: F_UNARY,
    systems.DAG_DIRECT: F_HOP3_STREAM,
    systems.DAG_GET: F_HOP3_STREAM,
    systems.FAN: F_HOP3_STREAM,
    systems.PUT_SMALL: F_UNARY,
    systems.GET_SMALL: F_UNARY,
    systems.PUT_LARGE: F_PUT_LARGE,
    systems.GET_LARGE: F_GET_LARGE,
    systems.MESSAGE: F_BIDI,
}
RAY_OF = {
    systems.CALL: "task incr.remote(1)",
    systems.DAG_DIRECT: "chain square.remote(incr.remote(1))",
    systems.DAG_GET: "chain square.remote(incr.remote(1))",
    systems.FAN: "fan-out/fan-in (1->4->1)",
    systems.PUT_SMALL: "ray.put 100 B",
    systems.GET_SMALL: "ray.get 100 B",
    systems.PUT_LARGE: "ray.put 1 MiB",
    systems.GET_LARGE: "ray.get 1 MiB",
}
SERVE, STATIC, CONSUL = systems.SERVE, systems.CLUSTER_STATIC, systems.CLUSTER_CONSUL
#: `cbgrpc serve --isolation none`: T1 and T4 shown for it, not held to them.
INPROCESS = systems.SERVE_INPROCESS
#: The system name of the storage engine's floor (called in this process).
ENGINE = "floor-engine"
#: Each latency target's workload and the floor(s) it is held to (their sum).
TARGET_PAIRS: dict[str, tuple[str, tuple[str, ...]]] = {
    "T1": (f"{SERVE}/{systems.DAG_DIRECT}", (f"floor/{F_HOP3_STREAM}",)),
    "T4": (f"{SERVE}/{systems.CALL}", (f"floor/{F_UNARY}",)),
    "T6": (f"{STATIC}/{systems.MESSAGE}", (f"floor/{F_BIDI}",)),
    f"T1 {INPROCESS}": (f"{INPROCESS}/{systems.DAG_DIRECT}", (f"floor/{F_HOP3_STREAM}",)),
    f"T4 {INPROCESS}": (f"{INPROCESS}/{systems.CALL}", (f"floor/{F_UNARY}",)),
}
for _system in systems.CLUSTERS:
    TARGET_PAIRS |= {
        f"C1 {_system}": (f"{_system}/{systems.DAG_DIRECT}", (f"floor/{F_HOP3_STREAM}",)),
        f"C2 {_system}": (f"{_system}/{systems.CALL}", (f"floor/{F_HOP3_STREAM}",)),
        f"C3 {_system}": (f"{_system}/{systems.DAG_GET}", (f"floor/{F_HOP3_STREAM}",)),
        f"C4-get {_system}": (
            f"{_system}/{systems.GET_SMALL}",
            (f"floor/{F_UNARY}", f"{ENGINE}/{F_ENGINE_READ}"),
        ),
        f"C4-put {_system}": (
            f"{_system}/{systems.PUT_SMALL}",
            (f"floor/{F_UNARY}", f"{ENGINE}/{F_ENGINE_WRITE}"),
        ),
    }
for _system in (SERVE, *systems.CLUSTERS):
    TARGET_PAIRS |= {
        f"C5-put {_system}": (f"{_system}/{systems.PUT_LARGE}", (f"floor/{F_PUT_LARGE}",)),
        f"C5-get {_system}": (f"{_system}/{systems.GET_LARGE}", (f"floor/{F_GET_LARGE}",)),
    }
TOTAL_BUDGET_SECONDS = 780.0  # 13 minutes: with bench.valkey after it, `make bench` stays within 15


@dataclass
class Settings:
    quick: bool
    out: Path
    calls: int
    tracing_calls: int
    """Timed calls per tracing-overhead variant and workload (bench/tracing.py)."""
    blocks: int
    warmup: int
    callers: int
    tp_seconds: float
    tp_rounds: int
    memory_calls: int
    ray: bool
    pin: bool
    """Pin every process to a core of its own (see bench.procs.Cores)."""
    profile: str
    """auto (where a target is missed), always or never."""
    profile_seconds: float
    storage: str
    """The storage engine of the clusters' KVS, and of the engine floor."""
    consul: bool
    """Run the cluster with Consul discovery too."""
    locality_samples: int
    long_chain_calls: int
    """Timed calls of the long-chain workload (after one that is not counted)."""


@dataclass
class Record:
    """Everything measured for one workload."""

    workload: Workload
    latencies: list[float] = field(default_factory=list)
    tp_calls: int = 0
    tp_seconds: float = 0.0
    tp_latencies: list[float] = field(default_factory=list)
    tp_cpu_seconds: float | None = None
    """CPU time of every process of the workload's system and of the bench process,
    summed over its throughput runs (None when its processes are not known)."""
    measure_throughput: bool = True
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    group: str | None = None
    """Records of one group take turns in small sub-blocks within each round."""
    rounds: list[list[float]] = field(default_factory=list)
    """The latencies of each round."""


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="cloudburst-grpc benchmarks: latency and throughput against the gRPC "
        "floor and Ray, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="few calls: a smoke run")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="output directory"
    )
    parser.add_argument("--calls", type=int, help="timed calls per workload (default 1000)")
    parser.add_argument(
        "--tracing-calls",
        type=int,
        help="timed calls per server of the tracing-overhead comparison (default 2000)",
    )
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (default 8)")
    parser.add_argument(
        "--memory-calls", type=int, help="calls for the memory check (default 100000)"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip Ray")
    parser.add_argument(
        "--no-consul", action="store_true", help="skip the cluster with Consul discovery"
    )
    parser.add_argument(
        "--storage",
        choices=systems.STORAGE_ENGINES,
        default="memory",
        help="storage engine of the clusters' KVS and of the engine floor (default memory)",
    )
    parser.add_argument(
        "--locality-samples",
        type=int,
        help="cold/repeat pairs of the locality workload per cluster (default 5)",
    )
    parser.add_argument(
        "--long-chain-calls",
        type=int,
        help="timed calls of the 4,000-function chain on cluster-static (default 3)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin every process to a core of its own, as `cbgrpc --cpus` recommends for "
        "latency, floor servers alike (default: the kernel places every process)",
    )
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default=None,
        help="profile with py-spy: when a target is missed (auto, the default; never with "
        "--quick), always, or never",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        quick=quick,
        out=args.out,
        calls=args.calls or (200 if quick else 1000),
        tracing_calls=args.tracing_calls or (200 if quick else 2000),
        blocks=2 if quick else 4,
        warmup=30 if quick else 200,
        callers=args.callers,
        tp_seconds=0.4 if quick else 1.25,
        tp_rounds=2,
        memory_calls=args.memory_calls or (5000 if quick else 100_000),
        ray=not args.no_ray,
        pin=args.pin,
        profile=args.profile or ("never" if quick else "auto"),
        profile_seconds=3.0 if quick else 5.0,
        storage=args.storage,
        consul=not args.no_consul,
        locality_samples=args.locality_samples or (2 if quick else 5),
        long_chain_calls=args.long_chain_calls or (2 if quick else 3),
    )


# -- workloads -----------------------------------------------------------------------


def floor_records(floor_client: clients.ClientProcess, engine: floor.EngineFloor) -> list[Record]:
    """The gRPC floor, timed in its client's own process; the storage engine's, in this one.

    The engine's read and write are called here: no gRPC, no event loop.
    """

    def check(size: int) -> Any:
        return lambda n: n == size

    small = floor.SMALL_PAYLOAD
    return [Record(w) for w in floor_client.workloads] + [
        Record(
            SyncWorkload(ENGINE, F_ENGINE_READ, engine.read, check=check(small)),
            measure_throughput=False,
        ),
        Record(
            SyncWorkload(ENGINE, F_ENGINE_WRITE, engine.write, check=check(small)),
            measure_throughput=False,
        ),
    ]


def system_workloads(
    procs: Processes, deployment: systems.System, cpu: int | None
) -> tuple[clients.ClientProcess, list[Record]]:
    """A system's workloads: timed in an SDK client process of its own, but for send/recv.

    The send/recv round trip is timed inside the functions, so this process
    only starts its DAG calls.
    """
    only = {
        systems.MTLS: systems.MTLS_WORKLOADS,
        INPROCESS: systems.INPROCESS_WORKLOADS,
    }.get(deployment.name, ())
    client = clients.ClientProcess(
        procs,
        f"client-{deployment.name}",
        [
            "sdk", "--system", deployment.name, "--address", deployment.address,
            "--options", json.dumps(deployment.client_options),
            *(arg for name in only for arg in ("--only", name)),
        ],
        cpu=cpu,
    )  # fmt: skip
    found = [Record(w) for w in client.workloads]
    if not only:
        found.append(Record(systems.MessagingWorkload(deployment)))
    return client, found


def unit_workloads(aio: AioLoop, pool: concurrent.futures.ThreadPoolExecutor) -> list[Record]:
    """Cost units: one handoff between threads, as the SDK and the executors make them."""

    async def noop() -> int:
        return 1

    def to_pool() -> asyncio.Future[int]:
        return asyncio.get_running_loop().run_in_executor(pool, int, "1")

    return [
        Record(
            SyncWorkload("unit", U_TO_LOOP, lambda: aio.run(noop(), 60)), measure_throughput=False
        ),
        Record(AioWorkload("unit", U_TO_POOL, to_pool, aio), measure_throughput=False),
    ]


def diagnosis_workloads(serve: systems.System, inproc: diagnose.InProcessServer) -> list[Record]:
    """The serve calls with parts taken away (see bench/diagnose.py); latency only."""
    found: list[Workload] = []
    try:
        found += diagnose.sdk_workloads(serve)
    except Exception as exc:
        log(f"diagnosis: SDK internals not usable ({type(exc).__name__}: {exc}); skipping them")
    try:
        diagnose.register(inproc.start())
        found += inproc.workloads()
    except Exception as exc:
        log(f"diagnosis: in-process server not usable ({type(exc).__name__}: {exc}); skipping it")
    return [Record(w, measure_throughput=False) for w in found]


#: Sub-blocks per round for the records of a group (see Record.group).
GROUP_SUB_BLOCKS = 5


def measure_latency(records: list[Record], settings: Settings, deadline: float) -> None:
    """Warm every workload up, then time it in interleaved rounds.

    Records of one group (the tracing variants of one workload, or a target's
    workload and its floor) are timed together where the first of them
    stands: in :data:`GROUP_SUB_BLOCKS` sub-blocks per round, each visiting
    them in a rotated order, so that neither a slow spell of the machine nor
    the position in the round favours one of them.
    """
    for record in records:
        _guard(record, lambda r=record: r.workload.block(settings.warmup), "warm-up")
    per_block = max(1, settings.calls // settings.blocks)
    groups = _groups(records)
    for round_index in range(settings.blocks):
        log(f"latency round {round_index + 1}/{settings.blocks} ({per_block} calls per workload)")
        for record in records:
            record.rounds.append([])
        for record in records:
            if record.group is None:
                _time_block(record, per_block)
            elif record is groups[record.group][0]:
                members = groups[record.group]
                calls = settings.tracing_calls if record.group.startswith("tracing/") else None
                group_block = max(1, (calls or settings.calls) // settings.blocks)
                subs = min(GROUP_SUB_BLOCKS, group_block)
                sizes = [group_block // subs + (i < group_block % subs) for i in range(subs)]
                for sub, size in enumerate(sizes):
                    shift = (round_index * subs + sub) % len(members)
                    for member in members[shift:] + members[:shift]:
                        _time_block(member, size)
        if time.monotonic() > deadline:
            log("latency: out of time budget; stopping early")
            for record in records:
                record.notes.append(f"latency: stopped early after round {round_index + 1}")
            break


def pair_targets(records: dict[str, Record]) -> None:
    """Group each target's workload with its floor(s) (see :data:`TARGET_PAIRS`).

    Targets that share a floor share a group: the floor and every workload
    held to it take turns in the same sub-blocks.
    """
    for mine, floors in TARGET_PAIRS.values():
        members = [records.get(key) for key in (mine, *floors)]
        if any(r is None for r in members):
            continue
        groups = {r.group for r in members if r is not None and r.group is not None}
        group = min(groups) if groups else f"target/{floors[0]}"
        for record in members:
            assert record is not None
            if record.group is not None and record.group != group:
                # Two groups meet (a sum of floors): merge them into one.
                for other in records.values():
                    if other.group == record.group:
                        other.group = group
            record.group = group


def _groups(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for record in records:
        if record.group is not None:
            groups.setdefault(record.group, []).append(record)
    return groups


def _time_block(record: Record, n: int) -> None:
    if record.error is None:
        got = _guard(record, lambda: record.workload.block(n), "latency")
        if got is not None:
            record.latencies.extend(got)
            record.rounds[-1].extend(got)


def start_tracing_variants(
    procs: Processes, deployments: dict[str, systems.System]
) -> tuple[list[tracing.Started], list[Record], str | None]:
    """The tracing-overhead servers (bench/tracing.py) and their records; an error stops them."""
    started: list[tracing.Started] = []
    try:
        log("tracing overhead: starting four more `cbgrpc serve` (off, off, on, disabled)")
        started = tracing.start(procs)
        for one in started:
            deployments[one.variant.system] = one.system
            one.check = tracing.check(one)
            log(
                f"{one.variant.system}: tracing {'on' if one.check['tracing_on'] else 'off'} "
                f"(log; timings: {one.check['timings_answer'][:80]})"
                + ("" if one.check["as_expected"] else " -- NOT AS INTENDED")
            )
        by_name: dict[str, list[Record]] = {name: [] for name in tracing.WORKLOADS}
        for one in started:
            for workload in tracing.workloads(one):
                by_name[workload.name].append(
                    Record(
                        workload,
                        measure_throughput=workload.name == tracing.WORKLOADS[0],
                        group=f"tracing/{workload.name}",
                    )
                )
        return started, [r for name in tracing.WORKLOADS for r in by_name[name]], None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
        log(f"tracing overhead: not measured ({error})")
        for one in started:
            one.system.close()
            deployments.pop(one.variant.system, None)
            for child in one.system.children:
                procs.stop(child)
        return [], [], error


def tracing_summary(
    started: list[tracing.Started], records: list[Record], error: str | None
) -> dict[str, Any]:
    mine = [r for r in records if r.group is not None and r.group.startswith("tracing/")]
    summary = tracing.summarize_overhead(
        started,
        {r.workload.key: r.latencies for r in mine},
        {r.workload.key: r.rounds for r in mine},
        {r.workload.key: r.tp_calls / r.tp_seconds if r.tp_seconds > 0 else None for r in mine},
        tracing.off_path_cost() if started else {},
        error or next((f"{r.workload.key}: {r.error}" for r in mine if r.error), None),
    )
    tracing.log_summary(summary)
    return summary


def measure_throughput(records: list[Record], settings: Settings) -> None:
    groups = _groups(records)
    for round_index in range(settings.tp_rounds):
        log(
            f"throughput round {round_index + 1}/{settings.tp_rounds} "
            f"({settings.callers} callers, {settings.tp_seconds:.2f} s per workload)"
        )
        for record in records:
            if record.group is None:
                _time_throughput(record, settings, settings.tp_seconds)
            elif record is groups[record.group][0]:
                # A group's records take turns in two halves, in a rotating order.
                members = [r for r in groups[record.group] if r.measure_throughput]
                for half in range(2):
                    shift = (round_index * 2 + half) % max(len(members), 1)
                    for member in members[shift:] + members[:shift]:
                        _time_throughput(member, settings, settings.tp_seconds / 2)


def measure_locality(deployments: dict[str, systems.System], settings: Settings) -> list[Record]:
    """The locality workload on each cluster: cold call and repeat, interleaved per sample.

    Two records per cluster (latency only): the cold calls and the repeats.
    """
    probes = [systems.LocalityProbe(deployments[name]) for name in systems.CLUSTERS
              if name in deployments]  # fmt: skip
    pairs = []
    for probe in probes:
        name = probe.system.name
        cold = Record(_Measured(name, systems.LOCALITY_COLD), measure_throughput=False)
        repeat = Record(_Measured(name, systems.LOCALITY_REPEAT), measure_throughput=False)
        pairs.append((probe, cold, repeat))
    log(
        f"locality: {settings.locality_samples} cold/repeat pairs per cluster "
        f"({systems.LOCALITY_REFERENCES} references to one 8 MiB array)"
    )
    for probe, cold, repeat in pairs:
        # Not counted: the function's own first run (loading its code) is not what C7 is about.
        if _guard(cold, probe.sample, "locality warm-up") is None:
            repeat.error = cold.error
    for _ in range(settings.locality_samples):
        for probe, cold, repeat in pairs:
            if cold.error is None:
                got = _guard(cold, probe.sample, "locality")
                if got is not None:
                    for record, seconds in zip((cold, repeat), got, strict=True):
                        record.latencies.append(seconds)
                        record.rounds.append([seconds])
                else:
                    repeat.error = cold.error
    return [r for _, cold, repeat in pairs for r in (cold, repeat)]


def measure_long_chain(deployments: dict[str, systems.System], settings: Settings) -> list[Record]:
    """The long-chain workload on the cluster with static addresses: a few calls, one record.

    Registering the chain (thousands of functions) is not timed; one call
    before the timed ones is not counted.
    """
    system = deployments.get(STATIC)
    if system is None:
        return []
    record = Record(_Measured(STATIC, systems.LONG_CHAIN), measure_throughput=False)
    probe = systems.LongChainProbe(system)
    log(f"long chain: registering {probe.length:,} functions and their DAG on {STATIC}")
    registered = _guard(record, probe.register, "long chain registration")
    if registered is None:
        return [record]
    log(f"long chain: registered in {registered:.1f} s; {settings.long_chain_calls} calls")
    if _guard(record, probe.sample, "long chain warm-up") is None:
        return [record]
    for _ in range(settings.long_chain_calls):
        seconds = _guard(record, probe.sample, "long chain")
        if seconds is None:
            break
        record.latencies.append(seconds)
        record.rounds.append([seconds])
    return [record]


class _Measured(Workload):
    """A workload measured by its own procedure (not by blocks of calls), for the report."""

    def block(self, n: int) -> list[float]:
        raise NotImplementedError(f"{self.key} is measured by its own procedure")


#: The server processes of each system: a throughput run of one of the system's workloads
#: is charged with their CPU time (their children's included) and its client's.
SYSTEM_PIDS: dict[str, list[int]] = {}


def _client_cpu(workload: Workload, pids: list[int]) -> float:
    """CPU seconds of ``pids`` (with their descendants) and of the process timing ``workload``.

    That is the workload's client process, or, for one timed here, this one.
    """
    if isinstance(workload, clients.RemoteWorkload):
        return cpu_seconds([*pids, workload.client.pid])
    own = os.times()
    return cpu_seconds(pids) + own.user + own.system


def _time_throughput(record: Record, settings: Settings, seconds: float) -> None:
    if record.error is None and record.measure_throughput:
        pids = SYSTEM_PIDS.get(record.workload.system)
        before = _client_cpu(record.workload, pids) if pids else 0.0
        got = _guard(
            record, lambda: record.workload.throughput(settings.callers, seconds), "throughput"
        )
        if got is not None:
            record.tp_calls += got.calls
            record.tp_seconds += got.seconds
            record.tp_latencies.extend(got.latencies)
            if pids:
                used = _client_cpu(record.workload, pids) - before
                record.tp_cpu_seconds = (record.tp_cpu_seconds or 0.0) + used


def _guard(record: Record, action: Any, what: str) -> Any:
    try:
        return action()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        record.error = f"{what}: {type(exc).__name__}: {exc}"[:500]
        log(f"{record.workload.key} failed: {record.error}")
        return None


# -- Ray -----------------------------------------------------------------------------


def run_ray(procs: Processes, settings: Settings) -> dict[str, Any]:
    if not settings.ray:
        return {"available": False, "reason": "skipped (--no-ray)"}
    if importlib.util.find_spec("ray") is None:
        return {
            "available": False,
            "reason": "ray is not installed (it is optional: "
            "`.venv/bin/pip install -r bench/requirements-ray.txt`)",
        }
    out = settings.out / "ray.json"
    out.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "bench.ray_bench",
        "--calls", str(settings.calls), "--blocks", str(settings.blocks),
        "--warmup", str(settings.warmup), "--callers", str(settings.callers),
        "--seconds", str(settings.tp_seconds * settings.tp_rounds), "--out", str(out),
    ]  # fmt: skip
    log("ray: starting a local Ray in its own process")
    child = procs.start("ray", argv, wait_for_address=False)
    try:
        child.proc.wait(120 if settings.quick else 240)
    except Exception:
        log("ray: out of time; stopping it")
    procs.stop(child, grace=20)
    try:
        result: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError):
        return {
            "available": False,
            "reason": f"the Ray run ended without a result; its log:\n{child.log_tail(10)}",
        }
    if not result.get("available"):
        log(f"ray: not available: {result.get('reason')}")
    return result


# -- targets -------------------------------------------------------------------------


def _median(records: dict[str, Record], key: str) -> float | None:
    record = records.get(key)
    if record is None or not record.latencies:
        return None
    return summarize(record.latencies)["median_ms"]


def _throughput(records: dict[str, Record], key: str) -> float | None:
    record = records.get(key)
    if record is None or record.tp_seconds <= 0:
        return None
    return record.tp_calls / record.tp_seconds


def _ray_median(ray: dict[str, Any], name: str) -> float | None:
    entry = ray.get("workloads", {}).get(name) if ray.get("available") else None
    if not entry or not entry.get("latencies"):
        return None
    return summarize(entry["latencies"])["median_ms"]


def evaluate_targets(
    records: dict[str, Record],
    ray: dict[str, Any],
    mem: dict[str, Any] | None,
    missing: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Each target: what was measured, the bound, and whether it is met.

    ``missing`` names the systems that could not be started, and why.
    """
    targets: list[dict[str, Any]] = []

    def add(
        ident: str, text: str, value: float | None, bound: float, *, at_most: bool, unit: str,
        detail: str, why_none: str = "not measured", system: str = SERVE,
    ) -> None:  # fmt: skip
        met = None if value is None else (value <= bound if at_most else value >= bound)
        if value is None and system in (missing or {}):
            why_none = f"{system} not started: {(missing or {})[system]}"
        targets.append(
            {
                "id": ident,
                "system": system,
                "target": text,
                "value": value,
                "bound": bound,
                "comparison": "<=" if at_most else ">=",
                "unit": unit,
                "met": met,
                "detail": detail if value is not None else why_none,
                "informational": system == INPROCESS,
            }
        )

    dag = _median(records, f"serve/{systems.DAG_DIRECT}")
    hop3 = _median(records, f"floor/{F_HOP3_STREAM}")
    add(
        "T1",
        "DAG incr->square, direct_response, `cbgrpc serve`: median <= 1.3x the 3-hop stream floor",
        None if dag is None or hop3 is None else dag / hop3,
        1.3,
        at_most=True,
        unit="x floor",
        detail=f"{_ms(dag)} vs floor {_ms(hop3)}{_per_round(records, 'T1')}",
    )
    ray_chain = _ray_median(ray, RAY_OF[systems.DAG_DIRECT])
    add(
        "T2",
        "Same DAG: at least 4x faster than Ray's chain `square.remote(incr.remote(1))` (medians)",
        None if dag is None or ray_chain is None else ray_chain / dag,
        4.0,
        at_most=False,
        unit="x faster",
        detail=f"Ray {_ms(ray_chain)} vs {_ms(dag)}",
        why_none="Ray not available: " + str(ray.get("reason", ""))[:200]
        if not ray.get("available")
        else "not measured",
        system=f"{SERVE} vs Ray",
    )
    dag_tp = _throughput(records, f"serve/{systems.DAG_DIRECT}")
    hop3_tp = _throughput(records, f"floor/{F_HOP3_STREAM}")
    add(
        "T3",
        "Same DAG, throughput with 8 callers: >= 0.6x the 3-hop stream floor's throughput",
        None if dag_tp is None or not hop3_tp else dag_tp / hop3_tp,
        0.6,
        at_most=False,
        unit="x floor",
        detail=f"{_rate(dag_tp)} vs floor {_rate(hop3_tp)}"
        + _cpu_detail(records, f"serve/{systems.DAG_DIRECT}", f"floor/{F_HOP3_STREAM}"),
    )
    call = _median(records, f"serve/{systems.CALL}")
    unary = _median(records, f"floor/{F_UNARY}")
    add(
        "T4",
        "One function call `incr(1).get()`, `cbgrpc serve`: median <= 1.5x a bare unary round trip",
        None if call is None or unary is None else call / unary,
        1.5,
        at_most=True,
        unit="x floor",
        detail=f"{_ms(call)} vs floor {_ms(unary)}{_per_round(records, 'T4')}",
    )
    if mem is not None and not mem.get("error") and mem.get("rss_after_first_1000_bytes"):
        calls = mem["calls"]
        detail = (
            f"{mem['rss_after_first_1000_bytes'] / 2**20:.1f} MiB after 1,000 calls, peak "
            f"{mem['rss_peak_bytes'] / 2**20:.1f} MiB over {calls:,} calls"
        )
        if mem["stopped_by_budget"]:
            detail += f" (only {calls:,} of {mem['target_calls']:,} calls fit the time budget)"
        value: float | None = mem["peak_over_first_1000"]
    else:
        value, detail = None, ""
    add(
        "T5",
        f"Peak RSS of `cbgrpc serve` over {(mem or {}).get('target_calls', 100_000):,} calls "
        "<= 1.5x its RSS after the first 1,000",
        value,
        1.5,
        at_most=True,
        unit="x",
        detail=detail,
        why_none=f"memory check failed: {mem.get('error')}" if mem else "not run",
    )
    message = _median(records, f"{STATIC}/{systems.MESSAGE}")
    bidi = _median(records, f"floor/{F_BIDI}")
    crossed = records.get(f"{STATIC}/{systems.MESSAGE}")
    where = ""
    if crossed is not None and isinstance(crossed.workload, systems.MessagingWorkload):
        flag = crossed.workload.crossed_processes()
        where = (
            "; ping and pong ran on different executor processes"
            if flag
            else "; WARNING: ping and pong did not always run on different processes"
        )
    add(
        "T6",
        "send/recv round trip between two functions on different executor processes (cluster): "
        "median <= 2x a bare gRPC bidi-stream round trip between two processes",
        None if message is None or bidi is None else message / bidi,
        2.0,
        at_most=True,
        unit="x floor",
        detail=f"{_ms(message)} vs floor {_ms(bidi)}{_per_round(records, 'T6')}{where}",
        system=STATIC,
    )
    _inprocess_targets(records, add)  # after T1-T6: shown, not held
    for system in systems.CLUSTERS:
        _cluster_targets(records, system, add)
    chain = _median(records, f"{STATIC}/{systems.LONG_CHAIN}")
    chain_record = records.get(f"{STATIC}/{systems.LONG_CHAIN}")
    add(
        f"C8 {STATIC}",
        f"DAG chain of {systems.LONG_CHAIN_FUNCTIONS:,} functions spread over both executors, "
        "direct response: median under 2 s per call",
        None if chain is None else chain / 1000,
        2.0,
        at_most=True,
        unit="s",
        detail=f"{(chain or 0) / 1000:.2f} s per call "
        f"({len(chain_record.latencies) if chain_record else 0} calls)",
        why_none="not measured"
        + (f": {chain_record.error}" if chain_record and chain_record.error else ""),
        system=STATIC,
    )
    for system in (SERVE, *systems.CLUSTERS):
        for op in ("put", "get"):
            _ratio_target(
                records, add, f"C5-{op} {system}",
                f"{op}_object 1 MiB: median <= 2x a bare 1 MiB unary call",
                2.0, system=system,
            )  # fmt: skip
    # T1-T6 as they were; then the cluster targets in order, each over its systems.
    order = {name: i for i, name in enumerate((SERVE, *systems.CLUSTERS))}

    def place(t: dict[str, Any]) -> tuple[bool, tuple[int, str], int]:
        if not t["id"].startswith("C"):
            return (False, (0, ""), 0)  # a stable sort keeps T1-T6 in their order
        return (True, report.target_order(t["id"].split(" ")[0]), order[t["system"]])

    targets.sort(key=place)
    return targets


def _inprocess_targets(records: dict[str, Record], add: Any) -> None:
    """T1 and T4 for `cbgrpc serve --isolation none`: shown next to serve's, never missed.

    ``serve`` (the default isolation) is what the targets hold; the in-process
    figures show what isolating user code in executor processes costs.
    """
    for ident, workload, base, bound in (
        ("T1", systems.DAG_DIRECT, F_HOP3_STREAM, 1.3),
        ("T4", systems.CALL, F_UNARY, 1.5),
    ):
        mine = _median(records, f"{INPROCESS}/{workload}")
        floor_ms = _median(records, f"floor/{base}")
        ratio = None if mine is None or floor_ms is None else mine / floor_ms
        rounds = _per_round(records, f"{ident} {INPROCESS}")
        add(
            f"{ident} {INPROCESS}",
            f"{ident} on `cbgrpc serve --isolation none` (informational: serve's target is "
            f"<= {bound}x its floor)",
            ratio,
            bound,
            at_most=True,
            unit="x floor",
            detail=f"{_ms(mine)} vs floor {_ms(floor_ms)}{rounds}",
            system=INPROCESS,
        )


def _cluster_targets(records: dict[str, Record], system: str, add: Any) -> None:
    """The targets of a cluster (C1-C4, C6, C7; C5 is shared with serve)."""
    hop3 = "the 3-hop stream floor"
    for ident, what, bound in (
        ("C1", "DAG incr->square, direct_response", 1.4),
        ("C2", "`incr(1).get()`", 1.4),
        ("C3", "DAG incr->square with `.get()`", 1.6),
    ):
        _ratio_target(
            records, add, f"{ident} {system}", f"{what}: median <= {bound}x {hop3}", bound,
            system=system, extra=_four_hops(records) if ident == "C1" else "",
        )  # fmt: skip
    for op, engine in (("get", "read"), ("put", "write")):
        _ratio_target(
            records, add, f"C4-{op} {system}",
            f"{op}_object 100 B: median <= 1.5x a bare unary round trip + a bare storage "
            f"engine {engine}",
            1.5, system=system,
        )  # fmt: skip
    dag_tp = _throughput(records, f"{system}/{systems.DAG_DIRECT}")
    hop3_tp = _throughput(records, f"floor/{F_HOP3_STREAM}")
    add(
        f"C6 {system}",
        f"DAG incr->square, direct_response, 8 callers: throughput >= 0.6x {hop3}'s",
        None if dag_tp is None or not hop3_tp else dag_tp / hop3_tp,
        0.6,
        at_most=False,
        unit="x floor",
        detail=f"{_rate(dag_tp)} vs floor {_rate(hop3_tp)}"
        + _cpu_detail(records, f"{system}/{systems.DAG_DIRECT}", f"floor/{F_HOP3_STREAM}"),
        system=system,
    )
    cold = _median(records, f"{system}/{systems.LOCALITY_COLD}")
    repeat = _median(records, f"{system}/{systems.LOCALITY_REPEAT}")
    samples = records.get(f"{system}/{systems.LOCALITY_COLD}")
    add(
        f"C7 {system}",
        "Locality: a function reading ten references to one 8 MiB array: the repeat call "
        ">= 5x faster than the first (medians)",
        None if cold is None or not repeat else cold / repeat,
        5.0,
        at_most=False,
        unit="x faster",
        detail=f"first {_ms(cold)}, repeat {_ms(repeat)}"
        f" ({len(samples.latencies) if samples else 0} pairs)",
        why_none=f"not measured{': ' + samples.error if samples and samples.error else ''}",
        system=system,
    )


def _four_hops(records: dict[str, Record]) -> str:
    """For C1's detail: what one more bare hop costs, the DAG's four against the floor's three."""
    four = _median(records, f"floor/{F_HOP4_STREAM}")
    three = _median(records, f"floor/{F_HOP3_STREAM}")
    if four is None or not three:
        return ""
    return (
        f"; the DAG makes 4 hops (client->scheduler->executor->executor->client): a bare "
        f"4-hop stream takes {four / three:.2f}x the 3-hop floor"
    )


def _ratio_target(
    records: dict[str, Record],
    add: Any,
    ident: str,
    text: str,
    bound: float,
    *,
    system: str,
    extra: str = "",
) -> None:
    """A latency target from :data:`TARGET_PAIRS`: the workload's median over its floors' sum.

    ``extra`` ends the detail.
    """
    key, floors = TARGET_PAIRS[ident]
    mine = _median(records, key)
    bases = [_median(records, f) for f in floors]
    total = None if any(b is None for b in bases) else sum(b for b in bases if b is not None)
    parts = [f"{f.partition('/')[2]} {_ms(b)}" for f, b in zip(floors, bases, strict=True)]
    names = f" ({' + '.join(parts)})" if len(parts) > 1 else ""
    record = records.get(key)
    add(
        ident,
        text,
        None if mine is None or not total else mine / total,
        bound,
        at_most=True,
        unit="x floor",
        detail=f"{_ms(mine)} vs floor {_ms(total)}{names}{_per_round(records, ident)}{extra}",
        why_none=f"not measured{': ' + record.error if record and record.error else ''}",
        system=system,
    )


def _per_round(records: dict[str, Record], ident: str) -> str:
    """The target's ratio in each round, lowest to highest: how much the run varied."""
    key, floors = TARGET_PAIRS[ident]
    members = [records.get(k) for k in (key, *floors)]
    if any(r is None for r in members):
        return ""
    mine, *bases = (r.rounds for r in members if r is not None)
    ratios = []
    for index, samples in enumerate(mine):
        floor_rounds = [b[index] if index < len(b) else [] for b in bases]
        if samples and all(floor_rounds):
            total = sum(statistics.median(b) for b in floor_rounds)
            ratios.append(statistics.median(samples) / total)
    if len(ratios) < 2:
        return ""
    return f"; per round {', '.join(f'{r:.2f}' for r in sorted(ratios))}x"


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} ms" if value >= 0.1 else f"{value * 1000:.2f} us"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}/s"


def _cpu_per_call(records: dict[str, Record], key: str) -> float | None:
    """Milliseconds of CPU per call in the workload's throughput runs, all its processes."""
    record = records.get(key)
    if record is None or record.tp_cpu_seconds is None or record.tp_calls <= 0:
        return None
    return record.tp_cpu_seconds / record.tp_calls * 1e3


def _cpu_detail(records: dict[str, Record], key: str, floor_key: str) -> str:
    """What a throughput target's calls cost in CPU, against the floor's, for its detail."""
    mine, base = _cpu_per_call(records, key), _cpu_per_call(records, floor_key)
    if mine is None or base is None:
        return ""
    return (
        f"; CPU per call {mine:.2f} ms vs the floor's {base:.2f} ms (every process of each, "
        f"its client's included; {os.cpu_count()} CPUs bound a rate at CPUs / CPU per call)"
    )


# -- profiling -----------------------------------------------------------------------


def profile_misses(
    targets: list[dict[str, Any]],
    records: dict[str, Record],
    deployments: dict[str, systems.System],
    settings: Settings,
) -> list[dict[str, Any]]:
    """Profile the product (and the bench's own client process) where a target is missed."""
    wanted: list[tuple[str, str]] = []  # (label, record key)
    missed = {t["id"] for t in targets if t["met"] is False}
    if settings.profile == "always":
        missed |= {"T1", "T4", "T6"}
    if missed & {"T1", "T2", "T3"}:
        wanted.append(("T1-T3 DAG direct_response on serve", f"serve/{systems.DAG_DIRECT}"))
    if "T4" in missed:
        wanted.append(("T4 incr(1).get() on serve", f"serve/{systems.CALL}"))
    if "T6" in missed:
        wanted.append(("T6 send/recv on the cluster", f"{STATIC}/{systems.MESSAGE}"))
    if f"C1 {STATIC}" in missed:
        wanted.append((f"C1 DAG direct_response on {STATIC}", f"{STATIC}/{systems.DAG_DIRECT}"))
    # Workloads far off their floor (no target of their own) are worth a look too.
    for key, record in records.items():
        system, _, name = key.partition("/")
        if system != SERVE or name not in FLOOR_OF or not record.latencies:
            continue
        mine, base = _median(records, key), _median(records, f"floor/{FLOOR_OF[name]}")
        if mine and base and mine / base > 4 and all(k != key for _, k in wanted):
            wanted.append((f"{name} on serve ({mine / base:.1f}x its floor)", key))
    results: list[dict[str, Any]] = []
    for label, key in wanted[:5]:
        record = records[key]
        deployment = deployments[record.workload.system]
        workload = record.workload
        if isinstance(workload, clients.RemoteWorkload):
            client = {"client": workload.client.pid}
        else:
            client = {"bench client (this process)": os.getpid()}
        targets_pids = {**deployment.pids(), **client}
        if record.workload.system in systems.CLUSTERS:
            targets_pids.pop(f"{record.workload.system}-kvs", None)
        log(f"profiling: {label}")
        block = 1 if isinstance(workload, systems.MessagingWorkload) else 20
        rounds = 200 if isinstance(workload, systems.MessagingWorkload) else block

        def drive(w: Workload = workload, n: int = rounds) -> None:
            w.block(n)

        profiles = profiling.record(
            label,
            targets_pids,
            drive,
            settings.profile_seconds,
            settings.out / "profiles",
        )
        results.append(
            {
                "label": label,
                "workload": key,
                "profiles": [p.__dict__ for p in profiles],
            }
        )
    return results


# -- main ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import google.protobuf
    import grpc

    from cloudburst import grpc_io

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "grpc_io": grpc_io.CHOICE,
        "protobuf": google.protobuf.__version__,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def git_info() -> dict[str, Any]:
    """The commit measured, and whether product code had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "cloudburst_grpc", "executors", "kvs", "sdk")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "product_files_changed": len(changed.splitlines()) if changed else 0,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: The aim for mutual TLS: the cluster's DAG latency within this fraction of plaintext.
MTLS_AIM = 0.10


def mtls_summary(records: list[Record]) -> dict[str, Any]:
    """Medians of the mutual-TLS cluster against the plaintext static one, per workload."""
    by_key = {r.workload.key: r for r in records}
    rows = []
    for name in (systems.DAG_DIRECT, systems.DAG_GET, systems.CALL):
        plain = by_key.get(f"{STATIC}/{name}")
        secure = by_key.get(f"{systems.MTLS}/{name}")
        if plain is None or secure is None or not plain.latencies or not secure.latencies:
            continue
        base = summarize(plain.latencies)["median_ms"]
        tls = summarize(secure.latencies)["median_ms"]
        rows.append(
            {
                "workload": name,
                "plain_median_ms": base,
                "mtls_median_ms": tls,
                "overhead": tls / base - 1 if base else None,
            }
        )
    return {"aim": MTLS_AIM, "workloads": rows}


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    interrupt_on_sigterm()
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "logs").mkdir(exist_ok=True)
    # The in-process server (bench/diagnose.py) logs here, not over the progress lines.
    logging.basicConfig(
        filename=settings.out / "logs" / "bench-process.log",
        filemode="w",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    began = time.monotonic()
    deadline = began + TOTAL_BUDGET_SECONDS
    log(f"bench: {'quick' if settings.quick else 'full'} run, results in {settings.out}")
    cores = Cores(settings.pin)
    if cores.enabled:
        # Before this process starts any thread, so that all of them stay on its core.
        pin(str(cores.client()))
    meta = machine_info()
    meta["pinning"] = cores.describe()
    meta["mode"] = "quick" if settings.quick else "full"
    meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    meta["storage"] = settings.storage
    meta.update(git_info())
    aio = AioLoop()
    pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="bench-unit")
    deployments: dict[str, systems.System] = {}
    floor_client: clients.ClientProcess | None = None
    system_clients: list[clients.ClientProcess] = []
    inproc: diagnose.InProcessServer | None = None
    engine: floor.EngineFloor | None = None
    valkeys: dict[str, Any] = {}
    scratch = tempfile.TemporaryDirectory(prefix="cbgrpc-bench-")
    missing: dict[str, str] = {}
    records: list[Record] = []
    ray: dict[str, Any] = {}
    mem: dict[str, Any] | None = None
    overhead: dict[str, Any] | None = None
    profiles: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    try:
        with Processes(settings.out / "logs", cores) as procs:
            log("starting the floor servers, `cbgrpc serve` and the process clusters")
            floor_argv = [sys.executable, "-m", "bench.floor", "--role"]
            echo = procs.start("floor-echo", [*floor_argv, "echo"], cpu=cores.server())
            hop_b = procs.start("floor-b", [*floor_argv, "b"], cpu=cores.server())
            hop_a = procs.start(
                "floor-a", [*floor_argv, "a", "--next", hop_b.address], cpu=cores.server()
            )
            # The four-hop path (informational): A4 -> A2 -> B.
            hop_a2 = procs.start(
                "floor-a2", [*floor_argv, "a", "--next", hop_b.address], cpu=cores.server()
            )
            hop_a4 = procs.start(
                "floor-a4", [*floor_argv, "a", "--next", hop_a2.address], cpu=cores.server()
            )
            floor_client = clients.ClientProcess(
                procs,
                "client-floor",
                ["floor", "--echo", echo.address, "--hop-a", hop_a.address,
                 "--hop-b", hop_b.address, "--hop-a4", hop_a4.address],
                cpu=cores.client(),
            )  # fmt: skip
            SYSTEM_PIDS["floor"] = [echo.pid, hop_a.pid, hop_b.pid]
            if settings.storage == "valkey":
                # One Valkey Cluster per cloudburst cluster: they must not share state.
                log("starting a Valkey Cluster (3 primaries, 1 replica each) per cluster")
                for name in (STATIC, CONSUL) if settings.consul else (STATIC,):
                    valkeys[name] = systems.start_valkey(Path(scratch.name) / f"valkey-{name}")
            urls = {name: cluster.url for name, cluster in valkeys.items()}
            engine = floor.EngineFloor(
                settings.storage, Path(scratch.name) / "engine-floor", urls.get(STATIC)
            )
            deployments[SERVE] = systems.start_serve(procs)
            deployments[INPROCESS] = systems.start_serve_inprocess(procs)
            deployments[STATIC] = systems.start_cluster(
                procs, STATIC, storage=settings.storage, data_dir=Path(scratch.name),
                valkey_url=urls.get(STATIC),
            )  # fmt: skip
            if settings.storage != "valkey":  # a Valkey Cluster serves one cluster only
                deployments[systems.MTLS] = systems.start_cluster(
                    procs, systems.MTLS, storage=settings.storage, data_dir=Path(scratch.name),
                    certs=Path(scratch.name) / "certs",
                )  # fmt: skip
            if settings.consul:
                try:
                    consul_child, consul = systems.start_consul(procs, systems.consul_binary())
                    log(f"consul: pid {consul_child.pid} at {consul}")
                    deployments[CONSUL] = systems.start_cluster(
                        procs, CONSUL, storage=settings.storage, data_dir=Path(scratch.name),
                        consul=consul, valkey_url=urls.get(CONSUL),
                    )  # fmt: skip
                except Exception as exc:
                    missing[CONSUL] = f"{type(exc).__name__}: {exc}"[:500]
                    log(f"{CONSUL}: not measured ({missing[CONSUL]})")
            else:
                missing[CONSUL] = "skipped (--no-consul)"
            for name, deployment in deployments.items():
                SYSTEM_PIDS[name] = list(deployment.pids().values())
            for deployment in deployments.values():
                systems.describe_start(deployment)
                systems.register_all(systems.connect(deployment))
            records = floor_records(floor_client, engine) + unit_workloads(aio, pool)
            for deployment in deployments.values():
                client, found = system_workloads(procs, deployment, cores.client())
                system_clients.append(client)
                records += found
            traced, traced_records, traced_error = start_tracing_variants(procs, deployments)
            records += traced_records
            records += diagnosis_workloads(
                deployments["serve"], inproc := diagnose.InProcessServer()
            )
            by_key = {r.workload.key: r for r in records}
            pair_targets(by_key)
            # The four-hop floor is timed in the three-hop floor's sub-blocks, for the ratio
            # of the two (C1's detail); no throughput.
            four = by_key.get(f"floor/{F_HOP4_STREAM}")
            if four is not None:
                four.group = by_key[f"floor/{F_HOP3_STREAM}"].group
                four.measure_throughput = False

            measure_latency(records, settings, deadline - 300)
            measure_throughput(records, settings)
            for record in measure_long_chain(deployments, settings):
                records.append(record)
                by_key[record.workload.key] = record
            for record in measure_locality(deployments, settings):
                records.append(record)
                by_key[record.workload.key] = record
            overhead = tracing_summary(traced, records, traced_error)
            log(f"cloudburst and floor measured in {time.monotonic() - began:.0f} s")
            ray = run_ray(procs, settings)
            targets = evaluate_targets(by_key, ray, None, missing)
            if settings.profile != "never":
                profiles = profile_misses(targets, by_key, deployments, settings)
            for client in [*system_clients, floor_client]:
                client.close()
            system_clients, floor_client = [], None
            for deployment in deployments.values():
                deployment.close()
            inproc.stop()
            inproc = None
            procs.stop_all()
            engine.close()
            engine = None
            for cluster in valkeys.values():
                cluster.stop()
            valkeys.clear()
            remaining = deadline - time.monotonic() - 15
            log(
                f"memory: up to {settings.memory_calls:,} calls with {settings.callers} callers "
                f"on a fresh `cbgrpc serve` (budget {max(remaining, 20):.0f} s)"
            )
            mem = memory.as_dict(
                memory.run(procs, settings.memory_calls, settings.callers, max(remaining, 20))
            )
            targets = evaluate_targets(by_key, ray, mem, missing)
    except KeyboardInterrupt:
        log("interrupted: stopping everything this run started")
        return 130
    finally:
        for client in [*system_clients, *([floor_client] if floor_client else [])]:
            try:
                client.close(10)
            except Exception:
                traceback.print_exc()
        for deployment in deployments.values():
            deployment.close()
        if inproc is not None:
            try:
                inproc.stop()
            except Exception:
                traceback.print_exc()
        if engine is not None:
            engine.close()
        for cluster in valkeys.values():
            cluster.stop()
        scratch.cleanup()
        aio.stop()
        pool.shutdown(wait=False)
    meta["seconds"] = time.monotonic() - began
    meta["load_average_at_end"] = list(os.getloadavg())
    data = report.build(
        meta,
        settings.__dict__,
        records,
        FLOOR_OF,
        RAY_OF,
        ray,
        targets,
        mem,
        profiles,
        overhead,
        mtls_summary(records),
    )
    paths = report.write(settings.out, data, records, ray)
    log(f"done in {meta['seconds']:.0f} s: " + ", ".join(str(p) for p in paths))
    for target in targets:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[target["met"]]
        if target.get("informational"):
            verdict = "shown"
        system = "" if target["system"] in target["id"] else f" [{target['system']}]"
        print(
            f"{target['id']}{system} {verdict}: {target['target']} ({target['detail']})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
