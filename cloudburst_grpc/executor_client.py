"""Reaching executors: the peer interface, its gRPC implementation and a directory.

The scheduler and executors talk to executors through :class:`ExecutorPeer`.
In one process the peer calls the executor directly; across processes
:class:`RemoteExecutorPeer` keeps one long-lived ``StreamTriggers`` stream per
executor, because a message on an open stream costs a fraction of a unary call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from cloudburst import protocol
from cloudburst.errors import CloudburstTimeoutError, UnavailableError
from cloudburst.rpc import call
from cloudburst.streams import OutboxStream, batches_enabled, status_lost
from cloudburst.v1 import execution_pb2, executor_service_pb2, executor_service_pb2_grpc
from cloudburst_grpc.answer_streams import DELIVERED_DIRECTLY
from cloudburst_grpc.schedules import SentSchedules
from cloudburst_grpc.security.identity import EXECUTOR
from cloudburst_grpc.security.tls import CertificateSource
from cloudburst_grpc.server import PeerChannel

logger = logging.getLogger(__name__)

#: Ids for the hellos of trigger streams: distinct within a process, and from a random start so
#: that a process that takes over a peer id (a restarted scheduler) does not reuse its ids.
_STREAM_IDS = itertools.count(secrets.randbits(62) + 1)
#: Stream endings whose details name a security refusal worth showing the caller.
_REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class NotDeliveredError(UnavailableError):
    """A request never reached its executor (the connection could not be made).

    Nothing of it ran there, so it is safe to send it elsewhere.
    """


def _never_connected(error: grpc.RpcError | None) -> bool:
    """Whether a stream ended because its connection could not be made at all."""
    if error is None or error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (error.details() or "").lower()
    return "failed to connect" in details or "connection refused" in details


class ExecutorPeer(Protocol):
    """One executor, as its callers see it."""

    executor_id: str
    address: str

    async def execute(
        self, request: executor_service_pb2.ExecuteFunctionRequest, timeout: float
    ) -> executor_service_pb2.ExecuteFunctionResponse:
        """Run one function call and return when it has finished."""
        ...

    async def trigger(
        self,
        trigger: execution_pb2.Trigger,
        schedule: execution_pb2.DagSchedule,
        *,
        written: bool = False,
    ) -> None:
        """Send a DAG trigger (without a schedule) of the call ``schedule`` places.

        Triggers to one peer arrive in the order sent. Across processes the
        schedule crosses each stream once per call (see :mod:`cloudburst_grpc.schedules`).
        With ``written``, the caller's task writes the trigger itself (or queues it
        behind the write in progress) and returns once that is done: a task and a
        turn of the event loop fewer, for a caller with nothing else to do until
        then; it then waits while the peer does not read. Without, it never waits.
        """
        ...

    def expect_result(
        self, schedule: execution_pb2.DagSchedule, timeout: float
    ) -> asyncio.Future[execution_pb2.Outcome]:
        """Wait for the sink's result of the call ``schedule`` places, its sink on this peer.

        Call it before the call's sources are triggered: it names in ``schedule``
        the way back (``reply_to``, ``reply_stream_id``), and nothing is sent for
        it. The future fails after ``timeout`` seconds, or at once when the way
        back breaks. When ``schedule`` names the caller's answer stream
        (``answer_stream_id``), the sink answers the caller there if the caller
        holds it at the peer; the future then settles with
        :data:`~cloudburst_grpc.answer_streams.DELIVERED_DIRECTLY`.
        """
        ...

    def expect_stored(self, response_key: str) -> asyncio.Future[bool]:
        """A future that settles once a direct call's result is stored at ``response_key``.

        Call before the call is sent. It settles with True when the executor
        dropped the store instead (:meth:`end_hold`), and with False also when
        the stored result can no longer be reported (the connection ended).
        """
        ...

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        """End the executor's held stores of results (``hold_store``); never waits.

        Those in ``drop`` (their callers released them) are not stored; those
        in ``store`` (a call refers to them) are stored at once.
        """
        ...

    async def pin(self, function_name: str, version: int) -> None:
        """Pin a function."""
        ...

    async def unpin(self, function_name: str) -> None:
        """Unpin a function."""
        ...

    async def status(self) -> executor_service_pb2.GetExecutorStatusResponse:
        """Return the executor's status."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


class OutcomeWaiters:
    """Futures for the sink results of DAG calls, by call id, each failing after its timeout.

    One timer serves them all, rather than one per call: it fires at the earliest
    deadline it knows of, fails every waiter past its deadline and sets itself for
    the next one. A result that comes in time costs no timer at all. Call ids are
    unique (a call run again gets a new one).
    """

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.Future[execution_pb2.Outcome], float, float]] = {}
        """Each waiter's future, deadline (the loop's clock) and timeout, by call id."""
        self._sweep: asyncio.TimerHandle | None = None
        """Fires at (or before) the earliest deadline of ``_waiting``; None while none waits."""

    def expect(self, call_id: str, timeout: float) -> asyncio.Future[execution_pb2.Outcome]:
        """Return a future for the call's result; it fails after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[execution_pb2.Outcome] = loop.create_future()
        deadline = loop.time() + timeout
        self._waiting[call_id] = (future, deadline, timeout)
        sweep = self._sweep
        if sweep is None or deadline < sweep.when():
            if sweep is not None:
                sweep.cancel()
            self._sweep = loop.call_at(deadline, self._expire)
        return future

    def _expire(self) -> None:
        """Fail the waiters past their deadline (forgetting cancelled ones); set the next sweep."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired: list[str] = []
        earliest: float | None = None
        for call_id, (_, deadline, _) in self._waiting.items():
            if deadline <= now:
                expired.append(call_id)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        for call_id in expired:
            future, _, timeout = self._waiting.pop(call_id)
            if not future.done():
                future.set_exception(
                    CloudburstTimeoutError(f"call {call_id} did not finish within {timeout:.1f}s")
                )
        if earliest is not None and self._sweep is None:
            self._sweep = loop.call_at(earliest, self._expire)

    def pop(self, call_id: str) -> asyncio.Future[execution_pb2.Outcome] | None:
        """The call's waiter, if one waits; it is forgotten here (its deadline no longer counts)."""
        waiting = self._waiting.pop(call_id, None)
        return None if waiting is None else waiting[0]

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiter with ``error`` and forget them all."""
        waiting = list(self._waiting.values())
        self._waiting.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for future, _, _ in waiting:
            if not future.done():
                future.set_exception(error)

    def __len__(self) -> int:
        return len(self._waiting)


#: Seconds stores to drop wait for a frame to the executor to ride on before they get their own.
DROP_WAIT_SECONDS = 0.005
#: Seconds a unary call may take to tell why a silent stream ended when gRPC lost its status.
PROBE_SECONDS = 5.0


class RemoteExecutorPeer:
    """An executor in another process, reached over one long-lived bidirectional stream.

    The stream opens on first use and reopens after it breaks; answers still
    outstanding when it breaks fail with UnavailableError, so nothing waits past
    its deadline.
    """

    def __init__(
        self,
        executor_id: str,
        address: str,
        peer_id: str,
        max_payload_bytes: int,
        on_broken: Callable[[str, str], None] | None = None,
        *,
        tls: CertificateSource | None = None,
        on_cache_report: Callable[[str, executor_service_pb2.CacheReport], None] | None = None,
    ) -> None:
        self._on_broken = on_broken
        self._on_cache_report = on_cache_report
        self.executor_id = executor_id
        self.address = address
        self._peer = PeerChannel(
            address, max_payload_bytes, tls, EXECUTOR, executor_service_pb2_grpc.ExecutorServiceStub
        )
        self._sequence = itertools.count(1)
        self._answers: dict[int, asyncio.Future[executor_service_pb2.ExecuteFunctionResponse]] = {}
        self._results = OutcomeWaiters()
        """The DAG calls whose sink's result comes back on the current stream, by call id."""
        self._peer_id = peer_id
        self._stream_id = 0
        """The stream_id of the current stream's hello (see :meth:`expect_result`)."""
        self._stored: dict[str, asyncio.Future[bool]] = {}
        self._heard = False
        """Whether the executor sent anything on the current stream."""
        self._probes: set[asyncio.Task[None]] = set()
        self._drops: list[str] = []
        """Keys whose held stores to drop, waiting for the next frame (see :meth:`end_hold`)."""
        self._drop_timer: asyncio.TimerHandle | None = None
        self.schedules = SentSchedules()
        """The schedules the current stream carried (triggers after the first refer to them)."""
        self._schedules_stream = 0
        """The number of the stream ``schedules`` is about."""
        batches = batches_enabled()
        self._stream: OutboxStream[
            executor_service_pb2.StreamTriggersRequest, executor_service_pb2.StreamTriggersResponse
        ] = OutboxStream(
            f"executor {executor_id} at {address}",
            lambda: self._peer.stub().StreamTriggers(),
            self._answered,
            self._ended,
            lambda: self._hello(batches),
            batches=batches,
        )

    def _hello(self, batches: bool) -> executor_service_pb2.StreamTriggersRequest:
        """The first frame of a new stream, under a stream id never used before."""
        self._stream_id = next(_STREAM_IDS)
        self._heard = False
        return executor_service_pb2.StreamTriggersRequest(
            hello=executor_service_pb2.TriggerHello(
                peer_id=self._peer_id, reads_batches=batches, stream_id=self._stream_id
            )
        )

    def _answered(self, frame: executor_service_pb2.StreamTriggersResponse) -> None:
        self._heard = True
        kind = frame.WhichOneof("frame")
        if kind == "execute_function":
            answer = self._answers.pop(frame.sequence, None)
            if answer is not None and not answer.done():
                answer.set_result(frame.execute_function)
        elif kind == "dag_result":
            result = self._results.pop(frame.dag_result.call_id)
            if result is not None and not result.done():
                if frame.dag_result.delivered_directly:
                    result.set_result(DELIVERED_DIRECTLY)
                else:
                    result.set_result(frame.dag_result.outcome)
        elif kind == "result_stored":
            stored = self._stored.pop(frame.result_stored.response_key, None)
            if stored is not None and not stored.done():
                stored.set_result(frame.result_stored.dropped)
        elif kind == "cache_report" and self._on_cache_report is not None:
            self._on_cache_report(self.executor_id, frame.cache_report)

    def _ended(self, error: grpc.RpcError | None) -> None:
        """Fail what waited on the ended stream; a new stream opens only after this returns.

        When gRPC lost the status that ended the stream (a write raced its end)
        and the executor sent nothing on it, the executor may have refused the
        stream (another release: nothing on it ran) or be gone: a unary call
        tells, and what waited on the stream fails once it has.
        """
        answers, results, stored = self._answers, self._results, self._stored
        self._answers, self._results, self._stored = {}, OutcomeWaiters(), {}
        if error is not None and status_lost(error) and not self._heard:
            probe = asyncio.get_running_loop().create_task(
                self._probe_then_fail(error, answers, results, stored)
            )
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)
            return
        self._fail(error, answers, results, stored)

    async def _probe_then_fail(
        self,
        error: grpc.RpcError,
        answers: dict[int, asyncio.Future[executor_service_pb2.ExecuteFunctionResponse]],
        results: OutcomeWaiters,
        stored: dict[str, asyncio.Future[bool]],
    ) -> None:
        """Ask the executor for its status: a refusal of this release is why the stream ended."""
        try:
            await self._peer.stub().GetExecutorStatus(
                executor_service_pb2.GetExecutorStatusRequest(), timeout=PROBE_SECONDS
            )
        except grpc.RpcError as probed:
            if protocol.refusal(probed) is not None:
                error = probed
        except Exception:
            pass  # the channel is closing: the stream's own error stands
        self._fail(error, answers, results, stored)

    def _fail(
        self,
        error: grpc.RpcError | None,
        answers: dict[int, asyncio.Future[executor_service_pb2.ExecuteFunctionResponse]],
        results: OutcomeWaiters,
        stored: dict[str, asyncio.Future[bool]],
    ) -> None:
        """Fail the answers, results and stores of an ended stream with ``error``."""
        code = error.code() if error is not None else None
        kind = NotDeliveredError if _never_connected(error) else UnavailableError
        why = ""
        if error is not None and code in _REFUSALS:
            # A refusal says what is missing (a role, an intention); pass it on.
            why = f": {error.details()}"
        mismatch = protocol.refusal(error)
        if mismatch is not None:
            # Refused when the stream opened: nothing sent on it ran there.
            kind = NotDeliveredError
            peer = f"executor {self.executor_id} at {self.address}"
            why = f": {protocol.refused_by(peer, mismatch)}"
            protocol.log_once(logger, peer, mismatch)
        failure = kind(
            f"lost the connection to executor {self.executor_id} at {self.address}"
            + (f" ({code}){why}" if code is not None else ""),
            {"executor": self.executor_id},
        )
        # Answers first: a caller told of the broken stream below still sees its answer's error.
        for answer in answers.values():
            if not answer.done():
                answer.set_exception(failure)
        results.fail_all(failure)
        for waiting in stored.values():
            if not waiting.done():
                waiting.set_result(False)  # nothing more will be reported
        if code is not None and self._on_broken is not None:
            broke = (
                f"it speaks wire protocol {mismatch.metadata.get(protocol.SERVER_KEY)}, "
                f"another release than this process"
                if mismatch is not None
                else f"its stream broke ({code})"
            )
            self._on_broken(self.executor_id, broke)

    async def execute(
        self, request: executor_service_pb2.ExecuteFunctionRequest, timeout: float
    ) -> executor_service_pb2.ExecuteFunctionResponse:
        """Run one call over the stream and wait for its answer."""
        sequence = next(self._sequence)
        answer: asyncio.Future[executor_service_pb2.ExecuteFunctionResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._answers[sequence] = answer
        try:
            async with asyncio.timeout(timeout):  # the write too: the peer may not read
                frame = executor_service_pb2.StreamTriggersRequest(
                    sequence=sequence, execute_function=request
                )
                if self._drops:
                    self._take_drops(frame)
                await self._stream.write(frame)
                return await answer
        except TimeoutError:
            raise CloudburstTimeoutError(
                f"call of {request.function_name!r} did not finish within {timeout:.1f}s"
            ) from None
        finally:
            self._answers.pop(sequence, None)

    async def trigger(
        self,
        trigger: execution_pb2.Trigger,
        schedule: execution_pb2.DagSchedule,
        *,
        written: bool = False,
    ) -> None:
        """Queue a trigger on the stream (never waits on a peer that stopped reading).

        It carries ``schedule`` the first time the call goes on the current stream
        and refers to it by call id after that. With ``written``, it is written
        from the caller's task instead (see :meth:`ExecutorPeer.trigger`).
        """
        stream = self._stream.open()
        if stream != self._schedules_stream:
            self._schedules_stream = stream
            self.schedules.reset()
        frame = executor_service_pb2.StreamTriggersRequest()
        frame.trigger.CopyFrom(trigger)
        self.schedules.fill(frame.trigger, schedule)
        if self._drops:
            self._take_drops(frame)
        if written:
            await self._stream.write(frame)
        else:
            self._stream.send(frame)

    def expect_result(
        self, schedule: execution_pb2.DagSchedule, timeout: float
    ) -> asyncio.Future[execution_pb2.Outcome]:
        """Wait for the sink's result on this peer's stream, which the schedule names.

        Opens the stream if it is not open (usually it is), so that the sink
        finds it; nothing is sent for the call.
        """
        self._stream.open()
        schedule.reply_to = self._peer_id
        schedule.reply_stream_id = self._stream_id
        return self._results.expect(schedule.call_id, timeout)

    def expect_stored(self, response_key: str) -> asyncio.Future[bool]:
        """Settles when the executor reports the result stored (True: dropped), or the stream ends.

        A store the executor holds is dropped if asked (:meth:`end_hold`) in time.
        """
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._stored[response_key] = stored
        stored.add_done_callback(lambda _: self._forget_stored(response_key, stored))
        return stored

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        """Send an EndHold (never waits).

        Stores to drop ride on the next frame to the executor (a release rides
        on its caller's next call, often to this executor), or go in a frame of
        their own after :data:`DROP_WAIT_SECONDS`; stores wanted go at once.
        """
        self._drops.extend(drop)
        if store:
            self._send_end_hold(store)
        elif self._drops and self._drop_timer is None:
            self._drop_timer = asyncio.get_running_loop().call_later(
                DROP_WAIT_SECONDS, self._send_end_hold
            )

    def _send_end_hold(self, store: Sequence[str] = ()) -> None:
        frame = executor_service_pb2.StreamTriggersRequest()
        frame.end_hold.store_keys.extend(store)
        self._take_drops(frame)
        try:
            self._stream.send(frame)
        except UnavailableError:
            pass  # closed for good: the held stores end by themselves

    def _take_drops(self, frame: executor_service_pb2.StreamTriggersRequest) -> None:
        """Put the stores waiting to be dropped into ``frame``."""
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if self._drops:
            frame.end_hold.drop_keys.extend(self._drops)
            self._drops.clear()

    def _forget_stored(self, response_key: str, stored: asyncio.Future[bool]) -> None:
        if self._stored.get(response_key) is stored:
            del self._stored[response_key]

    async def pin(self, function_name: str, version: int) -> None:
        """Pin a function (unary)."""
        request = executor_service_pb2.PinFunctionRequest(
            function_name=function_name, function_version=version
        )
        await call(
            f"pin {function_name!r}", lambda: self._peer.stub().PinFunction(request, timeout=30)
        )

    async def unpin(self, function_name: str) -> None:
        """Unpin a function (unary)."""
        request = executor_service_pb2.UnpinFunctionRequest(function_name=function_name)
        await call(
            f"unpin {function_name!r}", lambda: self._peer.stub().UnpinFunction(request, timeout=30)
        )

    async def status(self) -> executor_service_pb2.GetExecutorStatusResponse:
        """Fetch the executor's status (unary)."""
        request = executor_service_pb2.GetExecutorStatusRequest()
        return await call(
            "executor status", lambda: self._peer.stub().GetExecutorStatus(request, timeout=5)
        )

    async def close(self) -> None:
        """End the stream and close the channel; idempotent."""
        if self._stream.closed:
            return
        await self._stream.close()
        await self._peer.close()
        for probe in list(self._probes):  # the channel is closed: each ends at once
            await asyncio.wait([probe], timeout=PROBE_SECONDS)


class PeerDirectory:
    """Finds the peer for an executor id: in-process peers first, else a cached remote one."""

    def __init__(
        self,
        remote_factory: Callable[[str, str], ExecutorPeer],
    ) -> None:
        self._local: dict[str, ExecutorPeer] = {}
        self._remote: dict[str, ExecutorPeer] = {}
        self._remote_factory = remote_factory

    def add_local(self, peer: ExecutorPeer) -> None:
        """Register an executor that runs in this process."""
        self._local[peer.executor_id] = peer

    def get(self, executor_id: str, address: str) -> ExecutorPeer:
        """Return the peer for an executor, opening a remote one on first use."""
        local = self._local.get(executor_id)
        if local is not None:
            return local
        peer = self._remote.get(executor_id)
        if peer is None or peer.address != address:
            peer = self._remote_factory(executor_id, address)
            self._remote[executor_id] = peer
        return peer

    def remote(self, executor_id: str) -> ExecutorPeer | None:
        """The remote peer of an executor, if one was opened (nothing is opened here)."""
        return self._remote.get(executor_id)

    async def forget(self, executor_id: str) -> None:
        """Drop and close the remote peer of an executor that left."""
        peer = self._remote.pop(executor_id, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        """Close every remote peer."""
        peers = list(self._remote.values())
        self._remote.clear()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
