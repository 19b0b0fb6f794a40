"""CloudburstConnection: the user's entry point, with the original Cloudburst API."""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import contextlib
import functools
import inspect
import json
import logging
import os
import random
import secrets
import sys
import sysconfig
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from cloudburst import _original, chunks, malloc, protocol, sources, tracing
from cloudburst._core import Core, PendingCall, Write
from cloudburst._loop import new_driver
from cloudburst.errors import (
    CloudburstError,
    DagAlreadyExistsError,
    DagNotFoundError,
    FunctionNotFoundError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolMismatchError,
    SerializationError,
    UnavailableError,
)
from cloudburst.function import CloudburstFunction
from cloudburst.future import CloudburstFuture
from cloudburst.reference import CloudburstReference
from cloudburst.rpc import call, error_from_call_error, new_request_id
from cloudburst.serialization import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    LwwClock,
    check_length,
    decode,
    deserialize,
    encode,
    failure_to_error,
    lattice_bytes,
    lattice_value,
    serialize,
)
from cloudburst.transport import (
    CLIENT_CERT_PORT_META,
    DEFAULT_PORT,
    SCHEDULER_SERVICE,
    ClientSecurity,
)
from cloudburst.v1 import (
    error_pb2,
    execution_pb2,
    function_pb2,
    lattice_pb2,
    scheduler_service_pb2,
    value_pb2,
)

logger = logging.getLogger(__name__)

#: Seconds ``future.get()`` and other waits last when not told otherwise.
DEFAULT_TIMEOUT = 300.0
#: Seconds to wait for the first connection.
CONNECT_TIMEOUT = 10.0
#: The most times a call may run again after losing its executor (``retries=``).
MAX_RETRIES = 10
#: Seconds to wait for each other scheduler when the one in use is lost.
FAILOVER_CONNECT_TIMEOUT = 3.0
#: How many of its latest writes a connection remembers, for read-your-writes through caches.
_WRITES_REMEMBERED = 4096
#: How many function and DAG names a connection remembers as called (see ``_choose_key``).
_NAMES_REMEMBERED = 1024
#: The error reasons that say a name a call named is not registered (any more).
_NOT_FOUND = frozenset(
    {error_pb2.ERROR_REASON_FUNCTION_NOT_FOUND, error_pb2.ERROR_REASON_DAG_NOT_FOUND}
)
#: Longest ``get_object`` waits for a result answered directly to be stored.
RESULT_STORE_SECONDS = 10.0
#: Seconds a KVS address the scheduler names may take to answer before objects go through it.
DIRECT_KVS_TIMEOUT = 2.0
#: Values of ``CLOUDBURST_DIRECT_KVS`` that turn direct KVS access off.
_OFF = frozenset({"0", "false", "no", "off"})


CONSUL_DEFAULT_PORTS = {"http": 8500, "https": 8501}
"""The ports a Consul agent serves its HTTP API on when an address names none."""


def consul_base_url(consul_address: str) -> str:
    """Return ``scheme://host:port`` for a Consul agent given as ``host[:port]`` or a URL.

    The scheme defaults to ``http``; the port to Consul's own default for the
    scheme (8500 for ``http``, 8501 for ``https``), never to the web's 80/443.

    Raises:
        UnavailableError: the address is not ``host[:port]`` or ``scheme://host[:port]``.
    """
    text = consul_address.strip()
    parsed = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in CONSUL_DEFAULT_PORTS or not parsed.hostname or port == -1:
        raise UnavailableError(
            f"{consul_address!r} is not a Consul address; give host:port or "
            "http(s)://host:port, as in consul://127.0.0.1:8500"
        )
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host}:{port or CONSUL_DEFAULT_PORTS[parsed.scheme]}"


def discover_schedulers(
    consul_address: str, timeout: float, client_cert: bool = False
) -> list[str]:
    """Return the addresses of the passing schedulers registered in Consul, in random order.

    ``consul_address`` is ``host:port`` or ``http(s)://host:port`` of a Consul
    agent; ``CONSUL_HTTP_TOKEN`` is sent when set. With ``client_cert`` (a
    client that shows a certificate), a scheduler that also listens for such
    clients on a port of its own (``--client-cert-port``, in its service meta)
    is given at that port; every other at its registered port.

    Only schedulers of this SDK's release are returned: those whose service
    meta names this SDK's wire protocol version, or none (older releases). A
    rolling upgrade thus keeps the client on schedulers it can talk to.

    Raises:
        UnavailableError: Consul cannot be reached or knows no passing scheduler.
        ProtocolMismatchError: Every passing scheduler is of another release.
    """
    base = consul_base_url(consul_address)
    url = f"{base.rstrip('/')}/v1/health/service/{SCHEDULER_SERVICE}?passing=true"
    request = urllib.request.Request(url)
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    if token:
        request.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            nodes = json.load(response)
    except (OSError, ValueError) as exc:
        raise UnavailableError(
            f"cannot ask Consul at {base} for schedulers: {exc}; check the address and token"
        ) from None
    addresses = []
    other_releases: dict[str, list[str]] = {}
    """The addresses of schedulers of other releases, by the version they speak."""
    for node in nodes:
        service = node["Service"]
        meta = service.get("Meta") or {}
        host = service.get("Address") or node["Node"]["Address"]
        port = service["Port"]
        cert_port = meta.get(CLIENT_CERT_PORT_META, "")
        if client_cert and cert_port.isdigit():
            port = int(cert_port)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if protocol.same_release(meta):
            addresses.append(address)
        else:
            other_releases.setdefault(meta[protocol.META_KEY], []).append(address)
    if not addresses and other_releases:
        ours = protocol.protocol_version()
        found = "; ".join(
            f"wire protocol {version} at {', '.join(sorted(where))}"
            for version, where in sorted(other_releases.items())
        )
        raise ProtocolMismatchError(
            f"Consul at {base} knows only {SCHEDULER_SERVICE}s of another release ({found}); "
            f"this SDK speaks cloudburst-grpc wire protocol {ours}: use the SDK of the "
            "cluster's release, or wait until schedulers of this SDK's release pass "
            "(see docs/operations.md#upgrades)",
            {
                protocol.SERVER_KEY: ",".join(sorted(other_releases)),
                protocol.CLIENT_KEY: str(ours),
            },
        )
    if not addresses:
        raise UnavailableError(
            f"Consul at {base} knows no passing {SCHEDULER_SERVICE}; is a scheduler running?"
        )
    random.shuffle(addresses)
    return addresses


def discover_scheduler(consul_address: str, timeout: float, client_cert: bool = False) -> str:
    """Return the address of a passing scheduler registered in Consul (see above)."""
    return discover_schedulers(consul_address, timeout, client_cert)[0]


def parse_address(address: str) -> str:
    """Turn ``host``, ``host:port`` or ``[v6]:port`` (stray spaces allowed) into a gRPC target."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidArgumentError(
            f"the address must be a host or host:port string, not {address!r}"
        )
    text = address.strip()
    for scheme in ("grpc://", "http://", "tcp://"):
        text = text.removeprefix(scheme)
    if text.startswith("["):
        host, sep, port = text.partition("]")
        host += "]"
        if not sep or len(host) <= 2 or (port and not port.startswith(":")):
            raise InvalidArgumentError(f"{address!r} is not a valid [IPv6]:port address")
        port = port.removeprefix(":") if port else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = (part.strip() for part in text.split(":"))
    elif ":" in text:  # a bare IPv6 address
        host, port = f"[{text}]", str(DEFAULT_PORT)
    else:
        host, port = text, str(DEFAULT_PORT)
    if not host:
        raise InvalidArgumentError(f"{address!r} has no host; use host or host:port")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"the port in {address!r} must be a number from 1 to 65535")
    return f"{host}:{int(port)}"


_INSTALLED = {
    str(Path(p).resolve())
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
}


@functools.lru_cache(maxsize=1024)
def _installed(module: ModuleType) -> bool:
    """Whether a module comes from the interpreter or site-packages (so servers can import it)."""
    path = getattr(module, "__file__", None)
    if path is None:
        return True  # built-in
    resolved = str(Path(path).resolve())
    return any(resolved.startswith(root) for root in _INSTALLED)


@contextlib.contextmanager
def _by_value(objects: Sequence[Any]) -> Iterator[None]:
    """Pickle user modules by value, so code from scripts and test files travels with it."""
    registered = []
    for obj in objects:
        name = getattr(obj, "__module__", None) or type(obj).__module__
        module = sys.modules.get(name)
        if module is None or name == "__main__" or _installed(module):
            continue
        if name in cloudpickle.list_registry_pickle_by_value():
            continue
        cloudpickle.register_pickle_by_value(module)
        registered.append(module)
    try:
        yield
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


_pickle_lock = threading.Lock()


def _futures(args: Sequence[Any]) -> tuple[CloudburstFuture, ...]:
    """The futures among call arguments."""
    return tuple(arg for arg in args if isinstance(arg, CloudburstFuture))


#: Types whose values pickle without any module of the caller's.
_PLAIN_TYPES = frozenset({int, float, bool, str, bytes, type(None)})


def _serialize(obj: Any, what: str, limit: int) -> value_pb2.Value:
    if type(obj) in _PLAIN_TYPES:
        return serialize(obj, what=what, limit=limit)
    with _pickle_lock, _by_value([obj, type(obj)]):
        return serialize(obj, what=what, limit=limit)


def _stored_bytes(lattice: lattice_pb2.Lattice | chunks.LargeValue) -> Any:
    """The stored bytes of a value (``get_object(deserialize=False)``)."""
    if isinstance(lattice, chunks.LargeValue):
        if lattice.kind == "lww":
            return bytes(lattice.take())
        lattice = lattice.to_lattice()
    return lattice_bytes(lattice)


def _encode(obj: Any, what: str) -> tuple[bytes, value_pb2.Serializer.ValueType]:
    if type(obj) in _PLAIN_TYPES:
        return encode(obj, what=what)
    with _pickle_lock, _by_value([obj, type(obj)]):
        return encode(obj, what=what)


class CloudburstConnection:
    """A connection to a cloudburst scheduler (``cbgrpc serve``, or a cluster's load balancer).

    Args:
        func_addr: ``host`` or ``host:port`` of the scheduler or its load balancer
            (default port 7600), several of them separated by commas, or
            ``consul://host:port`` to use a passing scheduler of this SDK's release
            registered in that Consul agent (with ``tls_cert``, at the port it has
            for clients with certificates, if any); stray spaces are ignored. With
            several schedulers (a list, or Consul), losing the one in use moves the
            connection to another: idempotent operations (reads and writes of objects,
            registering and listing functions, ``future.get()``) retry there
            once by themselves; a call that was in flight raises
            UnavailableError and the next call goes to the new scheduler.
        ip: Accepted for compatibility with the original API; not needed.
        tid: Accepted for compatibility; not needed.
        local: Accepted for compatibility; not needed.
        timeout: Seconds that waits (``future.get()``, direct responses, each
            request) last when not given; 300 by default.
        max_payload_bytes: The largest serialized argument, result or object.
        keep_results: Keep every call's result in the KVS until it is deleted. By
            default a result stored under a key the runtime chose is deleted once
            its future is garbage-collected after the call finished.
        loop_driver: How the connection's event loop runs: ``"caller"`` (the
            default), by the threads that wait for results, or ``"thread"``, on
            a thread of its own, using only asyncio's public API. When not given,
            the environment variable ``CLOUDBURST_LOOP_DRIVER`` decides. Where
            this Python lacks a private asyncio name ``"caller"`` needs, the
            connection uses ``"thread"``. Any other value raises
            InvalidArgumentError, a ValueError. See :mod:`cloudburst._loop`.
        tls: Connect with TLS even without the settings below (trusting the
            system's CA roots); any of them turns TLS on, and False turns it off.
            Settings not given come from ``CLOUDBURST_TLS_CA``,
            ``CLOUDBURST_TOKEN``, ``CLOUDBURST_TLS_CERT``, ``CLOUDBURST_TLS_KEY``
            and ``CLOUDBURST_TLS_SERVER_NAME``. See docs/security.md.
        tls_ca: PEM CA bundle the server's certificate must chain to.
        token: Bearer token sent with every call; its role decides what the
            connection may do.
        tls_cert: PEM client certificate, to authenticate with instead of a token.
        tls_key: PEM key of ``tls_cert``.
        tls_server_name: Verify the server's certificate against this name
            instead of the host dialled.
        direct_kvs: Read and write objects at the KVS itself when the scheduler
            names its address (a plaintext cluster does), one network hop
            instead of two; when that address does not answer, within two
            seconds of connecting or later, objects go through the scheduler.
            False always goes through the scheduler. When not given,
            ``CLOUDBURST_DIRECT_KVS=0`` turns it off. At the KVS, reads, writes
            and deletes of one key go as frames of one stream that the
            connection's threads share (values too large for one message keep
            their chunks); ``CLOUDBURST_KVS_STREAM=0`` makes each a unary call
            (see :mod:`cloudburst.opstream`).
        direct_answers: Hold an answer stream at each executor of a cluster
            whose scheduler offers it, so that the executor that finishes a
            ``direct_response`` DAG call answers it directly, one hop instead
            of two through the scheduler (needs a client certificate with
            TLS; a token client is answered by the scheduler). When not
            given, ``CLOUDBURST_DIRECT_ANSWERS=0`` turns it off.

    The connection is thread-safe. Close it with :meth:`close` or use it in a
    ``with`` block.
    """

    def __init__(
        self,
        func_addr: str,
        ip: str | None = None,
        tid: int = 0,
        local: bool = False,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT,
        keep_results: bool = False,
        loop_driver: str | None = None,
        tls: bool | None = None,
        tls_ca: str = "",
        token: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        tls_server_name: str = "",
        direct_kvs: bool | None = None,
        direct_answers: bool | None = None,
    ) -> None:
        self._security = ClientSecurity.resolve(
            tls,
            ca_file=tls_ca,
            token=token,
            cert_file=tls_cert,
            key_file=tls_key,
            server_name=tls_server_name,
        )
        self._consul: str | None = None
        self._targets: list[str] = []
        """The schedulers given (empty with Consul, which is asked again at each failover)."""
        if isinstance(func_addr, str) and func_addr.strip().startswith("consul://"):
            self._consul = func_addr.strip().removeprefix("consul://")
            candidates = [parse_address(a) for a in self._discover(connect_timeout)]
        elif isinstance(func_addr, str) and "," in func_addr:
            self._targets = [parse_address(a) for a in func_addr.split(",") if a.strip()]
            candidates = list(self._targets)
        else:
            candidates = self._targets = [parse_address(func_addr)]
        self.address = candidates[0]
        self._switch_lock = threading.Lock()
        self.timeout = float(timeout)
        self.max_payload_bytes = max_payload_bytes
        self.max_value_bytes = max_payload_bytes
        """The largest value ``put_object`` stores: the KVS tier's limit, learned on connecting."""
        self.keep_results = keep_results
        self.last_error: CloudburstError | None = None
        """The error of the last ``register_dag``/``delete_dag`` that returned False."""
        if direct_kvs is None:
            direct_kvs = os.environ.get("CLOUDBURST_DIRECT_KVS", "").strip().lower() not in _OFF
        self._direct_kvs = direct_kvs
        if direct_answers is None:
            direct_answers = (
                os.environ.get("CLOUDBURST_DIRECT_ANSWERS", "").strip().lower() not in _OFF
            )
        # Executors take client certificates, not tokens: a token client stays with the scheduler.
        self._direct_answers = direct_answers and (
            not self._security.tls or bool(self._security.cert_file)
        )
        self._clock = LwwClock()
        self._written: collections.OrderedDict[str, int] = collections.OrderedDict()
        """When this connection last wrote each key (the newest ones), for read-your-writes."""
        self._answered: collections.OrderedDict[str, None] = collections.OrderedDict()
        """Result keys of calls answered directly, which executors store just after answering."""
        self._answered_lock = threading.Lock()
        self._called: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        """Functions and DAGs (kind, name) whose calls the scheduler accepted, the latest last."""
        self._called_lock = threading.Lock()
        # Large values reuse memory instead of faulting in fresh pages (see malloc.py).
        malloc.tune_once()
        self._loop = new_driver(loop_driver)
        self._closed = False
        try:
            self._core: Core = self._connect(candidates, connect_timeout)
        except BaseException:
            self._loop.stop()
            raise

    def _discover(self, timeout: float) -> list[str]:
        """The passing schedulers in Consul, at the port for this client's credentials."""
        assert self._consul is not None
        return discover_schedulers(self._consul, timeout, bool(self._security.cert_file))

    async def _make_core(self, target: str, connect_timeout: float) -> Core:
        core = Core(target, self.max_payload_bytes, self._loop, self._security)
        try:
            await core.wait_ready(connect_timeout)
        except BaseException:
            await core.close()
            raise
        # Answer streams register while the KVS is asked: a client that reaches neither the
        # executors nor the KVS waits for both at once, not one after the other.
        answers = (
            asyncio.ensure_future(core.use_answer_streams(min(connect_timeout, DIRECT_KVS_TIMEOUT)))
            if self._direct_answers
            else None
        )
        try:
            try:
                await self._use_kvs(core, connect_timeout)
            finally:
                if answers is not None:
                    await answers
        except BaseException:
            await core.close()
            raise
        return core

    async def _use_kvs(self, core: Core, connect_timeout: float) -> None:
        """Learn the KVS tier's limits and, where allowed, call the KVS directly."""
        try:  # the KVS tier's limit on a value (larger than a message: values move in chunks)
            limits = await chunks.get_limits(core.kvs, connect_timeout)
            self.max_value_bytes = max(int(limits.max_value_bytes), self.max_payload_bytes)
            core.learn_limits(limits)
        except ProtocolMismatchError as exc:
            if exc.metadata.get(protocol.ROLE_KEY) not in ("scheduler", "cbgrpc serve"):
                # The scheduler passes on the KVS's refusal of it: the cluster is mixed.
                raise ProtocolMismatchError(
                    f"the cluster behind the scheduler at {core.target} runs two releases: "
                    f"{exc.message}",
                    exc.metadata,
                ) from None
            theirs = exc.metadata.get(protocol.SERVER_KEY)
            ours = exc.metadata.get(protocol.CLIENT_KEY)
            raise ProtocolMismatchError(
                f"the cloudburst scheduler at {core.target} speaks cloudburst-grpc wire protocol "
                f"{theirs}, this SDK speaks {ours}: use the SDK of the cluster's release "
                "(see docs/operations.md#upgrades)",
                exc.metadata,
            ) from None
        except CloudburstError as exc:
            logger.debug(
                "the server did not report its limits (%s); values stay in one message", exc
            )
            return
        if limits.serves_op_streams:  # a KVS itself at the scheduler's address: cbgrpc serve
            core.stream_ops_here()
        if self._direct_kvs and limits.kvs_addresses:
            await core.use_direct_kvs(
                list(limits.kvs_addresses), min(connect_timeout, DIRECT_KVS_TIMEOUT)
            )

    @property
    def answer_executors(self) -> frozenset[str]:
        """The executors that answer this connection's calls directly (see ``direct_answers``)."""
        answers = self._core.answers
        return answers.registered if answers is not None else frozenset()

    @property
    def kvs_address(self) -> str | None:
        """The KVS that objects are read and written at directly; None: through the scheduler."""
        return self._core.kvs_address

    def _connect(self, candidates: Sequence[str], connect_timeout: float) -> Core:
        """Connect to the first of ``candidates`` that answers (each gets its share of time)."""
        each = connect_timeout if len(candidates) == 1 else FAILOVER_CONNECT_TIMEOUT
        error: UnavailableError | None = None
        for target in candidates:
            try:
                core: Core = self._loop.run(
                    self._make_core(target, each), each + 5, f"connecting to {target}"
                )
            except UnavailableError as exc:
                error = exc
                continue
            self.address = target
            return core
        assert error is not None
        if len(candidates) > 1:
            raise UnavailableError(
                f"no cloudburst scheduler answers at any of {', '.join(candidates)}"
            ) from None
        raise error

    def _fail_over(self, lost: Core) -> bool:
        """Move to another scheduler after ``lost`` became unreachable; returns whether it did.

        Only the first thread to notice moves; the others find the new core in place.
        """
        with self._switch_lock:
            if self._core is not lost:
                return True
            try:
                found = (
                    self._discover(FAILOVER_CONNECT_TIMEOUT)
                    if self._consul is not None
                    else self._targets
                )
            except UnavailableError:
                return False
            except ProtocolMismatchError as exc:
                # Only schedulers of another release are left: this client cannot use them.
                logger.warning("the scheduler at %s is unavailable; %s", lost.target, exc)
                return False
            others = [t for t in map(parse_address, found) if t != lost.target]
            if self._consul is None and others:
                # A list is tried in its order, starting after the scheduler lost.
                start = self._targets.index(lost.target) if lost.target in self._targets else -1
                others = [*self._targets[start + 1 :], *self._targets[: max(start, 0)]]
            if not others:
                return False
            try:
                self._core = self._connect(others, FAILOVER_CONNECT_TIMEOUT)
            except UnavailableError:
                return False
            logger.warning(
                "the scheduler at %s is unavailable; continuing at %s", lost.target, self.address
            )
        with contextlib.suppress(Exception):
            self._loop.start(lost.close())
        return True

    def _retrying(self, make: Callable[[], Any], what: str, timeout: float | None = None) -> Any:
        """Run an idempotent operation; if its scheduler is lost, once more on another.

        ``make`` builds the operation's coroutine against the current core.
        """
        core = self._core
        try:
            return self._run(make(), what, timeout)
        except UnavailableError as exc:
            # Only a lost scheduler: "no executor" and the like are answers of a live one.
            if type(exc) is not UnavailableError or not self._fail_over(core):
                raise
        return self._run(make(), what, timeout)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.run(self._core.close(), 10, "closing")
        self._loop.stop()

    def __enter__(self) -> CloudburstConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any, what: str, timeout: float | None = None) -> Any:
        if self._closed:
            raise CloudburstError("the connection is closed; create a new CloudburstConnection")
        limit = self.timeout if timeout is None else timeout
        return self._loop.run(coro, limit + 5, what)

    # -- functions -----------------------------------------------------------------

    def register(self, function: Any, name: str, *, retries: int = 0) -> CloudburstFunction:
        """Register a function, or a class as ``(Class, init_args)``, under ``name``.

        Registering again under the same name replaces the function; warm
        executors pick up the new code on their next call. A function's first
        parameter is the user library. A class needs a ``run`` method; see the
        user guide (docs/user-guide.md, "Classes") for when its ``__init__``
        and ``run`` receive the user library.

        ``retries`` (0 to 10) opts the function into at-least-once runs: a call
        whose executor is lost while it runs is run again elsewhere, up to that
        many times, so it may run more than once. Use it only for work that is
        safe to repeat. Without it such a call ends with UnavailableError (a call
        that never reached its executor is placed elsewhere either way).

        Returns:
            A handle; calling it returns a :class:`CloudburstFuture`.

        Raises:
            SerializationError: The function or an init argument cannot be pickled.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a function name must be a non-empty string, not {name!r}")
        if not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            raise InvalidArgumentError(
                f"register {name!r}: retries must be an int from 0 to {MAX_RETRIES}"
            )
        proto = function_pb2.Function(name=name, retries=retries)
        if isinstance(function, tuple):
            if len(function) != 2 or not inspect.isclass(function[0]):
                raise InvalidArgumentError(
                    f"register {name!r}: a class is registered as (Class, init_args)"
                )
            cls, init_args = function
            init = init_args if isinstance(init_args, tuple) else (init_args,)
            body: Any = cls
            proto.kind = function_pb2.FUNCTION_KIND_CLASS
            for index, arg in enumerate(init):
                proto.init_arguments.append(
                    _serialize(
                        arg, f"init argument {index + 1} of {name!r}", self.max_payload_bytes
                    )
                )
        elif inspect.isclass(function):
            body = function
            proto.kind = function_pb2.FUNCTION_KIND_CLASS
        elif callable(function):
            body = function
            proto.kind = function_pb2.FUNCTION_KIND_FUNCTION
        else:
            raise InvalidArgumentError(
                f"register {name!r}: expected a function or (Class, init_args), "
                f"got {type(function).__name__}"
            )
        if proto.kind == function_pb2.FUNCTION_KIND_CLASS and not callable(
            getattr(body, "run", None)
        ):
            raise InvalidArgumentError(
                f"register {name!r}: class {body.__name__} has no run method"
            )
        try:
            with _pickle_lock, _by_value([body]):
                data = cloudpickle.dumps(body)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize function {name!r}: {type(exc).__name__}: {exc}. Functions "
                "must not capture unpicklable objects (sockets, locks, open files).",
                {"function": name},
            ) from exc
        proto.body.CopyFrom(value_pb2.Value(data=data, serializer=value_pb2.SERIALIZER_CLOUDPICKLE))
        shipped = sources.collect(body)
        # Source text only improves remote tracebacks; never let it push a function over the limit.
        if sum(len(s.text) for s in shipped) + proto.ByteSize() <= self.max_payload_bytes // 2:
            proto.sources.extend(shipped)
        request = scheduler_service_pb2.CreateFunctionRequest(function=proto, replace_existing=True)
        self._retrying(
            lambda: call(
                f"registering {name!r}",
                lambda: self._core.scheduler.CreateFunction(request, timeout=self.timeout),
            ),
            f"registering {name!r}",
        )
        return CloudburstFunction(name, self)

    def get_function(self, name: str) -> CloudburstFunction | None:
        """Return a handle to a registered function, or None when there is none."""
        request = scheduler_service_pb2.GetFunctionRequest(name=name)
        try:
            self._retrying(
                lambda: call(
                    f"getting {name!r}",
                    lambda: self._core.scheduler.GetFunction(request, timeout=self.timeout),
                ),
                f"getting {name!r}",
            )
        except NotFoundError:
            return None
        return CloudburstFunction(name, self)

    def list(self, prefix: str | None = None) -> list[str]:
        """Return the registered function names, optionally only those starting with ``prefix``."""
        names: list[str] = []
        token = ""
        while True:
            request = scheduler_service_pb2.ListFunctionsRequest(
                prefix=prefix or "", page_token=token
            )
            response = self._retrying(
                functools.partial(
                    lambda r: call(
                        "listing functions",
                        lambda: self._core.scheduler.ListFunctions(r, timeout=self.timeout),
                    ),
                    request,
                ),
                "listing functions",
            )
            names.extend(response.names)
            token = response.next_page_token
            if not token:
                return names

    def delete_function(self, name: str) -> None:
        """Delete a function that no DAG uses.

        Raises:
            FunctionNotFoundError: No such function.
            FunctionInUseError: A DAG uses it; delete the DAG first.
        """
        request = scheduler_service_pb2.DeleteFunctionRequest(name=name)
        self._forget(("function", name))
        self._run(
            call(
                f"deleting {name!r}",
                lambda: self._core.scheduler.DeleteFunction(request, timeout=self.timeout),
            ),
            f"deleting {name!r}",
        )

    def exec_func(self, name: str, args: Sequence[Any] = ()) -> CloudburstFuture:
        """Call a registered function with ``args``; returns a future of its result.

        The first call of a name on a connection returns once the scheduler
        accepted it. Later calls of it return at once, where the scheduler
        supports it: the call's response key is chosen here, so nothing is
        waited for. If the function was deleted meanwhile, ``get()`` on the
        future raises FunctionNotFoundError (as does ``get_object`` of its
        ``obj_id``, and a call that was given the future), and the next call of
        the name waits for the scheduler again.

        Raises:
            FunctionNotFoundError: No function has that name (see above for a name
                called before).
            SerializationError: An argument cannot be pickled (the message names it).
            PayloadTooLargeError: An argument is larger than ``max_payload_bytes``.
        """
        if not isinstance(args, (list, tuple)):
            args = (args,)
        arguments = [self._argument(a, f"argument {i + 1} of {name!r}") for i, a in enumerate(args)]
        frame = scheduler_service_pb2.StreamCallsRequest(
            stream_outcome=True, releasable=not self.keep_results
        )
        request = frame.call_function  # built in place: the frame does not copy it
        request.name = name
        request.arguments.extend(arguments)
        request.SetInParent()
        called = ("function", name)
        pending = self._traced_call(
            frame,
            f"calling {name!r}",
            f"call {name}",
            {"cloudburst.function": name},
            holds=_futures(args),
            called=called,
        )
        if pending.outcome is not None:
            pending.outcome.add_done_callback(
                functools.partial(self._was_answered, pending, called)
            )
        return CloudburstFuture(pending.response_key, self, pending, owned=frame.releasable)

    def _was_answered(
        self,
        pending: PendingCall,
        called: tuple[str, str] | None,
        outcome: concurrent.futures.Future[execution_pb2.Outcome],
    ) -> None:
        """Remember a result key answered directly: reads of it wait until it is stored.

        A call answered that its function or DAG (``called``) is not registered
        makes the next call of that name wait for the scheduler's acceptance.
        """
        with self._answered_lock:
            self._answered[pending.response_key] = None
            if len(self._answered) > _WRITES_REMEMBERED:
                self._answered.popitem(last=False)
        if called is None or outcome.cancelled():
            return
        error = outcome.exception()
        if isinstance(error, (FunctionNotFoundError, DagNotFoundError)) or (
            error is None
            and (result := outcome.result()).WhichOneof("result") == "error"
            and result.error.reason in _NOT_FOUND
        ):
            self._forget(called)

    def _forget(self, called: tuple[str, str]) -> None:
        """Make the next call of a function or DAG wait to be accepted again."""
        with self._called_lock:
            self._called.pop(called, None)

    def _choose_key(self, core: Core, called: tuple[str, str] | None) -> str:
        """A response key for a call of ``called`` that need not wait to be accepted, or "".

        Only for a function or DAG this connection saw accepted before (so that
        a wrong name still raises from the call), on a stream whose scheduler
        takes keys its callers choose, while few calls are unanswered (see
        :attr:`Core.may_skip_accept`). The key has the scheduler's own form.
        """
        if called is None or not core.may_skip_accept:
            return ""
        with self._called_lock:
            if called not in self._called:
                return ""
            self._called.move_to_end(called)
        return secrets.token_hex(16)

    def _was_accepted(self, called: tuple[str, str]) -> None:
        with self._called_lock:
            self._called[called] = None
            if len(self._called) > _NAMES_REMEMBERED:
                self._called.popitem(last=False)

    def _stored_soon(self, key: str, forget: bool = False) -> bool:
        """Whether ``key`` holds a result answered directly (``forget``: stop waiting for it)."""
        with self._answered_lock:
            if forget:
                return self._answered.pop(key, 0) is None
            return key in self._answered

    def _traced_call(
        self,
        frame: scheduler_service_pb2.StreamCallsRequest,
        what: str,
        span_name: str,
        attributes: dict[str, str],
        timeout: float | None = None,
        holds: tuple[CloudburstFuture, ...] = (),
        outcome_only: bool = False,
        called: tuple[str, str] | None = None,
    ) -> PendingCall:
        """Send a call frame under a call span that ends when the outcome arrives.

        Returns once the call is accepted; with ``outcome_only`` (a direct
        response), once its outcome is in. A call of a function or DAG
        (``called``: kind and name) this connection saw accepted before returns
        at once, with a response key chosen here, where the scheduler takes one
        (see :meth:`_choose_key`).
        """
        span = tracing.start(span_name, attributes, frame.trace_context)
        try:
            if self._closed:
                raise CloudburstError("the connection is closed; create a new CloudburstConnection")
            core = self._core
            key = "" if outcome_only else self._choose_key(core, called)
            pending = core.send_call(frame, True, holds, outcome_only=outcome_only, chosen_key=key)
            if not key:
                try:
                    pending.wait_accepted(self.timeout if timeout is None else timeout)
                except UnavailableError as exc:
                    # The call may have reached the scheduler: not retried, but the next goes
                    # elsewhere.
                    if type(exc) is UnavailableError:
                        self._fail_over(core)
                    raise
                if called is not None:
                    self._was_accepted(called)
        except BaseException as exc:
            tracing.finish(span, exc)
            raise
        if span is not None:
            span.set_attribute("cloudburst.response_key", pending.response_key)
        tracing.end_with(span, pending.outcome)
        return pending

    # -- DAGs ----------------------------------------------------------------------

    def register_dag(
        self,
        name: str,
        functions: Sequence[str],
        connections: Sequence[tuple[str, str]],
        *,
        strict: bool = False,
        gpu_functions: Sequence[str] | None = None,
        batching_functions: Sequence[str] | None = None,
        colocated: Sequence[str] | None = None,
        retries: int = 0,
    ) -> bool:
        """Register a DAG of registered functions; edges are ``(upstream, downstream)`` pairs.

        ``gpu_functions``, ``batching_functions`` and ``colocated`` are the
        original's; they are accepted when empty. ``retries`` (0 to 10) opts the
        DAG into at-least-once runs: a call that loses one of its executors runs
        again from the start, up to that many times, so its functions may run
        more than once. Without it such a call ends with UnavailableError.

        Returns:
            True on success. False when registration fails (an unknown function, a
            cycle, more than one sink, an unconnected function, a taken name); the
            reason is then in :attr:`last_error` (and logged). With ``strict=True``
            the error is raised instead.

        Raises:
            NotSupportedError: ``gpu_functions``, ``batching_functions`` or
                ``colocated`` is not empty.
        """
        _original.reject_unsupported(
            "register_dag",
            gpu_functions=gpu_functions,
            batching_functions=batching_functions,
            colocated=colocated,
        )
        if not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            return self._failed(
                InvalidArgumentError(
                    f"register_dag {name!r}: retries must be an int from 0 to {MAX_RETRIES}"
                ),
                strict,
            )
        dag = function_pb2.Dag(name=name, retries=retries)
        try:
            for function in functions:
                dag.functions.append(function[0] if isinstance(function, tuple) else function)
            for pair in connections:
                upstream, downstream = pair
                dag.connections.append(
                    function_pb2.Connection(upstream=upstream, downstream=downstream)
                )
        except (TypeError, ValueError) as exc:
            error: CloudburstError = InvalidArgumentError(
                f"register_dag {name!r}: functions must be names and connections "
                f"(upstream, downstream) pairs ({exc})"
            )
            return self._failed(error, strict)
        request = scheduler_service_pb2.CreateDagRequest(dag=dag)
        try:
            self._run(
                call(
                    f"registering DAG {name!r}",
                    lambda: self._core.scheduler.CreateDag(request, timeout=self.timeout),
                ),
                f"registering DAG {name!r}",
            )
        except (InvalidArgumentError, NotFoundError, DagAlreadyExistsError) as exc:
            # What the DAG itself gets wrong is a False; anything else (unreachable) raises.
            return self._failed(exc, strict)
        self.last_error = None
        return True

    def _failed(self, error: CloudburstError, strict: bool) -> bool:
        if strict:
            raise error
        self.last_error = error
        logger.warning("%s", error)
        return False

    def delete_dag(self, name: str, *, strict: bool = False) -> bool:
        """Delete a DAG; returns False (reason in :attr:`last_error`) when there is none."""
        request = scheduler_service_pb2.DeleteDagRequest(name=name)
        self._forget(("dag", name))
        try:
            self._run(
                call(
                    f"deleting DAG {name!r}",
                    lambda: self._core.scheduler.DeleteDag(request, timeout=self.timeout),
                ),
                f"deleting DAG {name!r}",
            )
        except NotFoundError as exc:
            return self._failed(exc, strict)
        self.last_error = None
        return True

    def list_dags(self, prefix: str | None = None) -> builtins.list[str]:
        """Return the names of registered DAGs."""
        request = scheduler_service_pb2.ListDagsRequest(prefix=prefix or "")
        names: builtins.list[str] = []
        while True:
            response = self._retrying(
                functools.partial(
                    lambda r: call(
                        "listing DAGs",
                        lambda: self._core.scheduler.ListDags(r, timeout=self.timeout),
                    ),
                    request,
                ),
                "listing DAGs",
            )
            names.extend(response.names)
            if not response.next_page_token:
                return names
            request = scheduler_service_pb2.ListDagsRequest(
                prefix=prefix or "", page_token=response.next_page_token
            )

    def call_dag(
        self,
        dname: str,
        arg_map: Mapping[str, Any],
        direct_response: bool = False,
        consistency: Any = None,
        output_key: str | None = None,
        client_id: str | None = None,
        dry_run: bool = False,
        continuation: Any = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Call a DAG. ``arg_map`` maps function names to one argument or a list of them.

        ``consistency``, ``client_id``, ``dry_run`` and ``continuation`` are the
        original's: the default consistency (None or NORMAL) is the only one.

        Like :meth:`exec_func`, a later call of a DAG this connection called
        before returns its future at once (not with ``direct_response`` or
        ``output_key``); if the DAG was deleted meanwhile, ``get()`` raises
        DagNotFoundError.

        Returns:
            A :class:`CloudburstFuture` of the sink's result; with
            ``direct_response=True``, the result itself.

        Raises:
            DagNotFoundError: No DAG has that name (see above for one called before).
            RemoteFunctionError: With ``direct_response``, a function raised.
            CloudburstTimeoutError: With ``direct_response``, no result within the timeout.
            NotSupportedError: Another consistency mode, ``dry_run`` or a ``continuation``.
        """
        _original.check_consistency("call_dag", consistency)
        _original.reject_unsupported("call_dag", dry_run=dry_run, continuation=continuation)
        frame = scheduler_service_pb2.StreamCallsRequest(
            stream_outcome=not direct_response,
            releasable=not (direct_response or output_key or self.keep_results),
        )
        request = frame.call_dag  # built in place: the frame does not copy it
        request.SetInParent()
        request.name, request.direct_response = dname, direct_response
        request.response_key = output_key or ""
        for function, args in (arg_map or {}).items():
            values = args if isinstance(args, list) else [args]
            entry = request.function_arguments[function]
            entry.SetInParent()
            for index, arg in enumerate(values):
                entry.arguments.append(self._argument(arg, f"argument {index + 1} of {function!r}"))
        limit = self.timeout if timeout is None else timeout
        holds = tuple(
            future
            for args in (arg_map or {}).values()
            for future in _futures(args if isinstance(args, list) else [args])
        )
        # A user-named key is the user's: only a key the runtime would choose may be chosen here.
        called = None if direct_response or output_key else ("dag", dname)
        pending = self._traced_call(
            frame,
            f"calling DAG {dname!r}",
            f"call_dag {dname}",
            {"cloudburst.dag": dname},
            limit,
            holds,
            outcome_only=direct_response,
            called=called,
        )
        if direct_response:
            return self._decode(pending.wait_outcome(limit))
        if pending.outcome is not None:
            pending.outcome.add_done_callback(
                functools.partial(self._was_answered, pending, called)
            )
        return CloudburstFuture(pending.response_key, self, pending, owned=frame.releasable)

    # -- KVS -----------------------------------------------------------------------

    def get_object(
        self,
        key: str | CloudburstFuture | builtins.list[Any],
        deserialize: bool = True,
    ) -> Any:
        """Return the value stored at ``key``, or None when there is none.

        Args:
            key: A key (or a future, for its result), or a list of them: then a
                dict maps each key to its value or None, read in one batch.
            deserialize: False returns the stored bytes as they are.
        """
        decode = self._decode_lattice if deserialize else _stored_bytes
        if isinstance(key, builtins.list):
            keys = [self._key(k) for k in key]
            soon = [k for k in keys if self._stored_soon(k)]
            if soon:
                self._core.store_now(soon)  # held stores of them start now, not after the hold
            found = self._retrying(
                lambda: self._core.get_many(keys, timeout=self.timeout),
                f"get_object of {len(keys)} keys",
            )
            for k in keys:  # results answered directly and not stored yet: wait for them
                if found[k] is None and self._stored_soon(k):
                    found[k] = self._retrying(
                        functools.partial(self._stored_result, k), f"get_object({k!r})"
                    )
            return {k: None if found[k] is None else decode(found[k]) for k in keys}
        key = self._key(key)
        if self._stored_soon(key):
            # The executor stores a result just after answering it, or holds the store a
            # moment (asked here to start it at once): wait (briefly) for the store.
            self._core.store_now([key])
            lattice = self._retrying(lambda: self._stored_result(key), f"get_object({key!r})")
        else:
            lattice = self._retrying(
                lambda: self._core.get(key, timeout=self.timeout), f"get_object({key!r})"
            )
        return None if lattice is None else decode(lattice)

    get = get_object

    async def _stored_result(self, key: str) -> lattice_pb2.Lattice | chunks.LargeValue | None:
        """Read a result answered directly, waiting (briefly) for the store that follows."""
        lattice = await self._core.get(
            key, wait=True, timeout=min(self.timeout, RESULT_STORE_SECONDS)
        )
        if lattice is not None:
            self._stored_soon(key, forget=True)
        return lattice

    def put_object(self, key: str, value: Any) -> bool:
        """Store ``value`` at ``key`` (last writer wins); returns True once durable.

        Every attempt (again through the scheduler when the KVS is unreachable)
        sends the same timestamp and request id: see docs/protocol.md, "Objects
        at the KVS itself".
        """
        key = self._key(key)
        what = f"value for key {key!r}"
        data, serializer = _encode(value, what)
        size = len(data)
        check_length(size, what=what, limit=self.max_value_bytes)
        # One timestamp and one request id: a retry merges as the same write.
        write = Write(key, self._clock.now(), serializer, data, new_request_id())
        if size <= self._core.inline_value_bytes:
            # In one message: built here, off the loop, the bytes copied once. A larger
            # value goes in chunks, slices of the serialized value: no copy of the whole.
            write.frame = Core.put_frame(write)
        self._retrying(lambda: self._core.put(write, self.timeout), f"put_object({key!r})")
        self._wrote(key, write.timestamp.time_ns)
        return True

    def _wrote(self, key: str, time_ns: int) -> None:
        """Remember a write, so that a reference to its key is never served an older value."""
        self._written[key] = time_ns
        self._written.move_to_end(key)
        if len(self._written) > _WRITES_REMEMBERED:
            self._written.popitem(last=False)

    def delete_object(self, key: str) -> bool:
        """Delete ``key``; returns whether it existed.

        Every attempt sends the same request id (see :meth:`put_object`).
        """
        key = self._key(key)
        self._stored_soon(key, forget=True)
        request_id = new_request_id()  # sent by each attempt: a retry deletes once
        existed = self._run(
            self._core.delete(key, request_id, self.timeout), f"delete_object({key!r})"
        )
        self._wrote(key, self._clock.now().time_ns)  # a cached value from before is stale
        return bool(existed)

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def _key(key: str | CloudburstFuture) -> str:
        if isinstance(key, CloudburstFuture):
            return key.obj_id
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"a KVS key must be a non-empty string, not {key!r}")
        return key

    def _argument(self, arg: Any, what: str) -> value_pb2.Argument:
        if isinstance(arg, CloudburstFuture):
            return value_pb2.Argument(reference=value_pb2.Reference(key=arg.obj_id, wait=True))
        if isinstance(arg, CloudburstReference):
            reference = value_pb2.Reference(
                key=arg.key,
                wait=self._stored_soon(arg.key),  # a result being stored: wait for it
                raw=not arg.deserialize,
                not_before_ns=self._written.get(arg.key, 0),
            )
            return value_pb2.Argument(reference=reference)
        return value_pb2.Argument(value=_serialize(arg, what, self.max_payload_bytes))

    def _decode(self, outcome: execution_pb2.Outcome) -> Any:
        kind = outcome.WhichOneof("result")
        if kind == "value":
            return deserialize(outcome.value)
        if kind == "failure":
            raise failure_to_error(outcome.failure)
        if kind == "error":
            raise error_from_call_error(outcome.error)
        return None

    @staticmethod
    def _decode_lattice(lattice: lattice_pb2.Lattice | chunks.LargeValue) -> Any:
        if isinstance(lattice, chunks.LargeValue):
            if lattice.kind == "lww":  # decoded from the assembled bytes: no copy into a message
                return decode(lattice.take(), lattice.serializer)
            lattice = lattice.to_lattice()
        return lattice_value(lattice)
