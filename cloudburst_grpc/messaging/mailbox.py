"""Mailboxes and their router.

A mailbox belongs to one function invocation: it opens when the invocation
first asks for its id and closes, discarding unread messages, when the
invocation ends. A mailbox id names the process that hosts it
(``<invocation>@<host:port>``), so any process can route to it without a
directory. A mailbox is bounded: a sender that outruns its receiver waits for
space, and gets ``QueueFullError`` if none frees up in time.

Everything here runs on the event loop thread, except what a function's own
thread calls: :meth:`Mailbox.take`, :meth:`Mailbox.drain` and
:meth:`MailboxRouter.submit`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloudburst.errors import InvalidArgumentError, MailboxNotFoundError, QueueFullError
from cloudburst.v1 import messaging_service_pb2, value_pb2

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
        raise InvalidArgumentError(
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

    async def put(self, envelope: messaging_service_pb2.MessageEnvelope, timeout: float) -> None:
        """Add a message, waiting up to ``timeout`` seconds for space.

        A resent message (a number already seen from its sender) is dropped, so
        each message is delivered once.

        Raises:
            MailboxNotFoundError: The mailbox closed.
            QueueFullError: It stayed full for ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        deadline = loop.time() + timeout
        while True:
            if self.closed:
                raise _gone(self.id)
            if envelope.message_number and envelope.message_number <= self._last_number.get(
                envelope.sender_id, 0
            ):
                return
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


def _gone(mailbox_id: str) -> MailboxNotFoundError:
    return MailboxNotFoundError(
        f"no mailbox {mailbox_id}: the id is unknown or its function has finished",
        {"mailbox": mailbox_id},
    )


Forward = Callable[[str, messaging_service_pb2.MessageEnvelope, float], Awaitable[None]]
Post = Callable[
    [
        str,
        messaging_service_pb2.MessageEnvelope,
        concurrent.futures.Future[None] | asyncio.Future[None],
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

    def open(self) -> Mailbox:
        """Open a mailbox for a new invocation."""
        mailbox = Mailbox(f"{uuid.uuid4().hex}@{self.address}", self.capacity)
        self._mailboxes[mailbox.id] = mailbox
        return mailbox

    def close(self, mailbox_id: str) -> None:
        """Close a mailbox, discarding what it still holds."""
        mailbox = self._mailboxes.pop(mailbox_id, None)
        if mailbox is not None:
            mailbox.close()

    def get(self, mailbox_id: str) -> Mailbox:
        """The open mailbox with this id."""
        mailbox = self._mailboxes.get(mailbox_id)
        if mailbox is None:
            raise _gone(mailbox_id)
        return mailbox

    def __len__(self) -> int:
        return len(self._mailboxes)

    async def deliver(self, envelope: messaging_service_pb2.MessageEnvelope) -> None:
        """Put a message into one of this process's mailboxes."""
        await self.get(envelope.recipient_id).put(envelope, self.send_timeout)

    async def send(self, envelope: messaging_service_pb2.MessageEnvelope) -> None:
        """Deliver a message to its mailbox, here or in another process."""
        address = mailbox_address(envelope.recipient_id)
        if address == self.address:
            await self.deliver(envelope)
        else:
            await self._forward(address, envelope, self.send_timeout)

    def submit(
        self, envelope: messaging_service_pb2.MessageEnvelope, loop: asyncio.AbstractEventLoop
    ) -> concurrent.futures.Future[None]:
        """Start delivering a message from any thread; the future settles once it is there.

        Raises:
            InvalidArgumentError: The recipient is not a mailbox id.
            RuntimeError: The loop is closed.
        """
        address = mailbox_address(envelope.recipient_id)
        if address != self.address and self._post is not None:
            delivered: concurrent.futures.Future[None] = concurrent.futures.Future()
            loop.call_soon_threadsafe(self._post, address, envelope, delivered)
            return delivered
        return asyncio.run_coroutine_threadsafe(self.send(envelope), loop)
