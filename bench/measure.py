"""Timing: latency blocks, throughput with concurrent callers, and summaries.

A workload is measured the same way whatever it calls:

- latency: single caller, calls one after another, each timed with
  ``time.perf_counter`` around the whole operation (result checked);
- throughput: ``callers`` concurrent callers for a fixed time, each calling in
  a closed loop; throughput = calls completed / wall time until the last
  caller finished.

:class:`SyncWorkload` times a blocking call from Python threads (how SDK users
call). :class:`AioWorkload` times a coroutine on an asyncio loop, inside the
loop (how a grpc.aio program calls); its callers are coroutines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Runner(Protocol):
    """Runs a coroutine on some event loop and waits for it."""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600.0) -> T: ...


class AioLoop:
    """An asyncio loop on a daemon thread (the SDK's own pattern, for grpc.aio clients)."""

    def __init__(self, name: str = "bench-aio") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600.0) -> T:
        """Run ``coro`` on the loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return

        async def drain() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(drain(), 10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class Throughput:
    """What a throughput run measured."""

    callers: int
    calls: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


class Workload:
    """Something to time; subclasses say how one call is made."""

    def __init__(self, system: str, name: str, *, check: Callable[[Any], bool] | None = None):
        self.system = system
        self.name = name
        self.check = check

    @property
    def key(self) -> str:
        return f"{self.system}/{self.name}"

    def block(self, n: int) -> list[float]:
        """Make ``n`` calls one after another; return each one's latency in seconds."""
        raise NotImplementedError

    def throughput(self, callers: int, seconds: float) -> Throughput:
        """Run ``callers`` closed-loop callers for ``seconds``."""
        raise NotImplementedError

    def _verify(self, result: Any) -> None:
        if self.check is not None and not self.check(result):
            raise AssertionError(f"{self.key}: unexpected result {str(result)[:80]!r}")


class SyncWorkload(Workload):
    """A blocking call, timed in the calling thread; concurrent callers are threads."""

    def __init__(
        self,
        system: str,
        name: str,
        op: Callable[[], Any],
        *,
        check: Callable[[Any], bool] | None = None,
    ) -> None:
        super().__init__(system, name, check=check)
        self.op = op

    def block(self, n: int) -> list[float]:
        op, verify, clock = self.op, self._verify, time.perf_counter
        out = []
        for _ in range(n):
            start = clock()
            result = op()
            out.append(clock() - start)
            verify(result)
        return out

    def throughput(self, callers: int, seconds: float) -> Throughput:
        op, verify, clock = self.op, self._verify, time.perf_counter
        latencies: list[list[float]] = [[] for _ in range(callers)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(callers + 1)
        end = [0.0]

        def caller(index: int) -> None:
            mine = latencies[index]
            barrier.wait()
            stop = end[0]
            try:
                while True:
                    start = clock()
                    result = op()
                    done = clock()
                    mine.append(done - start)
                    verify(result)
                    if done >= stop or errors:
                        return
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=caller, args=(i,), name=f"caller-{i}", daemon=True)
            for i in range(callers)
        ]
        for thread in threads:
            thread.start()
        began = clock()
        end[0] = began + seconds
        barrier.wait()
        for thread in threads:
            thread.join()
        elapsed = clock() - began
        if errors:
            raise errors[0]
        flat = [x for part in latencies for x in part]
        return Throughput(callers, len(flat), elapsed, flat)


class AioWorkload(Workload):
    """A coroutine, timed inside its event loop; concurrent callers are coroutines."""

    def __init__(
        self,
        system: str,
        name: str,
        op: Callable[[], Awaitable[Any]],
        loop: Runner,
        *,
        check: Callable[[Any], bool] | None = None,
    ) -> None:
        super().__init__(system, name, check=check)
        self.op = op
        self.loop = loop

    def block(self, n: int) -> list[float]:
        op, verify, clock = self.op, self._verify, time.perf_counter

        async def run() -> list[float]:
            out = []
            for _ in range(n):
                start = clock()
                result = await op()
                out.append(clock() - start)
                verify(result)
            return out

        return self.loop.run(run())

    def throughput(self, callers: int, seconds: float) -> Throughput:
        op, verify, clock = self.op, self._verify, time.perf_counter

        async def run() -> Throughput:
            began = clock()
            stop = began + seconds

            async def caller() -> list[float]:
                mine = []
                while True:
                    start = clock()
                    result = await op()
                    done = clock()
                    mine.append(done - start)
                    verify(result)
                    if done >= stop:
                        return mine

            parts = await asyncio.gather(*(caller() for _ in range(callers)))
            flat = [x for part in parts for x in part]
            return Throughput(callers, len(flat), clock() - began, flat)

        return self.loop.run(run())


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(latencies: list[float]) -> dict[str, float]:
    """Median, p90, p99, mean, min and max in milliseconds, and the count."""
    values = sorted(latencies)
    if not values:
        return {"n": 0}
    ms = 1000.0
    return {
        "n": len(values),
        "median_ms": percentile(values, 50) * ms,
        "p90_ms": percentile(values, 90) * ms,
        "p99_ms": percentile(values, 99) * ms,
        "mean_ms": statistics.fmean(values) * ms,
        "min_ms": values[0] * ms,
        "max_ms": values[-1] * ms,
    }
