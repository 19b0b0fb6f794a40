"""Subprocesses the bench starts: `cbgrpc` servers, floor servers, the Ray runner.

Every process is started through :class:`Processes` and stopped by its PID
(SIGTERM, then SIGKILL after a grace period) when the ``with`` block ends, also
on an exception or Ctrl-C. Nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0


def log(message: str) -> None:
    """Progress, to stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    """One started process and the address it printed."""

    name: str
    proc: subprocess.Popen[str]
    log_path: Path
    address: str = ""
    _log_file: object = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Starts processes and stops every one of them, by PID, when the block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        unset: Collection[str] = (),
        wait_for_address: bool = True,
    ) -> Child:
        """Start ``argv``; unless told otherwise, wait for its "listening on ADDR" line.

        The child inherits this process's environment without the variables in
        ``unset``, plus ``env``.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("w")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if wait_for_address else log_file,
            stderr=log_file,
            text=True,
            env={**{k: v for k, v in os.environ.items() if k not in unset}, **(env or {})},
            # Own session: a Ctrl-C in the terminal reaches only the bench, which then
            # stops its children in order (connections first, servers after).
            start_new_session=True,
        )
        child = Child(name, proc, log_path, _log_file=log_file)
        with self._lock:
            self.children.append(child)
        if wait_for_address:
            child.address = self._read_address(child)
        return child

    def _read_address(self, child: Child) -> str:
        lines: list[str] = []
        stdout = child.proc.stdout
        assert stdout is not None

        def read() -> None:
            lines.append(stdout.readline())
            # Keep draining, so a chatty child can never block on a full pipe.
            for _ in stdout:
                pass

        threading.Thread(target=read, name=f"stdout-{child.name}", daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not lines and time.monotonic() < deadline and child.alive():
            time.sleep(0.01)
        line = lines[0] if lines else ""
        if "listening on" not in line:
            self.stop(child)
            raise RuntimeError(
                f"{child.name} did not start (first line {line!r}); its log:\n{child.log_tail()}"
            )
        return line.rsplit(" ", 1)[1].strip()

    def start_cbgrpc(
        self,
        name: str,
        command: str,
        *args: str,
        env: dict[str, str] | None = None,
        unset: Collection[str] = (),
    ) -> Child:
        """Start `cbgrpc COMMAND --port 0 ARGS` (the CLI of this checkout)."""
        argv = [sys.executable, "-m", "cloudburst_grpc", command, "--port", "0", *args]
        return self.start(name, argv, env=env, unset=unset)

    def stop(self, child: Child, grace: float = 10.0) -> int | None:
        """SIGTERM the child by PID, SIGKILL it after ``grace`` seconds; returns its exit code."""
        if child.alive():
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{child.name} (pid {child.pid}) ignored SIGTERM for {grace:.0f}s; killing it")
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait(10)
        close = getattr(child._log_file, "close", None)
        if close is not None:
            close()
        with self._lock:
            if child in self.children:
                self.children.remove(child)
        return child.proc.returncode

    def stop_all(self) -> None:
        """Stop every child still running, newest first."""
        with self._lock:
            children = list(reversed(self.children))
        for child in children:
            self.stop(child)


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so cleanup runs exactly as for Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
