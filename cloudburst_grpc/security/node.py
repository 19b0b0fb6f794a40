"""The security of one node, built from its configuration.

:class:`NodeSecurity` gives a node its server credentials, its authorization
interceptor and the channels it opens to peers, and enforces the safe
default: no listening beyond loopback without TLS unless ``--insecure``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from cloudburst_grpc.config import ConfigError, SecurityConfig
from cloudburst_grpc.security.authz import Authenticator, AuthInterceptor, FailureLimiter
from cloudburst_grpc.security.identity import EXECUTOR, KVS
from cloudburst_grpc.security.intentions import IntentionCheck
from cloudburst_grpc.security.tls import CertificateSource, TlsError, TlsSource
from cloudburst_grpc.security.tokens import TokenFileError, TokenStore

logger = logging.getLogger(__name__)

#: Roles whose port serves only the cluster's own services: their peers must show certificates.
MESH_ONLY_ROLES = (EXECUTOR, KVS)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class NodeSecurity:
    """TLS material, tokens and authorization of one node; all off without TLS."""

    config: SecurityConfig
    tls: CertificateSource | None = None
    tokens: TokenStore | None = None
    client_cert_port: int | None = None
    """The scheduler's port for clients with certificates (``security.client_cert_port``)."""
    _interceptor: AuthInterceptor | None = None

    @classmethod
    def from_config(
        cls, config: SecurityConfig, certificates: CertificateSource | None = None
    ) -> NodeSecurity:
        """Read the TLS and token files named in ``config``.

        ``certificates`` is the source of TLS material when it does not come
        from files (``security.tls_source = "consul"``, or the parent of an
        executor process of ``cbgrpc serve``); given, it turns TLS on.

        Raises:
            ConfigError: A file is missing or malformed; the message names it.
        """
        if not config.tls and certificates is None:
            return cls(config)
        if config.tls_source == "consul" and certificates is None:
            raise ConfigError(
                "security.tls_source 'consul' is for the cluster's services (cbgrpc kvs, "
                "executor, scheduler), which have Consul service names; give cbgrpc serve "
                "certificate files"
            )
        try:
            tls = certificates or TlsSource(
                Path(config.tls_cert).expanduser(),
                Path(config.tls_key).expanduser(),
                Path(config.tls_ca).expanduser(),
                config.trust_domain,
            )
            tokens = (
                TokenStore(Path(config.tokens_file).expanduser()) if config.tokens_file else None
            )
        except (TlsError, TokenFileError) as exc:
            raise ConfigError(f"security: {exc}") from None
        return cls(config, tls, tokens)

    def check_bind(self, host: str) -> None:
        """Refuse a non-loopback address without TLS unless insecure mode was asked for.

        Raises:
            ConfigError: The bind is refused; the message says how to allow it.
        """
        if self.tls is not None or is_loopback(host):
            return
        if not self.config.insecure:
            raise ConfigError(
                f"refusing to listen on {host} without TLS: anyone who reaches it could run "
                "code. Give --tls-cert, --tls-key and --tls-ca (`cbgrpc certs` makes them), "
                "or pass --insecure to accept the risk"
            )
        logger.warning(
            "INSECURE: listening on %s without TLS or authentication (--insecure); "
            "anyone who reaches this port can run code",
            host,
        )

    @property
    def insecure_warning(self) -> str:
        """A non-empty warning when this node runs insecure on purpose."""
        if self.tls is None and self.config.insecure:
            return "insecure: no TLS or authentication (--insecure)"
        return ""

    def interceptor(self) -> AuthInterceptor | None:
        """The authorization interceptor; None without TLS (nothing to authenticate with)."""
        if self.tls is None:
            return None
        if self._interceptor is None:
            self._interceptor = AuthInterceptor(
                Authenticator(self.tokens, (self.config.trust_domain,)),
                FailureLimiter(self.config.max_auth_failures),
            )
        return self._interceptor

    def use_intentions(self, check: IntentionCheck) -> None:
        """Also require Consul's intentions for calls from the cluster's services."""
        interceptor = self.interceptor()
        if interceptor is not None:
            interceptor.intentions = check

    def check_kind(self, role: str) -> str:
        """The Consul health check that can reach a node of ``role``."""
        from cloudburst_grpc.discovery.consul import CHECK_GRPC, CHECK_GRPC_TLS, CHECK_TCP

        if self.tls is None:
            return CHECK_GRPC
        if role in MESH_ONLY_ROLES or self.tokens is None:
            return CHECK_TCP
        return CHECK_GRPC_TLS

    def server_credentials(self, role: str) -> grpc.ServerCredentials | None:
        """Server credentials for a node of ``role``; None without TLS.

        Services only the cluster calls (executors, the KVS) require a client
        certificate in the handshake; a scheduler (and ``cbgrpc serve``) asks
        clients for one unless it accepts tokens.
        """
        if self.tls is None:
            return None
        require = role in MESH_ONLY_ROLES or self.tokens is None
        return self.tls.server_credentials(require_client_cert=require)
