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
from cloudburst_grpc.messaging.service import (
    AnswerOutbox,
    MessagingPeer,
    MessagingPeers,
    MessagingServicer,
)

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


async def no_forward(address: str, message: Envelope, timeout: float) -> bool:
    raise AssertionError(f"the receiver forwards nothing, got a message for {address}")


async def test_a_broken_stream_is_reopened_and_every_message_arrives_once_in_order() -> None:
    total, break_after = 200, 40
    receiver = MailboxRouter("receiver:1", no_forward, capacity=total)
    servicer = BreaksAfter(receiver, break_after)
    server, address = await serve(servicer)
    mailbox = receiver.open()
    peer = MessagingPeer(address, "sender", 1 << 20)
    try:
        delivered = [concurrent.futures.Future[bool]() for _ in range(total)]
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


class Process:
    """One process's messaging, wired as an executor wires it: answers may ride back."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.answers = AnswerOutbox()
        self.peers = MessagingPeers("p", 1 << 20, self.address, self.answers)
        self.router = MailboxRouter(
            self.address, self.peers.forward, post=self.peers.post, send_timeout=10
        )
        messaging_service_pb2_grpc.add_MessagingServiceServicer_to_server(
            MessagingServicer(self.router, self.answers, self.peers.answered), self.server
        )

    async def close(self) -> None:
        await self.peers.close()
        await self.server.stop(0)


async def test_an_answer_rides_on_a_message_going_back_and_goes_alone_otherwise() -> None:
    here, there = Process(), Process()
    await here.server.start()
    await there.server.start()
    try:
        asker, replier = here.router.open(), there.router.open()

        async def reply() -> None:
            (message,) = await replier.receive(10)
            # As a function waiting on the loop would: reply at once.
            await there.router.send(envelope(message.sender_id, 1))

        replying = asyncio.create_task(reply())
        question = envelope(replier.id, 1)
        question.sender_id = asker.id
        await asyncio.wait_for(here.router.send(question), 10)
        await asyncio.wait_for(replying, 10)
        assert [int(m.payload.data) for m in await asker.receive(10)] == [1]
        assert there.answers.riding == 1, "the answer to the question rode on the reply"
        assert here.answers.alone == 1, "nothing went back: the answer to the reply went alone"
        assert here.answers.riding == there.answers.alone == 0
    finally:
        await here.close()
        await there.close()


async def test_answers_on_a_frame_that_cannot_be_sent_go_alone() -> None:
    answers = AnswerOutbox()
    fallback: asyncio.Queue[Any] = asyncio.Queue()
    answers.hold("there:1", messaging_service_pb2.StreamMessagesResponse(sequence=7), fallback)
    peer = MessagingPeer("there:1", "p", 1 << 20, "here:1", answers)
    await peer.close()  # closed for good: the frame is never sent
    delivered = concurrent.futures.Future[bool]()
    peer.post(envelope("box@there:1", 1), delivered)
    with pytest.raises(UnavailableError):
        delivered.result(0)
    assert fallback.get_nowait().sequence == 7
    assert answers.alone == 1


async def test_the_receiver_answers_that_a_message_to_a_closed_mailbox_was_dropped() -> None:
    receiver = MailboxRouter("receiver:1", no_forward)
    server, address = await serve(MessagingServicer(receiver))
    peer = MessagingPeer(address, "sender", 1 << 20)
    try:
        open_box, closed_box = receiver.open(), receiver.open()
        receiver.close(closed_box.id)
        assert await peer.send(envelope(open_box.id, 1), timeout=30) is True
        assert await peer.send(envelope(closed_box.id, 1), timeout=30) is False
        delivered = concurrent.futures.Future[bool]()
        peer.post(envelope(closed_box.id, 2), delivered)
        assert await asyncio.wait_for(asyncio.wrap_future(delivered), 30) is False
        with pytest.raises(MailboxNotFoundError, match="never"):
            await peer.send(envelope("never-1@receiver:1", 1), timeout=30)
        assert receiver.dropped == 2
        assert [int(m.payload.data) for m in open_box.drain()] == [1]
    finally:
        await peer.close()
        await server.stop(0)


async def test_a_drop_is_reported_between_processes_wired_as_executors() -> None:
    here, there = Process(), Process()
    await here.server.start()
    await there.server.start()
    try:
        asker, finished = here.router.open(), there.router.open()
        there.router.close(finished.id)
        late = envelope(finished.id, 1)
        late.sender_id = asker.id
        assert await asyncio.wait_for(here.router.send(late), 10) is False
        # With a message going back meanwhile, the answer may ride on it: still a drop.
        sending = asyncio.create_task(here.router.send(envelope(finished.id, 2)))
        assert await asyncio.wait_for(there.router.send(envelope(asker.id, 1)), 10) is True
        assert await asyncio.wait_for(sending, 10) is False
        assert there.router.dropped == 2 and here.router.dropped == 0
    finally:
        await here.close()
        await there.close()
