"""The grpcurl recipes of docs/protocol.md, run against `cbgrpc serve` as the page says.

Every fenced block marked ``sh recipe`` is one grpcurl command; ``# expect: TEXT`` lines name
text its output must contain and ``# exit: N`` its exit code (0 otherwise). grpcurl comes from
tools/codegen (built from the Go module proxy and cached). Without Go the test skips, except
under CI, where it fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cloudburst import CloudburstConnection
from harness import ServeProcess
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
BLOCK = re.compile(r"^```sh recipe\n(.*?)^```", re.M | re.S)


@dataclass
class Recipe:
    command: list[str]
    expect: list[str] = field(default_factory=list)
    exit: int = 0


def recipes() -> list[Recipe]:
    found = []
    for body in BLOCK.findall(DOC.read_text()):
        recipe = Recipe([])
        for line in body.splitlines():
            if line.startswith("# expect: "):
                recipe.expect.append(line.removeprefix("# expect: "))
            elif line.startswith("# exit: "):
                recipe.exit = int(line.removeprefix("# exit: "))
            elif line.strip():
                recipe.command = shlex.split(line)
        found.append(recipe)
    return found


def grpcurl() -> str:
    if shutil.which("go") is None:
        if os.environ.get("CI"):
            pytest.fail("Go is required in CI to build grpcurl for the protocol recipes")
        pytest.skip("Go is not installed")
    built = subprocess.run(
        ["bash", str(ROOT / "tools" / "codegen" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return str(Path(built.stdout.strip().splitlines()[-1]) / "grpcurl")


def test_the_page_has_recipes_for_each_topic() -> None:
    commands = [" ".join(r.command) for r in recipes()]
    for topic in ("list", "describe", "CallDag", "GetResult", "PutValue", "GetValue", "Check"):
        assert any(topic in c for c in commands), topic
    assert all(r.command[0] == "grpcurl" for r in recipes())


def test_every_recipe_runs_as_documented(serve_process: Callable[..., ServeProcess]) -> None:
    binary = grpcurl()
    server = serve_process("--storage", "memory")
    with CloudburstConnection(server.address) as cloud:
        cloud.register(lambda _, x: x + 1, "incr")
        cloud.register(lambda _, x: x * x, "square")
        assert cloud.register_dag("pipeline", ["incr", "square"], [("incr", "square")])
        for recipe in recipes():
            args = [server.address if a == "127.0.0.1:7600" else a for a in recipe.command[1:]]
            command = [binary, *args]
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            output = done.stdout + done.stderr
            assert done.returncode == recipe.exit, f"{recipe.command}:\n{output}"
            for text in recipe.expect:
                assert text in output, f"{text!r} not in the output of {recipe.command}:\n{output}"
        # What grpcurl wrote as JSON reads as the natural Python value.
        assert cloud.get_object("recipe-key") == {"a": 1}
        # The recipe released its stored result: it is deleted with the next batch of releases.
        wait_until(
            lambda: cloud.get_object("recipe-result") is None,
            "the released result recipe-result to be deleted",
        )
