"""AnswerRoutes: which calls a caller's answer streams answer, and what a lost stream costs."""

from __future__ import annotations

from cloudburst.errors import AnswerLostError
from cloudburst.v1 import scheduler_service_pb2
from cloudburst_grpc.answer_streams import AnswerRoutes


def named(*executors: str, stream_id: str = "s" * 32) -> scheduler_service_pb2.AnswerStreams:
    return scheduler_service_pb2.AnswerStreams(answer_stream_id=stream_id, executor_ids=executors)


def lost(executor: str, *sequences: int) -> scheduler_service_pb2.AnswerStreamLost:
    return scheduler_service_pb2.AnswerStreamLost(executor_id=executor, sequences=sequences)


def test_a_call_is_routed_only_to_a_named_executor_while_it_runs() -> None:
    routes = AnswerRoutes()
    routes.started(1)
    assert routes.route(1, "a") is None  # nothing named yet
    routes.update(named("a", "b"))
    assert routes.route(1, "a") == ("s" * 32, 1)
    assert routes.route(1, "c") is None
    assert routes.route(2, "a") is None  # not a call this stream has running
    routes.update(named())
    routes.started(3)
    assert routes.route(3, "a") is None


def test_a_lost_stream_answers_calls_it_answered_and_stops_routing_there() -> None:
    routes = AnswerRoutes()
    routes.update(named("a", "b"))
    for sequence in (1, 2, 3, 4):
        routes.started(sequence)
    routes.route(1, "a")
    routes.route(2, "b")
    routes.route(3, "a")
    assert routes.finished(1, True) is None
    assert routes.finished(2, True) is None
    errors = routes.lost(lost("a", 1, 2, 3, 4, 5))
    # 1 went to a's stream: lost. 2 went to b's: its answer is on its way there. 3 and 4
    # still run. 5 is not running: answered here already (the error comes after: ignored).
    assert set(errors) == {1, 5}
    assert isinstance(errors[1], AnswerLostError)
    assert "the call ran" in str(errors[1]) and "executor a" in str(errors[1])
    assert routes.executors == {"b"}
    # 3's note says it went to a's lost stream: an error. 4 was never routed to a.
    error = routes.finished(3, True)
    assert isinstance(error, AnswerLostError)
    assert routes.finished(4, False) is None
    routes.started(6)
    assert routes.route(6, "a") is None  # until the caller names a again


def test_an_outcome_that_came_the_usual_way_is_answered_the_usual_way() -> None:
    routes = AnswerRoutes()
    routes.update(named("a"))
    routes.started(1)
    routes.route(1, "a")
    assert routes.lost(lost("a", 1)) == {}
    assert routes.finished(1, False) is None  # the sink found the stream gone
    routes.discard(1)
    assert routes.lost(lost("a", 1)) != {}  # not running, not known: answered already


def test_a_call_the_caller_says_it_has_stops_counting_at_once_and_only_once() -> None:
    routes = AnswerRoutes()
    routes.update(named("a"))
    ended: list[int] = []
    for sequence in (1, 2):
        routes.started(sequence)
        routes.route(sequence, "a")
        routes.when_answered(sequence, lambda s=sequence: ended.append(s))  # type: ignore[misc]
    routes.answered([2, 7])
    routes.answered([2])
    assert ended == [2]
    routes.finished(1, True)
    routes.answered([1])  # its note came first: nothing left to do
    assert ended == [2]


def test_a_call_answered_with_a_lost_error_is_not_answered_again_by_another_report() -> None:
    routes = AnswerRoutes()
    routes.update(named("a", "b"))
    routes.started(1)
    routes.route(1, "a")
    assert routes.lost(lost("a", 1)) == {}  # still running on a
    assert isinstance(routes.finished(1, True), AnswerLostError)  # its note: answered there
    # The caller then loses b's stream too, and still lists 1 (it has no answer for it yet):
    # 1 was answered (with the error) already, and b never had it.
    assert routes.lost(lost("b", 1)) == {}
