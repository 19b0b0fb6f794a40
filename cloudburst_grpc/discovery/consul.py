"""Discovery through Consul.

Every process registers itself with a gRPC health check (Consul calls
``grpc.health.v1.Health/Check`` on it) and a deregister-critical-after
backstop, retrying until Consul answers. Peers are found through the health
API (passing instances only) and kept in a local cache that blocking queries
update, so no call looks anything up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cloudburst.errors import UnavailableError
from cloudburst_grpc.config import ConfigError, ConsulConfig

logger = logging.getLogger(__name__)

#: Health checks: gRPC health in plaintext, over TLS, or a TCP connect.
CHECK_GRPC = "grpc"
CHECK_GRPC_TLS = "grpc-tls"
CHECK_TCP = "tcp"

#: Consul service names of the roles clients never look up (schedulers register
#: under :data:`cloudburst.transport.SCHEDULER_SERVICE`, which the SDK discovers).
KVS_SERVICE = "cloudburst-kvs"
EXECUTOR_SERVICE = "cloudburst-executor"

#: How long one blocking query waits on the Consul side.
BLOCKING_WAIT = "30s"


@dataclass(frozen=True)
class Instance:
    """One passing instance of a service."""

    service_id: str
    address: str
    """``host:port`` of its gRPC server."""
    meta: dict[str, str] = field(default_factory=dict)


def _split_address(config: ConsulConfig) -> tuple[str, int, str]:
    text = config.address if "//" in config.address else "//" + config.address
    parsed = urllib.parse.urlparse(text)
    try:
        port = parsed.port or 8500
    except ValueError:
        raise UnavailableError(
            f"consul.address {config.address!r} is not host:port or scheme://host:port"
        ) from None
    scheme = parsed.scheme or ("https" if config.ssl else "http")
    return parsed.hostname or "127.0.0.1", port, scheme


class ConsulClient:
    """The few Consul calls the runtime makes, over py-consul's asyncio client."""

    def __init__(self, config: ConsulConfig) -> None:
        try:
            import consul.aio
        except ImportError:  # pragma: no cover - the extra is part of the dev install
            raise UnavailableError(
                "Consul discovery needs the 'consul' extra: pip install 'cloudburst-grpc[consul]'"
            ) from None
        self.config = config
        host, port, scheme = _split_address(config)
        self.where = f"{scheme}://{host}:{port}"
        verify: bool | str = config.ca_file or config.verify
        cert = (config.cert_file, config.key_file) if config.cert_file else None
        try:
            self._consul: Any = consul.aio.Consul(
                host=host,
                port=port,
                scheme=scheme,
                token=config.token or None,
                verify=verify,
                cert=cert,
            )
        except (OSError, ValueError) as exc:  # unreadable CA, certificate or key files
            raise ConfigError(
                f"cannot use the Consul TLS files (consul.ca_file / cert_file / key_file, or "
                f"CONSUL_CACERT / CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY): {exc}"
            ) from None

    async def register(
        self,
        name: str,
        service_id: str,
        host: str,
        port: int,
        meta: dict[str, str],
        check_kind: str = CHECK_GRPC,
    ) -> None:
        """Register a service with a health check (one attempt).

        ``check_kind`` is :data:`CHECK_GRPC` (gRPC health over plaintext),
        :data:`CHECK_GRPC_TLS` (over TLS; the agent shows no client
        certificate) or :data:`CHECK_TCP` (a port that demands client
        certificates, which Consul's checks cannot show).
        """
        from consul import Check

        interval = f"{self.config.check_interval_seconds}s"
        timeout = f"{max(self.config.check_interval_seconds, 1.0)}s"
        deregister = f"{int(self.config.deregister_after_seconds)}s"
        if check_kind == CHECK_TCP:
            check = Check.tcp(host, port, interval, timeout=timeout, deregister=deregister)
        else:
            check = Check.grpc(
                f"{host}:{port}",
                interval=interval,
                use_tls=True if check_kind == CHECK_GRPC_TLS else None,
                # Consul verifies names against the address; the service's identity is its URI.
                tls_skip_verify=True if check_kind == CHECK_GRPC_TLS else None,
                timeout=timeout,
                deregister=deregister,
            )
        await self._consul.agent.service.register(
            name, service_id=service_id, address=host, port=port, meta=meta, check=check
        )

    async def deregister(self, service_id: str) -> None:
        """Remove a service registration (one attempt)."""
        await self._consul.agent.service.deregister(service_id)

    async def passing(self, name: str, index: str | None) -> tuple[str, list[Instance]]:
        """The passing instances of a service; with ``index``, waits until they change."""
        new_index, nodes = await self._consul.health.service(
            name, passing=True, index=index, wait=BLOCKING_WAIT if index else None
        )
        instances = []
        for node in nodes:
            service = node["Service"]
            host = service.get("Address") or node["Node"]["Address"]
            address = f"[{host}]:{service['Port']}" if ":" in host else f"{host}:{service['Port']}"
            instances.append(Instance(service["ID"], address, dict(service.get("Meta") or {})))
        return str(new_index), sorted(instances, key=lambda i: i.service_id)

    async def pause_after(self, what: str, exc: BaseException, attempt: int) -> None:
        """Log a failed Consul request and wait the back-off before its next attempt."""
        delay = _backoff(attempt, self.config.retry_max_seconds)
        logger.warning(
            "cannot %s in Consul at %s (%s: %s); retrying in %.1fs",
            what,
            self.where,
            type(exc).__name__,
            exc,
            delay,
        )
        await asyncio.sleep(delay)

    async def mesh_identity(self) -> tuple[str, str]:
        """The service-mesh trust domain of the cluster and the agent's datacenter."""
        _, roots = await self.ca_roots(None, 10.0)
        return str(roots["TrustDomain"]), await self.datacenter()

    async def ca_roots(self, index: str | None, wait: float) -> tuple[str, dict[str, Any]]:
        """The service-mesh CA's roots and trust domain; with ``index``, waits until they change.

        Consul holds a blocking query for up to ``wait`` seconds; this call
        gives up ten seconds after that.
        """
        from consul.callback import CB

        params = [("index", index), ("wait", f"{max(int(wait), 1)}s")] if index else []
        new_index, body = await asyncio.wait_for(
            self._consul.http.get(
                CB.json(index=True),
                "/v1/connect/ca/roots",
                params=params,
                headers=self._consul.prepare_headers(None),
            ),
            wait + 10.0,
        )
        if not isinstance(body, dict) or not body.get("Roots"):
            raise UnavailableError(
                f"Consul at {self.where} has no service-mesh CA roots: is Connect enabled "
                "(connect { enabled = true } on its servers)?"
            )
        return str(new_index), body

    async def datacenter(self) -> str:
        """The local agent's datacenter (the token needs ``node:read`` on some node).

        Read from the catalog's nodes, which are the agent's datacenter's, rather
        than from ``/v1/agent/self``, which needs ``agent:read``.
        """
        from consul.callback import CB

        nodes = await self._consul.http.get(
            CB.json(), "/v1/catalog/nodes", headers=self._consul.prepare_headers(None)
        )
        for node in nodes or []:
            if node.get("Datacenter"):
                return str(node["Datacenter"])
        raise UnavailableError(
            f"Consul at {self.where} shows no node, so its datacenter is unknown: the ACL "
            "token (consul.token / CONSUL_HTTP_TOKEN) needs node:read"
        )

    async def server_peers(self) -> list[str]:
        """The Consul servers' RPC addresses (``ip:8300``): ``/v1/status/peers`` of the local agent.

        The agent, client or server, forwards the question to the servers (their Raft peers).
        """
        from consul.callback import CB

        peers = await self._consul.http.get(
            CB.json(), "/v1/status/peers", headers=self._consul.prepare_headers(None)
        )
        return [str(peer) for peer in peers or []]

    async def authorize(self, target: str, client_uri: str, client_serial: str) -> tuple[bool, str]:
        """Ask the agent whether intentions let ``client_uri`` reach service ``target``."""
        import json

        from consul.callback import CB

        # The agent takes POST; py-consul's authorize() sends PUT, which it refuses.
        payload = {"Target": target, "ClientCertURI": client_uri, "ClientCertSerial": client_serial}
        answer = await self._consul.http.post(
            CB.json(),
            "/v1/agent/connect/authorize",
            headers=self._consul.prepare_headers(None),
            data=json.dumps(payload),
        )
        return bool(answer["Authorized"]), str(answer.get("Reason", ""))

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._consul.close()


def _backoff(attempt: int, ceiling: float) -> float:
    return float(min(ceiling, 0.25 * 2.0**attempt)) * (0.75 + random.random() / 2)


class Registration:
    """Keeps one service registered: retries until Consul answers, deregisters on stop."""

    def __init__(
        self,
        client: ConsulClient,
        name: str,
        service_id: str,
        host: str,
        port: int,
        meta: dict[str, str],
        check_kind: str = "grpc",
    ) -> None:
        self._check_kind = check_kind
        self._client = client
        self.name = name
        self.service_id = service_id
        self._host = host
        self._port = port
        self._meta = meta
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Register in the background, retrying with back-off until it succeeds."""
        self._task = asyncio.create_task(self._register())

    async def _register(self) -> None:
        attempt = 0
        while True:
            try:
                await self._client.register(
                    self.name, self.service_id, self._host, self._port, self._meta, self._check_kind
                )
            except Exception as exc:
                await self._client.pause_after(f"register {self.service_id}", exc, attempt)
                attempt += 1
                continue
            logger.info(
                "registered %s (%s) in Consul at %s", self.service_id, self.name, self._client.where
            )
            self.registered.set()
            return

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop retrying and deregister (best effort; the check's backstop covers failures)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self.registered.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._client.deregister(self.service_id)
            logger.info("deregistered %s from Consul", self.service_id)
        except Exception as exc:
            logger.warning("cannot deregister %s from Consul: %s", self.service_id, exc)


OnChange = Callable[[list[Instance]], Awaitable[None] | None]


class ServiceWatch:
    """The passing instances of one service, kept current by Consul blocking queries."""

    def __init__(self, client: ConsulClient, name: str, on_change: OnChange | None = None) -> None:
        self._client = client
        self.name = name
        self._on_change = on_change
        self.instances: list[Instance] = []
        self._changed = asyncio.Condition()
        self.version = 0
        """Counts the changes applied so far."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching in the background."""
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        index: str | None = None
        attempt = 0
        while True:
            try:
                new_index, instances = await self._client.passing(self.name, index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._client.pause_after(f"watch {self.name}", exc, attempt)
                attempt += 1
                continue
            attempt = 0
            if index is not None and new_index < index:
                new_index = "0"  # Consul's index went backwards (agent restart): start over.
            index = new_index
            if instances != self.instances or self.version == 0:
                await self._apply(instances)

    async def _apply(self, instances: list[Instance]) -> None:
        before = {i.service_id for i in self.instances}
        after = {i.service_id for i in instances}
        if before != after:
            logger.info(
                "%s: %d passing (%s)", self.name, len(instances), ", ".join(sorted(after)) or "none"
            )
        self.instances = instances
        if self._on_change is not None:
            result = self._on_change(instances)
            if result is not None:
                await result
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[list[Instance]], bool], timeout: float
    ) -> list[Instance]:
        """Wait until the instances satisfy ``predicate``.

        Raises:
            UnavailableError: They did not within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.version > 0 and predicate(self.instances))
        except TimeoutError:
            raise UnavailableError(
                f"no suitable passing instance of {self.name} in Consul at "
                f"{self._client.where} within {timeout:.0f}s"
            ) from None
        return self.instances

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
