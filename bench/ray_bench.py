"""Ray's figures, measured in a process of their own (``python -m bench.ray_bench``).

Ray starts its own daemons and driver threads; running it in a separate
process keeps them from perturbing the other measurements, and a Ray that
cannot be installed or started costs only its own section of the report. The
result (or the reason there is none) is written as JSON to ``--out``.

Ray runs as a local single-node cluster on this machine: ``ray.init`` with
the machine's CPU count, no dashboard, usage statistics off, bound to
127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any

from bench.measure import SyncWorkload, Workload
from bench.procs import interrupt_on_sigterm, pin_from_environment

CALL = "task incr.remote(1)"
CHAIN = "chain square.remote(incr.remote(1))"
FAN = "fan-out/fan-in (1->4->1)"
PUT_SMALL = "ray.put 100 B"
GET_SMALL = "ray.get 100 B"
PUT_LARGE = "ray.put 1 MiB"
GET_LARGE = "ray.get 1 MiB"


def _workloads() -> tuple[list[Workload], Any]:
    import ray

    @ray.remote
    def incr(a: int) -> int:
        return a + 1

    @ray.remote
    def square(a: int) -> int:
        return a * a

    @ray.remote
    def fan_source(a: int) -> int:
        return a

    @ray.remote
    def fan_1(a: int) -> int:
        return a + 1

    @ray.remote
    def fan_2(a: int) -> int:
        return a * 2

    @ray.remote
    def fan_3(a: int) -> int:
        return a + 3

    @ray.remote
    def fan_4(a: int) -> int:
        return a * 4

    @ray.remote
    def fan_sink(a: int, b: int, c: int, d: int) -> int:
        return a + b + c + d

    def fan() -> int:
        source = fan_source.remote(1)
        parts = [f.remote(source) for f in (fan_1, fan_2, fan_3, fan_4)]
        return int(ray.get(fan_sink.remote(*parts)))

    small, large = os.urandom(100), os.urandom(1024 * 1024)
    small_ref, large_ref = ray.put(small), ray.put(large)
    return [
        SyncWorkload("ray", CALL, lambda: ray.get(incr.remote(1)), check=lambda r: r == 2),
        SyncWorkload(
            "ray", CHAIN, lambda: ray.get(square.remote(incr.remote(1))), check=lambda r: r == 4
        ),
        SyncWorkload("ray", FAN, fan, check=lambda r: r == 12),
        SyncWorkload("ray", PUT_SMALL, lambda: ray.put(small)),
        SyncWorkload("ray", GET_SMALL, lambda: ray.get(small_ref), check=lambda r: r == small),
        SyncWorkload("ray", PUT_LARGE, lambda: ray.put(large)),
        SyncWorkload(
            "ray", GET_LARGE, lambda: ray.get(large_ref), check=lambda r: len(r) == len(large)
        ),
    ], ray


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except Exception as exc:
        return {"available": False, "reason": f"ray cannot be imported: {exc}"}
    began = time.monotonic()
    try:
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            _node_ip_address="127.0.0.1",
        )
    except Exception as exc:
        return {"available": False, "reason": f"ray.init failed: {type(exc).__name__}: {exc}"}
    result: dict[str, Any] = {
        "available": True,
        "version": ray.__version__,
        "init_seconds": time.monotonic() - began,
        "workloads": {},
    }
    try:
        workloads, _ = _workloads()
        for workload in workloads:
            print(f"ray: {workload.name}", file=sys.stderr, flush=True)
            workload.block(args.warmup)
            latencies: list[float] = []
            for _ in range(args.blocks):
                latencies.extend(workload.block(args.calls // args.blocks))
            workload.block(max(1, args.warmup // 4))
            throughput = workload.throughput(args.callers, args.seconds)
            result["workloads"][workload.name] = {
                "latencies": latencies,
                "throughput": {**asdict(throughput), "latencies": []},
                "throughput_latencies": throughput.latencies,
            }
    finally:
        ray.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ray's side of the bench")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pin_from_environment()  # every CPU again: Ray places its own processes
    interrupt_on_sigterm()  # so that ray.shutdown() runs when the bench stops us
    try:
        result = run(args)
    except KeyboardInterrupt:
        result = {"available": False, "reason": "interrupted"}
    except Exception as exc:
        result = {
            "available": False,
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    with open(args.out, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
