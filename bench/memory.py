"""The leak check: RSS of a fresh `cbgrpc serve` after 1,000 calls and over 100,000."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench import functions, systems
from bench.procs import Processes, log


@dataclass
class MemoryResult:
    target_calls: int
    callers: int
    calls: int = 0
    seconds: float = 0.0
    rss_after_first_1000: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)
    """(calls done, RSS bytes), sampled about every 0.25 s."""
    stopped_by_budget: bool = False
    error: str | None = None

    @property
    def ratio(self) -> float:
        return self.rss_peak / self.rss_after_first_1000 if self.rss_after_first_1000 else 0.0


def tree_rss(server: Any) -> int:
    """RSS of the server (a ``psutil.Process``) and its executor processes, summed."""
    import psutil

    total = int(server.memory_info().rss)
    for child in server.children(recursive=True):
        try:
            total += int(child.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return total


def run(procs: Processes, target_calls: int, callers: int, budget_seconds: float) -> MemoryResult:
    """Drive ``incr(1).get()`` calls with ``callers`` threads on a new `cbgrpc serve`.

    RSS is read after the first 1,000 calls, then sampled until ``target_calls``
    calls are done or ``budget_seconds`` have passed (then ``calls`` says how
    many were made).
    """
    import psutil

    result = MemoryResult(target_calls, callers)
    system = systems.start_serve(procs, name="serve-memory")
    server = psutil.Process(system.children[0].pid)
    try:
        conn = systems.connect(system)
        handle = conn.register(functions.incr, "incr")
        done = [0] * callers
        tickets = itertools.count()
        errors: list[BaseException] = []
        began = time.monotonic()
        deadline = began + budget_seconds

        def drive(index: int, limit: int) -> None:
            try:
                while next(tickets) < limit and time.monotonic() < deadline and not errors:
                    if handle(1).get() != 2:
                        raise AssertionError("incr(1) != 2")
                    done[index] += 1
            except BaseException as exc:
                errors.append(exc)

        def phase(limit: int) -> None:
            threads = [
                threading.Thread(target=drive, args=(i, limit), daemon=True) for i in range(callers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]

        phase(min(1000, target_calls))
        result.rss_after_first_1000 = tree_rss(server)
        result.samples.append((sum(done), result.rss_after_first_1000))
        log(f"memory: RSS after {sum(done)} calls {result.rss_after_first_1000 / 2**20:.1f} MiB")
        tickets = itertools.count(sum(done))
        stop_sampling = threading.Event()

        def sample() -> None:
            next_log = time.monotonic() + 15
            while not stop_sampling.wait(0.25):
                result.samples.append((sum(done), tree_rss(server)))
                if time.monotonic() >= next_log:
                    next_log += 15
                    log(f"memory: {sum(done)} calls, RSS {result.samples[-1][1] / 2**20:.1f} MiB")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            phase(target_calls)
        finally:
            stop_sampling.set()
            sampler.join()
        result.calls = sum(done)
        result.seconds = time.monotonic() - began
        result.rss_end = tree_rss(server)
        result.samples.append((result.calls, result.rss_end))
        result.rss_peak = max(rss for _, rss in result.samples)
        result.stopped_by_budget = result.calls < target_calls
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"memory: failed: {result.error}")
    finally:
        system.close()
        for child in system.children:
            procs.stop(child)
    return result


def as_dict(result: MemoryResult) -> dict[str, Any]:
    return {
        "target_calls": result.target_calls,
        "callers": result.callers,
        "calls": result.calls,
        "seconds": result.seconds,
        "rss_after_first_1000_bytes": result.rss_after_first_1000,
        "rss_peak_bytes": result.rss_peak,
        "rss_end_bytes": result.rss_end,
        "peak_over_first_1000": result.ratio,
        "stopped_by_budget": result.stopped_by_budget,
        "error": result.error,
        "samples": result.samples,
    }
