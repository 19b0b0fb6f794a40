"""The asynchronous core of the SDK: one channel, stubs, and a long-lived call stream.

Calls travel over one ``StreamCalls`` stream (a message on an open stream costs
a fraction of a unary call). Each call is answered once it is accepted, and
again with its outcome when that was asked for (once, with both, when it
finished at once; a direct response only with its outcome). Where the
scheduler takes response keys its callers choose (it says so at once on each
stream, asked with ``chooses_keys``), a call may carry a key chosen here
(:meth:`Core.send_call` with ``chosen_key``): it is answered only with its
outcome, and its caller need not wait for the scheduler to accept it. If the
stream breaks, outstanding calls fail with UnavailableError and the next call
reopens it. Calls sent from several threads before the loop gets to them are
sent by one task, in one message where the scheduler reads batches.

Results released by their futures (see :meth:`Core.release_when_done`) ride
on the next call frame, or on a frame of their own after ``RELEASE_DELAY``
when no call comes. Results about to be read are named in a frame of their own
(:meth:`Core.store_now`), so that an executor holding their store starts it.

Objects are read and written through ``KvsService``: at the scheduler, which
forwards to the KVS tier, or, when the scheduler names KVS addresses that
answer (:meth:`Core.use_direct_kvs`), at the KVS itself, one hop fewer. A
direct call that finds the KVS unreachable is made again through the
scheduler, which then serves every KVS call until the KVS answers again.
At the KVS itself (also at ``cbgrpc serve``, which says it serves the KVS at
its own address), single-key reads, writes that fit in one message and
deletes go as frames of one ``StreamOps`` stream, writes of values over 64 KiB
on a second (see :class:`~cloudburst.opstream.OpStreams`), unless
``CLOUDBURST_KVS_STREAM=0``; values too large for one message keep their
chunked calls.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from cloudburst import _client_cert as client_cert
from cloudburst import chunks
from cloudburst._answers import AnswerStreams
from cloudburst._loop import LoopDriver
from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    UnauthenticatedError,
    UnavailableError,
)
from cloudburst.opstream import (
    MAX_STREAMED_GET_BYTES,
    OpRequest,
    OpStream,
    OpStreams,
    stream_enabled,
)
from cloudburst.rpc import call, error_from_call_error, error_from_rpc
from cloudburst.streams import OutboxStream, batches_enabled, settle
from cloudburst.transport import ClientSecurity
from cloudburst.v1 import (
    execution_pb2,
    kvs_service_pb2,
    kvs_service_pb2_grpc,
    lattice_pb2,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
    value_pb2,
)

#: Seconds a released result waits for a call frame to ride on before it gets its own.
RELEASE_DELAY = 0.05

#: The most released keys (or keys to store now) one frame carries.
RELEASES_PER_FRAME = 1000

#: Seconds close() gives the scheduler to read what the connection sent last (calls, released
#: results) and end the call stream; then the stream is cancelled. Calls it accepted run on.
CLOSE_GRACE_SECONDS = 1.0

#: The most keys one BatchGetValues names (the service's limit); more take several.
BATCH_KEYS = 1000

#: The most calls a connection has sent or queued, unanswered, for a call to skip waiting to be
#: accepted (a chosen key): past it, calls wait to be accepted again, so that a caller that
#: sends faster than the scheduler reads is held back, not buffered here without bound.
CHOSEN_KEYS_IN_FLIGHT = 64

#: Seconds after losing the KVS's direct address before it is tried again (then doubling).
DIRECT_RETRY_SECONDS = 5.0

#: The longest pause between tries of a lost direct address.
DIRECT_RETRY_MAX_SECONDS = 120.0

logger = logging.getLogger(__name__)

T = TypeVar("T")

if TYPE_CHECKING:
    KvsStub = kvs_service_pb2_grpc.KvsServiceAsyncStub

_USER = lattice_pb2.KEYSPACE_USER


@dataclass
class PendingCall:
    """The two answers of one streamed call.

    They are thread-safe futures that the stream reader settles directly; the
    caller waiting on them runs the loop meanwhile when no other thread does.
    A call whose caller waits for nothing but its outcome (a direct response)
    has no ``accepted`` future: it is accepted with its outcome; nor has a
    call whose key was chosen here (``chosen``), whose ``response_key`` is known
    from the start.
    """

    driver: LoopDriver
    accepted: concurrent.futures.Future[str] | None
    outcome: concurrent.futures.Future[execution_pb2.Outcome] | None
    response_key: str = field(default="")
    """The key the scheduler answered with, once it accepted the call."""
    #: Futures passed as arguments, kept alive (so not released) until the outcome arrives.
    holds: tuple[Any, ...] = ()
    chosen: bool = False
    """Whether ``response_key`` was chosen here, so the call is not answered when accepted."""
    unsent: bool = False
    """Set when a call with a chosen key failed before it was sent: it never ran."""

    def wait_accepted(self, timeout: float) -> str:
        """Wait until the scheduler accepted the call; returns the response key.

        Without an ``accepted`` future, this waits for the outcome instead:
        what it raises the call raised before it was accepted; an error of a
        call accepted already is left to :meth:`wait_outcome`.
        """
        future: concurrent.futures.Future[Any] | None = (
            self.accepted if self.accepted is not None else self.outcome
        )
        assert future is not None
        if not self.driver.settled(future, timeout):
            if self.accepted is not None or not self.response_key:
                raise CloudburstTimeoutError(f"the call was not accepted within {timeout:.1f}s")
            return self.response_key
        try:
            future.result()
        except CloudburstError:
            if self.accepted is not None or not self.response_key:
                raise
        return self.response_key

    def wait_outcome(self, timeout: float) -> execution_pb2.Outcome:
        """Wait for the call's outcome; an error it was settled with is raised as it is."""
        assert self.outcome is not None
        if not self.driver.settled(self.outcome, timeout):
            raise CloudburstTimeoutError(
                f"the result at {self.response_key!r} was not ready within {timeout:.1f}s"
            )
        return self.outcome.result()


class Core:
    """Channel, stubs and the call stream; lives on the SDK's loop, which ``driver`` runs."""

    def __init__(
        self,
        target: str,
        max_payload_bytes: int,
        driver: LoopDriver,
        security: ClientSecurity | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.driver = driver
        self.target = target
        security = security or ClientSecurity()
        self._security = security
        self._tls = security.tls
        self._max_payload_bytes = max_payload_bytes
        self.channel = security.channel(target, max_payload_bytes)
        self.scheduler = scheduler_service_pb2_grpc.SchedulerServiceStub(self.channel)
        self.proxy_kvs: KvsStub = kvs_service_pb2_grpc.KvsServiceStub(self.channel)
        """KvsService at the scheduler, which forwards to the KVS tier."""
        self.kvs: KvsStub = self.proxy_kvs
        """KvsService where KVS calls go now: the KVS itself, or the scheduler."""
        self.kvs_address: str | None = None
        """The address of the KVS that KVS calls go to directly; None: through the scheduler."""
        self._direct: tuple[str, grpc.aio.Channel, KvsStub] | None = None
        self._connecting: asyncio.Future[None] | None = None
        """The wait for the channel to connect, while it goes on (see :meth:`wait_ready`)."""
        self._direct_inline = chunks.INLINE_VALUE_BYTES
        """Larger values written to the KVS itself go in chunks (from its own GetLimits)."""
        self._proxy_inline = chunks.INLINE_VALUE_BYTES
        """Larger values written at the scheduler's address go in chunks (from its GetLimits)."""
        self._ops: OpStreams | None = None
        """The op streams to the KVS called directly (None: unary calls only)."""
        self._proxy_ops: OpStreams | None = None
        """The op streams at the scheduler's address, where a KVS itself serves (``cbgrpc
        serve``; :meth:`stream_ops_here`). None: unary calls there, as a proxy takes."""
        self._stream_ops = stream_enabled()
        """Whether small KVS ops at the KVS itself go over an op stream."""
        self._retry_direct: asyncio.Task[None] | None = None
        self._batches = batches_enabled()
        """Whether this connection reads batched answers and batches calls."""
        self._stream: OutboxStream[
            scheduler_service_pb2.StreamCallsRequest, scheduler_service_pb2.StreamCallsResponse
        ] = OutboxStream(
            f"the scheduler at {target}",
            self.scheduler.StreamCalls,
            self._dispatch,
            self._ended,
            first_frame=self._answer_streams_frame,
            batches=self._batches,
        )
        self.answers: AnswerStreams | None = None
        """The answer streams at executors, once :meth:`use_answer_streams` opened them."""
        self._pending: dict[int, PendingCall] = {}
        self._answered_directly: list[int] = []
        """Sequences answered on answer streams, for the scheduler (see ``answered_sequences``)."""
        self._sequence = itertools.count(1)
        self._outbox: collections.deque[
            tuple[scheduler_service_pb2.StreamCallsRequest, PendingCall]
        ] = collections.deque()
        """Calls sent from any thread, not yet taken by a sender on the loop."""
        self._outbox_lock = threading.Lock()
        self._sender_started = False
        """Whether a sender task was started that has not yet looked at the outbox."""
        self._released: collections.deque[str] = collections.deque()
        self._release_scheduled = False
        self._keys_stream = 0
        """The number of the stream (``OutboxStream.opened``) whose scheduler takes chosen keys."""
        self._store_keys_stream = 0
        """The number of the stream whose scheduler reads ``store_keys``."""
        self._told_stream = 0
        """The number of the stream whose scheduler said what it takes (an answer of no call)."""
        self._store_keys_waiting: list[str] = []
        """Keys to store now, named before the stream's scheduler said whether it reads them."""

    @property
    def takes_chosen_keys(self) -> bool:
        """Whether a call sent now may carry a chosen key (its stream's scheduler said so)."""
        stream = self._stream
        return self._keys_stream == stream.opened and stream.is_open

    @property
    def may_skip_accept(self) -> bool:
        """Whether a call sent now may carry a chosen key and not wait to be accepted.

        Only while fewer than :data:`CHOSEN_KEYS_IN_FLIGHT` calls are unanswered
        or unsent: beyond that, waiting for the accept answer is the caller's
        back-pressure (a scheduler reads no more calls while too many of its
        stream's are unanswered).
        """
        return (
            self.takes_chosen_keys
            and len(self._pending) + len(self._outbox) < CHOSEN_KEYS_IN_FLIGHT
        )

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel connects, or raise saying why it did not.

        Raises:
            UnauthenticatedError: The client certificate is expired or not yet
                valid, or the server refused it in the TLS handshake.
            UnavailableError: No server answered; the message says where it tried.
        """
        cert_file = self._security.cert_file
        problem = client_cert.validity_problem(cert_file) if cert_file else None
        if problem:
            raise UnauthenticatedError(
                f"{problem}; servers refuse it in the TLS handshake: {client_cert.ADVICE}"
            )
        # The wait is not cancelled when it times out: gRPC ends a cancelled wait only once
        # the channel goes, and would then hand its end to this loop, closed by then (an
        # "Event loop is closed" traceback in the next connection's loop). It ends, and is
        # awaited, in close().
        self._connecting = asyncio.ensure_future(self.channel.channel_ready())
        try:
            await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
            self._connecting = None
        except TimeoutError:
            hint = "check the address and that `cbgrpc serve` (or the cluster) is running"
            if self._tls:
                last = await self._last_error()
                if cert_file and client_cert.refused_in_handshake(last):
                    cause = client_cert.issuer_problem(cert_file, self._security.ca_file) or (
                        "it is not signed by a CA the server trusts for clients"
                    )
                    raise UnauthenticatedError(
                        f"the server at {self.target} refused this client's certificate "
                        f"{cert_file} in the TLS handshake: {cause}; {client_cert.ADVICE} "
                        f"(gRPC's last error: {last})"
                    ) from None
                hint += (
                    "; with TLS, also that tls_ca is the cluster's CA and that the server "
                    "accepts your client certificate (one from another CA, or expired, is "
                    f"refused in the handshake). Last error: {last}"
                )
            raise UnavailableError(
                f"cannot reach a cloudburst scheduler at {self.target} within {timeout:.0f}s; "
                + hint
            ) from None

    async def _last_error(self) -> str:
        """What the channel's last connection attempt ended with (one quick call)."""
        try:
            await self.scheduler.ListFunctions(
                scheduler_service_pb2.ListFunctionsRequest(), timeout=2
            )
        except grpc.RpcError as exc:
            # Every error a call raises has details(); grpc.RpcError does not declare it.
            rpc: Any = exc
            return str(rpc.details())
        return "none"

    # -- the call stream -----------------------------------------------------------

    def _ended(self, error: grpc.RpcError | None) -> None:
        failure: CloudburstError = (
            error_from_rpc(error, what=f"the call stream to the scheduler at {self.target}")
            if error is not None
            else UnavailableError(f"the call stream to {self.target} closed")
        )
        pending_calls = list(self._pending.values())
        self._pending.clear()
        # Releases queued for this stream mean nothing to the next one.
        self._released.clear()
        self._answered_directly.clear()
        # The next stream may reach another scheduler: ask it again.
        self._keys_stream = self._store_keys_stream = self._told_stream = 0
        self._store_keys_waiting.clear()
        for pending in pending_calls:
            settle(pending.accepted, error=failure)
            settle(pending.outcome, error=failure)
            pending.holds = ()

    def _dispatch(self, answer: scheduler_service_pb2.StreamCallsResponse) -> None:
        pending = self._pending.get(answer.sequence)
        if pending is None:
            if answer.sequence == 0:
                self._told(answer)
            return
        kind = answer.WhichOneof("answer")
        if kind == "error":
            error = error_from_call_error(answer.error)
            del self._pending[answer.sequence]
            settle(pending.accepted, error=error)
            settle(pending.outcome, error=error)
            pending.holds = ()
            return
        body = answer.call_function if kind == "call_function" else answer.call_dag
        pending.response_key = body.response_key
        settle(pending.accepted, body.response_key)
        if body.HasField("outcome"):
            del self._pending[answer.sequence]
            settle(pending.outcome, body.outcome)
            pending.holds = ()
        elif pending.outcome is None:
            del self._pending[answer.sequence]

    def send_call(
        self,
        frame: scheduler_service_pb2.StreamCallsRequest,
        want_outcome: bool,
        holds: tuple[Any, ...] = (),
        *,
        outcome_only: bool = False,
        chosen_key: str = "",
    ) -> PendingCall:
        """Send a call from any thread; wait on the returned futures for its answers.

        ``holds`` (the futures among the arguments) stay alive until the outcome arrives.
        With ``outcome_only`` (and ``want_outcome``), the call has no ``accepted``
        future: its caller waits for the outcome alone. So it has with
        ``chosen_key`` (and ``want_outcome``; only when :attr:`takes_chosen_keys`),
        the response key chosen for it, sent in the frame: if the stream it was
        allowed on is gone by the time the call is written, the call fails with
        UnavailableError (``unsent``) instead of going to a scheduler that may
        not take it.

        Calls sent from several threads before the loop gets to them are sent
        together, by one task, in one message where the scheduler reads batches.
        """
        chosen = bool(chosen_key) and want_outcome
        pending = PendingCall(
            driver=self.driver,
            accepted=None
            if (outcome_only or chosen) and want_outcome
            else concurrent.futures.Future(),
            outcome=concurrent.futures.Future() if want_outcome else None,
            response_key=chosen_key if chosen else "",
            holds=holds,
            chosen=chosen,
        )
        if chosen:
            frame.chosen_response_key = chosen_key
        self._outbox.append((frame, pending))
        with self._outbox_lock:
            if self._sender_started:
                return pending  # the sender started for calls before takes this one too
            self._sender_started = True
        # A task, not a callback that starts a writer task: its first step writes.
        sender = self._send_outbox()
        try:
            self.driver.start(sender)
        except BaseException:
            # The loop is gone (start closed the sender): the next call must try (and
            # fail) too. Or a Ctrl-C landed, maybe after the loop took the sender, which
            # is then the loop's to run: a second sender started meanwhile finds nothing.
            with self._outbox_lock:
                self._sender_started = False
            raise
        return pending

    async def _send_outbox(self) -> None:
        """Send every call in the outbox (on the loop, started by :meth:`send_call`)."""
        with self._outbox_lock:
            # From now on, a call that comes starts another sender: none is left behind.
            self._sender_started = False
        outbox = self._outbox
        if not outbox:
            return  # an earlier sender took them
        sent: list[tuple[scheduler_service_pb2.StreamCallsRequest, PendingCall]] = []
        takes_keys = self.takes_chosen_keys
        while outbox:
            frame, pending = outbox.popleft()
            if pending.chosen and not takes_keys:
                # The stream whose scheduler took chosen keys broke since: the next may not.
                pending.unsent = True
                settle(
                    pending.outcome,
                    error=UnavailableError(
                        f"the call stream to the scheduler at {self.target} broke before the "
                        "call was sent; it did not run: call it again"
                    ),
                )
                pending.holds = ()
                continue
            frame.sequence = next(self._sequence)
            self._pending[frame.sequence] = pending
            frame.reads_batches = self._batches
            if not takes_keys:
                frame.chooses_keys = True
            sent.append((frame, pending))
        if not sent:
            return
        frame = sent[0][0]
        if self._answered_directly:
            if self._stream.is_open:
                frame.answered_sequences.extend(self._answered_directly)
            self._answered_directly.clear()
        if self._released:
            if self._stream.is_open:
                frame.release_keys.extend(self._take_releases())
            else:
                self._released.clear()  # they were the last stream's to release
        try:
            if len(sent) == 1:
                await self._stream.write(frame)
            else:
                await self._stream.write_all([frame for frame, _ in sent])
        except UnavailableError as exc:
            for frame, pending in sent:
                self._pending.pop(frame.sequence, None)
                settle(pending.accepted, error=exc)
                settle(pending.outcome, error=exc)

    # -- answer streams ------------------------------------------------------------

    async def use_answer_streams(self, timeout: float) -> bool:
        """Hold answer streams at the scheduler's executors, if it answers through them.

        Waits up to ``timeout`` for them to register; returns whether the
        scheduler uses them.
        """
        answers = AnswerStreams(
            self.scheduler,
            self._security,
            self._max_payload_bytes,
            self._dispatch_direct,
            self._answer_streams_changed,
            self._answer_stream_lost,
        )
        self.answers = answers
        if await answers.start(timeout):
            return True
        self.answers = None
        return False

    def _dispatch_direct(self, answer: scheduler_service_pb2.StreamCallsResponse) -> None:
        """An answer from an answer stream: as one from the scheduler, and noted for it."""
        known = answer.sequence in self._pending
        self._dispatch(answer)
        if known and answer.sequence not in self._pending:
            # The next frame tells the scheduler, which may not have heard yet.
            self._answered_directly.append(answer.sequence)

    def _answer_streams_frame(self) -> scheduler_service_pb2.StreamCallsRequest | None:
        """The frame naming the answer streams held now (None: none is)."""
        answers = self.answers
        if answers is None or not answers.registered:
            return None
        frame = scheduler_service_pb2.StreamCallsRequest()
        frame.answer_streams.answer_stream_id = answers.stream_id
        frame.answer_streams.executor_ids.extend(sorted(answers.registered))
        return frame

    def _answer_streams_changed(self) -> None:
        # A stream opened later starts with the frame (OutboxStream's first frame).
        if self._stream.is_open and (frame := self._answer_streams_frame()) is not None:
            self._stream.send(frame)

    def _answer_stream_lost(self, executor_id: str) -> None:
        if not self._stream.is_open:
            return  # the calls that stream waited for failed with it
        frame = scheduler_service_pb2.StreamCallsRequest()
        frame.answer_stream_lost.executor_id = executor_id
        frame.answer_stream_lost.sequences.extend(
            sequence for sequence, pending in self._pending.items() if pending.outcome is not None
        )
        self._stream.send(frame)

    # -- releasing results ---------------------------------------------------------

    def release_when_done(self, key: str, pending: PendingCall) -> None:
        """Release the result at ``key`` once its call's outcome arrived; from any thread.

        The scheduler then deletes it. Call when nothing can read the result any
        more (its future is gone).
        """
        if pending.outcome is not None:
            pending.outcome.add_done_callback(functools.partial(self._queue_release, key))

    def _queue_release(self, key: str, _outcome: object) -> None:
        self._released.append(key)
        if not self._release_scheduled:
            self._release_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self.loop.call_later, RELEASE_DELAY, self._flush)
            except RuntimeError:
                pass  # the loop is closed: the connection is gone

    def _take_releases(self) -> list[str]:
        keys: list[str] = []
        while self._released and len(keys) < RELEASES_PER_FRAME:
            keys.append(self._released.popleft())
        return keys

    def _flush(self) -> None:
        """Send the releases no call frame carried, in frames of their own."""
        self._release_scheduled = False
        while self._released:
            if not self._stream.is_open:
                self._released.clear()  # a new stream would ignore them
                return
            frame = scheduler_service_pb2.StreamCallsRequest()
            frame.release_keys.extend(self._take_releases())
            self._stream.send(frame)

    # -- reading results soon ------------------------------------------------------

    def store_now(self, keys: Sequence[str]) -> None:
        """Ask that results about to be read be stored at once; from any thread, never waits.

        For keys of results of this stream's calls, answered (``store_keys``): an
        executor that holds the store of one (see "Held stores" in docs/protocol.md)
        starts it now instead of when the hold ends. The scheduler ignores other keys.
        Nothing is sent to a scheduler that did not say it reads them (an earlier
        release): the read then waits for the hold to end.
        """
        try:
            self.loop.call_soon_threadsafe(self._send_store_keys, list(keys))
        except RuntimeError:
            pass  # the loop is closed: the connection is gone

    def _told(self, answer: scheduler_service_pb2.StreamCallsResponse) -> None:
        """Learn what the stream's scheduler takes from its answer of no call."""
        opened = self._stream.opened
        self._told_stream = opened
        if answer.takes_chosen_keys:
            self._keys_stream = opened
        if answer.takes_store_keys:
            self._store_keys_stream = opened
        waiting, self._store_keys_waiting = self._store_keys_waiting, []
        if waiting:
            self._send_store_keys(waiting)

    def _send_store_keys(self, keys: list[str]) -> None:
        stream = self._stream
        if not stream.is_open:
            return  # the stream whose calls made them is gone: a new one would ignore them
        if self._store_keys_stream != stream.opened:
            if self._told_stream != stream.opened:
                # The outcome came on an answer stream before the scheduler's word on this
                # one: wait for it (a scheduler that never says anything gets nothing).
                waiting = self._store_keys_waiting
                waiting.extend(keys)
                del waiting[:-RELEASES_PER_FRAME]
            return  # an earlier release, which would answer with an error
        for start in range(0, len(keys), RELEASES_PER_FRAME):
            frame = scheduler_service_pb2.StreamCallsRequest()
            frame.store_keys.extend(keys[start : start + RELEASES_PER_FRAME])
            stream.send(frame)

    # -- KVS -----------------------------------------------------------------------

    async def use_direct_kvs(self, addresses: Sequence[str], timeout: float) -> bool:
        """Call the KVS directly at the first of ``addresses`` that answers within ``timeout``.

        Returns whether one did; if none does, KVS calls keep going through the
        scheduler. A refused connection fails at once; ``timeout`` bounds an
        address that does not answer at all.
        """
        for address in addresses:
            channel = self._security.channel(address, self._max_payload_bytes)
            stub: KvsStub = kvs_service_pb2_grpc.KvsServiceStub(channel)
            try:
                limits = await stub.GetLimits(kvs_service_pb2.GetLimitsRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                rpc: Any = exc
                logger.info(
                    "the KVS at %s does not answer (%s); objects go through the scheduler",
                    address,
                    rpc.details(),
                )
                await channel.close()
                continue
            self._direct = (address, channel, stub)
            self._direct_inline = chunks.inline_bytes(limits)
            if self._stream_ops:
                self._ops = OpStreams(stub, f"the KVS at {address}")
            self.kvs, self.kvs_address = stub, address
            return True
        return False

    def learn_limits(self, limits: kvs_service_pb2.GetLimitsResponse) -> None:
        """Size the writes sent to the scheduler's address by its ``GetLimits`` answer."""
        self._proxy_inline = chunks.inline_bytes(limits)

    @property
    def inline_value_bytes(self) -> int:
        """The largest value a write sent now goes in one message with; larger: chunks."""
        return self._inline_at(self.kvs)

    def _inline_at(self, stub: KvsStub) -> int:
        # The service's limit, and this client's own: its channels send no more.
        inline = self._proxy_inline if stub is self.proxy_kvs else self._direct_inline
        return min(inline, self._max_payload_bytes)

    async def _on_kvs(self, operation: Callable[[KvsStub, OpStreams | None], Awaitable[T]]) -> T:
        """Run an idempotent KVS operation at the KVS; if that is unreachable, via the scheduler.

        At the KVS the operation gets the op stream, if any, for its small ops;
        through the scheduler (whose KVS proxy serves no op stream) it makes unary
        calls, unless a KVS itself serves there (:meth:`stream_ops_here`).
        """
        stub = self.kvs
        if stub is self.proxy_kvs:
            return await operation(stub, self._proxy_ops)
        try:
            return await operation(stub, self._ops)
        except UnavailableError as exc:
            if type(exc) is not UnavailableError:
                raise
            self._leave_direct(exc)
        return await operation(self.proxy_kvs, self._proxy_ops)

    def stream_ops_here(self) -> None:
        """Send small KVS ops at the scheduler's address over an op stream.

        For a server that said it serves ``StreamOps`` there itself
        (``GetLimitsResponse.serves_op_streams``: ``cbgrpc serve``); a scheduler's
        proxy does not. Nothing changes when op streams are off for this process.
        """
        if self._stream_ops and self._proxy_ops is None:
            self._proxy_ops = OpStreams(self.proxy_kvs, f"the KVS at {self.target}")

    def _leave_direct(self, error: CloudburstError) -> None:
        """Send KVS calls through the scheduler until the KVS answers directly again."""
        if self._direct is None or self.kvs is self.proxy_kvs:
            return
        logger.warning(
            "the KVS at %s is unreachable (%s); objects go through the scheduler until it answers",
            self._direct[0],
            error,
        )
        self.kvs, self.kvs_address = self.proxy_kvs, None
        self._retry_direct = self.loop.create_task(self._return_to_direct())

    async def _return_to_direct(self) -> None:
        """Try the KVS's direct address now and then; use it again once it answers."""
        assert self._direct is not None
        address, _, stub = self._direct
        delay = DIRECT_RETRY_SECONDS
        while True:
            await asyncio.sleep(delay)
            try:
                limits = await stub.GetLimits(kvs_service_pb2.GetLimitsRequest(), timeout=delay)
            except grpc.RpcError:
                delay = min(delay * 2, DIRECT_RETRY_MAX_SECONDS)
                continue
            logger.info("the KVS at %s answers again; objects go there directly", address)
            self._direct_inline = chunks.inline_bytes(limits)  # a restart may have changed them
            self.kvs, self.kvs_address = stub, address
            return

    async def get(
        self, key: str, wait: bool = False, timeout: float = 30.0
    ) -> lattice_pb2.Lattice | chunks.LargeValue | None:
        """Read a user key; with ``wait``, wait up to ``timeout`` seconds for it to exist.

        A value too large for one message comes as a :class:`~cloudburst.chunks.LargeValue`,
        its bytes not yet copied into a lattice.
        """
        return await self._on_kvs(functools.partial(self._get, key=key, wait=wait, timeout=timeout))

    async def _get(
        self, stub: KvsStub, ops: OpStreams | None, key: str, wait: bool, timeout: float
    ) -> lattice_pb2.Lattice | chunks.LargeValue | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Asks for no larger a message than this client's channels take: a KVS (or scheduler)
        # with a higher limit would otherwise send one that is refused here.
        request = kvs_service_pb2.GetValueRequest(
            key=key, keyspace=_USER, wait=wait, max_message_bytes=self._max_payload_bytes
        )
        what = f"reading key {key!r}"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            response = await self._get_value(stub, ops, request, remaining, what)
            if response is None:  # a wait that reached the deadline
                return None
            if response.chunked:  # too large for one message
                return await chunks.receive(
                    stub,
                    key,
                    lattice_pb2.KEYSPACE_USER,
                    max(deadline - loop.time(), 1.0),
                    self._max_payload_bytes,
                )
            if response.found:
                return response.lattice
            if not wait:
                return None
            # The server ends a wait at its own limit; keep waiting until ours.

    @staticmethod
    async def _get_value(
        stub: KvsStub,
        ops: OpStreams | None,
        request: kvs_service_pb2.GetValueRequest,
        timeout: float,
        what: str,
    ) -> kvs_service_pb2.GetValueResponse | None:
        """One GetValue, on the op stream if there is one; None: a wait reached the deadline."""
        try:
            if ops is not None and ops.small.available:
                frame = OpRequest()
                frame.get.CopyFrom(request)
                frame.get.max_message_bytes = chunks.smaller_limit(
                    MAX_STREAMED_GET_BYTES, request.max_message_bytes
                )
                answer = await ops.small.request(frame, what, timeout)
                if answer is not None:
                    return answer.get
            return await stub.GetValue(request, timeout=timeout)
        except grpc.RpcError as exc:
            if request.wait and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise error_from_rpc(exc, what=what) from None
        except CloudburstTimeoutError:
            if request.wait:
                return None
            # As the unary call's deadline says it (the KVS's own answer words it otherwise).
            raise CloudburstTimeoutError(f"{what} did not finish before its deadline") from None

    async def get_many(
        self, keys: list[str], timeout: float
    ) -> dict[str, lattice_pb2.Lattice | chunks.LargeValue | None]:
        """Read user keys in one BatchGetValues per :data:`BATCH_KEYS` keys.

        A value too large for the batch's answer is read on its own, in chunks.
        """
        return await self._on_kvs(functools.partial(self._get_many, keys=keys, timeout=timeout))

    async def _get_many(
        self, stub: KvsStub, _ops: OpStreams | None, keys: list[str], timeout: float
    ) -> dict[str, lattice_pb2.Lattice | chunks.LargeValue | None]:
        result: dict[str, lattice_pb2.Lattice | chunks.LargeValue | None] = {}
        for start in range(0, len(keys), BATCH_KEYS):
            request = kvs_service_pb2.BatchGetValuesRequest(
                keys=keys[start : start + BATCH_KEYS],
                keyspace=lattice_pb2.KEYSPACE_USER,
                max_message_bytes=self._max_payload_bytes,
            )
            response = await call(
                f"reading {len(request.keys)} keys",
                functools.partial(stub.BatchGetValues, request, timeout=timeout),
            )
            for entry in response.entries:
                if entry.chunked:
                    result[entry.key] = await chunks.receive(
                        stub, entry.key, lattice_pb2.KEYSPACE_USER, timeout, self._max_payload_bytes
                    )
                else:
                    result[entry.key] = entry.lattice if entry.found else None
        return result

    @staticmethod
    def put_frame(write: Write) -> OpRequest:
        """``write`` as the frame of one message: its lattice built in place, the bytes copied once.

        Built by the caller (off the loop) when the value fits in one message where
        writes go now, and kept for every attempt; :meth:`put` builds it when a
        retry sends in one message a value it did not expect to.
        """
        frame = OpRequest()
        request = frame.put
        request.key, request.keyspace = write.key, _USER
        request.request_id, request.omit_lattice = write.request_id, True
        lww = request.lattice.lww
        lww.timestamp.CopyFrom(write.timestamp)
        lww.value.data, lww.value.serializer = write.data, write.serializer
        return frame

    async def put(self, write: Write, timeout: float) -> None:
        """Send a write of a user key, sized for the service each attempt goes to.

        A value over that service's inline limit (its own ``GetLimits``) goes in
        chunks, straight from ``write.data`` (never copied whole); a smaller one in
        one message: the frame ``write`` carries (see :meth:`put_frame`), as a frame
        of an op stream or alone in a unary call. Every attempt sends the same
        lattice and request id: a retry merges as the same write.
        """
        what = f"writing key {write.key!r}"
        size = len(write.data)

        async def put(stub: KvsStub, ops: OpStreams | None) -> None:
            if size > self._inline_at(stub):
                await chunks.write_value(
                    stub,
                    write.key,
                    write.timestamp,
                    write.serializer,
                    write.data,
                    _USER,
                    timeout,
                    write.request_id,
                )
                return
            if write.frame is None:
                write.frame = self.put_frame(write)
            frame = write.frame
            stream = ops.for_write(size) if ops is not None else None
            if stream is not None and stream.available:
                if await _streamed(stream, frame, what, timeout) is not None:
                    return
            await call(what, lambda: stub.PutValue(frame.put, timeout=timeout))

        await self._on_kvs(put)

    async def delete(self, key: str, request_id: str, timeout: float) -> bool:
        """Delete a user key; every attempt sends ``request_id``."""
        request = kvs_service_pb2.DeleteValueRequest(key=key, keyspace=_USER, request_id=request_id)
        what = f"deleting key {key!r}"

        async def delete(stub: KvsStub, ops: OpStreams | None) -> bool:
            if ops is not None and ops.small.available:
                frame = OpRequest()
                frame.delete.CopyFrom(request)
                answer = await _streamed(ops.small, frame, what, timeout)
                if answer is not None:
                    return answer.delete.existed
            response = await call(what, lambda: stub.DeleteValue(request, timeout=timeout))
            return bool(response.existed)

        return await self._on_kvs(delete)

    async def close(self) -> None:
        """Send the queued releases, end the streams and close the channels.

        Waits for no server but the scheduler, and for it at most
        :data:`CLOSE_GRACE_SECONDS`.
        """
        self._flush()
        if self._retry_direct is not None:
            self._retry_direct.cancel()
        await self._stream.close(grace=CLOSE_GRACE_SECONDS)
        if self.answers is not None:
            await self.answers.close()
        for ops in (self._ops, self._proxy_ops):
            if ops is not None:
                # The op stream carries nothing that outlives its callers: a KVS that does
                # not answer is not waited for.
                await ops.close(grace=0)
        if self._direct is not None:
            await self._direct[1].close()
        await self.channel.close()
        if self._connecting is not None:  # a wait for the channel that did not end: it does now
            await asyncio.wait({self._connecting}, timeout=CLOSE_GRACE_SECONDS)
            if self._connecting.done() and not self._connecting.cancelled():
                self._connecting.exception()  # "Channel is closed": expected, and retrieved
            self._connecting = None


@dataclass(slots=True)
class Write:
    """One write of a user key's last-writer-wins value, the same in each of its attempts."""

    key: str
    timestamp: lattice_pb2.LwwTimestamp
    serializer: value_pb2.Serializer.ValueType
    data: bytes
    request_id: str
    frame: OpRequest | None = None
    """The write as one message, once built (:meth:`Core.put_frame`)."""


async def _streamed(
    ops: OpStream, frame: OpRequest, what: str, timeout: float
) -> kvs_service_pb2.StreamOpsResponse | None:
    """Send one op on the stream; None: the KVS has no op stream (make the unary call).

    Raises what the unary call would, in its words for a deadline.
    """
    try:
        return await ops.request(frame, what, timeout)
    except CloudburstTimeoutError:
        raise CloudburstTimeoutError(f"{what} did not finish before its deadline") from None
