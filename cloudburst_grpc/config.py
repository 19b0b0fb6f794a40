"""Configuration: frozen dataclasses, layered defaults < TOML file < environment < flags.

:func:`load_config` is the only reader of ``os.environ``; everything else takes
a config object, so tests pass explicit configs. Environment variables are
named ``CBGRPC_<SECTION>_<FIELD>``, e.g. ``CBGRPC_SERVER_PORT=7600`` or
``CBGRPC_KVS_ENGINE=memory``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudburst.serialization import DEFAULT_MAX_PAYLOAD_BYTES
from cloudburst.transport import DEFAULT_PORT
from cloudburst_grpc.affinity import parse_cpus


def default_data_dir() -> Path:
    """Return ``$XDG_DATA_HOME/cloudburst-grpc`` (``~/.local/share/cloudburst-grpc``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cloudburst-grpc"


#: The values of ``executor.isolation``; the first is the default.
ISOLATIONS = ("process", "none")


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC server listens."""

    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server private to this machine."""
    port: int = DEFAULT_PORT
    """Port to bind; 0 picks a free one (printed at start-up)."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    """Largest serialized value (argument, result or stored object) accepted."""
    grace_seconds: float = 5.0
    """How long shutdown waits for in-flight calls before cancelling them."""
    metrics_port: int = -1
    """Serve Prometheus metrics on this port; 0 picks a free one, -1 (the default) serves none."""
    timings: int = 0
    """Keep the timing breakdown of this many recent calls for ``cbgrpc timing`` (0: off)."""
    advertise_host: str = ""
    """The host other processes reach this one at; empty: ``host`` (127.0.0.1 if a wildcard)."""
    cpus: str = ""
    """Pin the process to these CPUs (``0``, ``0-3``, ``0,2``; Linux); empty: no pinning.

    Lowers latency when each process gets a core of its own; see
    :mod:`cloudburst_grpc.affinity` for when to leave it off.
    """


@dataclass(frozen=True)
class KvsConfig:
    """The lattice key-value store."""

    engine: str = "sqlite"
    """Storage engine: ``sqlite`` (durable, in data_dir), ``memory`` (lost on exit) or ``valkey``
    (a Valkey Cluster at ``valkey_url``, shared by any number of ``cbgrpc kvs`` processes)."""
    data_dir: Path = field(default_factory=default_data_dir)
    """Directory of the durable engine's files."""
    sync: str = "normal"
    """SQLite synchronous mode: ``normal`` survives a process crash, ``full`` also power loss."""
    max_wait_seconds: float = 60.0
    """Longest a waiting GetValue waits when the caller set no shorter deadline."""
    max_clock_skew_seconds: float = 60.0
    """How far ahead of the KVS's clock a last-writer-wins timestamp may be; writes stamped
    further in the future are refused (they would win every later write)."""
    max_value_bytes: int = 1073741824
    """The largest value one key may hold; values larger than one message
    (``server.max_payload_bytes``) move between processes in chunks. Clients learn it from the
    KVS (through a scheduler)."""
    valkey_url: str = ""
    """The Valkey Cluster of the ``valkey`` engine: ``redis://host:port[,host:port...]`` (any
    nodes of it; ``rediss://`` for TLS; ``user:password@`` before the hosts when needed)."""
    durable_writes: bool = True
    """With the ``valkey`` engine, acknowledge a write only once a replica has it (``WAIT 1``);
    off, a primary that dies may lose its last acknowledged writes."""
    engine_timeout_seconds: float = 10.0
    """With the ``valkey`` engine, how long an operation keeps retrying while the cluster fails
    over before it fails with UNAVAILABLE."""


@dataclass(frozen=True)
class ExecutorConfig:
    """The executors that run user code."""

    count: int = 2
    """Executors started by ``cbgrpc serve``."""
    isolation: str = "process"
    """How ``cbgrpc serve`` runs its executors: ``process`` (each in a child process it
    supervises and restarts, so user code that blocks, crashes or exhausts memory cannot stop
    the KVS or the scheduler) or ``none`` (in the server's own process: lower latency, but a
    user function or argument that blocks or kills the process stops the whole service)."""
    memory_limit_bytes: int = 0
    """Data memory (heap and thread stacks, ``RLIMIT_DATA``) an executor process may use, so a
    memory bomb ends in a MemoryError or a dead child rather than a dead server; 0: no limit.
    Leave room for the runtime's threads (a few hundred MiB at least)."""
    start_timeout_seconds: float = 60.0
    """How long ``cbgrpc serve`` waits for an executor process to start listening."""
    threads: int = 8
    """Functions per executor that run user code on threads at once (runnable slots); a
    function waiting in a user-library call gives its slot up while it waits."""
    max_threads: int = 1024
    """Most threads per executor, running or waiting in library calls; calls beyond it are
    refused with QUEUE_FULL."""
    max_queue: int = 1024
    """Calls an executor accepts beyond its running ones before refusing with QUEUE_FULL."""
    mailbox_capacity: int = 1024
    """Unread messages a function's mailbox holds before senders wait."""
    send_timeout_seconds: float = 10.0
    """How long ``send`` waits for space in a full mailbox before raising QueueFullError."""
    inline_max_seconds: float = 0.0002
    """Functions whose stretches of code (the whole run, or the code between two user-library
    calls) take at most this long run on the executor's event loop instead of a thread,
    sparing two thread hand-offs per call and per library call: directly, or in a greenlet
    when they use the library; 0 runs every function on a thread (see ``executors/inline.py``)."""
    cache_max_bytes: int = 268435456
    """Memory budget of an executor's cache of KVS values (user keys its functions read), kept
    fresh through the KVS's change stream; 0 turns the cache off. Only executors that reach the
    KVS over the network cache (``cbgrpc executor``); ``cbgrpc serve`` reads its store directly."""
    cache_max_entries: int = 4096
    """Most keys an executor's cache holds (each is one watch stream on the KVS)."""
    max_answer_streams: int = 4096
    """Callers' answer streams (``StreamAnswers``) an executor holds at once, each a stream and
    a queue of up to 4,096 answers; a caller refused past it is answered through the scheduler."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler that registers functions and places calls."""

    call_timeout_seconds: float = 300.0
    """Longest a call (or a wait for its direct response) may last without a caller deadline."""
    pin_replicas: int = 2
    """Executors each function of a registered DAG is pinned on."""
    result_ttl_seconds: float = 600.0
    """How long a result stored under a key the scheduler chose stays once its call's longest
    life (call_timeout_seconds) is over, unless its caller releases it first; 0 keeps it."""
    health_interval_seconds: float = 1.0
    """How often the scheduler checks that each executor answers."""
    health_timeout_seconds: float = 2.0
    """An executor that does not answer a health check this fast is set aside until it does."""
    max_unanswered_calls: int = 4096
    """Calls one ``StreamCalls`` stream may have in flight; it reads no more until some end."""
    direct_kvs: bool = True
    """Tell clients the KVS's address, so that they read and write objects there directly
    (one hop); false sends them through this scheduler (docs/security.md: with TLS, only
    clients with a certificate can)."""
    direct_kvs_address: str = ""
    """``host:port`` clients dial for the KVS, when not the address this scheduler uses."""
    direct_answers: bool = True
    """Have the executor that finishes a call whose outcome its caller awaits (``direct_response``,
    a streamed outcome) answer on the answer stream the caller holds there, when it holds one
    (docs/protocol.md); false answers every call here."""


@dataclass(frozen=True)
class ConsulConfig:
    """Service discovery through Consul; off unless an address is set.

    Consul's standard variables fill these: ``CONSUL_HTTP_ADDR``,
    ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``,
    ``CONSUL_CACERT``, ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``,
    ``CONSUL_TLS_SERVER_NAME``.
    """

    address: str = ""
    """``host:port`` or ``scheme://host:port`` of the Consul agent; empty turns discovery off."""
    token: str = field(default="", repr=False)
    """ACL token sent with every request (never shown by repr, so never in a log line)."""
    ssl: bool = False
    """Use HTTPS (implied by an ``https://`` address)."""
    verify: bool = True
    """Verify the agent's TLS certificate."""
    ca_file: str = ""
    """CA bundle that signed the agent's certificate."""
    cert_file: str = ""
    """Client certificate for mutual TLS."""
    key_file: str = ""
    """Client key for mutual TLS."""
    tls_server_name: str = ""
    """The name Consul's gRPC certificate must carry, when not the host dialled.

    Empty: the host of ``https://HOST:PORT``, or ``server.<datacenter>.consul``
    for ``https://servers`` (Consul's default domain).
    """
    check_interval_seconds: float = 2.0
    """How often Consul runs the gRPC health check of each service."""
    deregister_after_seconds: float = 60.0
    """Consul removes a service whose check stays critical this long (a backstop for crashes)."""
    retry_max_seconds: float = 10.0
    """Longest pause between retries while Consul cannot be reached."""

    @property
    def enabled(self) -> bool:
        """Whether discovery through Consul is on."""
        return bool(self.address)


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, service identities and client tokens (see docs/security.md).

    With ``tls_cert``, ``tls_key`` and ``tls_ca`` set, every connection is TLS:
    the cluster's services prove their role with their certificates, and
    clients with a bearer token from ``tokens_file`` or a client certificate.
    The files are re-read when they change.
    """

    tls_cert: str = ""
    """PEM certificate (chain) of this service; with tls_key and tls_ca it turns TLS on."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_ca: str = ""
    """PEM CA bundle that peers' and clients' certificates must chain to."""
    tokens_file: str = ""
    """Client tokens, one ``ROLE HASH [NAME]`` per line (``cbgrpc token``); needs TLS.
    Without it, clients authenticate with certificates."""
    trust_domain: str = "cloudburst.local"
    """The SPIFFE trust domain of the URI SANs that name roles."""
    insecure: bool = False
    """Allow listening on a non-loopback address without TLS (warns at start)."""
    max_auth_failures: int = 10
    """Refused calls a peer address may cause per minute before it is refused outright."""
    consul_intentions: bool = False
    """Also ask the Consul agent (intentions) whether a calling service may reach this one."""
    tls_source: str = "files"
    """Where certificates come from: ``files`` (tls_cert, tls_key, tls_ca) or ``consul``
    (Consul's service-mesh CA signs this service's certificate; needs consul.address)."""
    consul_grpc_address: str = ""
    """Consul's gRPC API for ``tls_source = "consul"``: ``host:port`` (plaintext) or
    ``https://host:port`` (TLS, trusting consul.ca_file and showing consul.cert_file and
    key_file when set), or ``servers`` (``https://servers``)
    for every Consul server the local agent knows, port 8502 (8503 with TLS; ``servers:PORT``
    picks another). Default: consul.address's host and port 8502, or 8503 over TLS when
    consul.address is https."""
    client_cert_port: int = -1
    """A scheduler with tokens_file also listens here for clients that show a client
    certificate (its main port, which takes tokens, cannot ask for one). -1: no such
    port; 0 picks a free one."""

    @property
    def tls(self) -> bool:
        """Whether TLS is configured."""
        return bool(self.tls_cert) or self.tls_source == "consul"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one process."""

    server: ServerConfig = field(default_factory=ServerConfig)
    """The gRPC server."""
    kvs: KvsConfig = field(default_factory=KvsConfig)
    """The key-value store."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """The executors."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The scheduler."""
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    """Service discovery."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Transport security and authorization."""

    def validate(self) -> Config:
        """Return self, or raise ConfigError naming the bad value."""
        checks = [
            (0 <= self.server.port <= 65535, "server.port must be between 0 and 65535"),
            (self.server.max_payload_bytes > 0, "server.max_payload_bytes must be positive"),
            (-1 <= self.server.metrics_port <= 65535, "server.metrics_port must be -1 to 65535"),
            (self.server.timings >= 0, "server.timings must not be negative"),
            (self.server.grace_seconds >= 0, "server.grace_seconds must not be negative"),
            (
                self.kvs.engine in ("sqlite", "memory", "valkey"),
                "kvs.engine must be 'sqlite', 'memory' or 'valkey'",
            ),
            (
                self.kvs.engine != "valkey" or bool(self.kvs.valkey_url),
                "kvs.engine 'valkey' needs kvs.valkey_url (redis://host:port of a cluster node)",
            ),
            (self.kvs.engine_timeout_seconds > 0, "kvs.engine_timeout_seconds must be positive"),
            (self.kvs.sync in ("normal", "full"), "kvs.sync must be 'normal' or 'full'"),
            (self.kvs.max_wait_seconds > 0, "kvs.max_wait_seconds must be positive"),
            (
                self.kvs.max_clock_skew_seconds > 0,
                "kvs.max_clock_skew_seconds must be positive",
            ),
            (self.executor.count >= 1, "executor.count must be at least 1"),
            (self.executor.threads >= 1, "executor.threads must be at least 1"),
            (
                self.executor.isolation in ISOLATIONS,
                "executor.isolation must be 'process' or 'none'",
            ),
            (
                self.executor.memory_limit_bytes >= 0,
                "executor.memory_limit_bytes must not be negative (0: no limit)",
            ),
            (
                self.executor.start_timeout_seconds > 0,
                "executor.start_timeout_seconds must be positive",
            ),
            (self.executor.max_queue >= 1, "executor.max_queue must be at least 1"),
            (
                self.executor.max_threads >= self.executor.threads,
                "executor.max_threads must be at least executor.threads",
            ),
            (
                self.executor.max_answer_streams >= 1,
                "executor.max_answer_streams must be at least 1",
            ),
            (self.executor.mailbox_capacity >= 1, "executor.mailbox_capacity must be at least 1"),
            (
                self.executor.send_timeout_seconds > 0,
                "executor.send_timeout_seconds must be positive",
            ),
            (
                0 <= self.executor.inline_max_seconds <= 0.1,
                "executor.inline_max_seconds must be between 0 (off) and 0.1",
            ),
            (
                self.scheduler.call_timeout_seconds > 0,
                "scheduler.call_timeout_seconds must be positive",
            ),
            (self.scheduler.pin_replicas >= 1, "scheduler.pin_replicas must be at least 1"),
            (
                self.scheduler.result_ttl_seconds >= 0,
                "scheduler.result_ttl_seconds must not be negative (0 keeps results)",
            ),
            (
                self.scheduler.health_interval_seconds > 0,
                "scheduler.health_interval_seconds must be positive",
            ),
            (
                self.scheduler.health_timeout_seconds > 0,
                "scheduler.health_timeout_seconds must be positive",
            ),
            (
                self.scheduler.max_unanswered_calls >= 1,
                "scheduler.max_unanswered_calls must be at least 1",
            ),
            (
                self.consul.check_interval_seconds > 0,
                "consul.check_interval_seconds must be positive",
            ),
            (
                self.consul.deregister_after_seconds >= 60,
                "consul.deregister_after_seconds must be at least 60 (Consul's minimum)",
            ),
            (self.consul.retry_max_seconds > 0, "consul.retry_max_seconds must be positive"),
            (
                bool(self.consul.cert_file) == bool(self.consul.key_file),
                "consul.cert_file and consul.key_file (CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY) go "
                "together: give both or neither",
            ),
            (
                bool(self.security.tls_cert)
                == bool(self.security.tls_key)
                == bool(self.security.tls_ca),
                "security.tls_cert, tls_key and tls_ca go together: give all three or none",
            ),
            (
                self.security.tls or not self.security.tokens_file,
                "security.tokens_file needs TLS (tls_cert, tls_key, tls_ca): "
                "tokens must not travel in clear",
            ),
            (self.security.max_auth_failures >= 1, "security.max_auth_failures must be at least 1"),
            (
                -1 <= self.security.client_cert_port <= 65535,
                "security.client_cert_port must be -1 (none) to 65535",
            ),
            (
                self.security.client_cert_port < 0 or bool(self.security.tokens_file),
                "security.client_cert_port is for a scheduler with security.tokens_file: "
                "without tokens its port already takes client certificates",
            ),
            (
                self.security.tls_source in ("files", "consul"),
                "security.tls_source must be 'files' or 'consul'",
            ),
            (
                self.security.tls_source != "consul" or self.consul.enabled,
                "security.tls_source 'consul' needs consul.address (--consul or CONSUL_HTTP_ADDR)",
            ),
            (
                self.security.tls_source != "consul" or not self.security.tls_cert,
                "security.tls_source 'consul' takes its certificates from Consul: "
                "leave out tls_cert, tls_key and tls_ca",
            ),
            (
                not self.security.consul_intentions or (self.security.tls and self.consul.enabled),
                "security.consul_intentions needs TLS (the caller's identity) and consul.address",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.server.cpus:
            try:
                parse_cpus(self.server.cpus)
            except ValueError as exc:
                raise ConfigError(f"server.cpus: {exc}") from None
        return self


def _convert(raw: Any, kind: Any, name: str) -> Any:
    if isinstance(kind, str):
        kind = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}[kind]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(str(raw)).expanduser()
        if kind in (int, float) and isinstance(raw, bool):
            raise ValueError(raw)
        if kind is int and isinstance(raw, float):
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _apply(config: Config, values: Mapping[str, Mapping[str, Any]], source: str) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    updates: dict[str, Any] = {}
    for section_name, fields in values.items():
        if section_name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{section_name}]; known: {', '.join(sections)}"
            )
        current = getattr(config, section_name)
        types_ = _section_types(type(current))
        changes = {}
        for key, raw in fields.items():
            if key not in types_:
                raise ConfigError(
                    f"{source}: unknown setting {section_name}.{key}; known: {', '.join(types_)}"
                )
            kind = types_[key]
            if isinstance(kind, types.UnionType):  # pragma: no cover - no optional fields yet
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            changes[key] = _convert(raw, kind, f"{source}: {section_name}.{key}")
        updates[section_name] = dataclasses.replace(current, **changes)
    return dataclasses.replace(config, **updates)


def _env_values(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, dict[str, str]] = {}
    for name, raw in environ.items():
        if not name.startswith("CBGRPC_"):
            continue
        rest = name.removeprefix("CBGRPC_").lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            values.setdefault(section, {})[key] = raw
    return values


#: Consul's standard environment variables and the settings they fill.
CONSUL_ENV = {
    "CONSUL_HTTP_ADDR": "address",
    "CONSUL_HTTP_TOKEN": "token",
    "CONSUL_HTTP_SSL": "ssl",
    "CONSUL_HTTP_SSL_VERIFY": "verify",
    "CONSUL_CACERT": "ca_file",
    "CONSUL_CLIENT_CERT": "cert_file",
    "CONSUL_CLIENT_KEY": "key_file",
    "CONSUL_TLS_SERVER_NAME": "tls_server_name",
}


def _consul_env(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    values = {field: environ[name] for name, field in CONSUL_ENV.items() if environ.get(name)}
    return {"consul": values} if values else {}


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration.

    Precedence: defaults < TOML file < Consul's ``CONSUL_*`` variables <
    ``CBGRPC_*`` variables < overrides (flags).

    Args:
        path: A TOML file with ``[server]``, ``[kvs]``, ``[executor]``, ``[scheduler]`` tables.
        overrides: Values from command-line flags, by section and field.
        environ: The environment; ``os.environ`` when None.

    Raises:
        ConfigError: A value is unknown or malformed; the message names it.
    """
    environ = os.environ if environ is None else environ
    config = Config()
    if path is None and environ.get("CBGRPC_CONFIG"):
        path = Path(environ["CBGRPC_CONFIG"])
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, fields in data.items():
            if not isinstance(fields, dict):
                raise ConfigError(f"{path}: {section} must be a table like [{section}]")
        config = _apply(config, data, str(path))
    config = _apply(config, _consul_env(environ), "Consul environment")
    config = _apply(config, _env_values(environ), "environment")
    if overrides:
        cleaned = {s: {k: v for k, v in f.items() if v is not None} for s, f in overrides.items()}
        config = _apply(config, {s: f for s, f in cleaned.items() if f}, "command line")
    return config.validate()
