"""The Go and TypeScript clients' programs, run by the tests as subprocesses.

Each client's driver (sdk/go/internal/clientdriver, sdk/typescript/test/driver.ts)
takes a scheduler's address and a mode (``default``, ``on``: objects at the KVS
itself, ``off``: through the scheduler), then one JSON command per line on its
stdin, and answers each with one JSON line; :class:`Driver` talks to one. `make
clients` builds the TypeScript programs (:func:`ts_program`); :func:`go_build`
builds a Go one (Go caches it). Without Go or Node a test skips, except under CI,
where it fails. The fixtures that start drivers are in tests/e2e/conftest.py.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import required_tool

ROOT = Path(__file__).resolve().parents[2]

#: What the clients read from the environment starts so: a driver gets none of the test
#: run's own, only what a test gives it.
CLIENT_PREFIX = "CLOUDBURST_"


def go_build(package: str, directory: Path) -> list[str]:
    """Build the Go program ``package`` of sdk/go (``./examples/polyglot``) into ``directory``.

    Returns the command that runs it.
    """
    go = required_tool("go")
    binary = directory / package.rstrip("/").rsplit("/", 1)[-1]
    subprocess.run(
        [go, "build", "-o", str(binary), package],
        cwd=ROOT / "sdk" / "go",
        check=True,
        timeout=600,
    )
    return [str(binary)]


def ts_program(name: str) -> list[str]:
    """The command that runs the TypeScript program sdk/typescript/test/``name``.ts."""
    node = required_tool("node")
    program = ROOT / "sdk" / "typescript" / "dist" / "test" / f"{name}.js"
    if not program.exists():
        pytest.fail(f"{program.relative_to(ROOT)} is missing: run `make clients` first")
    return [node, str(program)]


class Driver:
    """A client driver subprocess: :meth:`ask` sends a command and waits for its answer."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_PREFIX)}
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, **(env or {})},
        )
        self._answers: queue.Queue[str | None] = queue.Queue()
        self.stderr_lines: list[str] = []

        def read_stdout() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._answers.put(line)
            self._answers.put(None)

        def read_stderr() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr_lines.append(line)

        self._readers = [
            threading.Thread(target=reader, daemon=True) for reader in (read_stdout, read_stderr)
        ]
        for thread in self._readers:
            thread.start()

    def wait_exit(self, timeout: float) -> int:
        """Wait until the driver exits and its output is read; returns its exit code."""
        code = self.proc.wait(timeout)
        for thread in self._readers:
            thread.join(timeout)
        return code

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def send(self, **command: Any) -> None:
        """Send one command without waiting for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next answer, within ``timeout`` seconds."""
        try:
            line = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no answer within {timeout:.0f}s:\n{''.join(self.stderr_lines[-20:])}"
            ) from None
        if line is None:
            raise AssertionError(
                f"the driver exited ({self.proc.wait(10)}):\n{''.join(self.stderr_lines[-20:])}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, timeout: float = 90.0, **command: Any) -> dict[str, Any]:
        """Send a command and return its answer, waited for up to ``timeout`` seconds.

        ``timeout`` is not sent: an op's own deadline is sent with :meth:`send`.
        """
        self.send(**command)
        return self.receive(timeout)

    def ok(self, **command: Any) -> dict[str, Any]:
        """Send a command that must succeed; return its answer."""
        answer = self.ask(**command)
        assert answer["ok"], f"{command} failed: {answer}"
        return answer

    def close(self) -> int:
        """End the driver: its stdin closes, and it is killed if it does not exit within 10 s.

        Returns its exit code (negative: killed by that signal).
        """
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


#: Starts a driver: ``launch(address, mode="default", env=None)``.
Launcher = Callable[..., Driver]
