"""The ``cbgrpc`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from cloudburst import grpc_io, malloc
from cloudburst.errors import CloudburstError
from cloudburst.transport import DEFAULT_PORT
from cloudburst_grpc import affinity, telemetry
from cloudburst_grpc.config import ISOLATIONS, Config, ConfigError, load_config

logger = logging.getLogger("cbgrpc")

DESCRIPTION = """\
cloudburst-grpc: stateful functions-as-a-service over gRPC.

Register Python functions and classes, compose them into DAGs, call them,
and share state through a lattice key-value store, with the Cloudburst API:

    from cloudburst import CloudburstConnection
    cloud = CloudburstConnection("127.0.0.1")

Settings come from defaults < a TOML file (--config or CBGRPC_CONFIG) <
CBGRPC_<SECTION>_<FIELD> environment variables < flags.
"""

SERVE_HELP = """\
Run everything (KVS, scheduler, executors) on one port. The executors, which run
user code, are child processes this one supervises (--isolation none: threads here).
Data is stored durably in --data-dir (SQLite) unless --storage memory is given;
it does not start on a --data-dir of a newer release's storage format.
The server prints 'listening on HOST:PORT' once it accepts calls, and shuts
down gracefully on SIGINT or SIGTERM.
"""

#: The signals that stop a process.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds beyond the grace period a stopping process waits before it exits regardless.
EXIT_SLACK = 3.0
#: Seconds a forced exit waits for the KVS to commit what it has queued.
STORE_CLOSE_TIMEOUT = 2.0


def host_port(text: str) -> str:
    """``text`` when it is ``HOST:PORT`` (``[V6]:PORT`` for an IPv6 address), for argparse."""
    host, colon, port = text.rpartition(":")
    if not colon or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (as 10.0.0.5:7601, kvs.internal:7601 or [::1]:7601), got {text!r}"
        )
    return text


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="a TOML config file ([server], [kvs], [executor], [scheduler])"
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--port", type=int, help=f"port to bind; 0 picks a free one (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--max-payload-bytes", type=int, help="largest serialized value accepted (default 16 MiB)"
    )
    parser.add_argument(
        "--grace", type=float, help="seconds shutdown waits for in-flight calls (default 5)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (0 picks one; default: none)",
    )
    parser.add_argument(
        "--advertise-host",
        help="host other processes reach this one at (default: --host; 127.0.0.1 if a wildcard)",
    )
    parser.add_argument(
        "--cpus",
        metavar="LIST",
        help="pin this process to these CPUs, e.g. 0, 0-3 or 0,2 (Linux; default: no pinning). "
        "One core per cbgrpc process lowers latency; leave it off when functions run "
        "GIL-releasing code (numpy) that should use several cores",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )


def _security(
    parser: argparse.ArgumentParser, consul_ca: bool = True, client_cert_port: bool = False
) -> None:
    group = parser.add_argument_group(
        "security", "mutual TLS with service identities and client tokens (docs/security.md)"
    )
    group.add_argument("--tls-cert", metavar="FILE", help="PEM certificate of this service")
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-ca", metavar="FILE", help="PEM CA bundle that peers and clients must chain to"
    )
    group.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="client tokens, one 'ROLE HASH [NAME]' per line (see `cbgrpc token`); "
        "re-read when it changes",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host without TLS (anyone who reaches it can run code)",
    )
    if client_cert_port:
        group.add_argument(
            "--client-cert-port",
            type=int,
            metavar="PORT",
            help="with --tokens-file: also listen on PORT for clients that authenticate with "
            "a client certificate (0 picks one; default: none)",
        )
    group.add_argument(
        "--consul-intentions",
        action="store_true",
        default=None,
        help="with Consul: let its intentions decide which services may call this one",
    )
    if not consul_ca:  # cbgrpc serve has no Consul service name to be issued a certificate for
        return
    group.add_argument(
        "--tls-source",
        choices=["files", "consul"],
        help="where this service's certificate comes from: files (--tls-cert, --tls-key, "
        "--tls-ca; the default) or consul (Consul's service-mesh CA signs it, renewed "
        "and rotated without a restart)",
    )
    group.add_argument(
        "--consul-grpc",
        metavar="ADDRESS",
        help="Consul's gRPC API for --tls-source consul: HOST:PORT, or https://HOST:PORT for "
        "TLS (trusting CONSUL_CACERT, showing CONSUL_CLIENT_CERT if set); servers[:PORT] or "
        "https://servers[:PORT] for every server the local agent knows (default: the Consul "
        "host, port 8502)",
    )


def _storage(parser: argparse.ArgumentParser, valkey: bool = False) -> None:
    if valkey:
        parser.add_argument(
            "--engine",
            "--storage",
            dest="storage",
            choices=["sqlite", "memory", "valkey"],
            help="sqlite: durable in --data-dir (default); memory: lost when the process exits; "
            "valkey: the Valkey Cluster at --valkey-url, shared by any number of KVS processes",
        )
        parser.add_argument(
            "--valkey-url",
            metavar="URL",
            help="the Valkey Cluster of --engine valkey: redis://HOST:PORT[,HOST:PORT...]",
        )
        parser.add_argument(
            "--durable-writes",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="with --engine valkey, acknowledge a write only once a replica has it "
            "(default: on)",
        )
    else:
        parser.add_argument(
            "--storage",
            choices=["sqlite", "memory"],
            help="sqlite: durable in --data-dir (default); memory: lost when the process exits",
        )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="directory of the durable store (default $XDG_DATA_HOME/cloudburst-grpc, "
        "i.e. ~/.local/share/cloudburst-grpc)",
    )
    parser.add_argument(
        "--sync",
        choices=["normal", "full"],
        help="normal: writes survive a process crash (default); full: also power loss, slower",
    )


def _executors(parser: argparse.ArgumentParser, count: bool) -> None:
    if count:
        parser.add_argument("--executors", type=int, help="executors to run (default 2)")
        parser.add_argument(
            "--isolation",
            choices=list(ISOLATIONS),
            help="process: run each executor in a child process, restarted if it dies, so user "
            "code that blocks, crashes or exhausts memory cannot stop the server (default); "
            "none: run them in this process, faster but unprotected",
        )
    parser.add_argument(
        "--memory-limit-bytes",
        type=int,
        metavar="BYTES",
        help="data memory an executor process may use (RLIMIT_DATA); a function that needs "
        "more gets a MemoryError or ends its process, not the server (default 0: no limit)",
    )
    parser.add_argument(
        "--threads", type=int, help="threads per executor for user code (default 8)"
    )
    parser.add_argument(
        "--inline-max-seconds",
        type=float,
        metavar="SECONDS",
        help="functions whose runs (or, when they use the user library, whose stretches of "
        "code between library calls) take at most this long run on the executor's event "
        "loop, not a thread (default 0.0002; 0: never; always 0 in the executor processes "
        "of `serve --isolation process`)",
    )
    parser.add_argument(
        "--cache-max-bytes",
        type=int,
        metavar="BYTES",
        help="memory budget of an executor process's cache of KVS values, kept fresh through "
        "the KVS's change stream (default 268435456; 0: off)",
    )
    parser.add_argument(
        "--call-timeout", type=float, help="longest a call may run, in seconds (default 300)"
    )


def _result_ttl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--result-ttl",
        type=float,
        help="seconds an uncollected result under a scheduler-chosen key stays after its call's "
        "longest life (default 600; 0 keeps results)",
    )


def _consul(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--consul",
        metavar="ADDRESS",
        help="Consul agent (host:port or https://host:port) for discovery; default "
        "$CONSUL_HTTP_ADDR; token, TLS and CA from CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...",
    )
    parser.add_argument(
        "--consul-check-interval",
        type=float,
        metavar="SECONDS",
        help="how often Consul health-checks this service (default 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cbgrpc``."""
    parser = argparse.ArgumentParser(
        prog="cbgrpc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser(
        "serve",
        help="run everything in one process (local mode)",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(serve)
    _security(serve, consul_ca=False)
    _storage(serve)
    serve.add_argument(
        "--timings",
        type=int,
        metavar="N",
        help="keep the timing breakdown of the last N calls for `cbgrpc timing` (default: off)",
    )
    _executors(serve, count=True)
    _result_ttl(serve)

    kvs = commands.add_parser(
        "kvs",
        help="run the KVS service alone",
        description="Run the lattice KVS service alone; with Consul, register it there. "
        "The stored data (--data-dir, or the Valkey cluster) names its storage format; a KVS "
        "does not start on data of a newer release's format (see docs/operations.md, "
        "'Stored data across releases').",
    )
    _common(kvs)
    _security(kvs)
    _storage(kvs, valkey=True)
    _consul(kvs)
    kvs.add_argument("--id", dest="service_id", help="Consul service id (default: kvs-HOST-PORT)")

    executor = commands.add_parser(
        "executor",
        help="run one executor",
        description="Run one executor. It uses the KVS at --kvs, or discovers the KVS through "
        "Consul; with Consul it registers itself so schedulers find it.",
    )
    _common(executor)
    _security(executor)
    _executors(executor, count=False)
    _consul(executor)
    executor.add_argument(
        "--kvs",
        metavar="HOST:PORT",
        type=host_port,
        help="address of the KVS service (default: from Consul)",
    )
    executor.add_argument(
        "--id", dest="service_id", help="executor id, unique in the cluster (default: random)"
    )

    scheduler = commands.add_parser(
        "scheduler",
        help="run a scheduler",
        description="Run a scheduler that places calls on the executors given with --executor, "
        "or on the passing executors Consul knows (kept current as they join and leave). It "
        "also forwards KvsService calls to the KVS, so clients need only its address.",
    )
    _common(scheduler)
    _security(scheduler, client_cert_port=True)
    _consul(scheduler)
    scheduler.add_argument(
        "--kvs",
        metavar="HOST:PORT",
        type=host_port,
        help="address of the KVS service (default: from Consul)",
    )
    scheduler.add_argument(
        "--executor",
        action="append",
        default=[],
        metavar="HOST:PORT",
        type=host_port,
        dest="executor_addresses",
        help="address of an executor (repeat for each; default: from Consul)",
    )
    scheduler.add_argument("--id", dest="service_id", help="scheduler id (default: random)")
    scheduler.add_argument(
        "--call-timeout", type=float, help="longest a call may run, in seconds (default 300)"
    )
    _result_ttl(scheduler)
    certs = commands.add_parser(
        "certs",
        help="create a development CA and certificates for a cluster",
        description="Create a CA (or reuse the one in DIR) and sign a certificate for each "
        "service role (scheduler, executor, kvs, serve), valid for the given hosts, and client "
        "certificates. Each names its role in a URI SAN (spiffe://DOMAIN/role/ROLE). Keys are "
        "written readable by their owner only.",
    )
    certs.add_argument("directory", type=Path, metavar="DIR", help="where to write the files")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        dest="hosts",
        metavar="HOST",
        help="a host name or IP address clients use to reach the services (repeat; "
        "127.0.0.1 and localhost are always included)",
    )
    certs.add_argument(
        "--client",
        action="append",
        dest="clients",
        metavar="ROLE",
        help="a client certificate to issue: admin, invoker or invoker-restricted (repeat; "
        "default: admin and invoker)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument(
        "--trust-domain", default="cloudburst.local", help="SPIFFE trust domain of the URI SANs"
    )
    token = commands.add_parser(
        "token",
        help="create a client token and the line for the tokens file",
        description="Print a new random token for ROLE on stdout, and on stderr the line to "
        "add to the tokens file (the token's salted hash; the token itself is not stored).",
    )
    token.add_argument("role", choices=["admin", "invoker", "invoker-restricted"])
    token.add_argument("--name", default="", help="a name for logs (no spaces)")
    timing = commands.add_parser(
        "timing",
        help="print where the time of a recent call went",
        description="Print the timing breakdown of a recent call of a `cbgrpc serve --timings N`: "
        "each step (placement, each function run, KVS accesses, messages) with its start "
        "offset, duration, executor and outcome. CALL_ID is a future's obj_id or a call id.",
    )
    timing.add_argument("call_id", metavar="CALL_ID")
    timing.add_argument(
        "--address",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"the cbgrpc serve to ask (default 127.0.0.1:{DEFAULT_PORT})",
    )
    timing.add_argument(
        "--tls-ca",
        default="",
        metavar="FILE",
        help="connect with TLS, trusting this CA (default: $CLOUDBURST_TLS_CA; none: plaintext)",
    )
    timing.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a file holding an admin token (default: $CLOUDBURST_TOKEN)",
    )
    timing.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _timing(call_id: str, address: str, tls_ca: str = "", token_file: Path | None = None) -> int:
    import grpc

    from cloudburst.errors import CloudburstError
    from cloudburst.rpc import error_from_rpc
    from cloudburst.transport import ClientSecurity
    from cloudburst.v1 import diagnostics_service_pb2, diagnostics_service_pb2_grpc
    from cloudburst_grpc.diagnostics import format_timing

    try:
        token = token_file.read_text().strip() if token_file is not None else ""
    except OSError as exc:
        print(f"cbgrpc timing: cannot read {token_file}: {exc.strerror}", file=sys.stderr)
        return 1
    security = ClientSecurity.resolve(None, ca_file=tls_ca, token=token)
    try:
        credentials = security.channel_credentials()
    except CloudburstError as exc:
        print(f"cbgrpc timing: {exc}", file=sys.stderr)
        return 1
    options = [("grpc.ssl_target_name_override", security.server_name)]
    channel = (
        grpc.secure_channel(address, credentials, options if security.server_name else None)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        stub = diagnostics_service_pb2_grpc.DiagnosticsServiceStub(channel)
        try:
            response = stub.GetCallTiming(
                diagnostics_service_pb2.GetCallTimingRequest(call_id=call_id), timeout=10
            )
        except grpc.RpcError as exc:
            print(
                f"cbgrpc timing: {error_from_rpc(exc, what=f'asking {address}')}", file=sys.stderr
            )
            return 1
    print(format_timing(response))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from cloudburst_grpc.security.certs import create_bundle

    hosts = list(dict.fromkeys(["127.0.0.1", "localhost", *args.hosts]))
    try:
        clients = args.clients or ["admin", "invoker"]
        written = create_bundle(args.directory, hosts, clients, args.trust_domain, args.days)
    except (OSError, ValueError) as exc:
        print(f"cbgrpc certs: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _token(role: str, name: str) -> int:
    from cloudburst_grpc.security.tokens import hash_token, new_token

    if any(c.isspace() for c in name):
        print("cbgrpc token: --name must not contain spaces", file=sys.stderr)
        return 2
    token = new_token()
    line = f"{role} {hash_token(token)}" + (f" {name}" if name else "")
    print(token)
    print(f"add to the tokens file: {line}", file=sys.stderr)
    return 0


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the configuration from flags, environment and config file."""

    def get(name: str) -> Any:
        return getattr(args, name, None)

    overrides: dict[str, dict[str, Any]] = {
        "server": {
            "host": get("host"),
            "port": get("port"),
            "max_payload_bytes": get("max_payload_bytes"),
            "grace_seconds": get("grace"),
            "advertise_host": get("advertise_host"),
            "metrics_port": get("metrics_port"),
            "timings": get("timings"),
            "cpus": get("cpus"),
        },
        "consul": {
            "address": get("consul"),
            "check_interval_seconds": get("consul_check_interval"),
        },
        "kvs": {
            "engine": get("storage"),
            "data_dir": get("data_dir"),
            "sync": get("sync"),
            "valkey_url": get("valkey_url"),
            "durable_writes": get("durable_writes"),
        },
        "executor": {
            "count": get("executors"),
            "isolation": get("isolation"),
            "memory_limit_bytes": get("memory_limit_bytes"),
            "threads": get("threads"),
            "inline_max_seconds": get("inline_max_seconds"),
            "cache_max_bytes": get("cache_max_bytes"),
        },
        "scheduler": {
            "call_timeout_seconds": get("call_timeout"),
            "result_ttl_seconds": get("result_ttl"),
        },
        "security": {
            "tls_cert": get("tls_cert"),
            "tls_key": get("tls_key"),
            "tls_ca": get("tls_ca"),
            "tokens_file": get("tokens_file"),
            "insecure": get("insecure"),
            "consul_intentions": get("consul_intentions"),
            "tls_source": get("tls_source"),
            "consul_grpc_address": get("consul_grpc"),
            "client_cert_port": get("client_cert_port"),
        },
    }
    return load_config(get("config"), overrides)


class Stopper:
    """Makes SIGINT and SIGTERM stop the process within its grace period plus a few seconds.

    User code runs on threads that cannot be stopped, and code that never
    yields can hold up the event loop itself; neither may keep the process
    alive. The signal handler is a plain Python one, not the loop's: it runs on
    the main thread even while user code holds up the loop there. (A signal
    that lands on another thread wakes the main thread through a wakeup file
    descriptor the loop watches, as the loop's own handlers do.) It asks the
    loop to shut down and starts a watchdog that, if the process is still here
    :data:`EXIT_SLACK` seconds after the grace period, names the calls it
    abandons, closes the KVS store and exits. A second signal exits at once
    the same way. When the shutdown itself finishes but user functions still
    run, :func:`main` names them and exits without waiting for their threads.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, grace: float) -> None:
        self._loop = loop
        self._stop = stop
        self._grace = grace
        self.node: Any = None
        """The running node (a :class:`cloudburst_grpc.local.Node`), once started."""
        self.abandoned: list[tuple[str, str]] = []
        """(call id, function name) of the user functions shutdown left running."""
        self._signalled = False
        self._forcing = threading.Lock()
        self._previous: list[tuple[int, Any]] = []
        self._previous_wakeup = -1
        self._wakeup = socket.socketpair()
        """Written to by the C-level signal handler on any thread; the loop watches it."""
        for end in self._wakeup:
            end.setblocking(False)

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (on the main thread, while the loop runs)."""
        self._loop.add_reader(self._wakeup[0].fileno(), self._drain_wakeup)
        self._previous_wakeup = signal.set_wakeup_fd(
            self._wakeup[1].fileno(), warn_on_full_buffer=False
        )
        self._previous = [(sig, signal.signal(sig, self.handle)) for sig in SIGNALS]

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous:
            signal.signal(sig, previous)
        signal.set_wakeup_fd(self._previous_wakeup)
        self._loop.remove_reader(self._wakeup[0].fileno())
        for end in self._wakeup:
            end.close()

    def _drain_wakeup(self) -> None:
        # The bytes only woke the main thread; the Python handler does the work.
        with contextlib.suppress(OSError):
            while self._wakeup[0].recv(512):
                pass

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: start a graceful shutdown, or force one on a second signal."""
        if self._signalled:
            self.force(f"{signal.Signals(signum).name} received again")
            return
        self._signalled = True
        self._loop.call_soon_threadsafe(self._stop.set)
        threading.Thread(target=self._watch, name="cbgrpc-exit-watchdog", daemon=True).start()

    def _watch(self) -> None:
        threading.Event().wait(self._grace + EXIT_SLACK)
        self.force(
            f"shutdown did not finish within the grace period ({self._grace:.1f}s) "
            f"plus {EXIT_SLACK:.0f}s"
        )

    def name_abandoned(self) -> None:
        """Log each user function still running, which the process will not wait for."""
        if self.node is None:
            return
        # What stop() found after the grace period, or (stop still under way) what runs now.
        self.abandoned = self.node.abandoned or self.node.running_calls()
        for call_id, function in self.abandoned:
            logger.warning(
                "abandoning call %s (function %r): still running after the grace period",
                call_id,
                function,
            )

    def force(self, why: str) -> None:
        """Name the abandoned calls, close the KVS store and exit now (any thread)."""
        if not self._forcing.acquire(blocking=False):
            return  # another thread is exiting already
        try:
            logger.error("%s; exiting now", why)
            self.name_abandoned()
            # The local store (memory or SQLite) commits and closes; a remote one
            # (Valkey) has every acknowledged write already.
            close_blocking = getattr(getattr(self.node, "store", None), "close_blocking", None)
            if close_blocking is not None:
                close_blocking(STORE_CLOSE_TIMEOUT)
        except Exception:
            logger.exception("forced exit: cleaning up failed")
        finally:
            exit_now(1)


def exit_now(code: int) -> None:
    """Flush the logs and end the process without waiting for any thread."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _started(start: Callable[[], Awaitable[Any]], stop: asyncio.Event) -> Any:
    """What ``start()`` returns; None when ``stop`` is set first.

    A start waits for its peers (an executor to answer, a Consul agent), up to
    its own deadlines: a signal meanwhile cancels it, and what it had started
    closes as it unwinds.
    """
    starting = asyncio.ensure_future(start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        starting.cancel()
        raise
    finally:
        stopping.cancel()
    if starting.done():
        return starting.result()
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return None


async def _run_until_signal(
    start: Callable[[], Awaitable[Any]],
    label: str,
    tracing: telemetry.Telemetry,
    grace: float,
) -> Stopper:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopper = Stopper(loop, stop, grace)
    stopper.install()
    try:
        node = stopper.node = await _started(start, stop)
        if node is None:
            logger.info("signal received while starting; stopped")
            return stopper
        print(f"{label}: listening on {node.address}", flush=True)
        if tracing.metrics_port is not None:
            host = node.advertise_host
            print(f"{label}: metrics on http://{host}:{tracing.metrics_port}/metrics", flush=True)
        try:
            await stop.wait()
            logger.info("signal received; shutting down")
        finally:
            await node.stop()
            stopper.name_abandoned()
    finally:
        stopper.uninstall()
    return stopper


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cbgrpc``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "timing":
        return _timing(args.call_id, args.address, args.tls_ca, args.token_file)
    if args.command == "certs":
        return _certs(args)
    if args.command == "token":
        return _token(args.role, args.name)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.exit(2, f"cbgrpc: configuration error: {exc}\n")
    if config.server.cpus:
        # Before any server thread starts, so that every thread is pinned.
        try:
            affinity.pin(config.server.cpus)
        except ValueError as exc:
            parser.exit(2, f"cbgrpc: configuration error: server.cpus: {exc}\n")
    # Large values reuse memory instead of faulting in fresh pages (see malloc.py).
    malloc.tune()
    logger.info("gRPC I/O: %s", grpc_io.CHOICE)  # chosen as cloudburst was imported
    # An executor process of `cbgrpc serve` with TLS: its certificates come from its parent.
    certificates = None
    if args.command == "executor":
        from cloudburst_grpc import supervisor
        from cloudburst_grpc.security.internal import MemorySource

        if os.environ.get(supervisor.PARENT_ENV, "").isdigit():  # a child of `cbgrpc serve`
            if os.environ.get(supervisor.TLS_ENV) == "stdin":
                certificates = MemorySource(config.security.trust_domain)
            supervisor.follow_parent(int(os.environ[supervisor.PARENT_ENV]), certificates)
            wait = config.executor.start_timeout_seconds
            if certificates is not None and not certificates.wait(wait):
                print(
                    f"cbgrpc executor: no TLS certificate from the supervising server within "
                    f"{wait:.0f}s (executor.start_timeout_seconds)",
                    file=sys.stderr,
                )
                return 1
        try:
            supervisor.limit_memory(config.executor.memory_limit_bytes)
        except (OSError, ValueError) as exc:
            parser.exit(2, f"cbgrpc: configuration error: executor.memory_limit_bytes: {exc}\n")
    from cloudburst_grpc import local

    starters: dict[str, Callable[[], Awaitable[Any]]] = {
        "serve": lambda: local.start_local(config),
        "kvs": lambda: local.start_kvs_node(config, args.service_id),
        "executor": lambda: local.start_executor_node(
            config, args.kvs, args.service_id, certificates
        ),
        "scheduler": lambda: local.start_scheduler_node(
            config, args.kvs, args.executor_addresses, args.service_id
        ),
    }
    try:
        tracing = telemetry.setup(
            f"cloudburst-{args.command}",
            os.environ,
            None if config.server.metrics_port < 0 else config.server.metrics_port,
            config.server.host,
            config.server.timings,
        )
        stopper: Stopper | None = None
        try:
            stopper = asyncio.run(
                _run_until_signal(
                    starters[args.command],
                    f"cbgrpc {args.command}",
                    tracing,
                    config.server.grace_seconds,
                )
            )
        finally:
            tracing.shutdown()  # flush spans last, after the node stopped
        if stopper.abandoned:
            # Their threads never end; exiting normally would wait for them forever.
            exit_now(0)
        return 0
    except OSError as exc:
        print(f"cbgrpc {args.command}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"cbgrpc {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except CloudburstError as exc:  # a start-up failure: say what, not a traceback
        print(f"cbgrpc {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
