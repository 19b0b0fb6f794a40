"""The MessagingService servicer and the client side of peer streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc

from cloudburst import protocol
from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    InvalidArgumentError,
    ProtocolMismatchError,
    UnavailableError,
)
from cloudburst.rpc import error_from_call_error
from cloudburst.streams import OutboxStream, settle
from cloudburst.v1 import messaging_service_pb2, messaging_service_pb2_grpc
from cloudburst_grpc.failures import error_to_call_error
from cloudburst_grpc.messaging.mailbox import MailboxRouter
from cloudburst_grpc.security.identity import EXECUTOR
from cloudburst_grpc.security.tls import CertificateSource
from cloudburst_grpc.server import PeerChannel

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext

#: What a sender waits on: thread-safe on a worker thread, an asyncio future on the loop.
#: Its result is True when the message is in the mailbox, False when the mailbox had
#: closed and the message was dropped.
Delivered = concurrent.futures.Future[bool] | asyncio.Future[bool]

#: How often a message is sent again on a fresh stream after its stream broke.
RESEND_ATTEMPTS = 2
#: Seconds a sender waits for an answer beyond the time the receiver may take.
ANSWER_SLACK = 5.0
#: Unanswered messages per peer above which those whose senders gave up are forgotten.
PRUNE_ABOVE = 1024


Answer = messaging_service_pb2.StreamMessagesResponse
#: Where a held answer goes when no frame takes it: its stream's queue of answers to send.
Fallback = asyncio.Queue[Answer | None]


class AnswerOutbox:
    """Answers held back briefly, to ride on the next frame sent to their process.

    A receiver answers each message once it is in the mailbox, and the sender
    waits for that answer. Sent on its own, an answer costs a write here and a
    read there; but often (a reply, a ping-pong) a message goes back to the
    sender's process at once, and the answer can ride on it. An answer is held
    for two turns of the event loop, long enough for a function on the loop
    that was waiting for the message to send its reply; then it goes on its
    own stream after all.
    """

    def __init__(self) -> None:
        self._held: dict[str, list[tuple[Answer, Fallback]]] = {}
        self.riding = 0
        """Answers that rode on a frame to their process (for tests and diagnosis)."""
        self.alone = 0
        """Answers sent on their own stream after all."""

    def hold(self, address: str, answer: Answer, fallback: Fallback) -> None:
        """Hold ``answer`` for the process at ``address``; ``fallback`` sends it alone."""
        held = self._held.get(address)
        if held is None:
            self._held[address] = [(answer, fallback)]
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self.flush, address)
        else:
            held.append((answer, fallback))

    def take(self, address: str) -> list[tuple[Answer, Fallback]]:
        """The answers held for ``address``, to ride on a frame going there."""
        taken = self._held.pop(address, None)
        if taken is None:
            return []
        self.riding += len(taken)
        return taken

    def send_alone(self, held: list[tuple[Answer, Fallback]]) -> None:
        """Send answers on their own streams (also when the frame they rode on was lost)."""
        self.alone += len(held)
        for answer, fallback in held:
            fallback.put_nowait(answer)

    def flush(self, address: str) -> None:
        """Send what is held for ``address`` on its own streams now."""
        held = self._held.pop(address, None)
        if held:
            self.send_alone(held)


class MessagingServicer(messaging_service_pb2_grpc.MessagingServiceServicer):
    """Delivers messages arriving from other processes into this process's mailboxes.

    Frames of one stream are delivered in order, one at a time, so messages
    from one sender to one mailbox keep their order.
    """

    def __init__(
        self,
        router: MailboxRouter,
        outbox: AnswerOutbox | None = None,
        on_answers: Callable[[str, Sequence[Answer]], None] | None = None,
    ) -> None:
        self._router = router
        self._outbox = outbox
        self._on_answers = on_answers

    async def StreamMessages(
        self,
        request_iterator: AsyncIterator[messaging_service_pb2.StreamMessagesRequest],
        context: Context[
            messaging_service_pb2.StreamMessagesRequest,
            messaging_service_pb2.StreamMessagesResponse,
        ],
    ) -> AsyncIterator[messaging_service_pb2.StreamMessagesResponse]:
        """Deliver each sent message and answer when it is in the mailbox (or cannot be).

        A sender that gives its address in the hello may get its answers on
        the frames this process sends to it instead (see :class:`AnswerOutbox`).
        """
        frames = aiter(request_iterator)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        if first.WhichOneof("frame") != "hello":
            raise InvalidArgumentError("the first StreamMessages frame must be hello")
        address = first.hello.address
        if not address or self._outbox is None:
            async for frame in frames:
                if frame.WhichOneof("frame") == "send":
                    yield await self._answer(frame)
            return
        answers: Fallback = asyncio.Queue()
        reader = asyncio.create_task(self._read(frames, address, answers))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]

    async def _answer(self, frame: messaging_service_pb2.StreamMessagesRequest) -> Answer:
        answer = Answer(sequence=frame.sequence)
        try:
            answer.dropped = not await self._router.deliver(frame.send)
        except CloudburstError as exc:
            answer.error.CopyFrom(error_to_call_error(exc))
        return answer

    async def _read(
        self,
        frames: AsyncIterator[messaging_service_pb2.StreamMessagesRequest],
        address: str,
        answers: Fallback,
    ) -> None:
        assert self._outbox is not None
        try:
            async for frame in frames:
                if frame.answers and self._on_answers is not None:
                    self._on_answers(address, frame.answers)
                if frame.WhichOneof("frame") == "send":
                    self._outbox.hold(address, await self._answer(frame), answers)
        finally:
            self._outbox.flush(address)  # this stream's last answers, before it ends
            answers.put_nowait(None)


class MessagingPeer:
    """One long-lived stream to another process's MessagingService.

    Senders wait on thread-safe futures that the stream's reader settles when
    the receiver answers, so a function thread waits for its message to land
    without a round trip through the event loop. When the stream breaks, the
    messages still unanswered are sent again, in order, on a new stream; the
    receiver drops a copy it already has, so each is delivered once.
    """

    def __init__(
        self,
        address: str,
        peer_id: str,
        max_payload_bytes: int,
        own_address: str = "",
        outbox: AnswerOutbox | None = None,
        *,
        tls: CertificateSource | None = None,
    ) -> None:
        self.address = address
        self._outbox = outbox
        self._peer = PeerChannel(
            address,
            max_payload_bytes,
            tls,
            EXECUTOR,
            messaging_service_pb2_grpc.MessagingServiceStub,
        )
        self._waiting: dict[int, _Unanswered] = {}
        self._sequence = itertools.count(1)
        self._stream: OutboxStream[
            messaging_service_pb2.StreamMessagesRequest,
            messaging_service_pb2.StreamMessagesResponse,
        ] = OutboxStream(
            f"messaging at {address}",
            lambda: self._peer.stub().StreamMessages(),
            self._answered,
            self._ended,
            lambda: messaging_service_pb2.StreamMessagesRequest(
                hello=messaging_service_pb2.MessagingHello(
                    peer_id=peer_id, address=own_address if outbox is not None else ""
                )
            ),
        )

    def post(
        self,
        envelope: messaging_service_pb2.MessageEnvelope,
        delivered: Delivered,
        resends: int = RESEND_ATTEMPTS,
        riding: list[tuple[Answer, Fallback]] | None = None,
    ) -> None:
        """Send one message (on the loop); ``delivered`` settles with the receiver's answer.

        ``delivered`` is a thread-safe future for a sender on another thread, or
        an asyncio future for one on the loop. Answers held for the receiving
        process ride along (``riding``: those of an earlier try of this frame).

        It settles True when the message is in the mailbox, False when the
        mailbox there had closed (the message was dropped). It fails with the
        receiver's error (no such mailbox, mailbox full), or with
        UnavailableError when the stream broke more than ``resends`` times.
        """
        frame = self._frame(envelope, delivered, resends, riding)
        try:
            self._stream.send(frame)
        except UnavailableError as exc:  # closed for good: this process is shutting down
            self._unsent(frame, exc)

    def _frame(
        self,
        envelope: messaging_service_pb2.MessageEnvelope,
        delivered: Delivered,
        resends: int,
        riding: list[tuple[Answer, Fallback]] | None,
    ) -> messaging_service_pb2.StreamMessagesRequest:
        """The frame that sends ``envelope``, registered to await its answer."""
        if len(self._waiting) >= PRUNE_ABOVE:
            # Forget messages whose senders gave up waiting (their futures are cancelled).
            for sequence in [q for q, w in self._waiting.items() if w.delivered.done()]:
                del self._waiting[sequence]
        if self._outbox is not None:
            taken = self._outbox.take(self.address)
            riding = riding + taken if riding else taken
        sequence = next(self._sequence)
        self._waiting[sequence] = _Unanswered(envelope, delivered, resends, riding or [])
        frame = messaging_service_pb2.StreamMessagesRequest(sequence=sequence, send=envelope)
        if riding:
            frame.answers.extend(answer for answer, _ in riding)
        return frame

    def _unsent(self, frame: messaging_service_pb2.StreamMessagesRequest, exc: Exception) -> None:
        """The stream is closed for good: fail the frame's message, send its answers alone."""
        unanswered = self._waiting.pop(frame.sequence)
        settle(unanswered.delivered, error=exc)
        self._lost(unanswered.riding)

    def _lost(self, riding: list[tuple[Answer, Fallback]] | None) -> None:
        """Answers whose frame never arrived go on their own streams after all."""
        if riding and self._outbox is not None:
            self._outbox.send_alone(riding)

    async def send(self, envelope: messaging_service_pb2.MessageEnvelope, timeout: float) -> bool:
        """Deliver one message and wait for the receiver's answer.

        ``timeout`` is how long the receiver may wait for space in the mailbox;
        the answer is awaited a little longer, so a full mailbox is reported
        as such rather than as a timeout here.

        Returns:
            True when delivered, False when the mailbox had closed (dropped).
        """
        delivered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        frame = self._frame(envelope, delivered, RESEND_ATTEMPTS, None)
        try:
            # The write too: a peer that stopped reading holds it up.
            async with asyncio.timeout(timeout + ANSWER_SLACK):
                try:
                    await self._stream.write(frame)  # at once, not a loop turn later
                except UnavailableError as exc:
                    self._unsent(frame, exc)
                return await delivered
        except TimeoutError:
            raise CloudburstTimeoutError(
                f"no answer from {self.address} for a message to {envelope.recipient_id}"
            ) from None

    def answered(self, answer: Answer) -> None:
        """Settle the message ``answer`` answers (a second answer to it is ignored)."""
        self._answered(answer)

    def _answered(self, answer: messaging_service_pb2.StreamMessagesResponse) -> None:
        waiting = self._waiting.pop(answer.sequence, None)
        if waiting is None:
            return
        if answer.HasField("error"):
            settle(waiting.delivered, error=error_from_call_error(answer.error))
        else:
            settle(waiting.delivered, not answer.dropped)

    def _ended(self, error: grpc.RpcError | None) -> None:
        reason = str(error.code()) if error is not None else "closed"
        mismatch = protocol.refusal(error)
        if mismatch is not None:
            # Another release: sending again would be refused again.
            peer = f"the messaging service at {self.address}"
            protocol.log_once(logger, peer, mismatch)
            reason = protocol.refused_by(peer, mismatch)
        waiting = sorted(self._waiting.items())
        self._waiting.clear()
        for _, unanswered in waiting:
            if unanswered.delivered.done():
                self._lost(unanswered.riding)  # its sender gave up
                continue
            if unanswered.resends > 0 and not self._stream.closed and mismatch is None:
                self.post(
                    unanswered.envelope,
                    unanswered.delivered,
                    unanswered.resends - 1,
                    unanswered.riding,
                )
            else:
                self._lost(unanswered.riding)
                failure: CloudburstError = UnavailableError(
                    f"the messaging stream to {self.address} broke ({reason})",
                    {"address": self.address},
                )
                if mismatch is not None:
                    failure = ProtocolMismatchError(reason, mismatch.metadata)
                settle(unanswered.delivered, error=failure)

    async def close(self) -> None:
        """End the stream and close the channel; idempotent."""
        if self._stream.closed:
            return
        await self._stream.close()
        await self._peer.close()


@dataclass
class _Unanswered:
    """A message sent and not yet answered."""

    envelope: messaging_service_pb2.MessageEnvelope
    delivered: Delivered
    resends: int
    """How many more times it may be sent on a new stream."""
    riding: list[tuple[Answer, Fallback]]
    """Answers riding on its frame, sent again with it."""


class MessagingPeers:
    """One :class:`MessagingPeer` per remote process, opened on first use."""

    def __init__(
        self,
        peer_id: str,
        max_payload_bytes: int,
        own_address: str = "",
        outbox: AnswerOutbox | None = None,
        *,
        tls: CertificateSource | None = None,
    ) -> None:
        self._tls = tls
        self._peer_id = peer_id
        self._max_payload_bytes = max_payload_bytes
        self._own_address = own_address
        self._outbox = outbox if own_address else None
        self._peers: dict[str, MessagingPeer] = {}

    def _peer(self, address: str) -> MessagingPeer:
        peer = self._peers.get(address)
        if peer is None:
            peer = MessagingPeer(
                address,
                self._peer_id,
                self._max_payload_bytes,
                self._own_address,
                self._outbox,
                tls=self._tls,
            )
            self._peers[address] = peer
        return peer

    def answered(self, address: str, answers: Sequence[Answer]) -> None:
        """Answers that rode on a frame from ``address``: to messages sent there."""
        peer = self._peers.get(address)
        if peer is not None:
            for answer in answers:
                peer.answered(answer)

    async def forward(
        self, address: str, envelope: messaging_service_pb2.MessageEnvelope, timeout: float
    ) -> bool:
        """Send to the process at ``address``; False when its mailbox had closed."""
        return await self._peer(address).send(envelope, timeout)

    def post(
        self,
        address: str,
        envelope: messaging_service_pb2.MessageEnvelope,
        delivered: Delivered,
    ) -> None:
        """Send to the process at ``address`` (on the loop); see :meth:`MessagingPeer.post`."""
        self._peer(address).post(envelope, delivered)

    async def close(self) -> None:
        """Close every peer stream."""
        peers = list(self._peers.values())
        self._peers.clear()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
