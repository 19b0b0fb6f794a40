"""The MessagingService servicer and the client side of peer streams."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import grpc

from cloudburst._stream import OutboxStream
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

#: How often a send is retried on a fresh stream after its stream broke.
RESEND_ATTEMPTS = 2


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
    """One long-lived stream to another process's MessagingService."""

    def __init__(self, address: str, peer_id: str, max_payload_bytes: int) -> None:
        self.address = address
        self._channel = insecure_channel(address, max_payload_bytes)
        stub = messaging_service_pb2_grpc.MessagingServiceStub(self._channel)
        self._answers: dict[int, asyncio.Future[messaging_service_pb2.StreamMessagesResponse]] = {}
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

    def _answered(self, answer: messaging_service_pb2.StreamMessagesResponse) -> None:
        future = self._answers.pop(answer.sequence, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def _ended(self, error: grpc.RpcError | None) -> None:
        reason = str(error.code()) if error is not None else "closed"
        failure = _StreamBroken(f"the messaging stream to {self.address} broke ({reason})")
        for future in self._answers.values():
            if not future.done():
                future.set_exception(failure)
        self._answers.clear()

    async def send(self, envelope: messaging_service_pb2.MessageEnvelope, timeout: float) -> None:
        """Deliver one message and wait for the receiver's answer.

        A stream that breaks is reopened and the message sent again; the
        receiver drops it if the first copy had arrived, so it is delivered once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + 5
        for attempt in range(RESEND_ATTEMPTS + 1):
            sequence = next(self._sequence)
            future: asyncio.Future[messaging_service_pb2.StreamMessagesResponse] = (
                loop.create_future()
            )
            self._answers[sequence] = future
            self._stream.send(
                messaging_service_pb2.StreamMessagesRequest(sequence=sequence, send=envelope)
            )
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0)):
                    answer = await future
            except TimeoutError:
                self._answers.pop(sequence, None)
                raise CloudburstTimeoutError(
                    f"no answer from {self.address} for a message to {envelope.recipient_id}"
                ) from None
            except _StreamBroken as exc:
                if attempt == RESEND_ATTEMPTS:
                    raise UnavailableError(str(exc), {"address": self.address}) from None
                continue
            if answer.HasField("error"):
                raise error_from_call_error(answer.error)
            return

    async def close(self) -> None:
        """End the stream and close the channel; idempotent."""
        if self._stream.closed:
            return
        await self._stream.close()
        await self._channel.close()


class _StreamBroken(UnavailableError):
    """The stream ended before the answer came."""


class MessagingPeers:
    """One :class:`MessagingPeer` per remote process, opened on first use."""

    def __init__(self, peer_id: str, max_payload_bytes: int) -> None:
        self._peer_id = peer_id
        self._max_payload_bytes = max_payload_bytes
        self._peers: dict[str, MessagingPeer] = {}

    async def forward(
        self, address: str, envelope: messaging_service_pb2.MessageEnvelope, timeout: float
    ) -> None:
        """Send to the process at ``address``."""
        peer = self._peers.get(address)
        if peer is None:
            peer = MessagingPeer(address, self._peer_id, self._max_payload_bytes)
            self._peers[address] = peer
        await peer.send(envelope, timeout)

    async def close(self) -> None:
        """Close every peer stream."""
        peers = list(self._peers.values())
        self._peers.clear()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
