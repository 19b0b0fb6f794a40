"""The version of the wire protocol that the SDK and the runtime's processes speak.

The messages of ``protos/`` change between releases, and so does what some
fields mean; two releases in one deployment would misread each other. Every
channel this code opens (the SDK's, and the runtime's to its peers) carries
:data:`PROTOCOL_VERSION` in its gRPC ``user-agent`` as the product token
``cloudburst-protocol/<N>``: gRPC sends the user agent with every call, so it
costs nothing per call or per message. Every server of the runtime compares it
with its own version when a call or stream opens and refuses a caller that
speaks another one with ``FAILED_PRECONDITION``, reason ``PROTOCOL_MISMATCH``.
A caller whose user agent carries no version (grpcurl, a stub of the user's
own, another language's client) is served: the check is for this project's
processes and SDK, which must come from one release.

:data:`PROTOCOL_ENV` overrides the version for the process it is set for, as
read when a channel or a server is made; it exists for tests (a process that
pretends to be of another release), not for deployments.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping

import grpc

from cloudburst.errors import InvalidArgumentError, ProtocolMismatchError
from cloudburst.rpc import error_from_rpc

#: The wire protocol this release speaks. Bump it (by one) in a release whose processes
#: cannot work with the previous release's: a field reserved, renumbered or given another
#: meaning, a frame an older peer would misread, a stream whose order of frames changed.
#: Adding an optional field that older peers may ignore needs no bump.
PROTOCOL_VERSION = 2

#: The environment variable that replaces :data:`PROTOCOL_VERSION` in a process (tests only).
PROTOCOL_ENV = "CLOUDBURST_PROTOCOL_VERSION"

#: The product token in the user agent: ``cloudburst-protocol/<version>``.
PRODUCT = "cloudburst-protocol"

#: Where operators read what to do about a refusal.
ADVICE = "run one release across the deployment (see docs/operations.md#upgrades)"

#: The keys of the refusal's ErrorInfo metadata: the server's version and the caller's.
SERVER_KEY = "server_protocol"
CLIENT_KEY = "client_protocol"
#: The key of the refusal's ErrorInfo metadata that names the refusing process's role
#: ("scheduler", "executor", "KVS", "cbgrpc serve"): a scheduler passes on the KVS's errors.
ROLE_KEY = "server_role"

#: The Consul service meta key under which every process registers the version it speaks,
#: so that peers and clients pick processes of their own release before calling them.
META_KEY = "protocol"

_TOKEN = re.compile(rf"(?:^|\s){re.escape(PRODUCT)}/(\d{{1,9}})(?:\s|$)")


def protocol_version(environ: Mapping[str, str] | None = None) -> int:
    """The version this process speaks: :data:`PROTOCOL_ENV` if set, else :data:`PROTOCOL_VERSION`.

    Raises:
        InvalidArgumentError: The variable is set but not a non-negative integer.
    """
    raw = (os.environ if environ is None else environ).get(PROTOCOL_ENV, "").strip()
    if not raw:
        return PROTOCOL_VERSION
    if not raw.isdigit() or len(raw) > 9:
        raise InvalidArgumentError(f"{PROTOCOL_ENV} must be a non-negative integer, not {raw!r}")
    return int(raw)


def user_agent(version: int | None = None) -> str:
    """The user agent token that carries ``version`` (this process's, by default)."""
    return f"{PRODUCT}/{protocol_version() if version is None else version}"


def version_in(agent: str) -> int | None:
    """The protocol version a user agent carries; None when it carries none."""
    match = _TOKEN.search(agent)
    return int(match.group(1)) if match else None


def same_release(meta: Mapping[str, str]) -> bool:
    """Whether a process's Consul service meta names this process's version, or none.

    A process that names none comes from a release before versions were
    registered; it is taken as it always was (a call to it is refused if it
    speaks another version).
    """
    theirs = meta.get(META_KEY)
    return theirs is None or theirs == str(protocol_version())


def mismatch_message(server: str, server_version: int, caller: str, caller_version: int) -> str:
    """The message of a refusal: who speaks which version, and what to do."""
    return (
        f"{server} speaks cloudburst-grpc wire protocol {server_version}, {caller} speaks "
        f"{caller_version}; {ADVICE}"
    )


def refusal(error: grpc.RpcError | None) -> ProtocolMismatchError | None:
    """The refusal of a peer that speaks another version, if that is what ``error`` is."""
    if error is None or error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    refused = error_from_rpc(error)
    return refused if isinstance(refused, ProtocolMismatchError) else None


def refused_by(peer: str, error: ProtocolMismatchError) -> str:
    """What the refused side says: ``peer`` (e.g. "the executor at HOST:PORT") and both versions."""
    theirs = error.metadata.get(SERVER_KEY, "?")
    ours = error.metadata.get(CLIENT_KEY, "?")
    return (
        f"{peer} speaks cloudburst-grpc wire protocol {theirs} and refused this process, "
        f"which speaks {ours}; {ADVICE}"
    )


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def log_once(logger: logging.Logger, peer: str, error: ProtocolMismatchError) -> None:
    """Log, once per peer and pair of versions, that ``peer`` refused this process."""
    key = (peer, f"{error.metadata.get(SERVER_KEY)}/{error.metadata.get(CLIENT_KEY)}")
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.error("%s", refused_by(peer, error))


__all__ = [
    "ADVICE",
    "META_KEY",
    "PRODUCT",
    "PROTOCOL_ENV",
    "PROTOCOL_VERSION",
    "log_once",
    "mismatch_message",
    "protocol_version",
    "refusal",
    "refused_by",
    "same_release",
    "user_agent",
    "version_in",
]
