"""The KVS over Valkey: get/put of 100 B and 1 MiB, against the bare engine, in one run.

Usage (from the repository root): ``python -m bench.valkey [--quick] [--out DIR]``
(``make bench`` runs it after the main suite).

Starts a Valkey Cluster (3 primaries x 2 replicas on loopback), two
`cbgrpc kvs --engine valkey` processes (durable writes on and off), an
executor and a scheduler, and measures in the same run:

* the bare engine round trip (``SET``/``GET`` through the asyncio cluster client);
* KVS put/get from a client (gRPC to a KVS process), as a ratio to the bare round trip;
* KVS put/get from inside a function (the user library), same ratio;
* the cost of durable writes: put with ``WAIT 1`` against put without.

Writes ``valkey.md`` and ``valkey.json`` to the output directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as `python bench/valkey.py`
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' cluster and process modules

from redis.asyncio.cluster import ClusterNode, RedisCluster  # noqa: E402

from cloudburst import CloudburstConnection  # noqa: E402
from cloudburst.v1 import lattice_pb2, value_pb2  # noqa: E402
from cloudburst_grpc.server import insecure_channel  # noqa: E402
from cloudburst_kvs.client import KvsClient  # noqa: E402
from harness import CbgrpcProcess  # noqa: E402
from valkey_cluster import running_cluster  # noqa: E402

SIZES = {"100 B": 100, "1 MiB": 1 << 20}
LIMIT = 64 << 20


def log(message: str) -> None:
    print(f"[bench valkey {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lww(data: bytes) -> lattice_pb2.Lattice:
    lattice = lattice_pb2.Lattice()
    lattice.lww.value.data = data
    lattice.lww.value.serializer = value_pb2.SERIALIZER_BYTES
    return lattice


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
    }


async def timed(n: int, operation: Callable[[int], Awaitable[Any]]) -> list[float]:
    await operation(-1)  # warm-up
    samples = []
    for index in range(n):
        started = time.perf_counter()
        await operation(index)
        samples.append(time.perf_counter() - started)
    return samples


async def bare_engine(url_nodes: list[tuple[str, int]], n: int) -> dict[str, list[float]]:
    cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in url_nodes])
    await cluster.initialize()
    results: dict[str, list[float]] = {}
    try:
        for label, size in SIZES.items():
            data = b"x" * size
            key = f"bare-{size}"
            results[f"engine SET {label}"] = await timed(
                n, lambda _i, k=key, d=data: cluster.set(k, d)
            )
            results[f"engine GET {label}"] = await timed(n, lambda _i, k=key: cluster.get(k))
    finally:
        await cluster.aclose()
    return results


async def from_client(address: str, tag: str, n: int) -> dict[str, list[float]]:
    channel = insecure_channel(address, LIMIT)
    client = KvsClient(channel)
    results: dict[str, list[float]] = {}
    try:
        for label, size in SIZES.items():
            lattice = lww(b"y" * size)
            key = f"client-{tag}-{size}"
            results[f"client put {label}{tag}"] = await timed(
                n, lambda _i, k=key, lat=lattice: client.merge(k, lat)
            )
            if not tag:
                results[f"client get {label}"] = await timed(n, lambda _i, k=key: client.get(k))
    finally:
        await channel.close()
    return results


def inside_function(cloud: CloudburstConnection, n: int) -> dict[str, list[float]]:
    def measure(cloudburst: Any, size: int, count: int) -> tuple[list[float], list[float]]:
        import time as clock

        value = b"z" * size
        puts, gets = [], []
        cloudburst.put_object(f"fn-{size}", value)
        cloudburst.get_object(f"fn-{size}")
        for _ in range(count):
            started = clock.perf_counter()
            cloudburst.put_object(f"fn-{size}", value)
            puts.append(clock.perf_counter() - started)
            started = clock.perf_counter()
            cloudburst.get_object(f"fn-{size}")
            gets.append(clock.perf_counter() - started)
        return puts, gets

    handle = cloud.register(measure, "valkey-bench-measure")
    results: dict[str, list[float]] = {}
    for label, size in SIZES.items():
        puts, gets = handle(size, n).get(timeout=600)
        results[f"function put {label}"] = puts
        results[f"function get {label}"] = gets
    return results


def ratios(stats: dict[str, dict[str, float]]) -> list[tuple[str, str, float]]:
    rows = []
    for label in SIZES:
        for where in ("client", "function"):
            for op, engine_op in (("put", "SET"), ("get", "GET")):
                name = f"{where} {op} {label}"
                base = f"engine {engine_op} {label}"
                if name in stats and base in stats:
                    rows.append((name, base, stats[name]["p50_ms"] / stats[base]["p50_ms"]))
        durable = stats.get(f"client put {label}")
        relaxed = stats.get(f"client put {label} (no WAIT)")
        if durable and relaxed:
            rows.append(
                (
                    f"client put {label}",
                    f"client put {label} (no WAIT)",
                    durable["p50_ms"] / relaxed["p50_ms"],
                )
            )
    return rows


def render(stats: dict[str, dict[str, float]], quick: bool) -> str:
    lines = [
        "# KVS over Valkey Cluster",
        "",
        f"{'Quick' if quick else 'Full'} run; 3 primaries x 2 replicas on loopback, durable "
        "writes (`WAIT 1`) unless marked.",
        "",
        "| measurement | n | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, row in stats.items():
        lines.append(f"| {name} | {row['n']:.0f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} |")
    lines += ["", "| measurement | against | ratio of p50 |", "|---|---|---:|"]
    for name, base, ratio in ratios(stats):
        lines.append(f"| {name} | {base} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples, for a smoke run")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="output directory"
    )
    args, _ = parser.parse_known_args(argv)  # `make bench ARGS=...` also carries bench.run flags
    n = 20 if args.quick else 200
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        log(f"Valkey cluster up ({len(cluster.nodes)} nodes)")
        seeds = [("127.0.0.1", node.port) for node in cluster.nodes]
        samples.update(asyncio.run(bare_engine(seeds, n)))
        procs: list[CbgrpcProcess] = []
        try:
            common = ["--engine", "valkey", "--valkey-url", cluster.url]
            payload = ["--max-payload-bytes", str(LIMIT)]
            durable = CbgrpcProcess("kvs", *common, *payload)
            procs.append(durable)
            relaxed = CbgrpcProcess("kvs", *common, *payload, "--no-durable-writes")
            procs.append(relaxed)
            samples.update(asyncio.run(from_client(durable.address, "", n)))
            samples.update(asyncio.run(from_client(relaxed.address, " (no WAIT)", n)))
            executor = CbgrpcProcess("executor", "--kvs", durable.address, *payload)
            procs.append(executor)
            scheduler = CbgrpcProcess(
                "scheduler", "--kvs", durable.address, "--executor", executor.address, *payload
            )
            procs.append(scheduler)
            with CloudburstConnection(scheduler.address) as cloud:
                samples.update(inside_function(cloud, n))
        finally:
            for proc in reversed(procs):
                proc.kill()
    stats = {name: summary(values) for name, values in samples.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(stats, args.quick)
    (args.out / "valkey.md").write_text(report)
    (args.out / "valkey.json").write_text(
        json.dumps({"stats": stats, "ratios": ratios(stats)}, indent=2)
    )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
