"""Answer streams: calls answered by the executor that finished them, not by the scheduler.

A connection holds one ``ExecutorService.StreamAnswers`` stream at each
executor its scheduler lists (``ListExecutors``, followed as it changes), all
opened with one random 128-bit id. Once a stream is registered, the connection
names the executors it holds streams at on its call stream; the scheduler
then has the sink of a ``direct_response`` DAG call answer on that stream,
one hop instead of two through the scheduler. Answers read there are handed
to the same dispatcher as the scheduler's.

When a registered stream breaks, the connection tells the scheduler which
executor it lost and which calls it still waits for: the scheduler answers
those, with their outcome if it has it, or with an ``AnswerLostError`` for
a call whose answer went to the lost stream. The stream is opened again after
a pause while the executor stays listed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import grpc

from cloudburst.transport import ClientSecurity
from cloudburst.v1 import (
    executor_service_pb2,
    executor_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)

logger = logging.getLogger(__name__)

#: Seconds before a broken answer stream is opened again (doubling up to RETRY_MAX_SECONDS).
RETRY_SECONDS = 1.0
#: The longest pause between tries of an answer stream.
RETRY_MAX_SECONDS = 30.0
#: Seconds one ListExecutors waits for the membership to change.
WATCH_SECONDS = 30.0


class AnswerStreams:
    """The connection's answer streams at the executors of its scheduler.

    Args:
        scheduler: The scheduler's stub, for ``ListExecutors``.
        security: The connection's TLS settings, used for executors too.
        max_payload_bytes: The largest message accepted.
        on_answer: Called on the loop with every answer read.
        on_change: Called on the loop when the set of registered executors changed.
        on_lost: Called on the loop with the id of an executor whose registered stream broke.
    """

    def __init__(
        self,
        scheduler: scheduler_service_pb2_grpc.SchedulerServiceAsyncStub,
        security: ClientSecurity,
        max_payload_bytes: int,
        on_answer: Callable[[scheduler_service_pb2.StreamCallsResponse], None],
        on_change: Callable[[], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.stream_id = secrets.token_hex(16)
        """The id every stream is opened with (a capability: keep it to this connection)."""
        self.registered: frozenset[str] = frozenset()
        """The executors where the stream is registered now (replaced, never changed in place,
        so that other threads may read it)."""
        self._scheduler = scheduler
        self._security = security
        self._max_payload_bytes = max_payload_bytes
        self._on_answer = on_answer
        self._on_change = on_change
        self._on_lost = on_lost
        self._holders: dict[str, tuple[str, asyncio.Task[None]]] = {}
        """Executor id -> (address, the task that holds its stream)."""
        self._watcher: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._tried: set[str] = set()
        """Executors whose stream registered, or whose first attempt ended without (unreachable,
        refused): :meth:`start` waits for no more than these."""

    async def start(self, timeout: float) -> bool:
        """Open streams at the scheduler's executors; wait up to ``timeout`` for them to register.

        An executor that refuses the stream or cannot be reached is not waited for
        (its stream is tried again in the background).

        Returns whether the scheduler answers through such streams at all; if
        it does not (an older one, or ``cbgrpc serve``), nothing is opened.
        """
        try:
            listed = await self._scheduler.ListExecutors(
                scheduler_service_pb2.ListExecutorsRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            rpc: Any = exc
            logger.info("cannot list executors (%s); answers come from the scheduler", rpc.code())
            return False
        if not listed.direct_answers:
            return False
        self._follow(listed)
        self._watcher = asyncio.create_task(self._watch(listed.version))
        try:
            async with asyncio.timeout(timeout):
                while not self._holders.keys() <= self._tried:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            logger.info(
                "answer streams registered at %d of %d executors within %.1fs",
                len(self.registered),
                len(self._holders),
                timeout,
            )
        return True

    def _follow(self, listed: scheduler_service_pb2.ListExecutorsResponse) -> None:
        """Hold a stream at each executor listed, and at no other."""
        wanted = {e.executor_id: e.address for e in listed.executors}
        for executor_id, (address, holder) in list(self._holders.items()):
            if wanted.get(executor_id) != address:
                del self._holders[executor_id]
                holder.cancel()
        for executor_id, address in wanted.items():
            if executor_id not in self._holders:
                task = asyncio.create_task(self._hold(executor_id, address))
                self._holders[executor_id] = (address, task)

    async def _watch(self, version: int) -> None:
        """Follow the scheduler's executor membership (a blocking query at a time)."""
        delay = RETRY_SECONDS
        while True:
            request = scheduler_service_pb2.ListExecutorsRequest(min_version=version)
            try:
                listed = await self._scheduler.ListExecutors(request, timeout=WATCH_SECONDS)
            except grpc.RpcError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            delay = RETRY_SECONDS
            if listed.version != version:
                version = listed.version
                self._follow(listed)

    async def _hold(self, executor_id: str, address: str) -> None:
        """Keep a stream open at one executor: read its answers, open it again when it breaks."""
        channel = self._security.channel(address, self._max_payload_bytes)
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        request = executor_service_pb2.StreamAnswersRequest(answer_stream_id=self.stream_id)
        delay = RETRY_SECONDS
        try:
            while True:
                call = stub.StreamAnswers(request)
                try:
                    await self._read(executor_id, call)
                except grpc.RpcError as exc:
                    rpc: Any = exc
                    logger.info(
                        "the answer stream at executor %s (%s) ended: %s %s",
                        executor_id,
                        address,
                        rpc.code(),
                        rpc.details(),
                    )
                    if executor_id in self.registered:
                        delay = RETRY_SECONDS
                finally:
                    call.cancel()
                    self._unregister(executor_id)
                    self._tried.add(executor_id)
                    self._changed.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
        finally:
            await channel.close()

    async def _read(self, executor_id: str, call: Any) -> None:
        on_answer = self._on_answer
        async for message in call:
            if message.registered:
                self.registered = self.registered | {executor_id}
                self._tried.add(executor_id)
                self._changed.set()
                self._on_change()
            for answer in message.answers:
                on_answer(answer)

    def _unregister(self, executor_id: str) -> None:
        if executor_id in self.registered:
            self.registered = self.registered - {executor_id}
            self._changed.set()
            self._on_lost(executor_id)

    async def close(self) -> None:
        """End every stream; idempotent."""
        tasks = [holder for _, holder in self._holders.values()]
        self._holders.clear()
        if self._watcher is not None:
            tasks.append(self._watcher)
            self._watcher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
