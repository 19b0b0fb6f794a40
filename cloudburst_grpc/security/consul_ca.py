"""Certificates from Consul's service-mesh (Connect) CA, renewed and rotated in the background.

A service makes its own key and a certificate signing request naming its
Consul service in a SPIFFE URI (``spiffe://<trust domain>/ns/default/dc/<dc>/
svc/cloudburst-executor``, which Consul checks against the ACL token) and the
DNS names and addresses peers and clients dial it by (Consul copies those into
the certificate, so gRPC clients can verify them). A Consul server signs it
through its gRPC API (``ConnectCAService.Sign``); the CA roots and the trust
domain come from the HTTP API (``/v1/connect/ca/roots``) with blocking
queries, so a new root is seen at once. The leaf is signed again at half its
lifetime and whenever the active root changes; servers and peer channels pick
up the new material as they do changed files.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloudburst_grpc.config import ConsulConfig
from cloudburst_grpc.discovery.consul import ConsulClient
from cloudburst_grpc.security import consul_connectca_pb2, consul_connectca_pb2_grpc
from cloudburst_grpc.security.identity import DEFAULT_TRUST_DOMAIN
from cloudburst_grpc.security.tls import CertificateSource, TlsError, TlsMaterial, check_material

logger = logging.getLogger(__name__)

#: Consul's default gRPC ports: plaintext, and TLS.
GRPC_PORT = 8502
GRPC_TLS_PORT = 8503
#: Seconds a start waits for Consul's CA before it gives up.
START_SECONDS = 60.0
#: Seconds one Sign call may take.
SIGN_SECONDS = 15.0
#: Longest blocking query on the roots, and longest pause between retries.
WATCH_SECONDS = 30.0
RETRY_MAX_SECONDS = 10.0
#: Sign failures after which the channel is made anew: a ``servers`` address asks the agent
#: for the servers again, and TLS files (consul.ca_file, cert_file, key_file) are read again.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: The leaf is renewed once this fraction of its lifetime has passed.
RENEW_FRACTION = 0.5


def default_grpc_address(consul: ConsulConfig) -> str:
    """Consul's gRPC API beside its HTTP API: the same host, port 8502 (8503 for https)."""
    text = consul.address if "//" in consul.address else "//" + consul.address
    parsed = urllib.parse.urlparse(text)
    host = parsed.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    if parsed.scheme == "https" or (not parsed.scheme and consul.ssl):
        return f"https://{host}:{GRPC_TLS_PORT}"
    return f"{host}:{GRPC_PORT}"


#: ``security.consul_grpc_address`` naming every Consul server the local agent knows.
SERVERS = "servers"


@dataclass(frozen=True)
class ServersAddress:
    """``servers[:port]`` or ``https://servers[:port]``: each Consul server's gRPC API."""

    port: int
    tls: bool


def parse_servers_address(address: str) -> ServersAddress | None:
    """The port and TLS of a ``servers`` address; None for an address naming a host.

    ``servers`` dials port 8502 in plaintext, ``https://servers`` port 8503 with
    TLS; ``servers:PORT`` and ``https://servers:PORT`` pick the port.

    Raises:
        TlsError: ``servers:`` followed by something other than a port.
    """
    tls = address.startswith("https://")
    rest = address.removeprefix("https://").removeprefix("http://")
    host, sep, port = rest.partition(":")
    if host != SERVERS:
        return None
    if not sep:
        return ServersAddress(GRPC_TLS_PORT if tls else GRPC_PORT, tls)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise TlsError(
            f"security.consul_grpc_address {address!r}: after 'servers:' comes the Consul "
            "servers' gRPC port, e.g. servers:8502"
        )
    return ServersAddress(int(port), tls)


def servers_target(peers: Sequence[str], port: int) -> str:
    """A gRPC target naming ``port`` on every server in ``peers`` (``/v1/status/peers``).

    ``peers`` are the servers' RPC addresses, ``10.0.0.1:8300`` or ``[fd00::1]:8300``;
    the result, e.g. ``ipv4:10.0.0.1:8502,10.0.0.2:8502``, lets gRPC try the servers
    in turn until one answers. IPv4 addresses are used when there are any.

    Raises:
        TlsError: No server address in ``peers``.
    """
    v4: list[str] = []
    v6: list[str] = []
    for peer in peers:
        host = peer.rpartition(":")[0].strip("[]") if ":" in peer else peer
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.version == 4:
            v4.append(f"{ip}:{port}")
        else:
            v6.append(f"[{ip}]:{port}")
    if v4:
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    if v6:
        return "ipv6:" + ",".join(dict.fromkeys(v6))
    raise TlsError(
        "the Consul agent knows no servers (/v1/status/peers answered "
        f"{list(peers)!r}): has it joined the cluster?"
    )


@dataclass(frozen=True)
class Roots:
    """The CA roots Consul reports."""

    trust_domain: str
    active_id: str
    ca_pem: bytes
    """Every root with its intermediates: peers' leaves from before a rotation still verify."""


def parse_roots(body: dict[str, Any]) -> Roots:
    """Roots from the body of ``/v1/connect/ca/roots``."""
    pems: list[str] = []
    for root in body.get("Roots") or []:
        pems.append(str(root["RootCert"]).strip() + "\n")
        pems.extend(str(cert).strip() + "\n" for cert in root.get("IntermediateCerts") or [])
    return Roots(str(body["TrustDomain"]), str(body["ActiveRootID"]), "".join(pems).encode())


def service_uri(trust_domain: str, datacenter: str, service: str) -> str:
    """The SPIFFE id Consul issues to ``service`` (default namespace)."""
    return f"spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}"


def make_csr(uri: str, hosts: Sequence[str]) -> tuple[bytes, bytes]:
    """A new P-256 key and a CSR for it with ``uri`` and ``hosts`` (DNS names or IPs) as SANs.

    Returns:
        (key PEM, CSR PEM).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _tls_problem(details: str, consul: ConsulConfig) -> str | None:
    """What a failed TLS connection to Consul's gRPC API says to check; None if TLS was fine.

    ``details`` is gRPC's description of the failed connection, e.g. ``... Tls handshake
    failed (TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED ...``.
    """
    if "CERTIFICATE_VERIFY_FAILED" in details:
        if consul.ca_file:
            trusted = f"consul.ca_file / CONSUL_CACERT ({consul.ca_file})"
        else:
            trusted = "the system's CAs (set consul.ca_file / CONSUL_CACERT to Consul's CA)"
        return f"its certificate is not signed by a CA in {trusted}"
    if "Hostname Verification" in details:
        if consul.tls_server_name:
            return (
                "its certificate does not name consul.tls_server_name / "
                f"CONSUL_TLS_SERVER_NAME ({consul.tls_server_name})"
            )
        return (
            "its certificate does not name the host dialled (with https://servers: "
            "server.<datacenter>.consul; for another name, e.g. a Consul domain other "
            "than consul, set consul.tls_server_name / CONSUL_TLS_SERVER_NAME)"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return (
            "it does not speak TLS: that is the plaintext gRPC port (ports.grpc, 8502; "
            "dial it without https://); Consul's TLS port is ports.grpc_tls (8503)"
        )
    if "TSI_" in details or "SSL" in details or "Tls" in details:
        if consul.cert_file:
            return (
                "Consul refused the connection: does it trust the CA of consul.cert_file / "
                f"CONSUL_CLIENT_CERT ({consul.cert_file})?"
            )
        return (
            "Consul refused the connection: when its gRPC port requires client certificates "
            "(tls.grpc.verify_incoming), set consul.cert_file and key_file "
            "(CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY)"
        )
    return None


def _explain(exc: BaseException, grpc_address: str, service: str, consul: ConsulConfig) -> str:
    """A sentence for a failed request to Consul that says what to check."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return (
                f"Consul refused to sign a certificate for {service}: the ACL token "
                f"(consul.token / CONSUL_HTTP_TOKEN) needs service:write on {service} "
                f"({exc.details()})"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            details = exc.details() or ""
            problem = None
            if grpc_address.startswith("https://"):
                problem = _tls_problem(details, consul)
            if problem is not None:
                return (
                    f"the TLS connection to Consul's gRPC API at {grpc_address} failed: "
                    f"{problem} ({details})"
                )
            return (
                f"cannot reach Consul's gRPC API at {grpc_address} (a Consul server's gRPC "
                "port: 8502 in plaintext, 8503 over TLS as https://HOST:8503; set "
                f"security.consul_grpc_address / --consul-grpc): {details}"
            )
        return f"Consul's CA at {grpc_address} answered {code.name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "Consul did not answer in time"
    if "Connect must be enabled" in str(exc):
        return (
            "Consul's service-mesh CA is off: enable Connect on the Consul servers "
            "(connect { enabled = true })"
        )
    return f"{type(exc).__name__}: {exc}"


def _read(path: str, setting: str) -> bytes | None:
    """The bytes of the file ``path`` names (None for no path).

    Raises:
        TlsError: The file cannot be read; names ``setting``.
    """
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsError(f"cannot read {setting} {path!r}: {exc.strerror}") from None


class ConsulCaSource(CertificateSource):
    """This service's certificate from Consul's CA, kept current by a background task.

    :meth:`start` obtains the first certificate (or raises after its
    deadline); :meth:`close` stops the task. :meth:`current` never waits.
    """

    def __init__(
        self,
        consul: ConsulClient,
        service: str,
        hosts: Sequence[str],
        grpc_address: str,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        renew_fraction: float = RENEW_FRACTION,
    ) -> None:
        """Prepare to obtain certificates for Consul service ``service``.

        Args:
            consul: The Consul HTTP client (roots, datacenter; its token signs too).
            service: The Consul service name, e.g. ``cloudburst-executor``.
            hosts: DNS names and IP addresses the certificate names besides the
                URI (the role's ``<role>.<trust_domain>`` that peers verify, the
                advertised host, loopback).
            grpc_address: Consul's gRPC API, ``host:port`` or ``https://host:port``.
            trust_domain: The domain of the role DNS names peers verify (not Consul's).
            renew_fraction: Part of a leaf's lifetime after which it is renewed.

        Raises:
            TlsError: ``grpc_address`` is ``servers:`` with something other than a port.
        """
        parse_servers_address(grpc_address)  # a typo fails now, not after the start's deadline
        self.consul = consul
        self.service = service
        self.hosts = list(hosts)
        self.grpc_address = grpc_address
        self.trust_domain = trust_domain
        self._renew_fraction = renew_fraction
        self._lock = threading.Lock()
        self._material: TlsMaterial | None = None
        self._roots: Roots | None = None
        self._renew_at = 0.0
        self._datacenter = ""
        self._channel: grpc.aio.Channel | None = None
        self._dialled = grpc_address
        """What the channel dials, for messages (the servers' addresses in servers mode)."""
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.generation = 0

    def current(self) -> TlsMaterial:
        """The newest certificate, key and roots.

        Raises:
            TlsError: Before :meth:`start` succeeded.
        """
        material = self._material
        if material is None:
            raise TlsError("no certificate from Consul's CA yet")
        return material

    async def _open_channel(self) -> grpc.aio.Channel:
        """A channel to the configured address, or to every server the agent knows."""
        address = self.grpc_address
        options: list[tuple[str, str]] = []
        servers = parse_servers_address(address)
        if servers is not None:
            peers = await asyncio.wait_for(self.consul.server_peers(), SIGN_SECONDS)
            target = servers_target(peers, servers.port)
            self._dialled = f"{address} ({target})"
            address = ("https://" if servers.tls else "") + target
        if address.startswith("https://"):
            name = self.consul.config.tls_server_name
            if not name and servers is not None:
                # Dialled by IP: Consul's server certificates name server.<dc>.<domain>.
                name = f"server.{self._datacenter}.consul"
            if name:
                options.append(("grpc.ssl_target_name_override", name))
        return self._channel_to(address, options)

    def _channel_to(self, address: str, options: list[tuple[str, str]]) -> grpc.aio.Channel:
        """A channel to ``address``: for ``https://``, TLS trusting consul.ca_file.

        consul.cert_file and key_file, when set, are shown as the client certificate
        (Consul asks for one when ``tls.grpc.verify_incoming`` is on).
        """
        if not address.startswith("https://"):
            return grpc.aio.insecure_channel(address.removeprefix("http://"))
        config = self.consul.config
        roots = _read(config.ca_file, "consul.ca_file / CONSUL_CACERT")
        key = _read(config.key_file, "consul.key_file / CONSUL_CLIENT_KEY")
        chain = _read(config.cert_file, "consul.cert_file / CONSUL_CLIENT_CERT")
        if (key is None) != (chain is None):
            raise TlsError(
                "a client certificate for Consul needs both consul.cert_file and key_file "
                "(CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)"
            )
        credentials = grpc.ssl_channel_credentials(roots, key, chain)
        return grpc.aio.secure_channel(address.removeprefix("https://"), credentials, options)

    async def _sign(self, roots: Roots) -> None:
        """Have Consul sign a new key's CSR; install it with ``roots``."""
        if not self._datacenter:
            self._datacenter = await asyncio.wait_for(self.consul.datacenter(), SIGN_SECONDS)
        uri = service_uri(roots.trust_domain, self._datacenter, self.service)
        key_pem, csr_pem = make_csr(uri, self.hosts)
        if self._channel is None:
            self._channel = await self._open_channel()
        stub = consul_connectca_pb2_grpc.ConnectCAServiceStub(self._channel)
        token = self.consul.config.token
        metadata = (("x-consul-token", token),) if token else None
        try:
            response = await stub.Sign(
                consul_connectca_pb2.SignRequest(csr=csr_pem.decode()),
                timeout=SIGN_SECONDS,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                # The servers may have been replaced, or Consul's TLS files renewed (a wrong
                # CA fixed, a client certificate that expired): start afresh next time.
                channel, self._channel = self._channel, None
                await channel.close()
            raise
        cert_pem = response.cert_pem.encode()
        material = TlsMaterial(cert_pem, key_pem, roots.ca_pem)
        check_material(material, f"the certificate Consul signed for {self.service}")
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        start = leaf.not_valid_before_utc.timestamp()
        end = leaf.not_valid_after_utc.timestamp()
        renew_wall = start + (end - start) * self._renew_fraction
        now_wall = datetime.now(UTC).timestamp()
        with self._lock:
            self._material = material
            self._roots = roots
            self._renew_at = time.monotonic() + max(renew_wall - now_wall, 1.0)
            self.generation += 1
        async with self._changed:
            self._changed.notify_all()
        logger.info(
            "certificate for %s from Consul's CA (root %s), valid until %s; renewing in %.0fs",
            uri,
            roots.active_id,
            leaf.not_valid_after_utc.isoformat(),
            self._renew_at - time.monotonic(),
        )

    def _install_roots(self, roots: Roots) -> None:
        """Trust a changed set of roots with the current leaf (a root added or pruned)."""
        with self._lock:
            if self._material is None:
                return
            self._material = TlsMaterial(
                self._material.cert_pem, self._material.key_pem, roots.ca_pem
            )
            self._roots = roots
            self.generation += 1
        logger.info("Consul's CA roots changed; trusting %s", roots.active_id)

    async def wait_beyond(self, generation: int) -> int:
        """Wait until a certificate newer than ``generation`` is in use; returns its generation."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation > generation)
        return self.generation

    async def start(self, deadline_seconds: float = START_SECONDS) -> None:
        """Obtain the first certificate, retrying with back-off, then follow changes.

        Raises:
            TlsError: No certificate within ``deadline_seconds``; says why.
        """
        deadline = time.monotonic() + deadline_seconds
        attempt = 0
        while True:
            try:
                # One attempt never outlasts the deadline either.
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    _, body = await self.consul.ca_roots(None, SIGN_SECONDS)
                    await self._sign(parse_roots(body))
                break
            except Exception as exc:  # anything Consul or the network does: retry
                reason = _explain(exc, self._dialled, self.service, self.consul.config)
                delay = min(RETRY_MAX_SECONDS, 0.25 * 2.0**attempt)
                if time.monotonic() + delay > deadline:
                    raise TlsError(
                        f"no certificate from Consul's CA within {deadline_seconds:.0f}s: {reason}"
                    ) from None
                logger.warning(
                    "cannot get a certificate from Consul's CA (%s); retrying in %.1fs",
                    reason,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
        self._task = asyncio.create_task(self._follow(), name=f"consul-ca-{self.service}")

    async def _follow(self) -> None:
        """Renew the leaf at half its life and on a new active root; follow root changes."""
        index: str | None = None
        attempt = 0
        while True:
            try:
                roots = self._roots
                assert roots is not None
                if time.monotonic() >= self._renew_at:
                    await self._sign(roots)
                wait = min(WATCH_SECONDS, max(self._renew_at - time.monotonic(), 1.0))
                index, body = await self.consul.ca_roots(index, wait)
                if not index.isdigit() or int(index) < 1:
                    index = "1"  # Consul's advice for an index that cannot block
                new = parse_roots(body)
                if new.active_id != roots.active_id or new.trust_domain != roots.trust_domain:
                    logger.info("Consul's CA has a new active root %s; renewing", new.active_id)
                    await self._sign(new)
                elif new.ca_pem != roots.ca_pem:
                    self._install_roots(new)
                attempt = 0
            except Exception as exc:  # keep the certificate we have; try again
                index = None
                delay = min(RETRY_MAX_SECONDS, 0.25 * 2.0**attempt)
                attempt += 1
                logger.warning(
                    "cannot renew the certificate from Consul's CA (%s); keeping the current "
                    "one, retrying in %.1fs",
                    _explain(exc, self._dialled, self.service, self.consul.config),
                    delay,
                )
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop following Consul and close the gRPC channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
