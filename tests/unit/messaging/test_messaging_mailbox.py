from __future__ import annotations

import asyncio
import threading

import pytest

from cloudburst.errors import MailboxNotFoundError, QueueFullError
from cloudburst.v1 import messaging_service_pb2, value_pb2
from cloudburst_grpc.messaging.mailbox import MailboxRouter, mailbox_address

Envelope = messaging_service_pb2.MessageEnvelope


def envelope(recipient: str, number: int, sender: str = "s@here", text: str = "") -> Envelope:
    payload = value_pb2.Value(
        data=(text or str(number)).encode(), serializer=value_pb2.SERIALIZER_STRING
    )
    return Envelope(
        message_number=number, sender_id=sender, recipient_id=recipient, payload=payload
    )


async def no_forward(address: str, message: Envelope, timeout: float) -> bool:
    raise AssertionError(f"nothing should be forwarded, got one for {address}")


def test_mailbox_ids_name_their_process() -> None:
    router = MailboxRouter("10.0.0.1:7600", no_forward)
    mailbox = router.open()
    assert mailbox_address(mailbox.id) == "10.0.0.1:7600"
    with pytest.raises(MailboxNotFoundError, match="not a mailbox id"):
        mailbox_address("not-an-id")


async def test_messages_arrive_in_order_and_drain_empties() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    for n in range(1, 101):
        await router.send(envelope(mailbox.id, n))
    received = mailbox.drain()
    assert [m.payload.data.decode() for m in received] == [str(n) for n in range(1, 101)]
    assert mailbox.drain() == []


async def test_a_resent_message_is_delivered_once() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    await router.deliver(envelope(mailbox.id, 1))
    await router.deliver(envelope(mailbox.id, 1))
    await router.deliver(envelope(mailbox.id, 2))
    assert [m.payload.data for m in mailbox.drain()] == [b"1", b"2"]


async def test_sending_to_an_id_that_never_named_a_mailbox_fails_clearly() -> None:
    router = MailboxRouter("here:1", no_forward)
    opened = router.open()
    incarnation = opened.id.split("-")[0]
    never = [
        "nobody@here:1",
        f"{incarnation}-2@here:1",  # a number not issued yet
        f"{incarnation}-0@here:1",
        f"{incarnation}-x@here:1",
        "0123456789abcdef-1@here:1",  # another process's (an earlier one at this address)
    ]
    for mailbox_id in never:
        with pytest.raises(MailboxNotFoundError, match="no function was ever given this id"):
            await router.send(envelope(mailbox_id, 1))
    with pytest.raises(MailboxNotFoundError, match="not a mailbox id"):
        await router.send(envelope("malformed", 1))
    assert router.dropped == 0


async def test_a_message_to_a_closed_mailbox_is_dropped_and_counted() -> None:
    router = MailboxRouter("here:1", no_forward)
    first, second = router.open(), router.open()
    router.close(first.id)
    assert await router.send(envelope(first.id, 1)) is False
    assert await router.send(envelope(second.id, 1)) is True
    router.close(second.id)
    assert await router.send(envelope(second.id, 2)) is False
    assert router.dropped == 2
    assert len(router) == 0
    assert router.closed(first.id) and not router.closed(router.open().id)


async def test_a_sender_waiting_for_space_is_dropped_when_the_mailbox_closes() -> None:
    router = MailboxRouter("here:1", no_forward, capacity=1, send_timeout=30)
    mailbox = router.open()
    await router.send(envelope(mailbox.id, 1))
    blocked = asyncio.create_task(router.send(envelope(mailbox.id, 2)))
    await asyncio.sleep(0)  # let the sender start waiting
    assert not blocked.done()
    router.close(mailbox.id)
    assert await asyncio.wait_for(blocked, 5) is False
    assert router.dropped == 1


def test_getting_a_closed_mailbox_says_its_function_finished() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    router.close(mailbox.id)
    with pytest.raises(MailboxNotFoundError, match="has finished"):
        router.get(mailbox.id)


async def test_closing_discards_unread_messages() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    await router.send(envelope(mailbox.id, 1))
    router.close(mailbox.id)
    assert len(mailbox) == 0


async def test_a_full_mailbox_makes_the_sender_wait_then_fail() -> None:
    router = MailboxRouter("here:1", no_forward, capacity=2, send_timeout=0.05)
    mailbox = router.open()
    await router.send(envelope(mailbox.id, 1))
    await router.send(envelope(mailbox.id, 2))
    with pytest.raises(QueueFullError, match="is full"):
        await router.send(envelope(mailbox.id, 3))
    assert len(mailbox) == 2


async def test_a_waiting_sender_proceeds_when_the_receiver_reads() -> None:
    router = MailboxRouter("here:1", no_forward, capacity=1, send_timeout=30)
    mailbox = router.open()
    await router.send(envelope(mailbox.id, 1))
    blocked = asyncio.create_task(router.send(envelope(mailbox.id, 2)))
    await asyncio.sleep(0)  # let the sender start waiting
    assert not blocked.done()
    assert [m.payload.data for m in mailbox.drain()] == [b"1"]
    await asyncio.wait_for(blocked, 5)
    assert [m.payload.data for m in mailbox.drain()] == [b"2"]


async def test_receive_waits_for_a_message_and_times_out_empty() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    assert await mailbox.receive(0.01) == []
    waiting = asyncio.create_task(mailbox.receive(30))
    await asyncio.sleep(0)
    await router.send(envelope(mailbox.id, 7))
    received = await asyncio.wait_for(waiting, 5)
    assert [m.payload.data for m in received] == [b"7"]


async def test_messages_for_other_processes_are_forwarded() -> None:
    forwarded: list[tuple[str, Envelope]] = []

    async def forward(address: str, message: Envelope, timeout: float) -> bool:
        forwarded.append((address, message))
        return True

    router = MailboxRouter("here:1", forward)
    await router.send(envelope("abc@there:2", 1))
    assert [(a, m.recipient_id) for a, m in forwarded] == [("there:2", "abc@there:2")]


async def test_a_reader_thread_waits_for_a_message_without_the_loop() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    taken: list[list[bytes]] = []
    started = threading.Event()

    def reader() -> None:
        started.set()
        taken.append([m.payload.data for m in mailbox.take(30)])

    thread = threading.Thread(target=reader)
    thread.start()
    started.wait(10)
    await router.send(envelope(mailbox.id, 5))
    await asyncio.to_thread(thread.join, 10)
    assert taken == [[b"5"]]


async def test_a_reader_thread_frees_space_for_a_waiting_sender() -> None:
    router = MailboxRouter("here:1", no_forward, capacity=1, send_timeout=30)
    mailbox = router.open()
    await router.send(envelope(mailbox.id, 1))
    blocked = asyncio.create_task(router.send(envelope(mailbox.id, 2)))
    await asyncio.sleep(0)
    assert not blocked.done()
    first = await asyncio.to_thread(mailbox.take, 5)
    await asyncio.wait_for(blocked, 5)
    second = await asyncio.to_thread(mailbox.take, 5)
    assert [m.payload.data for m in first + second] == [b"1", b"2"]


def test_take_times_out_empty_and_a_closed_mailbox_wakes_its_reader() -> None:
    router = MailboxRouter("here:1", no_forward)
    mailbox = router.open()
    assert mailbox.take(0.01) == []
    mailbox.close()
    assert mailbox.take(30) == []  # returns at once: nothing more can arrive
