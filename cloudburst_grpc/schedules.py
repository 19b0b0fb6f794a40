"""Which DAG schedules a trigger stream carried already, kept alike at both of its ends.

A trigger carries its call's whole schedule (every function's placement,
arguments and version) only the first time the call crosses a stream; later
triggers of the call on that stream name it by call id. So a call of N
functions costs O(N) bytes per stream, not O(N) per trigger.

Both ends of a stream keep the same account of what the stream carried: the
sender's :class:`SentSchedules` and the receiver's :class:`ReceivedSchedules`
apply the same rule (:class:`ScheduleAccount`) to the same frames in the same
order, so the receiver remembers every schedule the sender refers to. At most
:data:`MAX_SCHEDULES` calls and :data:`MAX_SCHEDULE_BYTES` bytes of schedules
(as serialized) count per stream; past either bound the least recently used
call stops counting on both ends, and its next trigger carries its schedule
again. The receiver also lets go of a schedule at its call's deadline (the
call is over by then) but keeps counting it, so the two accounts stay alike.

A call of a DAG of at most two functions never sends two triggers on one
stream (its one source is triggered once, and triggers its one downstream
once), so its schedule is never counted (:func:`referable`): neither end
measures, copies or keeps it for references that cannot come.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict

from google.protobuf import timestamp_pb2

from cloudburst.errors import InvalidArgumentError
from cloudburst.v1 import execution_pb2

#: The most calls whose schedules one stream remembers.
MAX_SCHEDULES = 1024
#: The most bytes of schedules (as serialized) one stream remembers.
MAX_SCHEDULE_BYTES = 16 * 1024 * 1024


def epoch_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """A timestamp (a schedule's deadline, say) as seconds since the epoch.

    The value of ``stamp.ToNanoseconds() / 1e9`` at a third of the cost: hot
    paths convert a deadline or two per trigger.
    """
    return stamp.seconds + stamp.nanos / 1e9


def referable(schedule: execution_pb2.DagSchedule) -> bool:
    """Whether a stream counts ``schedule`` as carried, for later triggers to refer to.

    Only a DAG of more than two functions may send a stream two triggers of one
    call (two sources placed on one executor, two edges between the same two
    executors); a smaller DAG sends each stream at most one. A retried call runs
    under a new call id, so it never refers to its first run's schedule either.
    """
    return len(schedule.dag.functions) > 2


class ScheduleAccount:
    """The calls a stream counts as carried, least recently used first, and their sizes.

    Args:
        max_calls: The most calls counted.
        max_bytes: The most bytes of schedules counted; a larger schedule is never counted.
    """

    def __init__(self, max_calls: int = MAX_SCHEDULES, max_bytes: int = MAX_SCHEDULE_BYTES) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.bytes = 0
        """The bytes of the schedules counted."""

    def touch(self, call_id: str) -> bool:
        """Whether ``call_id`` counts as carried; if so, it becomes the most recently used."""
        if call_id not in self._sizes:
            return False
        self._sizes.move_to_end(call_id)
        return True

    def add(self, call_id: str, size: int) -> list[str]:
        """Count a schedule of ``size`` bytes as carried; return the calls that stopped counting.

        A schedule larger than the byte bound is not counted (its call then
        carries it in every trigger).
        """
        dropped: list[str] = []
        if call_id in self._sizes:
            self.bytes -= self._sizes.pop(call_id)
        if size > self.max_bytes:
            return dropped
        self._sizes[call_id] = size
        self.bytes += size
        while len(self._sizes) > self.max_calls or self.bytes > self.max_bytes:
            oldest, oldest_size = self._sizes.popitem(last=False)
            self.bytes -= oldest_size
            dropped.append(oldest)
        return dropped

    def __len__(self) -> int:
        """Calls counted."""
        return len(self._sizes)


class SentSchedules:
    """The sending end: which calls' schedules the current stream carried.

    Call :meth:`reset` whenever frames start going on a new stream.
    """

    def __init__(self, max_calls: int = MAX_SCHEDULES, max_bytes: int = MAX_SCHEDULE_BYTES) -> None:
        self._limits = (max_calls, max_bytes)
        self._account = ScheduleAccount(max_calls, max_bytes)
        self.carried = 0
        """Triggers filled so far that carried their schedule."""
        self.referred = 0
        """Triggers filled so far that referred to their schedule by call id."""

    def reset(self) -> None:
        """A new stream: it carried nothing yet."""
        self._account = ScheduleAccount(*self._limits)

    def fill(self, trigger: execution_pb2.Trigger, schedule: execution_pb2.DagSchedule) -> None:
        """Make ``trigger`` (without a schedule) carry ``schedule`` or refer to it by call id."""
        trigger.call_id = schedule.call_id
        if not referable(schedule):
            self.carried += 1
            trigger.schedule.CopyFrom(schedule)
            return
        if self._account.touch(schedule.call_id):
            self.referred += 1
            return
        self.carried += 1
        trigger.schedule.CopyFrom(schedule)
        self._account.add(schedule.call_id, schedule.ByteSize())

    def __len__(self) -> int:
        """Calls whose schedules the stream counts as carried."""
        return len(self._account)


class ReceivedSchedules:
    """The receiving end: the schedules one stream carried, for the triggers that refer to them.

    One per stream (a new stream starts with nothing, as does its sender).
    """

    def __init__(self, max_calls: int = MAX_SCHEDULES, max_bytes: int = MAX_SCHEDULE_BYTES) -> None:
        self._account = ScheduleAccount(max_calls, max_bytes)
        self._schedules: dict[str, execution_pb2.DagSchedule] = {}
        self._deadlines: list[tuple[float, str]] = []
        """A heap of (deadline, call id) of the schedules held; stale entries are skipped."""

    def resolve(self, trigger: execution_pb2.Trigger) -> execution_pb2.DagSchedule | None:
        """The schedule of ``trigger``'s call: its own, or the one the stream carried earlier.

        Returns None when the trigger refers to a call whose deadline has passed
        (the schedule was let go; the call is over).

        Raises:
            InvalidArgumentError: The trigger names no call, or one this stream never
                carried (or stopped counting): the sender broke the protocol.
        """
        now = time.time()
        self._let_go(now)
        if trigger.HasField("schedule"):
            schedule = trigger.schedule
            if not referable(schedule):
                return schedule  # never referred to: nothing to count or keep
            call_id = schedule.call_id
            for gone in self._account.add(call_id, schedule.ByteSize()):
                self._schedules.pop(gone, None)
            if self._account.touch(call_id):  # counted (not larger than the byte bound)
                deadline = epoch_seconds(schedule.deadline_time)
                if deadline > now:
                    # A copy: the trigger's own would keep its whole frame (its outcome) alive.
                    kept = execution_pb2.DagSchedule()
                    kept.CopyFrom(schedule)
                    self._schedules[call_id] = kept
                    self._watch(deadline, call_id)
                    return kept
                self._schedules.pop(call_id, None)
            return schedule
        call_id = trigger.call_id
        if not call_id:
            raise InvalidArgumentError("a trigger needs a schedule or the call_id of one")
        if not self._account.touch(call_id):
            raise InvalidArgumentError(
                f"trigger for call {call_id!r} refers to a schedule this stream did not carry "
                "(or no longer counts); send the schedule with the call's first trigger on "
                "each stream",
                {"call_id": call_id},
            )
        return self._schedules.get(call_id)

    def _watch(self, deadline: float, call_id: str) -> None:
        heap = self._deadlines
        heapq.heappush(heap, (deadline, call_id))
        if len(heap) > 2 * len(self._schedules) + 64:  # mostly calls no longer counted
            self._deadlines = [
                (epoch_seconds(s.deadline_time), c) for c, s in self._schedules.items()
            ]
            heapq.heapify(self._deadlines)

    def _let_go(self, now: float) -> None:
        """Drop the schedules of calls past their deadline (they stay counted)."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, call_id = heapq.heappop(heap)
            schedule = self._schedules.get(call_id)
            if schedule is not None and epoch_seconds(schedule.deadline_time) <= now:
                del self._schedules[call_id]

    def __len__(self) -> int:
        """Schedules held (counted and not past their deadline)."""
        return len(self._schedules)
