"""The MessagingService servicer and the client side of peer streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from cloudburst._stream import OutboxStream, settle
from cloudburst.errors import (
    CloudburstError,
    CloudburstTimeoutError,
    InvalidArgumentError,
    UnavailableError,
)
from cloudburst.rpc import error_from_call_error, error_to_call_error
from cloudburst.v1 import messaging_service_pb2, messaging_service_pb2_grpc
from cloudburst_grpc.messaging.mailbox import MailboxRouter
from cloudburst_grpc.server import insecure_channel

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext

#: What a sender waits on: thread-safe on a worker thread, an asyncio future on the loop.
Delivered = concurrent.futures.Future[None] | asyncio.Future[None]

#: How often a message is sent again on a fresh stream after its stream broke.
RESEND_ATTEMPTS = 2
#: Seconds a sender waits for an answer beyond the time the receiver may take.
ANSWER_SLACK = 5.0
#: Unanswered messages per peer above which those whose senders gave up are forgotten.
PRUNE_ABOVE = 1024


class MessagingServicer(messaging_service_pb2_grpc.MessagingServiceServicer):
    """Delivers messages arriving from other processes into this process's mailboxes.

    Frames of one stream are delivered in order, one at a time, so messages
    from one sender to one mailbox keep their order.
    """

    def __init__(self, router: MailboxRouter) -> None:
        self._router = router

    async def StreamMessages(
        self,
        request_iterator: AsyncIterator[messaging_service_pb2.StreamMessagesRequest],
        context: Context[
            messaging_service_pb2.StreamMessagesRequest,
            messaging_service_pb2.StreamMessagesResponse,
        ],
    ) -> AsyncIterator[messaging_service_pb2.StreamMessagesResponse]:
        """Deliver each sent message and answer when it is in the mailbox (or cannot be)."""
        first = True
        async for frame in request_iterator:
            kind = frame.WhichOneof("frame")
            if first:
                if kind != "hello":
                    raise InvalidArgumentError("the first StreamMessages frame must be hello")
                first = False
                continue
            if kind != "send":
                continue
            answer = messaging_service_pb2.StreamMessagesResponse(sequence=frame.sequence)
            try:
                await self._router.deliver(frame.send)
            except CloudburstError as exc:
                answer.error.CopyFrom(error_to_call_error(exc))
            yield answer


class MessagingPeer:
    """One long-lived stream to another process's MessagingService.

    Senders wait on thread-safe futures that the stream's reader settles when
    the receiver answers, so a function thread waits for its message to land
    without a round trip through the event loop. When the stream breaks, the
    messages still unanswered are sent again, in order, on a new stream; the
    receiver drops a copy it already has, so each is delivered once.
    """

    def __init__(self, address: str, peer_id: str, max_payload_bytes: int) -> None:
        self.address = address
        self._channel = insecure_channel(address, max_payload_bytes)
        stub = messaging_service_pb2_grpc.MessagingServiceStub(self._channel)
        self._waiting: dict[int, _Unanswered] = {}
        self._sequence = itertools.count(1)
        self._stream: OutboxStream[
            messaging_service_pb2.StreamMessagesRequest,
            messaging_service_pb2.StreamMessagesResponse,
        ] = OutboxStream(
            f"messaging at {address}",
            stub.StreamMessages,
            self._answered,
            self._ended,
            lambda: messaging_service_pb2.StreamMessagesRequest(
                hello=messaging_service_pb2.MessagingHello(peer_id=peer_id)
            ),
        )

    def post(
        self,
        envelope: messaging_service_pb2.MessageEnvelope,
        delivered: Delivered,
        resends: int = RESEND_ATTEMPTS,
    ) -> None:
        """Send one message (on the loop); ``delivered`` settles with the receiver's answer.

        ``delivered`` is a thread-safe future for a sender on another thread, or
        an asyncio future for one on the loop.

        It fails with the receiver's error (no such mailbox, mailbox full), or
        with UnavailableError when the stream broke more than ``resends`` times.
        """
        if len(self._waiting) >= PRUNE_ABOVE:
            # Forget messages whose senders gave up waiting (their futures are cancelled).
            for sequence in [q for q, w in self._waiting.items() if w.delivered.done()]:
                del self._waiting[sequence]
        sequence = next(self._sequence)
        self._waiting[sequence] = _Unanswered(envelope, delivered, resends)
        try:
            self._stream.send(
                messaging_service_pb2.StreamMessagesRequest(sequence=sequence, send=envelope)
            )
        except UnavailableError as exc:  # closed for good: this process is shutting down
            del self._waiting[sequence]
            settle(delivered, error=exc)

    async def send(self, envelope: messaging_service_pb2.MessageEnvelope, timeout: float) -> None:
        """Deliver one message and wait for the receiver's answer.

        ``timeout`` is how long the receiver may wait for space in the mailbox;
        the answer is awaited a little longer, so a full mailbox is reported
        as such rather than as a timeout here.
        """
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.post(envelope, delivered)
        try:
            await asyncio.wait_for(delivered, timeout + ANSWER_SLACK)
        except TimeoutError:
            raise CloudburstTimeoutError(
                f"no answer from {self.address} for a message to {envelope.recipient_id}"
            ) from None

    def _answered(self, answer: messaging_service_pb2.StreamMessagesResponse) -> None:
        waiting = self._waiting.pop(answer.sequence, None)
        if waiting is None:
            return
        if answer.HasField("error"):
            settle(waiting.delivered, error=error_from_call_error(answer.error))
        else:
            settle(waiting.delivered)

    def _ended(self, error: grpc.RpcError | None) -> None:
        reason = str(error.code()) if error is not None else "closed"
        waiting = sorted(self._waiting.items())
        self._waiting.clear()
        for _, unanswered in waiting:
            if unanswered.delivered.done():
                continue  # its sender gave up
            if unanswered.resends > 0 and not self._stream.closed:
                self.post(unanswered.envelope, unanswered.delivered, unanswered.resends - 1)
            else:
                failure = UnavailableError(
                    f"the messaging stream to {self.address} broke ({reason})",
                    {"address": self.address},
                )
                settle(unanswered.delivered, error=failure)

    async def close(self) -> None:
        """End the stream and close the channel; idempotent."""
        if self._stream.closed:
            return
        await self._stream.close()
        await self._channel.close()


@dataclass
class _Unanswered:
    """A message sent and not yet answered."""

    envelope: messaging_service_pb2.MessageEnvelope
    delivered: Delivered
    resends: int
    """How many more times it may be sent on a new stream."""


class MessagingPeers:
    """One :class:`MessagingPeer` per remote process, opened on first use."""

    def __init__(self, peer_id: str, max_payload_bytes: int) -> None:
        self._peer_id = peer_id
        self._max_payload_bytes = max_payload_bytes
        self._peers: dict[str, MessagingPeer] = {}

    def _peer(self, address: str) -> MessagingPeer:
        peer = self._peers.get(address)
        if peer is None:
            peer = MessagingPeer(address, self._peer_id, self._max_payload_bytes)
            self._peers[address] = peer
        return peer

    async def forward(
        self, address: str, envelope: messaging_service_pb2.MessageEnvelope, timeout: float
    ) -> None:
        """Send to the process at ``address``."""
        await self._peer(address).send(envelope, timeout)

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
