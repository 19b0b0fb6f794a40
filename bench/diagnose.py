"""Where the time of a `cbgrpc serve` call goes: the same call with parts taken away.

These workloads reach into the SDK's and the server's internals (read-only:
they call them, they change nothing), so they may break when those change;
a failure only costs their rows in the report.

- *SDK, one crossing*: the frames ``call_dag``/``exec_func`` + ``get()`` send,
  sent by the SDK's own core, but from one coroutine: the calling thread
  crosses to the SDK's loop once instead of twice.
- *SDK core from asyncio*: the same, timed inside the SDK's loop (no thread
  crossing at all): what a grpc.aio client of the same protocol would see.
- *server pipeline only*: the scheduler and executors of a `cbgrpc serve`
  composition (``start_local``) running in this process, called directly on
  their loop, no gRPC and no client: the server's own share of a call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import systems
from bench.measure import AioLoop, AioWorkload, SyncWorkload, Workload

SYSTEM = "diagnosis"
DAG_ONE = "serve DAG direct_response, SDK internals, one thread crossing"
DAG_NONE = "serve DAG direct_response, SDK core from asyncio, no crossing"
DAG_SERVER = "DAG direct_response, server pipeline only (in-process, no gRPC)"
CALL_ONE = "serve incr(1) + get(), SDK internals, one thread crossing"
CALL_NONE = "serve incr(1) + get(), SDK core from asyncio, no crossing"
CALL_SERVER = "incr(1) + outcome, server pipeline only (in-process, no gRPC)"
# Cost units (measured by bench.run): one handoff between threads, no I/O.
U_TO_LOOP = "thread -> asyncio loop -> thread (run_coroutine_threadsafe)"
U_TO_POOL = "loop -> thread pool -> loop (run_in_executor)"


class _SdkLoop:
    """The SDK connection's loop, as the :class:`~bench.measure.Runner` AioWorkload expects."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def run(self, coro: Any, timeout: float | None = 600.0) -> Any:
        return self._conn._loop.run(coro, timeout, "bench diagnosis")


def sdk_workloads(serve: systems.System) -> list[Workload]:
    """The serve workloads without the SDK's second thread crossing, and without any."""
    from cloudburst.v1 import scheduler_service_pb2 as sched

    conn: Any = serve.conn
    core = conn._core

    def dag_frame() -> Any:
        request = sched.CallDagRequest(name=systems.CHAIN_DAG, direct_response=True)
        request.function_arguments["incr"].arguments.append(conn._argument(1, "argument 1"))
        return sched.StreamCallsRequest(call_dag=request, stream_outcome=False)

    def call_frame() -> Any:
        request = sched.CallFunctionRequest(name="incr", arguments=[conn._argument(1, "arg 1")])
        return sched.StreamCallsRequest(call_function=request, stream_outcome=True)

    def send(frame: Any) -> Any:
        # The SDK's own path: one hand-off to the loop, then a wait on thread-safe futures.
        pending = core.send_call(frame, True)
        pending.wait_accepted(60)
        return conn._decode(pending.wait_outcome(60))

    async def send_from_loop(frame: Any) -> Any:
        pending = core.send_call(frame, True)
        await asyncio.wrap_future(pending.accepted)
        return conn._decode(await asyncio.wrap_future(pending.outcome))

    async def dag() -> Any:
        return await send_from_loop(dag_frame())

    async def call() -> Any:
        return await send_from_loop(call_frame())

    loop = _SdkLoop(conn)
    return [
        SyncWorkload(SYSTEM, DAG_ONE, lambda: send(dag_frame()), check=lambda r: r == 4),
        AioWorkload(SYSTEM, DAG_NONE, dag, loop, check=lambda r: r == 4),
        SyncWorkload(SYSTEM, CALL_ONE, lambda: send(call_frame()), check=lambda r: r == 2),
        AioWorkload(SYSTEM, CALL_NONE, call, loop, check=lambda r: r == 2),
    ]


class InProcessServer:
    """`cbgrpc serve`'s composition in this process, on its own loop."""

    def __init__(self) -> None:
        self.loop = AioLoop("bench-node")
        self.node: Any = None

    def start(self) -> str:
        from cloudburst_grpc.config import Config, KvsConfig, ServerConfig
        from cloudburst_grpc.local import start_local

        config = Config(
            server=ServerConfig(host="127.0.0.1", port=0), kvs=KvsConfig(engine="memory")
        ).validate()
        self.node = self.loop.run(start_local(config), 60)
        return str(self.node.address)

    def workloads(self) -> list[Workload]:
        from cloudburst.serialization import deserialize, serialize
        from cloudburst.v1 import scheduler_service_pb2 as sched
        from cloudburst.v1 import value_pb2

        scheduler = self.node.scheduler

        def argument() -> Any:
            return value_pb2.Argument(value=serialize(1, what="argument", limit=1 << 20))

        async def dag() -> Any:
            request = sched.CallDagRequest(name=systems.CHAIN_DAG, direct_response=True)
            request.function_arguments["incr"].arguments.append(argument())
            accepted = await scheduler.call_dag(request, True, None)
            return deserialize((await accepted.outcome).value)

        async def call() -> Any:
            request = sched.CallFunctionRequest(name="incr", arguments=[argument()])
            accepted = await scheduler.call_function(request, True, None)
            return deserialize((await accepted.outcome).value)

        return [
            AioWorkload(SYSTEM, DAG_SERVER, dag, self.loop, check=lambda r: r == 4),
            AioWorkload(SYSTEM, CALL_SERVER, call, self.loop, check=lambda r: r == 2),
        ]

    def stop(self) -> None:
        if self.node is not None:
            try:
                self.loop.run(self.node.stop(0.5), 30)
            finally:
                self.node = None
        self.loop.stop()


def register(address: str) -> None:
    """Register the bench's functions and DAGs on a server (through the SDK)."""
    system = systems.System("in-process", address, [])
    try:
        systems.register_all(systems.connect(system))
    finally:
        system.close()
