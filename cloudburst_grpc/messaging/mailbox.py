"""Mailboxes and their router.

A mailbox belongs to one function invocation: it opens when the invocation
first asks for its id and closes, discarding unread messages, when the
invocation ends. A mailbox id names the process that hosts it
(``<incarnation>-<number>@<host:port>``), so any process can route to it
without a directory. A mailbox is bounded: a sender that outruns its receiver
waits for space, and gets ``QueueFullError`` if none frees up in time.

A message to a mailbox that existed and has closed is dropped, as the
original system dropped it: functions that gossip with random peers and no
final barrier send to peers that have already returned, and that must not
fail the sender. ``send`` then answers False (True when delivered), and the
drop is counted. An id that never named a mailbox, or a malformed one, still
fails with ``MailboxNotFoundError``: that is a bug in the caller.

Telling "closed" from "never existed" needs no record of closed ids. Each
router draws a random incarnation token when it starts and numbers the
mailboxes it opens 1, 2, 3, ...; so "this id is closed" is exactly "it
carries my token, its number is one I have issued, and it is not open". The
memory used is one counter, however many mailboxes come and go, and nothing
has to be forgotten. An id of an earlier process at the same address (its
token differs) counts as unknown: this process cannot tell whether it was
ever issued.

Everything here runs on the event loop thread, except what a function's own
thread calls: :meth:`Mailbox.take`, :meth:`Mailbox.drain` and
:meth:`MailboxRouter.submit`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import secrets
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloudburst.errors import MailboxNotFoundError, QueueFullError
from cloudburst.v1 import messaging_service_pb2, value_pb2
from cloudburst_grpc import telemetry

#: Messages a mailbox holds before senders wait.
DEFAULT_CAPACITY = 1024
#: Seconds a sender waits for space in a full mailbox.
DEFAULT_SEND_TIMEOUT = 10.0


@dataclass(frozen=True)
class Message:
    """One received message."""

    sender_id: str
    payload: value_pb2.Value
    trace_context: dict[str, str]
    """The sending span's trace context."""


def mailbox_address(mailbox_id: str) -> str:
    """The ``host:port`` of the process hosting a mailbox."""
    invocation, sep, address = mailbox_id.rpartition("@")
    if not sep or not invocation or not address:
        raise MailboxNotFoundError(
            f"{mailbox_id!r} is not a mailbox id; use the value get_id() returned",
            {"mailbox": mailbox_id},
        )
    return address


class Mailbox:
    """A bounded, ordered queue of messages for one invocation.

    Messages arrive on the event loop; the function reads them from its own
    thread with :meth:`take`, which waits on a condition the arrival notifies,
    so a reader needs no round trip through the loop.
    """

    def __init__(self, mailbox_id: str, capacity: int) -> None:
        self.id = mailbox_id
        self.capacity = capacity
        self._messages: collections.deque[Message] = collections.deque()
        self._last_number: dict[str, int] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._changed = asyncio.Event()
        """Set on the loop when messages arrive or are taken (wakes loop-side waiters)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._space_waiters = 0
        """Senders waiting on the loop for space; readers wake the loop only for them."""
        self.closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    def _notify_loop(self) -> None:
        """Wake loop-side waiters (senders waiting for space), from any thread."""
        loop = self._loop
        if loop is None:
            self._changed.set()
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._changed.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._changed.set)

    async def put(self, envelope: messaging_service_pb2.MessageEnvelope, timeout: float) -> bool:
        """Add a message, waiting up to ``timeout`` seconds for space.

        A resent message (a number already seen from its sender) is not added
        again, so each message is delivered once.

        Returns:
            True once the message is in the mailbox (or was already), False
            when the mailbox is closed (or closes while the sender waits), so
            the message is dropped.

        Raises:
            QueueFullError: It stayed full for ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        deadline = loop.time() + timeout
        while True:
            if self.closed:
                return False
            if envelope.message_number and envelope.message_number <= self._last_number.get(
                envelope.sender_id, 0
            ):
                return True
            if len(self) < self.capacity:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise QueueFullError(
                    f"mailbox {self.id} is full ({self.capacity} unread messages) and its "
                    f"function did not read any within {timeout:.1f}s; send less often or "
                    "recv more often",
                    {"mailbox": self.id},
                )
            self._space_waiters += 1
            try:
                self._changed.clear()
                if len(self) < self.capacity:
                    continue  # a reader took messages before it could see this waiter
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                continue
            finally:
                self._space_waiters -= 1
        message = Message(envelope.sender_id, envelope.payload, dict(envelope.trace_context))
        with self._arrived:
            self._messages.append(message)
            self._arrived.notify_all()
        if envelope.message_number:
            self._last_number[envelope.sender_id] = envelope.message_number
        self._changed.set()
        return True

    def drain(self) -> list[Message]:
        """Take every message received so far (never waits; any thread)."""
        with self._lock:
            messages = list(self._messages)
            self._messages.clear()
        if messages and self._space_waiters:
            self._notify_loop()
        return messages

    def take(self, timeout: float) -> list[Message]:
        """Take the messages, waiting in this thread up to ``timeout`` seconds for one."""
        with self._arrived:
            self._arrived.wait_for(lambda: bool(self._messages) or self.closed, timeout)
        return self.drain()

    async def receive(self, timeout: float) -> list[Message]:
        """Take the messages, waiting up to ``timeout`` seconds for at least one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not len(self) and not self.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                break
        return self.drain()

    def close(self) -> None:
        """Discard unread messages and refuse new ones."""
        with self._arrived:
            self.closed = True
            self._messages.clear()
            self._arrived.notify_all()
        self._notify_loop()


def _unknown(mailbox_id: str) -> MailboxNotFoundError:
    return MailboxNotFoundError(
        f"no mailbox {mailbox_id}: no function was ever given this id (use the value "
        "get_id() returned)",
        {"mailbox": mailbox_id},
    )


#: Delivers an envelope to another process's address within a timeout; True when
#: delivered, False when the mailbox there has closed and the message was dropped.
Forward = Callable[[str, messaging_service_pb2.MessageEnvelope, float], Awaitable[bool]]
Post = Callable[
    [
        str,
        messaging_service_pb2.MessageEnvelope,
        concurrent.futures.Future[bool] | asyncio.Future[bool],
    ],
    None,
]


class MailboxRouter:
    """The mailboxes of one process, and delivery to mailboxes anywhere.

    Args:
        address: ``host:port`` of this process's MessagingService; part of every id.
        forward: Delivers an envelope to another process's address.
        capacity: Messages a mailbox holds before senders wait.
        send_timeout: Seconds a send waits for space before failing.
        post: Starts delivering an envelope to another process's address (on the
            loop) and settles the future given when it is there; lets
            :meth:`submit` skip a coroutine per message. Without it, ``forward``
            is used.
    """

    def __init__(
        self,
        address: str,
        forward: Forward,
        capacity: int = DEFAULT_CAPACITY,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        post: Post | None = None,
    ) -> None:
        self.address = address
        self._forward = forward
        self._post = post
        self.capacity = capacity
        self.send_timeout = send_timeout
        self._mailboxes: dict[str, Mailbox] = {}
        self._incarnation = secrets.token_hex(8)
        self._issued = 0
        """How many mailboxes this router has opened (the number of the latest)."""
        self.dropped = 0
        """Messages dropped because their mailbox had closed (also a metric)."""

    def open(self) -> Mailbox:
        """Open a mailbox for a new invocation."""
        self._issued += 1
        mailbox = Mailbox(f"{self._incarnation}-{self._issued}@{self.address}", self.capacity)
        self._mailboxes[mailbox.id] = mailbox
        return mailbox

    def closed(self, mailbox_id: str) -> bool:
        """Whether this router issued ``mailbox_id`` and it is no longer open."""
        if mailbox_id in self._mailboxes:
            return False
        invocation, _, address = mailbox_id.rpartition("@")
        incarnation, _, number = invocation.rpartition("-")
        return (
            address == self.address
            and incarnation == self._incarnation
            and number.isdigit()
            and 1 <= int(number) <= self._issued
        )

    def close(self, mailbox_id: str) -> None:
        """Close a mailbox, discarding what it still holds."""
        mailbox = self._mailboxes.pop(mailbox_id, None)
        if mailbox is not None:
            mailbox.close()

    def get(self, mailbox_id: str) -> Mailbox:
        """The open mailbox with this id.

        Raises:
            MailboxNotFoundError: No mailbox with this id is open.
        """
        mailbox = self._mailboxes.get(mailbox_id)
        if mailbox is None:
            if self.closed(mailbox_id):
                raise MailboxNotFoundError(
                    f"mailbox {mailbox_id} has closed: its function has finished",
                    {"mailbox": mailbox_id},
                )
            raise _unknown(mailbox_id)
        return mailbox

    def __len__(self) -> int:
        return len(self._mailboxes)

    async def deliver(self, envelope: messaging_service_pb2.MessageEnvelope) -> bool:
        """Put a message into one of this process's mailboxes.

        Returns:
            True when it is in the mailbox; False when the mailbox existed and
            has closed, so the message was dropped (and counted).

        Raises:
            MailboxNotFoundError: This process never issued the id.
            QueueFullError: The mailbox stayed full.
        """
        recipient = envelope.recipient_id
        mailbox = self._mailboxes.get(recipient)
        if mailbox is None:
            if not self.closed(recipient):
                raise _unknown(recipient)
            delivered = False
        else:
            delivered = await mailbox.put(envelope, self.send_timeout)
        if not delivered:
            self.dropped += 1
            telemetry.MESSAGES_DROPPED.add(1)
        return delivered

    async def send(self, envelope: messaging_service_pb2.MessageEnvelope) -> bool:
        """Deliver a message to its mailbox, here or in another process.

        Returns:
            True when delivered, False when dropped because the mailbox has closed.
        """
        address = mailbox_address(envelope.recipient_id)
        if address == self.address:
            return await self.deliver(envelope)
        return await self._forward(address, envelope, self.send_timeout)

    def submit(
        self, envelope: messaging_service_pb2.MessageEnvelope, loop: asyncio.AbstractEventLoop
    ) -> concurrent.futures.Future[bool]:
        """Start delivering a message from any thread; the future settles once it is there.

        The future's result is what :meth:`send` returns.

        Raises:
            MailboxNotFoundError: The recipient is not a mailbox id.
            RuntimeError: The loop is closed.
        """
        address = mailbox_address(envelope.recipient_id)
        if address != self.address and self._post is not None:
            delivered: concurrent.futures.Future[bool] = concurrent.futures.Future()
            loop.call_soon_threadsafe(self._post, address, envelope, delivered)
            return delivered
        return asyncio.run_coroutine_threadsafe(self.send(envelope), loop)
