"""The ``cbgrpc`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from cloudburst.errors import CloudburstError
from cloudburst.transport import DEFAULT_PORT
from cloudburst_grpc import affinity, malloc, telemetry
from cloudburst_grpc.config import Config, ConfigError, load_config

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
Run everything (KVS, scheduler, executors) in this process on one port.
Data is stored durably in --data-dir (SQLite) unless --storage memory is given.
The server prints 'listening on HOST:PORT' once it accepts calls, and shuts
down gracefully on SIGINT or SIGTERM.
"""


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
        "--threads", type=int, help="threads per executor for user code (default 8)"
    )
    parser.add_argument(
        "--inline-max-seconds",
        type=float,
        metavar="SECONDS",
        help="functions whose runs (or, when they use the user library, whose stretches of "
        "code between library calls) take at most this long run on the executor's event "
        "loop, not a thread (default 0.0002; 0: never)",
    )
    parser.add_argument(
        "--call-timeout", type=float, help="longest a call may run, in seconds (default 300)"
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
    _storage(serve)
    serve.add_argument(
        "--timings",
        type=int,
        metavar="N",
        help="keep the timing breakdown of the last N calls for `cbgrpc timing` (default: off)",
    )
    _executors(serve, count=True)

    kvs = commands.add_parser(
        "kvs",
        help="run the KVS service alone",
        description="Run the lattice KVS service alone; with Consul, register it there.",
    )
    _common(kvs)
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
    _executors(executor, count=False)
    _consul(executor)
    executor.add_argument(
        "--kvs", metavar="HOST:PORT", help="address of the KVS service (default: from Consul)"
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
    _consul(scheduler)
    scheduler.add_argument(
        "--kvs", metavar="HOST:PORT", help="address of the KVS service (default: from Consul)"
    )
    scheduler.add_argument(
        "--executor",
        action="append",
        default=[],
        metavar="HOST:PORT",
        dest="executor_addresses",
        help="address of an executor (repeat for each; default: from Consul)",
    )
    scheduler.add_argument("--id", dest="service_id", help="scheduler id (default: random)")
    scheduler.add_argument(
        "--call-timeout", type=float, help="longest a call may run, in seconds (default 300)"
    )
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
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _timing(call_id: str, address: str) -> int:
    import grpc

    from cloudburst.rpc import error_from_rpc
    from cloudburst.v1 import diagnostics_service_pb2, diagnostics_service_pb2_grpc
    from cloudburst_grpc.diagnostics import format_timing

    with grpc.insecure_channel(address) as channel:
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
            "threads": get("threads"),
            "inline_max_seconds": get("inline_max_seconds"),
        },
        "scheduler": {"call_timeout_seconds": get("call_timeout")},
    }
    return load_config(get("config"), overrides)


async def _run_until_signal(
    start: Callable[[], Awaitable[Any]], label: str, tracing: telemetry.Telemetry
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on POSIX
            pass
    try:
        node = await start()
        print(f"{label}: listening on {node.address}", flush=True)
        if tracing.metrics_port is not None:
            host = node.advertise_host
            print(f"{label}: metrics on http://{host}:{tracing.metrics_port}/metrics", flush=True)
        try:
            await stop.wait()
            logger.info("signal received; shutting down")
        finally:
            await node.stop()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cbgrpc``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "timing":
        return _timing(args.call_id, args.address)
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
    from cloudburst_grpc import local

    starters: dict[str, Callable[[], Awaitable[Any]]] = {
        "serve": lambda: local.start_local(config),
        "kvs": lambda: local.start_kvs_node(config, args.service_id),
        "executor": lambda: local.start_executor_node(config, args.kvs, args.service_id),
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
        try:
            return asyncio.run(
                _run_until_signal(starters[args.command], f"cbgrpc {args.command}", tracing)
            )
        finally:
            tracing.shutdown()  # flush spans last, after the node stopped
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
