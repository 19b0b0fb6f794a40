"""Authorization of every RPC by the caller's identity.

:class:`AuthInterceptor` establishes who calls (the URI SAN of a verified
client certificate, or a bearer token) and checks the method against
:data:`METHOD_ROLES`; some requests are also checked field by field (the
system keyspace, and the serializers a restricted invoker may use). A caller
without an identity gets ``UNAUTHENTICATED``, one whose role may not call the
method ``PERMISSION_DENIED``; both messages say which role is needed. Failed
attempts are logged, counted (the ``cloudburst.auth.failures`` metric) and
limited per peer address. Nothing secret ever reaches a log line or an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from cloudburst.errors import error_class
from cloudburst.v1 import kvs_service_pb2, lattice_pb2, value_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.interceptors import RefusedFrame
from cloudburst_grpc.security.identity import (
    ADMIN,
    CLIENT_ROLES,
    DEFAULT_TRUST_DOMAIN,
    EXECUTOR,
    INVOKER_RESTRICTED,
    SCHEDULER,
    SERVE,
    Identity,
    role_from_uri,
    uris_from_auth_context,
)
from cloudburst_grpc.security.tokens import TokenStore

if TYPE_CHECKING:
    from cloudburst_grpc.security.intentions import IntentionCheck

logger = logging.getLogger(__name__)

AUTH_FAILURES = telemetry.METER.create_counter(
    "cloudburst.auth.failures",
    unit="{attempt}",
    description="Calls refused because the caller was not authenticated or not allowed",
)

_CLIENTS = frozenset(CLIENT_ROLES)
_ADMIN = frozenset({ADMIN})
_MESH = frozenset({SCHEDULER, EXECUTOR, SERVE})
_STREAMS = frozenset({EXECUTOR, SERVE})
_KVS_USERS = _CLIENTS | _MESH
_SYSTEM_WRITERS = frozenset({SCHEDULER, SERVE})
_SYSTEM_READERS = _MESH

_S = "/cloudburst.v1.SchedulerService/"
_E = "/cloudburst.v1.ExecutorService/"
_K = "/cloudburst.v1.KvsService/"

#: The roles that may call each method; a method not listed is refused.
METHOD_ROLES: dict[str, frozenset[str]] = {
    **{_S + m: _ADMIN for m in ("CreateFunction", "DeleteFunction", "CreateDag", "DeleteDag")},
    **{
        _S + m: _CLIENTS
        for m in (
            "GetFunction",
            "ListFunctions",
            "GetDag",
            "ListDags",
            "ListExecutors",
            "GetResult",
            "CallFunction",
            "CallDag",
            "StreamCalls",
        )
    },
    **{
        _E + m: _MESH
        for m in (
            "ExecuteFunction",
            "StreamTriggers",
            "PinFunction",
            "UnpinFunction",
            "GetExecutorStatus",
        )
    },
    # A caller's answer stream (the sink answers it directly): the one executor RPC for clients.
    _E + "StreamAnswers": _CLIENTS,
    "/cloudburst.v1.MessagingService/StreamMessages": _STREAMS,
    **{
        _K + m: _KVS_USERS
        for m in (
            "GetValue",
            "PutValue",
            "DeleteValue",
            "BatchGetValues",
            "BatchDeleteValues",
            "ListKeys",
            "WatchValues",
            "GetValueChunks",
            "PutValueChunks",
            "GetLimits",
            "StreamOps",
        )
    },
    # cbgrpc serve asks its executor processes for their parts of a breakdown.
    "/cloudburst.v1.DiagnosticsService/GetCallTiming": _ADMIN | {SERVE},
}

#: Methods anyone may call, authenticated or not: health checks (Consul, load balancers).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: Methods any authenticated caller may use.
ANY_ROLE_PREFIXES = ("/grpc.reflection.",)

_KVS_WRITES = frozenset(
    {_K + "PutValue", _K + "PutValueChunks", _K + "DeleteValue", _K + "BatchDeleteValues"}
)
#: Streams whose frames are each a call of a unary method, answered one by one: every frame (each
#: frame of a batch too) is authorized as that call would be, and a refused frame is answered with
#: its error (the stream goes on).
PER_FRAME_METHODS = frozenset({_K + "StreamOps"})
#: Serializers a restricted invoker may send: none of them runs code when read.
SAFE_SERIALIZERS = frozenset(
    {value_pb2.SERIALIZER_BYTES, value_pb2.SERIALIZER_STRING, value_pb2.SERIALIZER_JSON}
)


class Denied(Exception):
    """A refusal: its code and a message that says what is needed (never a secret)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        """Record the status code, the message for the caller and a reason for the metric."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


def _needed(roles: Iterable[str]) -> str:
    names = sorted(roles)
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def check_method(method: str, identity: Identity) -> None:
    """Raise Denied unless ``identity`` may call ``method``."""
    if method.startswith(ANY_ROLE_PREFIXES):
        return
    roles = METHOD_ROLES.get(method)
    if roles is None:
        raise Denied(
            grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any role", "method"
        )
    if identity.role not in roles:
        raise Denied(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} needs role {_needed(roles)}; the caller has role {identity.role}",
            "role",
        )


def _values_of_arguments(arguments: Iterable[value_pb2.Argument]) -> Iterable[value_pb2.Value]:
    for argument in arguments:
        if argument.HasField("value"):
            yield argument.value


def _values_of_request(method: str, request: Any) -> Iterable[value_pb2.Value]:
    """The user values in a request that a restricted invoker sends."""
    name = method.rsplit("/", 1)[-1]
    if name == "CallFunction":
        yield from _values_of_arguments(request.arguments)
    elif name == "CallDag":
        for argument_list in request.function_arguments.values():
            yield from _values_of_arguments(argument_list.arguments)
    elif name == "StreamCalls":
        for frame in request.batch or (request,):  # a batch carries the frames to check
            if frame.HasField("call_function"):
                yield from _values_of_arguments(frame.call_function.arguments)
            elif frame.HasField("call_dag"):
                for argument_list in frame.call_dag.function_arguments.values():
                    yield from _values_of_arguments(argument_list.arguments)
    elif name == "PutValueChunks" and request.HasField("put"):  # the first frame
        yield request.put.lattice.lww.value
    elif name == "PutValue":
        lattice: lattice_pb2.Lattice = request.lattice
        if lattice.HasField("lww"):
            yield lattice.lww.value
        elif lattice.HasField("set"):
            yield from lattice.set.values


def unary_equivalent(method: str, request: Any) -> tuple[str, Any]:
    """The unary method and request that a frame of a per-frame stream stands for.

    Any other method and request come back unchanged.
    """
    if method == _K + "StreamOps" and isinstance(request, kvs_service_pb2.StreamOpsRequest):
        kind = request.WhichOneof("op")
        if kind == "get":
            return _K + "GetValue", request.get
        if kind == "put":
            return _K + "PutValue", request.put
        if kind == "delete":
            return _K + "DeleteValue", request.delete
    return method, request


def check_request(method: str, identity: Identity, request: Any) -> None:
    """Raise Denied unless ``identity`` may send this particular request.

    Only schedulers write the system keyspace and only the cluster's services
    read it; a restricted invoker's values must use a serializer that runs no
    code when read. A frame of a per-frame stream is checked as the unary call
    it stands for, the method's roles included.
    """
    unary, request = unary_equivalent(method, request)
    if unary != method:
        check_method(unary, identity)
        method = unary
    if method == _K + "PutValueChunks" and request.HasField("put"):
        keyspace = request.put.keyspace  # the first frame names the key; chunks name nothing
    else:
        keyspace = getattr(request, "keyspace", None)
    if method.startswith(_K) and keyspace is not None:
        if keyspace == lattice_pb2.KEYSPACE_SYSTEM:
            allowed = _SYSTEM_WRITERS if method in _KVS_WRITES else _SYSTEM_READERS
            if identity.role not in allowed:
                action = "writing" if method in _KVS_WRITES else "reading"
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{action} the system keyspace needs role {_needed(allowed)}; "
                    f"the caller has role {identity.role}",
                    "keyspace",
                )
    if identity.role == INVOKER_RESTRICTED:
        for value in _values_of_request(method, request):
            if value.serializer not in SAFE_SERIALIZERS:
                kind = value_pb2.Serializer.Name(value.serializer)
                raise Denied(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"role invoker-restricted may send only JSON, string or bytes values, "
                    f"not {kind}; cloudpickle values need role invoker or admin",
                    "serializer",
                )


class FailureLimiter:
    """Counts failed attempts per peer address; too many in a window block the peer a while."""

    def __init__(self, limit: int = 10, window_seconds: float = 60.0) -> None:
        """At most ``limit`` failures per ``window_seconds`` before the peer is refused outright."""
        self.limit = limit
        self.window = window_seconds
        self._failures: dict[str, list[float]] = {}

    def _recent(self, peer: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(peer, ()) if now - t < self.window]
        if times:
            self._failures[peer] = times
        else:
            self._failures.pop(peer, None)
        return times

    def blocked_for(self, peer: str, now: float | None = None) -> float:
        """Seconds until ``peer`` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        times = self._recent(peer, now)
        if len(times) < self.limit:
            return 0.0
        return max(0.0, times[-self.limit] + self.window - now)

    def failed(self, peer: str, now: float | None = None) -> int:
        """Record a failure; returns the number within the window."""
        now = time.monotonic() if now is None else now
        times = self._recent(peer, now)
        times.append(now)
        self._failures[peer] = times
        if len(self._failures) > 10_000:  # forget the oldest peers rather than grow forever
            for stale in list(self._failures)[:1000]:
                del self._failures[stale]
        return len(times)


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


@dataclass
class Authenticator:
    """Who is calling: from the TLS peer certificate, or from a bearer token."""

    tokens: TokenStore | None
    trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,)

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        """The caller's identity; raises Denied (UNAUTHENTICATED) when it has none."""
        uris = uris_from_auth_context(context.auth_context())
        for uri in uris:
            role = role_from_uri(uri, self.trust_domains)
            if role is not None:
                return Identity(role, "certificate", uri)
        if uris:
            raise Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate names no role of this cluster",
                "certificate",
            )
        token = _bearer(context.invocation_metadata() or ())
        if token is None:
            hint = "a bearer token" if self.tokens is not None else "a client certificate"
            raise Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                f"authentication required: present {hint}",
                "missing",
            )
        if self.tokens is None:
            raise Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "this service accepts no tokens; present a client certificate",
                "token",
            )
        entry = self.tokens.cached(token)
        if entry is None:
            entry = await asyncio.to_thread(self.tokens.lookup, token)
        if entry is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid", "token")
        return Identity(entry.role, "token", entry.name)


def _bearer(metadata: Iterable[Any]) -> str | None:
    for item in metadata:
        key, value = item[0], item[1]
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose caller is unknown or lacks the role the method needs."""

    def __init__(self, authenticator: Authenticator, limiter: FailureLimiter | None = None) -> None:
        """Use ``authenticator`` to identify callers; ``limiter`` bounds failures per peer."""
        self.authenticator = authenticator
        self.limiter = limiter or FailureLimiter()
        self._logged = FailureLimiter(self.limiter.limit, self.limiter.window)
        self.intentions: IntentionCheck | None = None
        """When set, calls from the cluster's services also need Consul's intentions."""

    async def _intention_denial(self, identity: Identity) -> Denied | None:
        if self.intentions is None or identity.source != "certificate":
            return None
        reason = await self.intentions.denial(identity)
        if reason is None:
            return None
        return Denied(grpc.StatusCode.PERMISSION_DENIED, reason, "intention")

    async def _deny(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, denied: Denied
    ) -> None:
        self._note(context, method, denied)
        await context.abort(denied.code, denied.message)

    def _note(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, denied: Denied
    ) -> None:
        """Count and log a refusal; a failed authentication counts towards blocking its peer."""
        peer = peer_host(context.peer() or "")
        AUTH_FAILURES.add(1, {"reason": denied.reason, "rpc.method": method})
        # Every refusal is logged, up to the limit per peer and minute (no flooding).
        if self._logged.failed(peer) <= self._logged.limit:
            logger.warning(
                "refused %s from %s (%s): %s", method, peer, denied.reason, denied.message
            )
        # Only failed authentication (guessing) blocks a peer; a caller that proved who it
        # is and lacks a role is refused call by call, so it recovers once allowed.
        if denied.code == grpc.StatusCode.UNAUTHENTICATED:
            if self.limiter.failed(peer) == self.limiter.limit:
                logger.warning(
                    "%d failed authentications from %s within %.0fs; refusing it for a while",
                    self.limiter.limit,
                    peer,
                    self.limiter.window,
                )

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Identity:
        peer = peer_host(context.peer() or "")
        wait = self.limiter.blocked_for(peer)
        if wait > 0:
            AUTH_FAILURES.add(1, {"reason": "limited", "rpc.method": method})
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"too many failed attempts from this address; retry in {wait:.0f}s",
            )
        try:
            identity = await self.authenticator.identify(context)
            check_method(method, identity)
            denial = await self._intention_denial(identity)
            if denial is not None:
                raise denial
        except Denied as denied:
            await self._deny(context, method, denied)
            raise  # not reached: abort raises
        return identity

    def _check(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        identity: Identity,
        request: Any,
    ) -> Awaitable[None] | None:
        try:
            check_request(method, identity, request)
        except Denied as denied:
            return self._deny(context, method, denied)
        return None

    def _unary_request(self, method: str, behavior: Handler) -> Handler:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            identity = await self._admit(context, method)
            denial = self._check(context, method, identity, request)
            if denial is not None:
                await denial
            return await behavior(request, context)

        return wrapped

    def _unary_request_stream(self, method: str, behavior: Handler) -> Handler:
        async def wrapped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            identity = await self._admit(context, method)
            denial = self._check(context, method, identity, request)
            if denial is not None:
                await denial
            async for response in behavior(request, context):
                yield response

        return wrapped

    def _checked_frames(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        identity: Identity,
        frames: AsyncIterator[Any],
    ) -> AsyncIterator[Any]:
        per_frame = method in PER_FRAME_METHODS

        async def checked() -> AsyncIterator[Any]:
            async for message in frames:
                # Each frame of a per-frame stream's batch is authorized (and refused) on its
                # own: the servicer gets such a batch's frames one by one.
                for frame in (message.batch or (message,)) if per_frame else (message,):
                    if per_frame:
                        try:
                            check_request(method, identity, frame)
                        except Denied as refusal:
                            self._note(context, method, refusal)
                            error = error_class(None, refusal.code)(refusal.message)
                            yield RefusedFrame(frame, error)
                            continue
                    else:
                        denial = self._check(context, method, identity, frame)
                        if denial is not None:
                            await denial
                    # An intention changed while the stream is open applies to it too.
                    denied = await self._intention_denial(identity)
                    if denied is not None:
                        await self._deny(context, method, denied)
                    yield frame

        return checked()

    def _stream_request(self, method: str, behavior: Handler, coroutine: bool) -> Handler:
        if coroutine:

            async def wrapped_coroutine(
                frames: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                identity = await self._admit(context, method)
                return await behavior(
                    self._checked_frames(context, method, identity, frames), context
                )

            return wrapped_coroutine

        async def wrapped(
            frames: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            identity = await self._admit(context, method)
            async for response in behavior(
                self._checked_frames(context, method, identity, frames), context
            ):
                yield response

        return wrapped

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Wrap the handler so that it first checks the caller."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_request(method, handler.unary_unary), **kwargs
            )
        if handler.unary_stream:
            behavior = handler.unary_stream
            wrapped = (
                self._unary_request(method, behavior)
                if asyncio.iscoroutinefunction(behavior)
                else self._unary_request_stream(method, behavior)
            )
            return grpc.unary_stream_rpc_method_handler(wrapped, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_request(method, handler.stream_unary, True), **kwargs
            )
        if handler.stream_stream:
            behavior = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                self._stream_request(method, behavior, asyncio.iscoroutinefunction(behavior)),
                **kwargs,
            )
        return handler
