"""The executors of ``cbgrpc serve`` as child processes, restarted when they exit.

With ``executor.isolation = "process"`` (the default), ``cbgrpc serve`` keeps
the KVS, the scheduler and the client-facing port in its own process and runs
each executor as a child: ``cbgrpc executor`` on 127.0.0.1, using the parent's
KVS. User code and user data are unpickled and run only there, so a function or
argument that blocks, crashes its process or exhausts its memory costs the
calls in flight on that child, never the service. :class:`Supervisor` starts
the children, adds them to the scheduler's pool, restarts one that exits (with
backoff), and stops them on shutdown. A child ends itself when its parent dies
(:func:`follow_parent`), so none outlives the server. With TLS, each child gets
its certificate and key from the parent's private CA over its standard input
(see :mod:`cloudburst_grpc.security.internal`): they never touch a disk. The
supervisor renews them, and the parent's own, after a third of their lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from cloudburst.errors import UnavailableError
from cloudburst_grpc.config import Config
from cloudburst_grpc.scheduler.pool import ExecutorPool
from cloudburst_grpc.security.internal import (
    InternalCa,
    MemorySource,
    decode_material,
    encode_material,
)
from cloudburst_grpc.security.tls import TlsError, TlsMaterial

logger = logging.getLogger(__name__)

#: Set in a child's environment to the supervising process's pid.
PARENT_ENV = "CBGRPC_SUPERVISOR_PID"
#: Set in a child's environment to ``stdin`` when its TLS material comes over its standard input.
TLS_ENV = "CBGRPC_SUPERVISOR_TLS"
#: The variable that asks a child to serve metrics (on a port of its choosing).
METRICS_ENV = "CBGRPC_SERVER_METRICS_PORT"
#: Linux prctl option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: Longest pause between two attempts to restart a child that keeps failing.
MAX_BACKOFF = 10.0
#: How long a child told to stop a second time may take to exit before it is killed.
FORCE_SECONDS = 1.5
#: How long sending a child its renewed certificate may take before it is given up.
SEND_SECONDS = 10.0
#: A child that ran at least this long restarts at once when it exits.
STABLE_SECONDS = 10.0
#: Settings the children do not take from the parent (their own address, ports, pinning).
_OWN = {"host", "port", "advertise_host", "metrics_port", "cpus"}
#: Security settings a child does not need: it serves only the parent, never clients. The
#: user's certificate files are among them: a child gets its own from the parent.
_CLIENT_FACING = {"tokens_file", "consul_intentions", "tls_cert", "tls_key", "tls_ca"}


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    return repr(value) if isinstance(value, float) else str(value)


def child_environment(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of an executor child: the parent's, with its settings made explicit.

    The parent's own ``CBGRPC_*`` and ``CONSUL_*`` variables (and its config file)
    are replaced by the settings it resolved, so a child neither reads another
    file nor registers in Consul.
    """
    env = {k: v for k, v in environ.items() if not k.startswith(("CBGRPC_", "CONSUL_"))}
    for section in ("server", "executor", "scheduler", "security"):
        values = getattr(config, section)
        for item in dataclasses.fields(values):
            if item.name in _OWN or item.name in _CLIENT_FACING:
                continue
            name = f"CBGRPC_{section.upper()}_{item.name.upper()}"
            env[name] = _text(getattr(values, item.name))
    # An isolated executor keeps user code and user data off its event loop: a function
    # or argument that blocks then delays only its own call, never the child's streams
    # and health checks (which would set the whole child aside).
    env["CBGRPC_EXECUTOR_INLINE_MAX_SECONDS"] = "0"
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if config.server.metrics_port >= 0 and not disabled:
        env[METRICS_ENV] = "0"  # the server's endpoint includes the children's
    env[PARENT_ENV] = str(os.getpid())
    return env


def describe_exit(code: int) -> str:
    """``exit code 9`` or ``signal SIGKILL``, from a returncode."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def follow_parent(parent_pid: int, certificates: MemorySource | None = None) -> None:
    """In a child: end this process when the supervising parent dies; take its TLS material.

    Linux delivers SIGKILL on the parent's death (``PR_SET_PDEATHSIG``);
    elsewhere, and as a backstop, a thread exits when the parent's end of
    stdin closes, which happens when the parent exits however it ends. That
    thread also reads what the parent sends: with ``certificates``, each line
    is new TLS material for it. Standard input itself is then ``/dev/null``,
    so user code that reads it can neither block on nor take the parent's pipe.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    pipe = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError), os.fdopen(pipe, "rb") as stream:
            for line in stream:
                if certificates is None or not line.strip():
                    continue
                try:
                    certificates.update(decode_material(line))
                except TlsError as exc:
                    logger.error("keeping the current TLS certificate: %s", exc)
        os._exit(1)

    threading.Thread(target=watch, name="cbgrpc-parent-watch", daemon=True).start()


def limit_memory(limit_bytes: int) -> None:
    """Bound this process's data memory (``RLIMIT_DATA``); 0 leaves it unbounded."""
    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


@dataclasses.dataclass
class Child:
    """One executor process."""

    executor_id: str
    process: asyncio.subprocess.Process | None = None
    address: str = ""
    metrics_url: str = ""
    """Where it serves Prometheus metrics, when the server does."""
    started: float = 0.0
    """``time.monotonic()`` when it started listening."""
    failures: int = 0
    """Consecutive starts that failed or ended quickly (they lengthen the backoff)."""
    output: asyncio.Task[None] | None = None


class Supervisor:
    """Starts ``executor.count`` executor processes, keeps them in the pool, restarts them."""

    def __init__(
        self,
        config: Config,
        kvs_address: str,
        pool: ExecutorPool,
        on_added: Callable[[], Awaitable[None]],
        environ: Mapping[str, str] | None = None,
        internal_ca: InternalCa | None = None,
    ) -> None:
        """Prepare the children (started by :meth:`start`).

        Args:
            config: The server's configuration (the children take its executor settings).
            kvs_address: Where the children reach the KVS (the server's own address).
            pool: The scheduler's pool, where children are added once they listen.
            on_added: Called after a restarted child rejoined the pool (to pin functions).
            environ: The environment to derive the children's from; ``os.environ`` if None.
            internal_ca: With TLS: the CA that gives each child its certificate, key
                and CA (sent over its standard input; the children never see the
                server's own) and renews them and the server's internal one.
        """
        self._config = config
        self._kvs_address = kvs_address
        self._pool = pool
        self._on_added = on_added
        self._env = child_environment(config, os.environ if environ is None else environ)
        self._ca = internal_ca
        if internal_ca is not None:
            self._env[TLS_ENV] = "stdin"
        self.children = [Child(f"executor-{i}") for i in range(config.executor.count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def metrics_urls(self) -> dict[str, str]:
        """Executor id -> where its process serves its metrics (none once stopping)."""
        if self._stopping:
            return {}
        return {c.executor_id: c.metrics_url for c in self.children if c.metrics_url}

    async def start(self) -> None:
        """Start every child, wait until each listens and add it to the pool.

        Raises:
            UnavailableError: A child did not start; the message says why.
        """
        if self._ca is not None:  # counted from now: the first certificates are just issued
            self._tasks.append(asyncio.create_task(self._renew(self._ca)))
        try:
            await asyncio.gather(*(self._spawn(child) for child in self.children))
        except BaseException:
            await self.stop(0.0)
            raise
        for child in self.children:
            self._pool.add(child.executor_id, child.address)
            self._tasks.append(asyncio.create_task(self._supervise(child)))

    async def _renew(self, ca: InternalCa) -> None:
        """Renew the server's internal certificate and every child's, every third of their life.

        New connections use the new ones; connections already open keep theirs.
        A child that is starting again meanwhile gets a new one as it starts.
        """
        while True:
            await asyncio.sleep(ca.renew_seconds)
            try:
                ca.renew()
                for child in self.children:
                    if child.process is not None and child.process.returncode is None:
                        await self._send_renewed(ca, child)
            except Exception:  # the next round tries again, before anything expires
                logger.exception("renewing the internal TLS certificates failed")
                continue
            logger.info(
                "renewed the internal TLS certificates (they last %.0fs)", ca.lifetime_seconds
            )

    async def _send_renewed(self, ca: InternalCa, child: Child) -> None:
        assert child.process is not None
        try:
            async with asyncio.timeout(SEND_SECONDS):
                await _send(child.process, ca.child_material())
        except TimeoutError:  # its pipe is full: the whole process is stuck
            logger.warning(
                "executor %s takes no new TLS certificate; it keeps its current one",
                child.executor_id,
            )

    async def _spawn(self, child: Child) -> None:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cloudburst_grpc",
            "executor",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--kvs",
            self._kvs_address,
            "--id",
            child.executor_id,
            "--log-level",
            level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
            # Its own process group: a terminal's Ctrl-C reaches the parent, which stops it.
            start_new_session=True,
        )
        child.process = process
        assert process.stdout is not None
        timeout = self._config.executor.start_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                if self._ca is not None:
                    await _send(process, self._ca.child_material())
                while True:
                    line = (await process.stdout.readline()).decode(errors="replace")
                    if not line:
                        code = await process.wait()
                        raise UnavailableError(
                            f"executor process {child.executor_id} ended at start-up "
                            f"({describe_exit(code)}); its log above says why"
                        )
                    if "listening on" in line:
                        child.address = line.rsplit(" ", 1)[1].strip()
                        if METRICS_ENV not in self._env:
                            break
                    elif "metrics on http://" in line:
                        child.metrics_url = line.rsplit(" ", 1)[1].strip()
                        break
                    else:
                        _forward(line)
        except TimeoutError:
            _kill(process)
            await process.wait()
            raise UnavailableError(
                f"executor process {child.executor_id} did not start listening within "
                f"{timeout:.0f}s (executor.start_timeout_seconds)"
            ) from None
        child.started = time.monotonic()
        # What user functions print goes where it went in one process: the server's stdout.
        child.output = asyncio.create_task(_copy(process.stdout))
        logger.info(
            "executor %s runs in process %d at %s", child.executor_id, process.pid, child.address
        )

    async def _supervise(self, child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            lived = time.monotonic() - child.started
            child.failures = 0 if lived >= STABLE_SECONDS else child.failures + 1
            logger.error(
                "executor %s (process %d) exited with %s; restarting it",
                child.executor_id,
                child.process.pid,
                describe_exit(code),
            )
            reason = f"its process exited with {describe_exit(code)}"
            self._pool.set_aside(child.executor_id, reason)
            while not self._stopping:
                delay = min(0.25 * 2 ** (child.failures - 1), MAX_BACKOFF) if child.failures else 0
                await asyncio.sleep(delay)
                try:
                    await self._spawn(child)
                    break
                except (UnavailableError, OSError) as exc:
                    child.failures += 1
                    logger.error("restarting executor %s failed: %s", child.executor_id, exc)
            if self._stopping:
                return
            # A fresh member: up at once, its pins to be restored.
            await self._pool.remove(child.executor_id)
            self._pool.add(child.executor_id, child.address)
            logger.info("executor %s is back at %s", child.executor_id, child.address)
            try:
                await self._on_added()
            except Exception:
                logger.exception("restoring pins on executor %s failed", child.executor_id)

    async def stop(self, grace: float) -> None:
        """Stop the children: SIGTERM (they drain for ``grace``), SIGKILL after it; idempotent."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        running = [c.process for c in self.children if c.process is not None]
        running = [p for p in running if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            waits = [asyncio.create_task(p.wait()) for p in running]
            # A child drains for the grace period, then stops its server.
            _, pending = await asyncio.wait(waits, timeout=grace + 0.5)
            if pending:
                # A second SIGTERM makes a child name the calls it abandons and exit at once
                # (user code may hold up its event loop, so it may not stop by itself).
                for process in running:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.send_signal(signal.SIGTERM)
                _, pending = await asyncio.wait(pending, timeout=FORCE_SECONDS)
            for process in running:
                if process.returncode is None:
                    logger.warning(
                        "executor process %d still running after the grace period; killing it",
                        process.pid,
                    )
                    _kill(process)
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for child in self.children:
            if child.process is not None and child.process.stdin is not None:
                child.process.stdin.close()
            if child.output is not None:
                child.output.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()


async def _send(process: asyncio.subprocess.Process, material: TlsMaterial) -> None:
    """Send TLS material to a child; one that has ended already is left to its supervisor."""
    assert process.stdin is not None
    with contextlib.suppress(ConnectionError):
        process.stdin.write(encode_material(material))
        await process.stdin.drain()


def _forward(line: str) -> None:
    # Output nobody reads any more is dropped: a child must never block on a full pipe.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(line)
        sys.stdout.flush()


async def _copy(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        _forward(line.decode(errors="replace"))
