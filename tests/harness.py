"""Test harness: servers on 127.0.0.1 port 0 in a background loop, clusters, `cbgrpc serve`.

Servers run on an event loop in a background thread, so tests can drive them
with the synchronous SDK exactly as users do. Every fixture stops what it
started, also when the test fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cloudburst._loop import _drain as drain
from cloudburst_grpc.config import Config, ExecutorConfig, KvsConfig, SchedulerConfig, ServerConfig
from cloudburst_grpc.local import Node

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0


class LoopThread:
    """An asyncio loop on a daemon thread, for servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-servers", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STARTUP_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(drain(self.loop), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def make_config(tmp_path: Path | None = None, **sections: Any) -> Config:
    """A config for tests: port 0, in-memory storage (or SQLite in tmp_path), small pools."""
    server = ServerConfig(host="127.0.0.1", port=0, grace_seconds=1.0)
    kvs = (
        KvsConfig(engine="memory")
        if tmp_path is None
        else KvsConfig(engine="sqlite", data_dir=tmp_path)
    )
    config = Config(
        server=server,
        kvs=kvs,
        executor=ExecutorConfig(count=2, threads=4),
        scheduler=SchedulerConfig(call_timeout_seconds=30.0),
    )
    for name, changes in sections.items():
        config = dataclasses.replace(
            config, **{name: dataclasses.replace(getattr(config, name), **changes)}
        )
    return config.validate()


@dataclasses.dataclass
class Cluster:
    """Separate servers (KVS, executors, scheduler) in one test process."""

    loop: LoopThread
    kvs: Node
    executors: list[Node]
    scheduler: Node

    @property
    def address(self) -> str:
        return self.scheduler.address


class CbgrpcProcess:
    """A `cbgrpc COMMAND` subprocess; its address is read from its first line of output."""

    def __init__(self, command: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudburst_grpc", command, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.address = self._read_address()

    def _read_address(self) -> str:
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            result.append(self.proc.stdout.readline())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(STARTUP_TIMEOUT)
        line = result[0] if result else ""
        if "listening on" not in line:
            self.kill()
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"cbgrpc {self.command} did not start: {line!r}\n{stderr}")
        return line.rsplit(" ", 1)[1].strip()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""


class ServeProcess(CbgrpcProcess):
    """A `cbgrpc serve` subprocess."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__("serve", *args, env=env)


@dataclasses.dataclass
class ProcessCluster:
    """A KVS, executors and a scheduler, each its own `cbgrpc` process."""

    kvs: CbgrpcProcess
    executors: list[CbgrpcProcess]
    scheduler: CbgrpcProcess

    @property
    def address(self) -> str:
        return self.scheduler.address

    def all(self) -> list[CbgrpcProcess]:
        return [self.scheduler, *self.executors, self.kvs]
