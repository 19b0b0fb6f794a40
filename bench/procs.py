"""Subprocesses the bench starts: `cbgrpc` servers, floor servers, the Ray runner.

Every process is started through :class:`Processes` and stopped by its PID
(SIGTERM, then SIGKILL after a grace period) when the ``with`` block ends, also
on an exception or Ctrl-C. Nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import atexit
import itertools
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
#: Set for a child of the bench: the CPU list it pins itself to when it starts.
CPUS_VARIABLE = "BENCH_CPUS"


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


class Cores:
    """The core each process of the bench runs on, when pinning is on.

    As `cbgrpc --cpus` recommends for latency, every process gets a core of its
    own: the bench process (every client, floor or SDK) the first, each server
    one of the others in turn, so that a client and the server it calls never
    share a core; the executors of a cluster are spread over all cores, one
    per core. Processes the bench does not control (Ray's) keep every core.
    The floor servers are placed by the same rule as cloudburst's, so the
    ratios compare like with like. Off (the default; always on one core), the
    kernel places everything.
    """

    def __init__(self, enabled: bool) -> None:
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.available = available
        """The bench's CPUs before pinning."""
        self.cpus = available if enabled and len(available) >= 2 else []
        self._turn = itertools.count()

    @property
    def enabled(self) -> bool:
        return bool(self.cpus)

    def client(self) -> int | None:
        """The bench process's core."""
        return self.cpus[0] if self.cpus else None

    def server(self) -> int | None:
        """The core of the next server: the cores after the client's, in turn."""
        if not self.cpus:
            return None
        return self.cpus[1 + next(self._turn) % (len(self.cpus) - 1)]

    def spread(self, index: int) -> int | None:
        """The core of the ``index``-th executor of a cluster: one per core."""
        return self.cpus[index % len(self.cpus)] if self.cpus else None

    def describe(self) -> str:
        if not self.cpus:
            if len(self.available) < 2:
                return "off (one CPU): the kernel places every process"
            return "off (no --pin): the kernel places every process"
        return (
            f"each process pinned to one core: the bench process (all clients) to CPU "
            f"{self.cpus[0]}, every server (floor or cloudburst) to one of CPU "
            f"{', '.join(map(str, self.cpus[1:]))} in turn, the cluster's executors one "
            "per core; Ray's processes unpinned"
        )


def cpu_seconds(pids: Collection[int]) -> float:
    """CPU time (user + system) used so far by ``pids`` and all their descendants.

    A process that is gone counts as 0 (its time is lost, not guessed). Not for
    the bench's own PID: every server descends from it.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    seen: set[int] = set()
    todo = list(pids)
    total = 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / ticks


def pin_from_environment() -> None:
    """Pin this process as the bench asked (``BENCH_CPUS``), if it did; for bench children."""
    cpus = os.environ.get(CPUS_VARIABLE)
    if cpus:
        from cloudburst_grpc.affinity import pin

        pin(cpus)


class Processes:
    """Starts processes and stops every one of them, by PID, when the block ends."""

    def __init__(self, log_dir: Path, cores: Cores | None = None) -> None:
        self.log_dir = log_dir
        self.cores = cores or Cores(enabled=False)
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
        cpu: int | None = None,
        interactive: bool = False,
    ) -> Child:
        """Start ``argv``; unless told otherwise, wait for its "listening on ADDR" line.

        The child inherits this process's environment without the variables in
        ``unset``, plus ``env``. With pinning on, ``BENCH_CPUS`` tells it its core
        (``cpu``), or, without one, every CPU the bench had before it pinned itself.
        ``interactive``: its stdin and stdout are pipes for the caller to use (no
        address is read), its stderr goes to the log.
        """
        if self.cores.enabled:
            cpus = str(cpu) if cpu is not None else ",".join(map(str, self.cores.available))
            env = {**(env or {}), CPUS_VARIABLE: cpus}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("w")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE if wait_for_address or interactive else log_file,
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
        if wait_for_address and not interactive:
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
        cpu: int | None = None,
    ) -> Child:
        """Start `cbgrpc COMMAND --port 0 ARGS` (the CLI of this checkout), on core ``cpu``."""
        argv = [sys.executable, "-m", "cloudburst_grpc", command, "--port", "0", *args]
        if self.cores.enabled and cpu is not None:
            argv += ["--cpus", str(cpu)]
        return self.start(name, argv, env=env, unset=unset, cpu=cpu)

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
