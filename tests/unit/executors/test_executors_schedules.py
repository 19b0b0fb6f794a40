"""A DAG call's schedule crosses each trigger stream once; its other triggers refer to it.

The stage machine (StageState) of two executors runs chains whose functions
alternate between them, with every trigger between them serialized and parsed
as on a stream: the work and bytes per trigger do not grow with the chain.
The two ends of a stream keep the same account of the schedules it carried.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

import pytest
from google.protobuf import timestamp_pb2

from cloudburst.errors import InvalidArgumentError
from cloudburst.serialization import serialize
from cloudburst.v1 import execution_pb2, executor_service_pb2, function_pb2
from cloudburst_executors.stages import Deliver, RunStage, StageState
from cloudburst_grpc.schedules import (
    ReceivedSchedules,
    ScheduleAccount,
    SentSchedules,
    epoch_seconds,
    referable,
)

A, B = "executor-a", "executor-b"


def chain_schedule(length: int, call_id: str, deadline: float) -> execution_pb2.DagSchedule:
    """A chain c00000 -> c00001 -> ... whose functions alternate between A and B."""
    names = [f"c{i:05d}" for i in range(length)]
    dag = function_pb2.Dag(name="chain", version=1, functions=names)
    for upstream, downstream in itertools.pairwise(names):
        dag.connections.add(upstream=upstream, downstream=downstream)
    schedule = execution_pb2.DagSchedule(call_id=call_id, dag=dag)
    for index, name in enumerate(names):
        schedule.placements[name] = A if index % 2 == 0 else B
        schedule.function_versions[name] = 1
        schedule.function_arguments[name].SetInParent()
    schedule.executor_addresses[A] = "127.0.0.1:1"
    schedule.executor_addresses[B] = "127.0.0.1:2"
    schedule.deadline_time.FromNanoseconds(int(deadline * 1e9))
    return schedule


def value(n: int) -> execution_pb2.Outcome:
    return execution_pb2.Outcome(value=serialize(n, what="test value", limit=1 << 20))


@dataclass
class Stream:
    """One direction between two executors: its sender's and its receiver's accounts."""

    sent: SentSchedules = field(default_factory=SentSchedules)
    received: ReceivedSchedules = field(default_factory=ReceivedSchedules)
    frames: list[int] = field(default_factory=list)
    """The size of each trigger frame that referred to its schedule."""
    carried: int = 0

    def cross(
        self, trigger: execution_pb2.Trigger, schedule: execution_pb2.DagSchedule
    ) -> tuple[execution_pb2.Trigger, execution_pb2.DagSchedule]:
        """Send a trigger as the remote peer does; what the receiving servicer hands on."""
        frame = executor_service_pb2.StreamTriggersRequest()
        frame.trigger.CopyFrom(trigger)
        self.sent.fill(frame.trigger, schedule)
        data = frame.SerializeToString()
        if frame.trigger.HasField("schedule"):
            self.carried += 1
        else:
            self.frames.append(len(data))
        arrived = executor_service_pb2.StreamTriggersRequest.FromString(data).trigger
        resolved = self.received.resolve(arrived)
        assert resolved is not None
        return arrived, resolved


def run_chain(length: int, calls: int = 2) -> dict[tuple[str, str], Stream]:
    """Run ``calls`` calls of a chain over two stage machines; return the streams used."""
    states = {A: StageState(A), B: StageState(B)}
    streams = {(A, B): Stream(), (B, A): Stream(), ("scheduler", A): Stream()}
    deadline = time.time() + 300
    for call in range(calls):
        schedule = chain_schedule(length, f"call-{call}", deadline)
        start = execution_pb2.Trigger(target_function="c00000", call_id=schedule.call_id)
        trigger, arrived = streams["scheduler", A].cross(start, schedule)
        here = A
        ready = states[here].trigger(trigger, arrived)
        ran = 0
        while True:
            assert isinstance(ready, RunStage)
            ran += 1
            after = states[here].ran(ready, ready.function, value(ran % 100))
            if isinstance(after, Deliver):
                break
            (forward,) = after
            assert not forward.local  # the chain alternates between A and B
            trigger, arrived = streams[here, forward.executor_id].cross(forward.trigger(), arrived)
            here = forward.executor_id
            ready = states[here].trigger(trigger, arrived)
        assert ran == length
        assert after.schedule.call_id == schedule.call_id
        assert after.outcome == value(length % 100)
    return streams


def test_a_schedule_crosses_each_stream_once_per_call_whatever_the_chain_length() -> None:
    short, long = run_chain(100), run_chain(1000)
    for streams in (short, long):
        assert [s.carried for s in streams.values()] == [2, 2, 2]  # once per call
        assert [s.sent.carried for s in streams.values()] == [2, 2, 2]
    # Every other trigger refers to its schedule: it is as small for 1000 functions as for 100.
    assert max(long[A, B].frames + long[B, A].frames) == max(
        short[A, B].frames + short[B, A].frames
    )
    assert len(long[A, B].frames) + len(long[B, A].frames) == 2 * (1000 - 1) - 4
    assert long[A, B].sent.referred + long[B, A].sent.referred == 2 * (1000 - 1) - 4


def test_the_stage_machine_keeps_the_schedule_by_reference() -> None:
    state = StageState(A)
    schedule = chain_schedule(3, "call-1", time.time() + 60)
    trigger = execution_pb2.Trigger(target_function="c00000", call_id="call-1")
    ready = state.trigger(trigger, schedule)
    assert ready is not None and ready.schedule is schedule
    after = state.ran(ready, "c00000", value(1))
    assert isinstance(after, list)
    (forward,) = after
    made = forward.trigger()
    assert not made.HasField("schedule") and made.call_id == "call-1"
    assert made.target_function == "c00001" and made.upstream_function == "c00000"
    assert made.outcome == value(1)


def test_both_ends_of_a_stream_agree_under_every_bound() -> None:
    """Random traffic over tight bounds: every reference the sender makes resolves."""
    rng = random.Random(7)
    deadline = time.time() + 300
    sizes = {}
    schedules = []
    for call in range(40):
        built = chain_schedule(rng.randint(1, 30), f"call-{call}", deadline)
        sizes[built.call_id] = built.ByteSize()
        schedules.append(built)
    max_bytes = sorted(sizes.values())[-3] * 3  # a few of them at a time, some never
    sent, received = SentSchedules(5, max_bytes), ReceivedSchedules(5, max_bytes)
    for _ in range(2000):
        schedule = rng.choice(schedules[: rng.randint(1, len(schedules))])
        frame = execution_pb2.Trigger(target_function="c00000")
        sent.fill(frame, schedule)
        arrived = execution_pb2.Trigger.FromString(frame.SerializeToString())
        resolved = received.resolve(arrived)
        assert resolved is not None and resolved.call_id == schedule.call_id
        assert len(received) <= 5
    assert sent.referred > 0 and sent.carried > 0


def test_a_schedule_over_the_byte_bound_travels_with_every_trigger() -> None:
    schedule = chain_schedule(50, "big", time.time() + 60)
    sent = SentSchedules(max_bytes=schedule.ByteSize() - 1)
    for _ in range(3):
        trigger = execution_pb2.Trigger(target_function="c00000")
        sent.fill(trigger, schedule)
        assert trigger.HasField("schedule")
    assert (sent.carried, sent.referred, len(sent)) == (3, 0, 0)


def test_a_new_stream_starts_from_nothing() -> None:
    schedule = chain_schedule(3, "call-1", time.time() + 60)
    sent = SentSchedules()
    first, second, third = (execution_pb2.Trigger(target_function="c00000") for _ in range(3))
    sent.fill(first, schedule)
    sent.fill(second, schedule)
    sent.reset()
    sent.fill(third, schedule)
    assert [t.HasField("schedule") for t in (first, second, third)] == [True, False, True]


def test_a_reference_to_a_schedule_the_stream_never_carried_is_refused() -> None:
    received = ReceivedSchedules()
    with pytest.raises(InvalidArgumentError, match=r"call 'lost'.*did not carry"):
        received.resolve(execution_pb2.Trigger(target_function="f", call_id="lost"))
    with pytest.raises(InvalidArgumentError, match="schedule or the call_id"):
        received.resolve(execution_pb2.Trigger(target_function="f"))


def test_a_schedule_is_let_go_at_its_calls_deadline() -> None:
    received = ReceivedSchedules()
    past = chain_schedule(3, "over", time.time() - 1)
    live = chain_schedule(3, "live", time.time() + 60)
    for schedule in (past, live):
        assert received.resolve(execution_pb2.Trigger(schedule=schedule)) is not None
    assert len(received) == 1
    # Still counted (the sender counts it too), but the call is over: nothing to run.
    assert received.resolve(execution_pb2.Trigger(call_id="over")) is None
    assert received.resolve(execution_pb2.Trigger(call_id="live")) is not None


def test_the_account_drops_the_least_recently_used_first() -> None:
    account = ScheduleAccount(max_calls=2, max_bytes=100)
    assert account.add("a", 10) == []
    assert account.add("b", 10) == []
    assert account.touch("a")
    assert account.add("c", 10) == ["b"]
    assert account.add("d", 85) == ["a"]  # over the byte bound: the oldest goes
    assert (len(account), account.bytes) == (2, 95)
    assert account.add("e", 101) == [] and not account.touch("e")


def test_a_kept_schedule_does_not_keep_its_first_trigger_alive() -> None:
    received = ReceivedSchedules()
    schedule = chain_schedule(3, "call-1", time.time() + 60)
    first = execution_pb2.Trigger(schedule=schedule, outcome=value(1))
    kept = received.resolve(first)
    assert kept == schedule and kept is not first.schedule  # a copy, apart from the frame
    assert received.resolve(execution_pb2.Trigger(call_id="call-1")) is kept


@pytest.mark.parametrize("length", [1, 2])
def test_a_dag_of_two_functions_or_fewer_is_never_counted(length: int) -> None:
    """Such a call sends a stream one trigger at most: no reference to its schedule can come."""
    schedule = chain_schedule(length, "small", time.time() + 60)
    sent, received = SentSchedules(), ReceivedSchedules()
    for _ in range(2):  # even a second trigger (which no sender makes) carries it again
        trigger = execution_pb2.Trigger(target_function="c00000", outcome=value(1))
        sent.fill(trigger, schedule)
        assert trigger.HasField("schedule") and trigger.call_id == "small"
        # The receiver hands on the trigger's own schedule: nothing measured, copied or kept.
        assert received.resolve(trigger) == schedule
    assert (sent.carried, sent.referred, len(sent), len(received)) == (2, 0, 0, 0)
    with pytest.raises(InvalidArgumentError, match="did not carry"):
        received.resolve(execution_pb2.Trigger(target_function="c00000", call_id="small"))


def test_a_dag_of_three_functions_is_counted() -> None:
    assert not referable(chain_schedule(2, "two", time.time() + 60))
    assert referable(chain_schedule(3, "three", time.time() + 60))


@pytest.mark.parametrize(
    "nanoseconds",
    [0, 1, 999_999_999, 1_000_000_000, 1_765_000_000_123_456_789, 4_102_444_800_999_999_999],
)
def test_epoch_seconds_is_the_timestamps_value_in_seconds(nanoseconds: int) -> None:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(nanoseconds)
    assert epoch_seconds(stamp) == pytest.approx(stamp.ToNanoseconds() / 1e9, rel=1e-15, abs=1e-9)


def test_a_schedule_is_let_go_at_its_deadline_read_in_seconds() -> None:
    received = ReceivedSchedules()
    now = time.time()
    soon = chain_schedule(3, "soon", now + 0.5)
    later = chain_schedule(3, "later", now + 60)
    for schedule in (soon, later):
        assert received.resolve(execution_pb2.Trigger(schedule=schedule)) == schedule
    assert len(received) == 2
    received._let_go(now + 1)
    assert len(received) == 1
    assert received.resolve(execution_pb2.Trigger(call_id="later")) == later
    assert received.resolve(execution_pb2.Trigger(call_id="soon")) is None, "past its deadline"
