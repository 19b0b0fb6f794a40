"""Why a server may refuse this client's certificate, told before or after the handshake.

A server that refuses a client certificate (expired, or not signed by a CA it
trusts) closes the TLS handshake; gRPC then reports only that the connection
closed. The SDK checks the certificate's validity dates before it connects and,
when a handshake it presented a certificate in is closed, says what is wrong
with the certificate as far as the client can tell.

The checks read the certificate with ``cryptography`` when it is installed (it
is with ``cbgrpc``, and with the SDK's ``tls`` extra:
``pip install 'cloudburst-grpc-sdk[tls]'``); without it they are skipped and
the message is general.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

#: Words of gRPC's last connection error that mean the server ended the handshake
#: after this client showed its certificate (TLS 1.3 servers close the connection;
#: TLS 1.2 ones send one of these alerts).
REFUSAL_MARKS = (
    "Socket closed",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_HANDSHAKE_FAILURE",
)

ADVICE = (
    "use a client certificate issued by the cluster's CA and still valid "
    "(`cbgrpc certs DIR --client ROLE` issues one), or a token"
)


def _load(path: str) -> Any | None:
    """The first certificate of the PEM file ``path``; None without ``cryptography``."""
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - cryptography comes with the server's install
        return None
    try:
        return x509.load_pem_x509_certificates(Path(path).expanduser().read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def validity_problem(cert_file: str, now: datetime.datetime | None = None) -> str | None:
    """Why ``cert_file`` is not valid now (expired, or not yet valid); None when it is."""
    cert = _load(cert_file)
    if cert is None:
        return None
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        return (
            f"the client certificate {cert_file} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.not_valid_before_utc > now:
        return (
            f"the client certificate {cert_file} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    return None


def issuer_problem(cert_file: str, ca_file: str) -> str | None:
    """Why ``cert_file`` is not signed by a CA of ``ca_file``; None when it is or cannot tell."""
    cert = _load(cert_file)
    if cert is None or not ca_file:
        return None
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cas = x509.load_pem_x509_certificates(Path(ca_file).expanduser().read_bytes())
    except (OSError, ValueError):
        return None
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return None
        except (ValueError, TypeError, InvalidSignature):  # another issuer, key or signature
            continue
    return (
        f"the client certificate {cert_file} is not signed by the CA in {ca_file} "
        f"(it names issuer {cert.issuer.rfc4514_string()}), so a server of that CA refuses it"
    )


def refused_in_handshake(last_error: str) -> bool:
    """Whether gRPC's last connection error looks like a server refusing the handshake."""
    return any(mark in last_error for mark in REFUSAL_MARKS)
