"""Peer streams between processes: a broken stream loses no message and duplicates none."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from cloudburst.errors import MailboxNotFoundError, UnavailableError
from cloudburst.v1 import messaging_service_pb2, messaging_service_pb2_grpc, value_pb2
from cloudburst_grpc.messaging.mailbox import MailboxRouter
from cloudburst_grpc.messaging.service import MessagingPeer, MessagingServicer

Envelope = messaging_service_pb2.MessageEnvelope


class BreaksAfter(MessagingServicer):
    """Delivers the first stream's n-th message, then ends that stream before answering it."""

    def __init__(self, router: MailboxRouter, after: int) -> None:
        super().__init__(router)
        self.after = after
        self.streams = 0

    async def StreamMessages(
        self,
        request_iterator: AsyncIterator[messaging_service_pb2.StreamMessagesRequest],
        context: Any,
    ) -> AsyncIterator[messaging_service_pb2.StreamMessagesResponse]:
        self.streams += 1
        first_stream = self.streams == 1
        answered = 0
        async for answer in super().StreamMessages(request_iterator, context):
            answered += 1
            if first_stream and answered == self.after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the stream broke")
            yield answer


async def serve(servicer: MessagingServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    messaging_service_pb2_grpc.add_MessagingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def envelope(recipient: str, number: int) -> Envelope:
    payload = value_pb2.Value(data=str(number).encode(), serializer=value_pb2.SERIALIZER_STRING)
    return Envelope(
        message_number=number,
        sender_id="sender@elsewhere:1",
        recipient_id=recipient,
        payload=payload,
    )


async def no_forward(address: str, message: Envelope, timeout: float) -> None:
    raise AssertionError(f"the receiver forwards nothing, got a message for {address}")


async def test_a_broken_stream_is_reopened_and_every_message_arrives_once_in_order() -> None:
    total, break_after = 200, 40
    receiver = MailboxRouter("receiver:1", no_forward, capacity=total)
    servicer = BreaksAfter(receiver, break_after)
    server, address = await serve(servicer)
    mailbox = receiver.open()
    peer = MessagingPeer(address, "sender", 1 << 20)
    try:
        delivered = [concurrent.futures.Future[None]() for _ in range(total)]
        for number, future in enumerate(delivered, start=1):
            peer.post(envelope(mailbox.id, number), future)
        await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(f) for f in delivered)), timeout=30
        )
        assert servicer.streams == 2, "the first stream should have broken and been reopened"
        received = [int(m.payload.data) for m in mailbox.drain()]
        assert received == list(range(1, total + 1))
    finally:
        await peer.close()
        await server.stop(0)


async def test_a_receiver_that_is_gone_fails_the_send_after_the_resends() -> None:
    router = MailboxRouter("127.0.0.1:1", no_forward)
    server, address = await serve(MessagingServicer(router))
    await server.stop(0)  # nothing listens there any more
    peer = MessagingPeer(address, "sender", 1 << 20)
    try:
        with pytest.raises(UnavailableError, match="messaging stream"):
            await peer.send(envelope(f"abc@{address}", 1), timeout=30)
    finally:
        await peer.close()


async def test_the_receivers_error_reaches_the_sender() -> None:
    receiver = MailboxRouter("placeholder:1", no_forward)
    server, address = await serve(MessagingServicer(receiver))
    peer = MessagingPeer(address, "sender", 1 << 20)
    try:
        with pytest.raises(MailboxNotFoundError, match="no mailbox"):
            await peer.send(envelope(f"nobody@{address}", 1), timeout=30)
    finally:
        await peer.close()
        await server.stop(0)
