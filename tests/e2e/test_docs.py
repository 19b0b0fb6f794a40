"""Every Python example of README.md and docs/*.md, run against a real server.

Convention: examples connect to ``127.0.0.1:7600``, where ``make serve``
listens, as a user's would; the test replaces that text with the address of a
``cbgrpc serve --storage memory`` subprocess of its own (one per Markdown
file, so each file starts from an empty server) and runs the file's
```python blocks in order, in one namespace, as a user's script
(``docs_runner.py``). The example load balancer address of docs/aws.md
(:data:`EXAMPLE_LOAD_BALANCER`) is replaced the same way. A top-level
expression ending in a literal comment
(``incr(1).get()  # 2``) must produce that value. An example that connects
through Consul (``consul://127.0.0.1:8500``) runs against a real Consul agent
and a cluster of ``cbgrpc`` processes registered in it instead.

Text that is not Python to run (output, shell commands, config files) uses
other fences (```text, ```sh, ```toml). The ``cbgrpc`` synopses quoted in the
docs (```text blocks starting with ``cbgrpc serve [``) must name exactly the
options ``--help`` lists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import (
    ROOT,
    CbgrpcProcess,
    ConsulAgent,
    ServeProcess,
    consul_binary,
    executors_of,
)

HERE = Path(__file__).resolve().parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_ADDRESS = "127.0.0.1:7600"
EXAMPLE_CONSUL = "consul://127.0.0.1:8500"
EXAMPLE_LOAD_BALANCER = "cloudburst-sched-0123.elb.eu-west-1.amazonaws.com:7600"
SYNOPSIS = re.compile(r"^```text\n(cbgrpc (\w+) \[.*?)^```", re.S | re.M)
OPTION = re.compile(r"--[a-z][a-z-]*")


def has_python(path: Path) -> bool:
    return "```python\n" in path.read_text()


def run_examples(path: Path, *substitutions: str) -> str:
    result = subprocess.run(
        [sys.executable, str(HERE / "docs_runner.py"), str(path), *substitutions],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "path",
    [p for p in DOCS if has_python(p) and EXAMPLE_CONSUL not in p.read_text()],
    ids=lambda p: p.name,
)
def test_examples_run_against_cbgrpc_serve(
    serve_process: Callable[..., ServeProcess], path: Path
) -> None:
    server = serve_process("--storage", "memory")
    output = run_examples(
        path,
        f"{EXAMPLE_ADDRESS}={server.address}",
        f"{EXAMPLE_LOAD_BALANCER}={server.address}",
    )
    assert re.search(r"docs ok: [1-9]\d* blocks, [1-9]\d* values checked", output), output
    assert server.stop() == 0


# -- examples that need a cluster registered in Consul ---------------------------------


@pytest.fixture
def consul_cluster() -> Iterator[tuple[ConsulAgent, CbgrpcProcess]]:
    """Consul, a KVS, two executors and a scheduler, all registered; stopped by PID."""
    agent = ConsulAgent(consul_binary())
    env = {"CONSUL_HTTP_ADDR": agent.address}
    procs: list[CbgrpcProcess] = []
    try:
        procs.append(CbgrpcProcess("kvs", "--storage", "memory", env=env))
        for name in ("executor-a", "executor-b"):
            procs.append(CbgrpcProcess("executor", "--id", name, env=env))
        scheduler = CbgrpcProcess("scheduler", env=env)
        procs.append(scheduler)
        wanted = {p.address for p in procs[1:3]}
        executors_of(scheduler.address, lambda pool: pool == wanted)
        agent.wait(
            "/v1/health/service/cloudburst-scheduler?passing=true",
            lambda body: len(body) == 1,
        )
        yield agent, scheduler
    finally:
        for proc in reversed(procs):
            proc.kill()
        agent.stop()


@pytest.mark.parametrize(
    "path",
    [p for p in DOCS if has_python(p) and EXAMPLE_CONSUL in p.read_text()],
    ids=lambda p: p.name,
)
def test_examples_run_against_a_consul_cluster(
    consul_cluster: tuple[ConsulAgent, CbgrpcProcess], path: Path
) -> None:
    agent, scheduler = consul_cluster
    output = run_examples(
        path,
        f"{EXAMPLE_CONSUL}=consul://{agent.address}",
        f"{EXAMPLE_ADDRESS}={scheduler.address}",
    )
    assert re.search(r"docs ok: [1-9]\d* blocks, [1-9]\d* values checked", output), output


# -- quoted command-line synopses --------------------------------------------------------


def quoted_synopses() -> list[Any]:
    return [
        pytest.param(path, match.group(2), match.group(1), id=f"{path.name}:{match.group(2)}")
        for path in DOCS
        for match in SYNOPSIS.finditer(path.read_text())
    ]


def test_the_docs_quote_the_serve_synopsis() -> None:
    assert "serve" in {param.values[1] for param in quoted_synopses()}


@pytest.mark.parametrize(("path", "command", "synopsis"), quoted_synopses())
def test_quoted_synopsis_names_exactly_the_options_of_help(
    path: Path, command: str, synopsis: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloudburst_grpc", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    documented = set(OPTION.findall(synopsis))
    offered = set(OPTION.findall(result.stdout)) - {"--help"}
    assert documented == offered, (
        f"{path.name}: `cbgrpc {command}` synopsis lacks {sorted(offered - documented)}, "
        f"names unknown {sorted(documented - offered)}"
    )
