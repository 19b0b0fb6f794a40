"""Answers the sink sends straight to the caller: what a scheduler keeps per call stream.

A caller may hold an answer stream (``ExecutorService.StreamAnswers``) at each
executor it can reach, all opened with one random id, and names those
executors on its ``StreamCalls`` stream (``answer_streams``). For a call
whose outcome the caller awaits (``direct_response`` or ``stream_outcome``,
one-shot or DAG) that runs (a DAG: whose sink runs) on one of them, the
scheduler asks that executor to answer on that stream
(:meth:`AnswerRoutes.route`); the executor then sends the scheduler only a
note, and the outcome future settles with :data:`DELIVERED_DIRECTLY`. The
scheduler keeps the call in its books until then, so executor loss,
half-close, result storage and the stream's limits work as before. The
caller may say sooner that it has an answer (``answered_sequences``), so that
the call stops counting against its executor's load (:meth:`AnswerRoutes.answered`).

An answer written into a connection that then breaks can be lost. The caller
reports the broken stream with the sequences it still waits for
(``answer_stream_lost``); :meth:`AnswerRoutes.lost` decides which of them get
an :class:`~cloudburst.errors.AnswerLostError` now, and :meth:`AnswerRoutes.finished`
which get one when their note arrives. Answers on the call stream come in
order, so a real answer sent there before such an error wins.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cloudburst.errors import AnswerLostError
from cloudburst.v1 import execution_pb2, scheduler_service_pb2

#: The outcome a sink's note stands for: the real one went to the caller's answer stream.
#: Compared by identity; never sent anywhere.
DELIVERED_DIRECTLY = execution_pb2.Outcome()

#: Sequences answered directly that a stream remembers, to tell which stream a lost one took.
REMEMBERED = 4096


class AnswerRoutes:
    """One call stream's answer streams, and its calls that may be answered through them.

    Everything runs on the scheduler's loop.
    """

    def __init__(self) -> None:
        self.stream_id = ""
        """The caller's answer stream id ("" before it named one)."""
        self.executors: frozenset[str] = frozenset()
        """The executors where the caller holds its answer stream now."""
        self._running: dict[int, str] = {}
        """Calls that may be delegated and have not ended: sequence -> executor ("" not there)."""
        self._lost: dict[int, str] = {}
        """Running calls whose answer the caller may have lost: sequence -> the lost executor."""
        self._delivered: collections.OrderedDict[int, str] = collections.OrderedDict()
        """Recent calls answered directly: sequence -> the executor that answered."""
        self._on_answered: dict[int, Callable[[], None]] = {}
        """What to do once the caller says it has a running call's answer (see :meth:`answered`)."""

    def update(self, streams: scheduler_service_pb2.AnswerStreams) -> None:
        """The caller named its answer streams (replacing those it named before)."""
        self.stream_id = streams.answer_stream_id
        self.executors = frozenset(streams.executor_ids) if self.stream_id else frozenset()

    def started(self, sequence: int) -> None:
        """A call that may be answered directly was read (call before the next frame is)."""
        self._running[sequence] = ""

    def route(self, sequence: int, executor_id: str) -> tuple[str, int] | None:
        """Where the sink on ``executor_id`` should answer the call (None: to the scheduler)."""
        if sequence not in self._running:
            return None
        if executor_id in self.executors:
            self._running[sequence] = executor_id
            return self.stream_id, sequence
        self._running[sequence] = ""
        return None

    def when_answered(self, sequence: int, then: Callable[[], None]) -> None:
        """Run ``then`` when the caller says it received the call's answer on an answer stream."""
        if sequence in self._running:
            self._on_answered[sequence] = then

    def answered(self, sequences: Iterable[int]) -> None:
        """The caller received these calls' answers on answer streams (before their notes came).

        Placing its next calls counts them ended: a caller that waits for each
        answer before its next call would otherwise see its last call still
        running on the executor that ran it (which may cache its keys).
        """
        for sequence in sequences:
            then = self._on_answered.pop(sequence, None)
            if then is not None:
                then()

    def finished(self, sequence: int, delivered: bool) -> AnswerLostError | None:
        """The call ended; the error to answer it with, if its direct answer was lost."""
        self._on_answered.pop(sequence, None)
        executor = self._running.pop(sequence, "")
        lost = self._lost.pop(sequence, None)
        if not delivered:
            return None
        # Remembered either way: a later report of another lost stream must not answer it again.
        self._delivered[sequence] = executor
        while len(self._delivered) > REMEMBERED:
            self._delivered.popitem(last=False)
        if lost is not None and lost == executor:
            return _lost_error(executor)
        return None

    def discard(self, sequence: int) -> None:
        """Forget a call that ended without :meth:`finished` (it failed or was cancelled)."""
        self._running.pop(sequence, None)
        self._lost.pop(sequence, None)
        self._on_answered.pop(sequence, None)

    def lost(self, report: scheduler_service_pb2.AnswerStreamLost) -> dict[int, AnswerLostError]:
        """The caller lost its answer stream at an executor: the errors to answer with now.

        No call is answered there any more until the caller names it again. A
        listed call that was answered there gets its error now; one still
        running there gets it when its note says it was answered directly (an
        outcome that comes to the scheduler instead is answered as usual).
        """
        executor = report.executor_id
        self.executors = self.executors - {executor}
        errors: dict[int, AnswerLostError] = {}
        for sequence in report.sequences:
            if sequence in self._running:
                if self._running[sequence] == executor:
                    self._lost[sequence] = executor
            elif self._delivered.get(sequence, executor) == executor:
                # Answered there (or answered here already: that answer came first and wins).
                errors[sequence] = _lost_error(executor)
        return errors


@dataclass(frozen=True)
class AnswerTo:
    """Where one call may be answered directly: its stream's routes and its sequence."""

    routes: AnswerRoutes
    sequence: int

    def route(self, executor_id: str) -> tuple[str, int] | None:
        """The answer stream id and sequence the executor should answer on (None: here)."""
        return self.routes.route(self.sequence, executor_id)

    def when_answered(self, then: Callable[[], None]) -> None:
        """Run ``then`` if the caller says it received the answer before the executor's note."""
        self.routes.when_answered(self.sequence, then)


def _lost_error(executor_id: str) -> AnswerLostError:
    return AnswerLostError(
        f"the call ran, but its answer was lost with the connection to executor {executor_id}, "
        "which sent it; it was not run again",
        {"executor": executor_id},
    )
