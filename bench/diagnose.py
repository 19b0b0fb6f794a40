"""Where the time of a `cbgrpc serve` call goes: the same call with parts taken away.

These workloads reach into the SDK's and the server's internals (read-only:
they call them, they change nothing), so they may break when those change;
a failure only costs their rows in the report.

- *SDK core from asyncio*: the frames ``call_dag``/``exec_func`` + ``get()``
  send, sent by the SDK's own core from a coroutine and timed inside the SDK's
  loop, without the synchronous API around them: what a grpc.aio client of
  the same protocol would see.
- *server pipeline only*: the scheduler and executors of a `cbgrpc serve`
  composition (``start_local``) running in this process, called directly on
  their loop, no gRPC and no client: the server's own share of a call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import systems
from bench.measure import AioLoop, AioWorkload, Workload

SYSTEM = "diagnosis"
DAG_NONE = "serve DAG direct_response, SDK core from asyncio, no synchronous API"
DAG_SERVER = "DAG direct_response, server pipeline only (in-process, no gRPC)"
CALL_NONE = "serve incr(1) + get(), SDK core from asyncio, no synchronous API"
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
    """The serve workloads sent by the SDK's core from a coroutine on its loop."""
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
        AioWorkload(SYSTEM, DAG_NONE, dag, loop, check=lambda r: r == 4),
        AioWorkload(SYSTEM, CALL_NONE, call, loop, check=lambda r: r == 2),
    ]


class InProcessServer:
    """`cbgrpc serve`'s composition in this process, on its own loop."""

    def __init__(self) -> None:
        self.loop = AioLoop("bench-node")
        self.node: Any = None

    def start(self) -> str:
        from cloudburst_grpc.config import Config, ExecutorConfig, KvsConfig, ServerConfig
        from cloudburst_grpc.local import start_local

        config = Config(
            server=ServerConfig(host="127.0.0.1", port=0),
            kvs=KvsConfig(engine="memory"),
            executor=ExecutorConfig(isolation="none"),  # the pipeline itself, in this process
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
