"""Observability of `cbgrpc serve` as users turn it on: metrics, call timings, OTEL_* variables."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import RemoteFunctionError
from cloudburst_executors.inline import QUICK_RUNS
from harness import ServeProcess


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            # Drop the otel_scope labels so keys stay readable.
            samples[re.sub(r',?otel_scope_\w+="[^"]*"', "", name).replace("{,", "{")] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in samples.items():
        if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def boom(_: Any, n: int) -> int:
    raise ValueError(f"boom {n}")


def test_prometheus_counters_move(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process("--storage", "memory", "--metrics-port", "0")
    url = server.wait_for_log("metrics on http://", stdout=True).rsplit(" ", 1)[1].strip()
    with CloudburstConnection(server.address) as cloud:
        incr = cloud.register(lambda cb, a: (cb.put_object("seen", a), a + 1)[1], "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("test_dag", ["incr", "square"], [("incr", "square")])
        assert incr(1).get(timeout=30) == 2
        before = scrape(url)
        for i in range(5):
            assert incr(i).get(timeout=30) == i + 1
        assert cloud.call_dag("test_dag", {"incr": 2}, direct_response=True) == 9
        with pytest.raises(RemoteFunctionError):
            cloud.register(boom, "boom")(1).get(timeout=30)
        after = scrape(url)
    calls = "cloudburst_function_calls_total"
    assert (
        metric(after, calls, function="incr", outcome="value")
        - metric(before, calls, function="incr", outcome="value")
        == 6
    )
    assert metric(after, calls, function="boom", outcome="failure") == 1
    assert metric(after, "cloudburst_dag_calls_total", dag="test_dag", outcome="value") == 1
    assert metric(after, "cloudburst_function_duration_seconds_count", function="square") >= 1
    puts = "cloudburst_kvs_operation_duration_seconds_count"
    assert metric(after, puts, operation="put") > metric(before, puts, operation="put")
    for gauge in ("cloudburst_executor_utilization", "cloudburst_executor_queue_depth"):
        assert any(k.startswith(gauge + "{") for k in after), gauge
    # Labels are names, never call ids.
    assert not any(re.search(r"[0-9a-f]{32}", key) for key in after)


def where(_: Any, delay: float) -> str:
    time.sleep(delay)
    return threading.current_thread().name


def test_a_function_that_holds_up_the_event_loop_is_counted(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process(
        "--storage",
        "memory",
        "--metrics-port",
        "0",
        "--inline-max-seconds",
        "0.05",
        "--executors",
        "1",  # each executor keeps its own record of a function's runs
        # Isolated executor processes never run functions on their event loop.
        "--isolation",
        "none",
    )
    url = server.wait_for_log("metrics on http://", stdout=True).rsplit(" ", 1)[1].strip()
    with CloudburstConnection(server.address) as cloud:
        fn = cloud.register(where, "where")
        threads = [fn(0).get(timeout=30) for _ in range(QUICK_RUNS + 1)]
        assert not threads[-1].startswith("cb-"), "quick runs earned it the event loop"
        stalls = "cloudburst_function_loop_stalls_total"
        assert metric(scrape(url), stalls, function="where") == 0
        fn(0.3).get(timeout=30)  # blocks the loop for 0.3 s: over 5x the limit
        assert metric(scrape(url), stalls, function="where") == 1
        assert fn(0).get(timeout=30).startswith("cb-"), "back on worker threads"
    assert "'where' took" in server.stderr()


def cbgrpc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_timing_prints_the_breakdown_of_a_call(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process("--storage", "memory", "--timings", "10")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(lambda _, a: a + 1, "incr")
        cloud.register(lambda _, a: a * a, "square")
        assert cloud.register_dag("test_dag", ["incr", "square"], [("incr", "square")])
        future = cloud.call_dag("test_dag", {"incr": 1})
        assert future.get(timeout=30) == 4
    result = cbgrpc("timing", future.obj_id, "--address", server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"call {future.obj_id}"
    steps = [line.split(" ms  ", 2)[-1].strip() for line in lines[1:]]
    assert steps[0] == "schedule test_dag"
    assert any(
        s.startswith("run incr  [executor=executor-") and "outcome=value" in s for s in steps
    )
    assert any(s.startswith("run square") for s in steps)
    unknown = cbgrpc("timing", "no-such-call", "--address", server.address)
    assert unknown.returncode == 1 and "no recent call 'no-such-call'" in unknown.stderr


def test_timing_explains_when_it_is_off(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process("--storage", "memory")
    result = cbgrpc("timing", "anything", "--address", server.address)
    assert result.returncode == 1 and "start cbgrpc serve with --timings" in result.stderr


def test_otel_sdk_disabled_turns_everything_off(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process(
        "--storage", "memory", "--timings", "10", env={"OTEL_SDK_DISABLED": "true"}
    )
    result = cbgrpc("timing", "anything", "--address", server.address)
    assert result.returncode == 1 and "--timings" in result.stderr


def test_console_exporter_prints_the_spans(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process(
        "--storage", "memory", env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "demo"}
    )
    with CloudburstConnection(server.address) as cloud:
        assert cloud.register(lambda _, a: a + 1, "incr")(1).get(timeout=30) == 2
    assert server.stop() == 0
    output = "".join(server.stdout_lines)
    assert '"name": "run incr"' in output and '"service.name": "demo"' in output
