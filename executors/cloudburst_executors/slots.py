"""Runnable slots: how many functions run user code on an executor's threads at once.

``executor.threads`` bounds the functions that *compute* at once, not those
that exist: a function waiting in a user-library call (``get_object`` with a
timeout, ``recv``, ``send`` to a full mailbox, any KVS round trip) gives its
slot up while it waits and takes one again before its code goes on. So
functions that wait for each other (a rendezvous through the KVS, a ring of
messages) never deadlock for want of threads: the thread pool grows past
``threads`` while they wait, up to ``executor.max_threads``, beyond which
the executor refuses calls with QUEUE_FULL and says why.

A run waiting for its pinned class instance (whose lock another run may
hold across a library call) gives its slot up too (see
:mod:`cloudburst_executors.runner`). A lock of the user's own held across a
library call is not seen: ``threads`` runs blocked on it can keep its holder
from getting a slot back, so such code needs more ``threads`` than runs that
may block on the lock at once.

A call that finds every slot busy waits for one on its thread; the first
time that happens the executor logs it with the numbers, and the metrics
``cloudburst.executor.queue_depth`` and ``cloudburst.executor.queued_calls``
show it from then on (see :mod:`cloudburst_grpc.telemetry`).
"""

from __future__ import annotations

import logging
import threading

from cloudburst.errors import UnavailableError
from cloudburst_grpc import telemetry

logger = logging.getLogger(__name__)


class RunSlots:
    """The runnable slots of one executor, shared by its worker threads.

    Args:
        size: The slots (``executor.threads``).
        executor_id: Named in the log line and the metric.
    """

    def __init__(self, size: int, executor_id: str) -> None:
        self.size = size
        self.executor_id = executor_id
        self.running = 0
        """Functions holding a slot."""
        self.waiting = 0
        """Functions that gave their slot up to wait in a library call."""
        self.queued = 0
        """Functions waiting for a slot (to start, or to go on after a library call)."""
        self._free = size
        self._closed = False
        self._warned = False
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._labels = {"executor": executor_id}

    def acquire(self) -> None:
        """Take a slot, waiting on this thread for one if all are busy.

        Raises:
            UnavailableError: The executor shut down.
        """
        with self._lock:
            if self._free > 0 and not self._closed:
                self._free -= 1
                self.running += 1
                return
            self._queue()
            try:
                while self._free <= 0 and not self._closed:
                    self._freed.wait()
            finally:
                self.queued -= 1
            if self._closed:
                raise UnavailableError(f"executor {self.executor_id} is shutting down")
            self._free -= 1
            self.running += 1

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._free += 1
            self.running -= 1
            if self.queued:
                self._freed.notify()

    def wait_begins(self) -> None:
        """The function holding a slot starts waiting in a library call: give its slot up."""
        with self._lock:
            self._free += 1
            self.running -= 1
            self.waiting += 1
            if self.queued:
                self._freed.notify()

    def wait_ends(self) -> None:
        """Its wait ended: take a slot again, waiting for one if need be (see :meth:`acquire`)."""
        with self._lock:
            self.waiting -= 1
        self.acquire()

    def close(self) -> None:
        """The executor shuts down: whoever waits for a slot gets UnavailableError."""
        with self._lock:
            self._closed = True
            self._freed.notify_all()

    def _queue(self) -> None:
        """A function must wait for a slot (lock held): count it; log it the first time."""
        self.queued += 1
        telemetry.QUEUED_CALLS.add(1, self._labels)
        if self._warned:
            return
        self._warned = True
        logger.warning(
            "executor %s: calls wait for a free thread: %d queued, %d running, %d waiting in "
            "library calls (executor.threads = %d); add executors or threads if this persists "
            "(the metric cloudburst.executor.queued_calls counts such waits; this is logged once)",
            self.executor_id,
            self.queued,
            self.running,
            self.waiting,
            self.size,
        )
