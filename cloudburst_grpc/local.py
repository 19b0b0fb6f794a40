"""Composition: starting the services, in one process on one port or as separate servers.

``cbgrpc serve`` calls :func:`start_local`; the integration tests call the same
functions, so what is tested is what runs. Each function returns a
:class:`Node` whose :meth:`Node.stop` shuts down in reverse order of start-up:
health NOT_SERVING, then the server (with a grace period), then the
components, then the store (which flushes its writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health, health_pb2

from cloudburst import protocol
from cloudburst.errors import CloudburstError, ProtocolMismatchError, UnavailableError
from cloudburst.rpc import error_from_rpc
from cloudburst.transport import CLIENT_CERT_PORT_META, SCHEDULER_SERVICE
from cloudburst.v1 import (
    diagnostics_service_pb2,
    diagnostics_service_pb2_grpc,
    executor_service_pb2,
    executor_service_pb2_grpc,
    kvs_service_pb2_grpc,
    messaging_service_pb2,
    messaging_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_executors.cache import ValueCache
from cloudburst_executors.executor import Executor
from cloudburst_executors.servicer import ExecutorServicer, LocalExecutorPeer
from cloudburst_grpc import telemetry
from cloudburst_grpc.config import Config, ConfigError
from cloudburst_grpc.diagnostics import DiagnosticsServicer
from cloudburst_grpc.discovery.consul import (
    CHECK_GRPC,
    EXECUTOR_SERVICE,
    KVS_SERVICE,
    ConsulClient,
    Instance,
    Registration,
    ServiceWatch,
)
from cloudburst_grpc.executor_client import ExecutorPeer, PeerDirectory, RemoteExecutorPeer
from cloudburst_grpc.kvs_access import KvsAccess
from cloudburst_grpc.kvs_proxy import KvsProxyServicer
from cloudburst_grpc.messaging.mailbox import MailboxRouter
from cloudburst_grpc.messaging.service import AnswerOutbox, MessagingPeers, MessagingServicer
from cloudburst_grpc.scheduler.core import Scheduler
from cloudburst_grpc.scheduler.pool import ExecutorPool
from cloudburst_grpc.scheduler.servicer import SchedulerServicer
from cloudburst_grpc.security.consul_ca import ConsulCaSource, default_grpc_address
from cloudburst_grpc.security.identity import EXECUTOR, KVS, SCHEDULER, role_dns_name
from cloudburst_grpc.security.intentions import IntentionCheck
from cloudburst_grpc.security.internal import InternalCa, leaf_seconds
from cloudburst_grpc.security.node import NodeSecurity
from cloudburst_grpc.security.tls import CertificateSource, TlsError
from cloudburst_grpc.server import (
    bind,
    create_server,
    enable_reflection,
    peer_channel,
)
from cloudburst_grpc.supervisor import Supervisor
from cloudburst_kvs.access import EndpointKvs, InProcessKvs, KvsEndpoint
from cloudburst_kvs.backend import LatticeBackend
from cloudburst_kvs.local import SERVICE_NAME as KVS_SERVICE_NAME
from cloudburst_kvs.local import add_kvs_to_server, open_backend, open_store
from cloudburst_kvs.store import LatticeStore

logger = logging.getLogger(__name__)

SCHEDULER_SERVICE_NAME = scheduler_service_pb2.DESCRIPTOR.services_by_name[
    "SchedulerService"
].full_name
EXECUTOR_SERVICE_NAME = executor_service_pb2.DESCRIPTOR.services_by_name[
    "ExecutorService"
].full_name
DIAGNOSTICS_SERVICE_NAME = diagnostics_service_pb2.DESCRIPTOR.services_by_name[
    "DiagnosticsService"
].full_name
MESSAGING_SERVICE_NAME = messaging_service_pb2.DESCRIPTOR.services_by_name[
    "MessagingService"
].full_name


@dataclass
class Node:
    """A running server and the components it serves."""

    role: str
    """What it runs: ``serve``, ``kvs``, ``scheduler`` or ``executor``."""
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    """The port bound (useful when 0 was asked for)."""
    host: str
    config: Config
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    scheduler: Scheduler | None = None
    executors: list[Executor] = field(default_factory=list)
    store: LatticeBackend | None = None
    registration: Registration | None = None
    """The node's Consul registration, when discovery is on."""
    answers: AnswerOutbox | None = None
    """Answers to messages from other processes, held to ride on messages back."""
    router: MailboxRouter | None = None
    """The mailboxes of the node's functions, when it runs executors."""
    abandoned: list[tuple[str, str]] = field(default_factory=list)
    """(call id, function name) of the user functions still running when :meth:`stop`
    ended the grace period: their threads cannot be stopped, so the process exits
    without them."""
    security: NodeSecurity | None = None
    """TLS material and authorization of this node (off without TLS)."""
    end_streams: Callable[[float], Awaitable[bool]] | None = None
    """Ends the streams peers keep open to the node's executor, once its calls answered;
    whether streams are left that wait on callers that do not read them."""
    end_kvs_streams: Callable[[float], Awaitable[None]] | None = None
    """Ends the op streams clients keep open to the node's KVS, once their ops answered."""
    supervisor: Supervisor | None = None
    """The executor processes of a ``cbgrpc serve`` that isolates user code."""
    _stopped: bool = False

    @property
    def advertise_host(self) -> str:
        """The host other processes reach this node at."""
        if self.config.server.advertise_host:
            return self.config.server.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def address(self) -> str:
        """``host:port`` to reach the node."""
        host = self.advertise_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Shut down in reverse order of start-up; idempotent.

        Health turns NOT_SERVING (Consul stops routing here), the node leaves
        Consul, running user code gets the grace period to finish, then the
        server stops and the components close. Draining the executors and
        stopping the server share the one grace period, so user code that
        never returns holds up neither for longer (see :attr:`abandoned`).
        """
        if self._stopped:
            return
        self._stopped = True
        limit = self.config.server.grace_seconds if grace is None else grace
        deadline = asyncio.get_running_loop().time() + limit
        await self.health.enter_graceful_shutdown()
        if self.registration is not None:
            await self.registration.stop()
        if self.executors:
            await asyncio.gather(*(e.drain(limit) for e in self.executors))
        stalled = False
        if self.end_streams is not None:
            # Calls that came on streams (most of them) are waited for here.
            stalled = await self.end_streams(deadline - asyncio.get_running_loop().time())
        if self.executors:
            self.abandoned = self.running_calls()
        if self.supervisor is not None:
            # Each child drains its own calls for the grace period (naming those it abandons).
            await self.supervisor.stop(limit)
        if self.scheduler is not None:
            # It would take the end of its watch for a lost KVS and try again.
            await self.scheduler.stop_following()
        if self.store is not None:
            # Watches never end by themselves; end them so stop() need not wait out its grace.
            self.store.end_watches()
        if self.end_kvs_streams is not None:
            await self.end_kvs_streams(deadline - asyncio.get_running_loop().time())
        # Streams whose callers do not read would hold the server for its whole grace period;
        # gRPC cancels calls only all at once, and every other call has ended by now.
        grace = 0.0 if stalled else max(deadline - asyncio.get_running_loop().time(), 0.0)
        await self.server.stop(grace)
        await self.stack.aclose()
        logger.info("%s on port %d stopped", self.role, self.port)

    def executor_addresses(self) -> list[str]:
        """The addresses of the node's executor processes (none when they run in-process)."""
        if self.supervisor is None:
            return []
        return [c.address for c in self.supervisor.children if c.address]

    def running_calls(self) -> list[tuple[str, str]]:
        """(call id, function name) of the user functions running now; any thread."""
        calls: list[tuple[str, str]] = []
        for executor in self.executors:
            for _ in range(3):  # the loop may change the dict meanwhile: copy again
                try:
                    calls.extend(list(executor.running.values()))
                    break
                except RuntimeError:
                    continue
        return sorted(calls)


async def _serve(node: Node, services: list[str]) -> None:
    enable_reflection(node.server, services)
    await node.server.start()
    for service in ["", *services]:
        await node.health.set(service, health_pb2.HealthCheckResponse.SERVING)


async def _consul_certificates(
    config: Config, role: str, service: str, stack: contextlib.AsyncExitStack
) -> ConsulCaSource | None:
    """With ``security.tls_source = "consul"``: this node's certificate from Consul's CA.

    A scheduler must then take tokens: no client can have a certificate from
    that CA. The certificate names the role's DNS name (which peers verify), the
    advertised and bound hosts and loopback; it is renewed and follows CA
    rotations until the node stops.

    Raises:
        ConfigError: No certificate before the start deadline; the message says why.
    """
    security = config.security
    if security.tls_source != "consul" or not config.consul.enabled:
        return None
    if role == SCHEDULER and not security.tokens_file:
        raise ConfigError(
            "a scheduler with certificates from Consul's CA needs --tokens-file "
            "(security.tokens_file): Consul's CA issues no client certificates, so clients "
            "must show tokens"
        )
    client = ConsulClient(config.consul)
    stack.push_async_callback(client.close)
    host = config.server.host
    hosts = [role_dns_name(role, security.trust_domain)]
    if config.server.advertise_host:
        hosts.append(config.server.advertise_host)
    if host not in ("0.0.0.0", "::", ""):
        hosts.append(host)
    hosts += ["127.0.0.1", "localhost"]
    try:
        source = ConsulCaSource(
            client,
            service,
            hosts,
            security.consul_grpc_address or default_grpc_address(config.consul),
            security.trust_domain,
        )
        stack.push_async_callback(source.close)  # also when the start fails: its channel
        await source.start()
    except TlsError as exc:
        raise ConfigError(f"security: {exc}") from None
    return source


def _new_server(
    config: Config, role: str, certificates: CertificateSource | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int, NodeSecurity]:
    security = NodeSecurity.from_config(config.security, certificates)
    security.check_bind(config.server.host)
    server, health_servicer = create_server(
        config.server.max_payload_bytes,
        security.interceptor(),
        {KVS: "KVS", "serve": "cbgrpc serve"}.get(role, role),
    )
    port = bind(server, config.server.host, config.server.port, security.server_credentials(role))
    wanted = config.security.client_cert_port
    if role == SCHEDULER and wanted >= 0 and security.tls is not None:
        # The main port takes tokens and so cannot ask for certificates (gRPC Python either
        # requires one in every handshake or asks for none); this one requires them.
        credentials = security.tls.server_credentials(require_client_cert=True)
        security.client_cert_port = bind(server, config.server.host, wanted, credentials)
    return server, health_servicer, port, security


async def _open_store(config: Config, stack: contextlib.AsyncExitStack) -> LatticeStore:
    store = open_store(config.kvs, config.server.max_payload_bytes)
    await store.start()
    stack.push_async_callback(store.close)
    return store


async def _open_backend(config: Config, stack: contextlib.AsyncExitStack) -> LatticeBackend:
    store = open_backend(config.kvs, config.server.max_payload_bytes)
    await store.start()
    stack.push_async_callback(store.close)
    return store


class _PoolReports:
    """Hands what remote executors report to a scheduler's pool, once the pool exists.

    The pool is built from the peer directory, and the directory's peers report
    to the pool: this breaks the cycle. Reports before the pool exists are dropped.
    """

    def __init__(self) -> None:
        self.pool: ExecutorPool | None = None

    def broken(self, executor_id: str, reason: str) -> None:
        if self.pool is not None:
            self.pool.set_aside(executor_id, reason)

    def cached(self, executor_id: str, report: executor_service_pb2.CacheReport) -> None:
        if self.pool is not None:
            self.pool.note_cached(executor_id, report.added, report.removed, report.full)


def _remote_factory(
    peer_id: str,
    config: Config,
    security: NodeSecurity,
    reports: _PoolReports | None = None,
) -> PeerDirectory:
    def factory(executor_id: str, address: str) -> ExecutorPeer:
        return RemoteExecutorPeer(
            executor_id,
            address,
            peer_id,
            config.server.max_payload_bytes,
            reports.broken if reports is not None else None,
            tls=security.tls,
            on_cache_report=reports.cached if reports is not None else None,
        )

    return PeerDirectory(factory)


def _messaging(
    node: Node,
    peer_id: str,
    address: str | None = None,
    tls: CertificateSource | None = None,
) -> MailboxRouter:
    """Serve MessagingService on the node and return its mailbox router.

    Args:
        node: The node to serve it on.
        peer_id: The node's name towards its peers.
        address: Where the node's peers reach its mailboxes; the node's address if None.
        tls: The material of its channels to peers; the node's own if None.
    """
    config = node.config
    address = address or node.address
    if tls is None and node.security is not None:
        tls = node.security.tls
    # Answers to messages from a process ride on messages going back to it.
    outbox = node.answers = AnswerOutbox()
    peers = MessagingPeers(
        peer_id,
        config.server.max_payload_bytes,
        address,
        outbox,
        tls=tls,
    )
    node.stack.push_async_callback(peers.close)
    router = MailboxRouter(
        address,
        peers.forward,
        config.executor.mailbox_capacity,
        config.executor.send_timeout_seconds,
        peers.post,
    )
    node.router = router
    messaging_service_pb2_grpc.add_MessagingServiceServicer_to_server(
        MessagingServicer(router, outbox, peers.answered), node.server
    )
    return router


async def start_local(config: Config) -> Node:
    """Start the KVS and scheduler in this process, served on one port, and the executors.

    With ``executor.isolation = "process"`` each executor is a child process
    (see :mod:`cloudburst_grpc.supervisor`); with ``"none"`` they run here.
    """
    isolated = config.executor.isolation == "process"
    stack = contextlib.AsyncExitStack()
    try:
        store = await _open_store(config, stack)
        kvs = InProcessKvs(store, config.kvs.max_wait_seconds)
        server, health_servicer, port, security = _new_server(config, "serve")
        node = Node(
            "serve", server, health_servicer, port, config.server.host, config, stack, store=store
        )
        node.security = security
        internal_address = node.address
        internal_ca: InternalCa | None = None
        # Whom the node's own channels (to executors, to mailboxes) trust and show.
        peer_security = security
        if isolated and security.tls is not None:
            # The children get certificates from a CA of this process, not the user's: they
            # reach this node on a loopback port of its own that takes only those.
            internal_ca = InternalCa(config.security.trust_domain, leaf_seconds(os.environ))
            internal_port = bind(
                server,
                "127.0.0.1",
                0,
                internal_ca.source.server_credentials(require_client_cert=True),
            )
            internal_address = f"127.0.0.1:{internal_port}"
            peer_security = replace(security, tls=internal_ca.source)
        reports = _PoolReports()
        peers = _remote_factory("scheduler-local", config, peer_security, reports)
        stack.push_async_callback(peers.close)
        router = _messaging(node, "serve", internal_address, peer_security.tls)
        pool = reports.pool = ExecutorPool(peers)
        for index in range(0 if isolated else config.executor.count):
            executor = Executor(
                f"executor-{index}",
                f"local:executor-{index}",
                config.executor,
                kvs,
                peers,
                config.server.max_payload_bytes,
                config.scheduler.call_timeout_seconds,
                router,
            )
            executor.allow_values(config.kvs.max_value_bytes)
            stack.push_async_callback(executor.close)
            node.executors.append(executor)
            peers.add_local(LocalExecutorPeer(executor))
            pool.add(executor.executor_id, executor.address)
        scheduler = Scheduler(
            "scheduler-local",
            kvs,
            pool,
            config.scheduler,
            config.server.max_payload_bytes,
            # The KVS is here and isolated executors are not: storing a result here is a call
            # in this process, where an executor's store is a request and a report back.
            stores_results=isolated,
            # Clients reach only the server's one port, not its executors: no answer streams.
            direct_answers=False,
        )
        stack.push_async_callback(scheduler.close)
        node.scheduler = scheduler
        await scheduler.start()
        node.end_kvs_streams = add_kvs_to_server(
            server, store, config.kvs, config.server.max_payload_bytes
        ).end_streams
        scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
            SchedulerServicer(scheduler), server
        )
        diagnostics_service_pb2_grpc.add_DiagnosticsServiceServicer_to_server(
            DiagnosticsServicer(
                node.executor_addresses, config.server.max_payload_bytes, peer_security.tls
            ),
            server,
        )
        services = [
            SCHEDULER_SERVICE_NAME,
            KVS_SERVICE_NAME,
            MESSAGING_SERVICE_NAME,
            DIAGNOSTICS_SERVICE_NAME,
        ]
        if isolated:
            # The children use this server's KVS: it serves before they start, but reports
            # SERVING only once they have joined the pool.
            enable_reflection(server, services)
            await server.start()
            supervisor = node.supervisor = Supervisor(
                config,
                internal_address,
                pool,
                scheduler.restore_pins,
                internal_ca=internal_ca,
            )
            stack.push_async_callback(supervisor.stop, 0.0)
            try:
                await supervisor.start()
            except BaseException:
                await server.stop(0)
                raise
            if config.server.metrics_port >= 0:
                telemetry.add_metrics_source(supervisor.metrics_urls)
            await scheduler.restore_pins()
            for service in ["", *services]:
                await node.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        else:
            await scheduler.restore_pins()
            await _serve(node, services)
    except BaseException:
        await stack.aclose()
        raise
    logger.info(
        "cbgrpc serve listening on %s:%d (%d executors%s, %s storage)",
        config.server.host,
        port,
        config.executor.count,
        " in child processes" if isolated else " in this process",
        config.kvs.engine,
    )
    return node


async def _consul(node: Node) -> ConsulClient | None:
    """The node's Consul client when discovery is on (closed with the node).

    With ``security.consul_intentions``, calls from other services are also
    checked against Consul's intentions from here on.
    """
    if not node.config.consul.enabled:
        return None
    client = ConsulClient(node.config.consul)
    node.stack.push_async_callback(client.close)
    if node.config.security.consul_intentions and node.security is not None:
        node.security.use_intentions(IntentionCheck(client, node.role))
    return client


def _register(node: Node, client: ConsulClient | None, name: str, service_id: str) -> None:
    """Register the (serving) node in Consul in the background, retrying until it answers."""
    if client is None:
        return
    # Which release's wire protocol it speaks: schedulers leave executors of another one out.
    meta = {"role": node.role, PROTOCOL_META: str(protocol.protocol_version())}
    if node.security is not None and node.security.insecure_warning:
        meta["security"] = node.security.insecure_warning
    if node.security is not None and node.security.client_cert_port is not None:
        # Clients with certificates dial this port (the SDK's consul:// reads it).
        meta[CLIENT_CERT_PORT_META] = str(node.security.client_cert_port)
    node.registration = Registration(
        client,
        name,
        service_id,
        node.advertise_host,
        node.port,
        meta,
        node.security.check_kind(node.role) if node.security is not None else CHECK_GRPC,
    )
    node.registration.start()


async def _watch(
    node: Node,
    client: ConsulClient,
    name: str,
    on_change: Callable[[list[Instance]], Awaitable[None] | None] | None = None,
) -> ServiceWatch:
    watch = ServiceWatch(client, name, on_change)
    watch.start()
    node.stack.push_async_callback(watch.stop)
    return watch


async def _kvs_endpoint(
    node: Node, client: ConsulClient | None, kvs_address: str | None
) -> KvsEndpoint:
    if kvs_address is None and client is None:
        raise ConfigError(
            "no KVS to use: give its address (--kvs HOST:PORT) or a Consul agent "
            "(--consul HOST:PORT or CONSUL_HTTP_ADDR) to discover it"
        )
    watch = None if kvs_address is not None else await _watch(node, client, KVS_SERVICE)  # type: ignore[arg-type]
    endpoint = KvsEndpoint(
        node.config, kvs_address, watch, tls=node.security.tls if node.security else None
    )
    node.stack.push_async_callback(endpoint.close)
    return endpoint


async def start_kvs_node(config: Config, kvs_id: str | None = None) -> Node:
    """Start a server that runs only the KVS (registered in Consul when discovery is on)."""
    stack = contextlib.AsyncExitStack()
    try:
        store = await _open_backend(config, stack)
        certificates = await _consul_certificates(config, KVS, KVS_SERVICE, stack)
        server, health_servicer, port, security = _new_server(config, KVS, certificates)
        node = Node(
            "kvs", server, health_servicer, port, config.server.host, config, stack, store=store
        )
        node.security = security
        consul = await _consul(node)
        node.end_kvs_streams = add_kvs_to_server(
            server, store, config.kvs, config.server.max_payload_bytes
        ).end_streams
        await _serve(node, [KVS_SERVICE_NAME])
        _register(node, consul, KVS_SERVICE, kvs_id or f"kvs-{node.advertise_host}-{port}")
    except BaseException:
        await stack.aclose()
        raise
    logger.info("kvs listening on %s", node.address)
    return node


async def start_executor_node(
    config: Config,
    kvs_address: str | None = None,
    executor_id: str | None = None,
    certificates: CertificateSource | None = None,
) -> Node:
    """Start a server that runs one executor.

    It uses the KVS at ``kvs_address``, or the passing KVS instances in Consul
    when no address is given; with discovery on it registers itself.
    ``certificates``, when given, is its TLS material (a child of ``cbgrpc
    serve`` gets it from its parent) instead of the configured one.
    """
    stack = contextlib.AsyncExitStack()
    try:
        if certificates is None:
            certificates = await _consul_certificates(config, EXECUTOR, EXECUTOR_SERVICE, stack)
        server, health_servicer, port, security = _new_server(config, EXECUTOR, certificates)
        node = Node("executor", server, health_servicer, port, config.server.host, config, stack)
        node.security = security
        consul = await _consul(node)
        endpoint = await _kvs_endpoint(node, consul, kvs_address)
        executor_id = executor_id or f"executor-{uuid.uuid4().hex[:8]}"
        peers = _remote_factory(executor_id, config, security)
        stack.push_async_callback(peers.close)
        router = _messaging(node, executor_id)
        kvs: KvsAccess = EndpointKvs(endpoint)
        if config.executor.cache_max_bytes > 0:
            kvs = ValueCache(
                EndpointKvs(endpoint),
                config.executor.cache_max_bytes,
                executor_id,
                config.executor.cache_max_entries,
            )
        executor = Executor(
            executor_id,
            node.address,
            config.executor,
            kvs,
            peers,
            config.server.max_payload_bytes,
            config.scheduler.call_timeout_seconds,
            router,
        )
        stack.push_async_callback(executor.close)
        node.executors.append(executor)
        try:  # functions may store values as large as the KVS tier takes (in chunks)
            limits = await (await endpoint.client()).limits(timeout=10.0)
            executor.allow_values(int(limits.max_value_bytes))
        except ProtocolMismatchError as exc:
            # A KVS of another release: this executor could not run anything.
            if protocol.ROLE_KEY not in exc.metadata:
                raise  # not a KVS's refusal: Consul knows only KVS of other releases
            kvs_peer = f"the KVS at {endpoint.address}"
            raise ProtocolMismatchError(protocol.refused_by(kvs_peer, exc), exc.metadata) from None
        except CloudburstError as exc:
            logger.warning(
                "the KVS did not report its limits (%s): values stay in one message", exc
            )
        servicer = ExecutorServicer(executor, config.executor.max_answer_streams)
        node.end_streams = servicer.end_streams
        executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
        services = [EXECUTOR_SERVICE_NAME, MESSAGING_SERVICE_NAME]
        if config.server.timings > 0:  # its part of `cbgrpc timing`, for a supervising serve
            diagnostics_service_pb2_grpc.add_DiagnosticsServiceServicer_to_server(
                DiagnosticsServicer(), server
            )
            services.append(DIAGNOSTICS_SERVICE_NAME)
        await _serve(node, services)
        _register(node, consul, EXECUTOR_SERVICE, executor_id)
    except BaseException:
        await stack.aclose()
        raise
    logger.info("executor %s listening on %s", executor_id, node.address)
    return node


async def start_scheduler_node(
    config: Config,
    kvs_address: str | None = None,
    executor_addresses: list[str] | None = None,
    scheduler_id: str | None = None,
    connect_timeout: float = 30.0,
) -> Node:
    """Start a server that runs a scheduler.

    Executors come from ``executor_addresses``, or, when none are given, from
    the passing executors in Consul, kept current as they join and leave. The
    scheduler also serves KvsService by forwarding to the KVS, so clients need
    only its address.
    """
    stack = contextlib.AsyncExitStack()
    try:
        certificates = await _consul_certificates(config, SCHEDULER, SCHEDULER_SERVICE, stack)
        server, health_servicer, port, security = _new_server(config, SCHEDULER, certificates)
        node = Node("scheduler", server, health_servicer, port, config.server.host, config, stack)
        node.security = security
        consul = await _consul(node)
        endpoint = await _kvs_endpoint(node, consul, kvs_address)
        scheduler_id = scheduler_id or f"scheduler-{uuid.uuid4().hex[:8]}"
        reports = _PoolReports()
        peers = _remote_factory(scheduler_id, config, security, reports)
        stack.push_async_callback(peers.close)
        pool = reports.pool = ExecutorPool(peers)
        scheduler = Scheduler(
            scheduler_id,
            EndpointKvs(endpoint),
            pool,
            config.scheduler,
            config.server.max_payload_bytes,
        )
        stack.push_async_callback(scheduler.close)
        node.scheduler = scheduler
        await scheduler.start()
        if executor_addresses:
            for address in executor_addresses:
                try:
                    status = await _executor_status(config, security, address, connect_timeout)
                except ProtocolMismatchError as exc:
                    # Another release: it stays out of the pool (the error says what to do).
                    protocol.log_once(logger, f"the executor at {address}", exc)
                    continue
                pool.add(status.executor_id, address)
            await scheduler.restore_pins()
        elif consul is not None:

            async def membership(instances: list[Instance]) -> None:
                added = await pool.sync(
                    (i.service_id, i.address) for i in instances if _same_protocol(i)
                )
                if added:
                    await scheduler.restore_pins()

            await _watch(node, consul, EXECUTOR_SERVICE, membership)
        else:
            raise ConfigError(
                "no executors to use: give their addresses (--executor HOST:PORT, repeated) or a "
                "Consul agent (--consul HOST:PORT or CONSUL_HTTP_ADDR) to discover them"
            )
        scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
            SchedulerServicer(scheduler), server
        )
        kvs_service_pb2_grpc.add_KvsServiceServicer_to_server(
            KvsProxyServicer(
                endpoint.channel,
                endpoint.unreachable,
                lambda: endpoint.address,
                _direct_kvs(config, endpoint),
                config.server.max_payload_bytes,
            ),
            server,
        )
        await _serve(node, [SCHEDULER_SERVICE_NAME, KVS_SERVICE_NAME])
        _register(node, consul, SCHEDULER_SERVICE, scheduler_id)
    except BaseException:
        await stack.aclose()
        raise
    logger.info("scheduler %s listening on %s", scheduler_id, node.address)
    if security.client_cert_port is not None:
        logger.info(
            "scheduler %s takes clients with certificates on %s:%d",
            scheduler_id,
            node.advertise_host,
            security.client_cert_port,
        )
    return node


#: The Consul service meta key that holds the wire protocol version a node speaks.
PROTOCOL_META = protocol.META_KEY


def _same_protocol(instance: Instance) -> bool:
    """Whether a discovered node speaks this process's wire protocol (or does not say).

    One that speaks another is logged, once, and left out.
    """
    if protocol.same_release(instance.meta):
        return True
    theirs = instance.meta[PROTOCOL_META]
    ours = str(protocol.protocol_version())
    key = (instance.service_id, theirs)
    if key not in _OTHER_PROTOCOLS:
        _OTHER_PROTOCOLS.add(key)
        logger.error(
            "executor %s at %s speaks cloudburst-grpc wire protocol %s (its Consul meta), this "
            "scheduler speaks %s: it stays out of the pool; %s",
            instance.service_id,
            instance.address,
            theirs,
            ours,
            protocol.ADVICE,
        )
    return False


#: The discovered nodes of another protocol already logged (service id, version).
_OTHER_PROTOCOLS: set[tuple[str, str]] = set()


def _direct_kvs(config: Config, endpoint: KvsEndpoint) -> Callable[[], Awaitable[list[str]]] | None:
    """What tells clients where to call the KVS directly; None sends them through the scheduler.

    With TLS the KVS's port demands a client certificate (docs/security.md):
    clients that show one call it directly, with their role checked there as
    here; clients with a token fail its handshake and stay with the scheduler.
    """
    if not config.scheduler.direct_kvs:
        return None
    fixed = config.scheduler.direct_kvs_address

    async def addresses() -> list[str]:
        return [fixed or await endpoint.resolved_address()]

    return addresses


async def _executor_status(
    config: Config, security: NodeSecurity, address: str, timeout: float
) -> executor_service_pb2.GetExecutorStatusResponse:
    channel = peer_channel(address, config.server.max_payload_bytes, security.tls, EXECUTOR)
    async with channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        try:
            return await stub.GetExecutorStatus(
                executor_service_pb2.GetExecutorStatusRequest(),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            refusal = error_from_rpc(exc)
            if isinstance(refusal, ProtocolMismatchError):
                raise refusal from None
            raise UnavailableError(
                f"cannot reach the executor at {address} within {timeout:.0f}s: {exc.details()}"
            ) from None
