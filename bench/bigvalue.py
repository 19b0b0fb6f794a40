"""Peak RSS of every process for one large value (1 GiB by default): put, get, read in a function.

Not a test and not part of `bench.run`: it needs several GiB of free memory.
Run it alone on a quiet machine::

    python -m bench.bigvalue                 # 1 GiB, the memory engine
    python -m bench.bigvalue --mib 256       # a quicker look

It starts a cluster of separate processes (`cbgrpc kvs --storage memory`, two
`cbgrpc executor`, `cbgrpc scheduler`, as `bench.systems.start_cluster` does)
and a fresh client process, which

1. builds the value (``bytes``, the user's object, stored as they are; with
   ``--pickled`` a ``bytearray``, which is pickled) and stores it with
   ``put_object``;
2. drops its own copy (keeping a SHA-256 of it; ``--keep-value`` keeps it, as
   a user comparing the two would) and reads the value back with
   ``get_object``, checking the digest;
3. calls a function that takes a ``CloudburstReference`` to the key, so one
   executor reads the value from the KVS.

The cluster runs with the default configuration: the scheduler sets aside an
executor that does not answer a health check within 2 s, and fails the calls
running there, so the function's read also shows that an executor reading
1 GiB keeps answering. ``--health-timeout`` sets another limit.

Each process's peak RSS is its ``ru_maxrss`` (the client reads its own with
``getrusage``; for the servers the bench reads ``VmHWM`` of
``/proc/PID/status``, the same figure, before stopping them). The baseline is
each process's RSS just before the value moves (the client's after it built
the value, minus the value), so ``copies`` = (peak - baseline) / size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
KEY = "bench/bigvalue"


def digest(cloudburst: Any, data: bytes) -> tuple[int, str]:
    """The length and SHA-256 of a value (the function the executor runs)."""
    return len(data), hashlib.sha256(data).hexdigest()


def _status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def client(address: str, size: int, keep: bool, pickled: bool) -> dict[str, Any]:
    """The client's part, in a process of its own; returns its figures."""
    from cloudburst import CloudburstConnection, CloudburstReference

    with CloudburstConnection(address, timeout=600) as cloud:
        fn = cloud.register(digest, "bigvalue_digest")
        fn(b"warm-up").get(timeout=120)  # the function's code loaded before the timed part
        # A pickled value is a few bytes longer than its data: 4 KiB less keeps it in the limit.
        value: bytes | bytearray = (
            bytearray(range(256)) * ((size - 4096) // 256)
            if pickled
            else bytes(range(256)) * (size // 256)
        )
        expected = hashlib.sha256(value).hexdigest()
        baseline = _status_kib("self", "VmRSS") * 1024 - size
        started = time.monotonic()
        cloud.put_object(KEY, value)
        put_seconds = time.monotonic() - started
        if not keep:
            del value
        started = time.monotonic()
        got = cloud.get_object(KEY)
        get_seconds = time.monotonic() - started
        ok = hashlib.sha256(got).hexdigest() == expected
        del got
        started = time.monotonic()
        try:
            read = fn(CloudburstReference(KEY)).get(timeout=600)
            call_error = None
        except Exception as exc:  # reported, so the peaks of a failed run are still seen
            read, call_error = None, f"{type(exc).__name__}: {exc}"
        call_seconds = time.monotonic() - started
        cloud.delete_object(KEY)
    return {
        "get_ok": ok,
        "call_ok": read is not None and read[1] == expected,
        "call_error": call_error,
        "baseline_bytes": baseline,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "put_seconds": put_seconds,
        "get_seconds": get_seconds,
        "call_seconds": call_seconds,
    }


def measure(
    size: int, keep: bool = False, health_timeout: float | None = None, pickled: bool = False
) -> dict[str, Any]:
    """Start a cluster, run the client, read every process's peak RSS; returns the figures."""
    from bench import systems
    from bench.procs import Processes, log

    # The cluster's processes inherit this process's environment.
    if health_timeout is not None:
        os.environ["CBGRPC_SCHEDULER_HEALTH_TIMEOUT_SECONDS"] = str(health_timeout)

    with tempfile.TemporaryDirectory(prefix="bigvalue-") as tmp, Processes(Path(tmp)) as procs:
        cluster = systems.start_cluster(procs, "bigvalue")
        baselines = {c.name: _status_kib(c.pid, "VmRSS") * 1024 for c in cluster.children}
        log(f"bigvalue: a {size / MIB:.0f} MiB value through {cluster.address}")
        run = subprocess.run(
            [
                *(sys.executable, "-m", "bench.bigvalue", "--client", cluster.address, str(size)),
                *(["--keep-value"] if keep else []),
                *(["--pickled"] if pickled else []),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if run.returncode != 0:
            raise RuntimeError(f"the client failed:\n{run.stderr[-4000:]}")
        figures = {"client": json.loads(run.stdout.strip().splitlines()[-1])}
        for child in cluster.children:
            role = child.name.removeprefix("bigvalue-")
            figures[role] = {
                "baseline_bytes": baselines[child.name],
                "peak_bytes": _status_kib(child.pid, "VmHWM") * 1024,
            }
    return figures


def report(size: int, figures: dict[str, Any], keep: bool = False, pickled: bool = False) -> str:
    """A table of the figures."""
    held = "kept" if keep else "dropped"
    kind = "a bytearray, pickled" if pickled else "bytes"
    lines = [
        f"One {size / MIB:.0f} MiB value ({kind}, memory engine): put_object, get_object "
        f"(the client's own copy {held}), a function reading it by reference",
        f"{'process':<12} {'baseline MiB':>12} {'peak MiB':>9} {'copies':>7}",
    ]
    for name, entry in figures.items():
        base, peak = entry["baseline_bytes"], entry["peak_bytes"]
        lines.append(
            f"{name:<12} {base / MIB:>12.0f} {peak / MIB:>9.0f} {(peak - base) / size:>7.2f}"
        )
    c = figures["client"]
    lines.append(
        f"client: put {c['put_seconds']:.1f} s, get {c['get_seconds']:.1f} s, "
        f"function {c['call_seconds']:.1f} s; get_object returned the value: {c['get_ok']}, "
        f"the function read it: {c['call_ok']}"
    )
    if c["call_error"]:
        lines.append(f"the function call failed: {c['call_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=1024, help="value size in MiB (default 1024)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument(
        "--keep-value", action="store_true", help="the client keeps its value during the get"
    )
    parser.add_argument(
        "--pickled", action="store_true", help="the value is a bytearray (pickled), not bytes"
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=None,
        help="seconds the scheduler waits for an executor's health check (default: the "
        "configuration's, 2)",
    )
    parser.add_argument("--client", nargs=2, metavar=("ADDRESS", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(
            json.dumps(client(args.client[0], int(args.client[1]), args.keep_value, args.pickled))
        )
        return 0
    size = args.mib * MIB
    figures = measure(size, args.keep_value, args.health_timeout, args.pickled)
    print(report(size, figures, args.keep_value, args.pickled))
    if args.json:
        print(json.dumps(figures))
    return 0 if figures["client"]["get_ok"] and figures["client"]["call_ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
