"""The user library: the first argument every function receives.

User code runs on an executor thread or in a greenlet on the event loop (see
:mod:`cloudburst_executors.cooperative`). The library does not care which: each of its
calls that needs the loop goes through the run's *bridge*, chosen once per run
by where the run goes. :class:`LoopBridge` serves code on a thread: it hands
each coroutine to the loop and waits for it with a deadline;
:class:`cooperative.GreenletBridge` serves a greenlet: it switches to the loop,
which awaits the coroutine. Either way the loop is never blocked and no call
waits forever.

Each run knows its call's deadline (when the caller stops waiting). No
library call waits past it, and once it has passed every library call raises
:class:`~cloudburst.errors.CloudburstTimeoutError` in the function: a
function polling the KVS for something that never comes ends with its call,
and gives its thread back, instead of polling on for nobody.

A function on a worker thread holds one of the executor's runnable slots
(see :mod:`cloudburst_executors.slots`) while its code runs, and gives it up
while it waits in a library call: functions waiting for each other never
starve the ones they wait for of threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from cloudburst.chunks import stored_bytes, stored_value
from cloudburst.errors import CloudburstTimeoutError, InvalidArgumentError, UnavailableError
from cloudburst.serialization import (
    LwwClock,
    deserialize,
    lattice_bytes,
    lattice_value,
    lww_of,
    serialize,
)
from cloudburst.v1 import messaging_service_pb2
from cloudburst_grpc import telemetry
from cloudburst_grpc.kvs_access import KvsAccess, get_stored
from cloudburst_grpc.messaging.mailbox import Mailbox, MailboxRouter, Message

if TYPE_CHECKING:
    from cloudburst_executors.slots import RunSlots

T = TypeVar("T")


class LoopBridge:
    """How the library calls of user code on a worker thread reach the event loop.

    Every wait of a library call is one of this class's methods, so that a run
    in a greenlet (:class:`cooperative.GreenletBridge`) can wait differently.

    It also times the stretches of user code between library calls (from
    :meth:`begin` to :meth:`end`), which decide whether the function may run
    on the loop (see :mod:`cloudburst_executors.inline`).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, deadline: float = math.inf
    ) -> None:
        self.loop = loop
        self.timeout = timeout
        self.deadline = deadline
        """When the call's caller stops waiting (time.monotonic())."""
        self._slots: RunSlots | None = None
        """The runnable slots, while the user code on the owner thread holds one."""
        self.streak = 0
        """Quick stretches of user code in a row, up to the latest."""
        self.broken = False
        """Whether a slow stretch came before them."""
        self._max_stretch_seconds = 0.0
        self._mark = 0.0
        """When the current stretch began (perf_counter), or 0 when not measuring."""
        self._owner: int | None = None
        """The thread running the user code, once known."""
        self.foreign = False
        """Whether another thread (one the user code started) called the library."""

    def begin(self, max_stretch_seconds: float) -> None:
        """User code starts running on this thread: measure its stretches against the limit."""
        self.streak, self.broken, self._max_stretch_seconds = 0, False, max_stretch_seconds
        self.own()
        self._mark = time.perf_counter()

    def own(self) -> None:
        """User code runs on this thread: calls from any other are :attr:`foreign`."""
        self._owner = threading.get_ident()

    def hold(self, slots: RunSlots) -> None:
        """The user code on this thread holds one of ``slots``: give it up in each wait."""
        self._slots = slots

    def let_go(self) -> None:
        """The user code ended (its slot is released by the caller)."""
        self._slots = None

    def left(self, what: str, limit: float) -> float:
        """Seconds ``what`` may wait: ``limit``, or less if the call's deadline is nearer.

        Raises:
            CloudburstTimeoutError: The call's deadline has passed.
        """
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CloudburstTimeoutError(
                f"{what}: the call's deadline passed {-left:.1f}s ago (its caller stopped "
                "waiting), so every library call of the function fails from now on"
            )
        return min(limit, left)

    def end(self) -> None:
        """User code ended: count its last stretch and stop measuring."""
        self._stretch_ends()
        self._mark = 0.0

    def _stretch_ends(self) -> bool:
        """Count the stretch of user code that ends; False when called from a foreign thread."""
        if self._owner is not None and threading.get_ident() != self._owner:
            self.foreign = True
            return False
        if self._mark:
            if time.perf_counter() - self._mark > self._max_stretch_seconds:
                self.streak, self.broken = 0, True
            else:
                self.streak += 1
        return True

    def _pause(self) -> RunSlots | None:
        """A wait begins: end the stretch; give the slot up (returned, to take back)."""
        if not self._stretch_ends():
            return None
        slots = self._slots
        if slots is not None:
            slots.wait_begins()
        return slots

    def _resume(self, slots: RunSlots | None) -> None:
        """The wait ended: take a slot again (see :meth:`_pause`); a new stretch begins."""
        if slots is not None:
            slots.wait_ends()
        if self._mark and threading.get_ident() == self._owner:
            self._mark = time.perf_counter()

    def run(
        self,
        coro: Coroutine[Any, Any, T],
        what: str,
        timeout: float | None = None,
        bounded: bool = False,
    ) -> T:
        """Run ``coro`` on the loop and return its result.

        ``bounded``: the coroutine has a deadline of its own (shorter than
        ``timeout``), which a greenlet run then relies on alone.

        Raises:
            CloudburstTimeoutError: It did not finish within the timeout.
        """
        try:
            limit = self.left(what, self.timeout if timeout is None else timeout)
        except CloudburstTimeoutError:
            coro.close()
            raise
        return self.wait(asyncio.run_coroutine_threadsafe(coro, self.loop), what, limit)

    def on_loop(self, function: Callable[[], T], what: str) -> T:
        """Call ``function`` on the loop's thread and return what it returns."""

        async def call() -> T:
            return function()

        return self.run(call(), what)

    def send(
        self, router: MailboxRouter, envelope: messaging_service_pb2.MessageEnvelope, limit: float
    ) -> bool:
        """Deliver a message through ``router``; returns once it is in the recipient's mailbox.

        Returns:
            True when delivered, False when the recipient's mailbox had closed (dropped).

        Raises:
            CloudburstTimeoutError: It was not delivered within ``limit`` seconds.
        """
        what = f"send to {envelope.recipient_id}"
        limit = self.left(what, limit)
        try:
            delivered = router.submit(envelope, self.loop)
        except RuntimeError:
            raise UnavailableError("the executor is shutting down") from None
        return self.wait(delivered, what, limit)

    def receive(self, mailbox: Mailbox, wait: float) -> list[Message]:
        """The mailbox's messages; without any, wait up to ``wait`` seconds for one."""
        # Wait in this thread: arrivals notify the mailbox's condition. Even
        # without a wait this ends a stretch of user code, as in a greenlet.
        if wait:
            wait = self.left("recv()", wait)
        with self.blocking():
            return mailbox.take(wait) if wait else mailbox.drain()

    def wait(self, future: concurrent.futures.Future[T], what: str, limit: float) -> T:
        """Wait on this thread for ``future``, which the loop settles.

        An error ``future`` carries is raised as it is, a ``TimeoutError`` too.

        Raises:
            CloudburstTimeoutError: It did not settle within ``limit`` seconds.
        """
        slots = self._pause()
        try:
            done, _ = concurrent.futures.wait([future], limit)
        finally:
            self._resume(slots)
        if done:
            return future.result()
        future.cancel()
        self.left(what, math.inf)  # the deadline passed: say so
        raise CloudburstTimeoutError(f"{what} did not finish within {limit:.1f}s")

    def blocking(self) -> contextlib.AbstractContextManager[None]:
        """Marks a wait on this thread that is not user code (see :meth:`begin`)."""
        return _Blocking(self)


class _Blocking:
    __slots__ = ("_bridge", "_slots")

    def __init__(self, bridge: LoopBridge) -> None:
        self._bridge = bridge
        self._slots: RunSlots | None = None

    def __enter__(self) -> None:
        self._slots = self._bridge._pause()

    def __exit__(self, *exc: object) -> None:
        self._bridge._resume(self._slots)


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
        max_value_bytes: int | None = None,
    ) -> None:
        self._bridge = bridge
        self._kvs = kvs
        self._clock = clock
        self._max_payload_bytes = max_payload_bytes
        self._max_value_bytes = max_value_bytes or max_payload_bytes
        """The largest value ``put_object`` stores (the KVS tier's; large ones go in chunks)."""
        self._call_id = call_id
        self._router = router
        self._mailbox_id: str | None = None
        self._mailbox: Mailbox | None = None
        self._sent = 0

    def get_object(
        self, key: str | list[str], timeout: float | None = None, deserialize: bool = True
    ) -> Any:
        """Return the value stored at ``key``, or None when the key does not exist.

        Args:
            key: The key, or a list of keys: then a dict maps each key to its
                value or None, read in one batch (``timeout`` does not apply).
            timeout: If given, wait up to this many seconds for the key to exist
                (a rendezvous with another function), then return None.
            deserialize: False returns the stored bytes as they are.
        """
        if isinstance(key, list):
            return self._get_many(key, lattice_value if deserialize else lattice_bytes)
        # A large value comes in its chunks, joined and decoded here, on the function's
        # thread, not on the event loop.
        decode = stored_value if deserialize else stored_bytes
        _check_key(key)
        wait = timeout is not None and timeout > 0
        with telemetry.span("kvs get", attributes={"cloudburst.key": key}) as current:
            started = time.monotonic()
            lattice = self._bridge.run(
                get_stored(self._kvs, key, wait=wait, timeout=timeout if wait else None),
                f"get_object({key!r})",
                None if timeout is None else timeout + 10,
            )
            telemetry.KVS_DURATION.record(time.monotonic() - started, {"operation": "get"})
            if current is not None:
                current.set_attribute("cloudburst.found", lattice is not None)
        return None if lattice is None else decode(lattice)

    def _get_many(self, keys: list[str], decode: Any) -> dict[str, Any]:
        for key in keys:
            _check_key(key)
        with telemetry.span("kvs get", attributes={"cloudburst.keys": len(keys)}):
            started = time.monotonic()
            found = self._bridge.run(self._kvs.get_many(keys), f"get_object of {len(keys)} keys")
            telemetry.KVS_DURATION.record(time.monotonic() - started, {"operation": "get"})
        return {key: None if found[key] is None else decode(found[key]) for key in keys}

    def put_object(self, key: str, value: Any) -> bool:
        """Store ``value`` at ``key`` (last writer wins); returns True once durable."""
        _check_key(key)
        lattice = lww_of(
            value, self._clock, what=f"value for key {key!r}", limit=self._max_value_bytes
        )
        with telemetry.span("kvs put", attributes={"cloudburst.key": key}):
            started = time.monotonic()
            self._bridge.run(self._kvs.put(key, lattice), f"put_object({key!r})")
            telemetry.KVS_DURATION.record(time.monotonic() - started, {"operation": "put"})
        return True

    get = get_object
    put = put_object

    @property
    def bridge(self) -> LoopBridge:
        """How this invocation's library calls reach the loop."""
        return self._bridge

    def _messaging(self) -> MailboxRouter:
        if self._router is None:
            raise UnavailableError("messaging is not enabled on this executor")
        return self._router

    def get_id(self) -> str:
        """Return this invocation's mailbox id; other functions ``send`` to it."""
        if self._mailbox_id is None:
            self._mailbox = self._bridge.on_loop(self._messaging().open, "get_id()")
            self._mailbox_id = self._mailbox.id
        return self._mailbox_id

    getid = get_id

    def send(self, dest: str, msg: Any) -> bool:
        """Send ``msg`` (any Python value) to the function whose id is ``dest``.

        Returns True once the message is in the receiver's mailbox, or False
        when the receiver has finished (its mailbox closed): the message is
        then dropped, as the original system dropped it. Messages from one
        sender to one receiver arrive in order.

        Raises:
            MailboxNotFoundError: No function was ever given this id, or it is malformed.
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
            payload=serialize(msg, what=f"message to {dest}", limit=self._max_payload_bytes),
        )
        attributes = (
            {"cloudburst.sender": sender, "cloudburst.recipient": dest}
            if telemetry.tracing()
            else None
        )
        limit = router.send_timeout + 15
        with telemetry.span("send", attributes=attributes):
            telemetry.inject(envelope.trace_context)
            return self._bridge.send(router, envelope, limit)

    def recv(self, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Return the messages received so far as ``(sender_id, msg)`` pairs.

        Without ``timeout`` it never waits (an empty list when nothing came);
        with ``timeout`` it waits up to that many seconds for at least one.
        """
        mailbox_id = self.get_id()
        mailbox = self._mailbox
        assert mailbox is not None
        wait = max(timeout or 0.0, 0.0)
        attributes = {"cloudburst.recipient": mailbox_id} if telemetry.tracing() else None
        with telemetry.span("recv", attributes=attributes) as current:
            messages = self._bridge.receive(mailbox, wait)
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
