"""The user library: the first argument every function receives.

User code runs on executor threads; each library call hands a coroutine to the
event loop and waits for it with a deadline, so the loop is never blocked and
no call waits forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from cloudburst.errors import CloudburstTimeoutError, InvalidArgumentError, UnavailableError
from cloudburst.serialization import LwwClock, deserialize, lattice_value, lww, serialize
from cloudburst.v1 import messaging_service_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.kvs_access import KvsAccess
from cloudburst_grpc.messaging.mailbox import Mailbox, MailboxRouter

T = TypeVar("T")


class LoopBridge:
    """Runs coroutines on the event loop from user threads, with a deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout

    def run(self, coro: Coroutine[Any, Any, T], what: str, timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result.

        Raises:
            CloudburstTimeoutError: It did not finish within the timeout.
        """
        limit = self.timeout if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(limit)
        except TimeoutError:
            future.cancel()
            raise CloudburstTimeoutError(f"{what} did not finish within {limit:.1f}s") from None


class UserLibrary:
    """What a function can do besides compute: read and write the KVS, message peers.

    The original system's names ``get``, ``put`` and ``getid`` are aliases.
    One library serves one invocation; its mailbox closes when the invocation ends.
    """

    def __init__(
        self,
        bridge: LoopBridge,
        kvs: KvsAccess,
        clock: LwwClock,
        max_payload_bytes: int,
        call_id: str,
        router: MailboxRouter | None = None,
    ) -> None:
        self._bridge = bridge
        self._kvs = kvs
        self._clock = clock
        self._limit = max_payload_bytes
        self._call_id = call_id
        self._router = router
        self._mailbox_id: str | None = None
        self._mailbox: Mailbox | None = None
        self._sent = 0

    def get_object(self, key: str, timeout: float | None = None) -> Any:
        """Return the value stored at ``key``, or None when the key does not exist.

        Args:
            key: The key.
            timeout: If given, wait up to this many seconds for the key to exist
                (a rendezvous with another function), then return None.
        """
        _check_key(key)
        wait = timeout is not None and timeout > 0
        with telemetry.span("kvs get", attributes={"cloudburst.key": key}) as current:
            started = time.monotonic()
            lattice = self._bridge.run(
                self._kvs.get(key, wait=wait, timeout=timeout if wait else None),
                f"get_object({key!r})",
                None if timeout is None else timeout + 10,
            )
            telemetry.KVS_DURATION.record(time.monotonic() - started, {"operation": "get"})
            if current is not None:
                current.set_attribute("cloudburst.found", lattice is not None)
        return None if lattice is None else lattice_value(lattice)

    def put_object(self, key: str, value: Any) -> bool:
        """Store ``value`` at ``key`` (last writer wins); returns True once durable."""
        _check_key(key)
        data = serialize(value, what=f"value for key {key!r}", limit=self._limit)
        with telemetry.span("kvs put", attributes={"cloudburst.key": key}):
            started = time.monotonic()
            self._bridge.run(self._kvs.put(key, lww(data, self._clock)), f"put_object({key!r})")
            telemetry.KVS_DURATION.record(time.monotonic() - started, {"operation": "put"})
        return True

    get = get_object
    put = put_object

    def _messaging(self) -> MailboxRouter:
        if self._router is None:
            raise UnavailableError("messaging is not enabled on this executor")
        return self._router

    def get_id(self) -> str:
        """Return this invocation's mailbox id; other functions ``send`` to it."""
        if self._mailbox_id is None:
            router = self._messaging()

            async def open_mailbox() -> Mailbox:
                return router.open()

            self._mailbox = self._bridge.run(open_mailbox(), "get_id()")
            self._mailbox_id = self._mailbox.id
        return self._mailbox_id

    getid = get_id

    def send(self, dest: str, msg: Any) -> None:
        """Send ``msg`` (any Python value) to the function whose id is ``dest``.

        Returns once the message is in the receiver's mailbox. Messages from one
        sender to one receiver arrive in order.

        Raises:
            MailboxNotFoundError: No such id, or its function has finished.
            QueueFullError: The receiver's mailbox stayed full.
        """
        if not isinstance(dest, str) or not dest:
            raise InvalidArgumentError(f"send needs a mailbox id from get_id(), not {dest!r}")
        router = self._messaging()
        sender = self.get_id()
        self._sent += 1
        envelope = messaging_service_pb2.MessageEnvelope(
            message_number=self._sent,
            sender_id=sender,
            recipient_id=dest,
            payload=serialize(msg, what=f"message to {dest}", limit=self._limit),
        )
        attributes = {"cloudburst.sender": sender, "cloudburst.recipient": dest}
        limit = router.send_timeout + 15
        with telemetry.span("send", attributes=attributes):
            telemetry.inject(envelope.trace_context)
            try:
                delivered = router.submit(envelope, self._bridge.loop)
            except RuntimeError:
                raise UnavailableError("the executor is shutting down") from None
            try:
                delivered.result(limit)
            except TimeoutError:
                delivered.cancel()
                raise CloudburstTimeoutError(
                    f"send to {dest} did not finish within {limit:.1f}s"
                ) from None

    def recv(self, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Return the messages received so far as ``(sender_id, msg)`` pairs.

        Without ``timeout`` it never waits (an empty list when nothing came);
        with ``timeout`` it waits up to that many seconds for at least one.
        """
        mailbox_id = self.get_id()
        mailbox = self._mailbox
        assert mailbox is not None
        wait = max(timeout or 0.0, 0.0)
        with telemetry.span("recv", attributes={"cloudburst.recipient": mailbox_id}) as current:
            # Read (and wait) in this thread: arrivals notify the mailbox's condition.
            messages = mailbox.take(wait) if wait else mailbox.drain()
            if current is not None:
                current.set_attribute("cloudburst.messages", len(messages))
                for message in messages:
                    link = telemetry.link_to(message.trace_context)
                    if link is not None:
                        current.add_link(link.context)
        return [(m.sender_id, deserialize(m.payload)) for m in messages]

    @property
    def has_mailbox(self) -> bool:
        """Whether the invocation opened a mailbox, which :meth:`close` must then end."""
        return self._mailbox_id is not None

    def close(self) -> None:
        """End the invocation's mailbox, discarding unread messages (on the loop thread)."""
        if self._mailbox_id is not None and self._router is not None:
            self._router.close(self._mailbox_id)


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"a KVS key must be a non-empty string, not {key!r}")
