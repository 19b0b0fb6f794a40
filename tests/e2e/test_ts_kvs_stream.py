"""The TypeScript client's objects travel as frames of one StreamOps stream.

The client's driver (sdk/typescript/test/driver.ts, built by `make clients`)
runs against a cluster in this process (a KVS whose interceptor counts the ops
it receives, unary and framed, and a scheduler that names that KVS to its
clients) and against `cbgrpc serve`'s code (start_local): put, get and delete
go as frames of one stream at the KVS and at serve's own address; at the
scheduler's proxy (which serves no stream) and with ``CLOUDBURST_KVS_STREAM=0``
they are unary calls; every error is the one the unary call gives, a value
over the KVS's message limit goes in chunks though under the 64 KiB a frame
takes (at `cbgrpc serve` with a small limit too), and a deadline shorter than a
held write ends it. Without Node the tests skip, except under CI, where they
fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from cloudburst.v1 import kvs_service_pb2, kvs_service_pb2_grpc, lattice_pb2, value_pb2
from cloudburst_grpc.kvs_proxy import KvsProxyServicer
from cloudburst_grpc.local import Node, start_local
from cloudburst_grpc.security.authz import AuthInterceptor
from cloudburst_kvs.servicer import KvsServicer
from e2e.drivers import Launcher
from harness import LoopThread, make_config
from kvs_interceptors import KVS, LIMIT, UNARY, Gate, KvsServer

WAIT = 60.0


def counted(key: str) -> bool:
    """Whether an op's key is the test's (the runtime's own keys are not counted)."""
    return key.startswith("ts/") or key == ""


class OpCounter(grpc.aio.ServerInterceptor):
    """Records the test's KVS ops a server receives: unary calls, and each stream's frames."""

    def __init__(self) -> None:
        self.unary: list[tuple[str, str]] = []
        self.streams: list[list[tuple[str, str]]] = []
        self.opened = 0
        """StreamOps calls, refused ones too."""

    def framed(self) -> list[tuple[str, str]]:
        return [frame for stream in self.streams for frame in stream]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if method == KVS + "StreamOps":
            self.opened += 1
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if method in {KVS + name for name in UNARY}:
            behavior = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                if counted(request.key):
                    self.unary.append((method.removeprefix(KVS), request.key))
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if method != KVS + "StreamOps":
            return handler
        stream_behavior = handler.stream_stream

        async def frames(requests: Any) -> Any:
            seen: list[tuple[str, str]] = []
            async for message in requests:
                for frame in message.batch or (message,):
                    op = frame.WhichOneof("op")
                    key = getattr(frame, op).key if op else ""
                    if counted(key):
                        if not seen:
                            self.streams.append(seen)
                        seen.append((op or "", key))
                yield message

        if asyncio.iscoroutinefunction(stream_behavior):

            async def written(requests: Any, context: Any) -> Any:
                return await stream_behavior(frames(requests), context)

            wrapped: Any = written
        else:

            async def answered(requests: Any, context: Any) -> Any:
                async for answer in stream_behavior(frames(requests), context):
                    yield answer

            wrapped = answered
        return grpc.stream_stream_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class CountedKvs(KvsServer):
    """The test KVS: its test ops counted (``counter``), behind a gate that may refuse callers."""

    def __init__(self, loop: LoopThread) -> None:
        self.counter = OpCounter()
        self.gate = Gate()
        super().__init__(loop, self.counter, AuthInterceptor(self.gate), held_key="ts/held")


@pytest.fixture
def proxy_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The test's ops the scheduler's KVS proxy receives (patched before any scheduler starts)."""
    calls: list[str] = []
    for name in UNARY:
        original = getattr(KvsProxyServicer, name)

        async def recorded(
            self: Any, request: Any, context: Any, _n: str = name, _f: Any = original
        ) -> Any:
            if counted(request.key):
                calls.append(_n)
            return await _f(self, request, context)

        monkeypatch.setattr(KvsProxyServicer, name, recorded)
    streams = KvsProxyServicer.StreamOps

    async def recorded_stream(self: Any, requests: Any, context: Any) -> AsyncIterator[Any]:
        calls.append("StreamOps")
        async for answer in streams(self, requests, context):
            yield answer

    monkeypatch.setattr(KvsProxyServicer, "StreamOps", recorded_stream)
    return calls


@pytest.fixture
def cluster(
    start_kvs_server: Callable[[CountedKvs], CountedKvs],
    naming_scheduler: Callable[..., Node],
    server_loop: LoopThread,
    proxy_calls: list[str],
) -> tuple[Node, CountedKvs]:
    """A scheduler that names a counted KVS to its clients (its proxy serves another KVS)."""
    kvs = start_kvs_server(CountedKvs(server_loop))
    return naming_scheduler(kvs.address), kvs


def test_put_get_and_delete_go_on_one_stream_to_the_kvs(
    cluster: tuple[Node, CountedKvs], launch_ts: Launcher
) -> None:
    scheduler, kvs = cluster
    driver = launch_ts(scheduler.address)
    driver.ok(op="put", key="ts/a", value={"n": [1, 2]})
    assert driver.ok(op="kvs_address")["address"] == kvs.address
    assert driver.ok(op="get", key="ts/a")["value"] == {"n": [1, 2]}
    assert driver.ok(op="delete", key="ts/a")["existed"] is True
    assert driver.ok(op="delete", key="ts/a")["existed"] is False
    assert driver.ok(op="get", key="ts/a") == {"ok": True, "found": False}
    assert driver.close() == 0
    assert kvs.counter.unary == []
    assert kvs.counter.streams == [
        [("put", "ts/a"), ("get", "ts/a"), ("delete", "ts/a"), ("delete", "ts/a"), ("get", "ts/a")]
    ]


def test_the_proxy_and_the_switch_get_unary_calls(
    cluster: tuple[Node, CountedKvs], proxy_calls: list[str], launch_ts: Launcher
) -> None:
    scheduler, kvs = cluster
    switched = launch_ts(scheduler.address, env={"CLOUDBURST_KVS_STREAM": "0"})
    proxied = launch_ts(scheduler.address, "off")
    for driver in (switched, proxied):
        driver.ok(op="put", key="ts/k", value=1)
        assert driver.ok(op="get", key="ts/k")["value"] == 1
        assert driver.ok(op="delete", key="ts/k")["existed"] is True
        assert driver.close() == 0
    # The proxy (serves_op_streams cleared) was asked no stream, and forwarded each op.
    assert proxy_calls == ["PutValue", "GetValue", "DeleteValue"]
    # The switched-off client went to the KVS directly, in unary calls.
    assert kvs.counter.unary == [
        ("PutValue", "ts/k"),
        ("GetValue", "ts/k"),
        ("DeleteValue", "ts/k"),
    ]
    assert kvs.counter.streams == []


def _set_lattice(address: str, key: str) -> None:
    """Store a set lattice at ``key``: a last-writer-wins write there is a type mismatch."""
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=b"a")
    lattice = lattice_pb2.Lattice(set=lattice_pb2.SetLattice(values=[value]))
    with grpc.insecure_channel(address) as channel:
        kvs_service_pb2_grpc.KvsServiceStub(channel).PutValue(
            kvs_service_pb2.PutValueRequest(key=key, lattice=lattice), timeout=WAIT
        )


#: Each error, as a driver command, and the gRPC code and reason it fails with.
ERRORS: dict[str, tuple[dict[str, Any], str, str]] = {
    "empty key on get": ({"op": "get", "key": ""}, "InvalidArgument", "INVALID_ARGUMENT"),
    "empty key on put": (
        {"op": "put", "key": "", "value": 1},
        "InvalidArgument",
        "INVALID_ARGUMENT",
    ),
    "empty key on delete": ({"op": "delete", "key": ""}, "InvalidArgument", "INVALID_ARGUMENT"),
    "lattice type mismatch": (
        {"op": "put", "key": "ts/typed", "value": 1},
        "FailedPrecondition",
        "LATTICE_TYPE_MISMATCH",
    ),
}


def test_each_error_is_the_one_the_unary_call_gives(
    cluster: tuple[Node, CountedKvs], launch_ts: Launcher
) -> None:
    scheduler, kvs = cluster
    _set_lattice(kvs.address, "ts/typed")
    answers: dict[str, list[dict[str, Any]]] = {}
    for env in ({}, {"CLOUDBURST_KVS_STREAM": "0"}):
        driver = launch_ts(scheduler.address, env=env)
        assert driver.ok(op="kvs_address")["address"] == ""  # resolved with the first op
        driver.ok(op="get", key="ts/first")
        assert driver.ok(op="kvs_address")["address"] == kvs.address
        for case, (command, _code, _reason) in ERRORS.items():
            answers.setdefault(case, []).append(driver.ask(**command))
        assert driver.close() == 0
    for case, (_command, code, reason) in ERRORS.items():
        streamed, unary = answers[case]
        assert streamed == unary, case
        assert not streamed["ok"] and streamed["code"] == code, (case, streamed)
        if reason:
            assert streamed["reason"] == reason, (case, streamed)
    # The stream carried every op of the first client, the second sent unary calls.
    assert len(kvs.counter.streams) == 1
    ops = [("get", "ts/first"), ("get", ""), ("put", ""), ("delete", "")]
    assert kvs.counter.framed() == [*ops, ("put", "ts/typed")]
    names = {"get": "GetValue", "put": "PutValue", "delete": "DeleteValue"}
    assert kvs.counter.unary == [
        ("PutValue", "ts/typed"),  # the set stored first
        *[(names[op], key) for op, key in [*ops, ("put", "ts/typed")]],
    ]


def test_a_value_under_64_kib_over_the_kvs_message_limit_goes_in_chunks(
    cluster: tuple[Node, CountedKvs], launch_ts: Launcher
) -> None:
    """A value that would go as a frame, were it not over the KVS's own message limit (LIMIT)."""
    scheduler, kvs = cluster
    size = 60 << 10
    assert LIMIT < size < 64 << 10
    for mode, env in (("streamed", {}), ("switched-off", {"CLOUDBURST_KVS_STREAM": "0"})):
        driver = launch_ts(scheduler.address, env=env)
        key = f"ts/chunked/{mode}"
        sent = driver.ok(op="put_bytes", key=key, size=size)
        assert driver.ok(op="kvs_address")["address"] == kvs.address
        read = driver.ok(op="get_bytes", key=key)
        assert (read["size"], read["sha256"]) == (size, sent["sha256"])
        driver.ok(op="put", key=f"ts/small/{mode}", value="x" * (LIMIT // 2))
        assert driver.close() == 0
    # Neither client sent the value in one message; the small one still did, as each sends ops.
    assert kvs.counter.framed() == [
        ("get", "ts/chunked/streamed"),
        ("put", "ts/small/streamed"),
    ]
    assert kvs.counter.unary == [
        ("GetValue", "ts/chunked/switched-off"),
        ("PutValue", "ts/small/switched-off"),
    ]


@pytest.mark.parametrize("mode", ["default", "off"])
def test_cbgrpc_serve_with_a_small_message_limit_takes_a_60_kib_value_in_chunks(
    start_node: Callable[..., Node], launch_ts: Launcher, mode: str
) -> None:
    """Sized by serve's GetLimits answer: asked first with direct access on, by the put without."""
    node = start_node(start_local(make_config(server={"max_payload_bytes": LIMIT})))
    driver = launch_ts(node.address, mode)
    size = 60 << 10
    sent = driver.ok(op="put_bytes", key="ts/serve/chunked", size=size)
    read = driver.ok(op="get_bytes", key="ts/serve/chunked")
    assert (read["size"], read["sha256"]) == (size, sent["sha256"])
    assert driver.close() == 0


def test_a_refused_stream_sends_its_op_as_a_unary_call(
    cluster: tuple[Node, CountedKvs], launch_ts: Launcher
) -> None:
    """A KVS that refuses the caller when the stream opens: the unary call tells why."""
    scheduler, kvs = cluster
    answers = []
    for env in ({}, {"CLOUDBURST_KVS_STREAM": "0"}):
        driver = launch_ts(scheduler.address, env=env)
        # A value over 64 KiB and over the KVS's own message limit goes in chunks, so the
        # client is at the KVS before any stream of ops opens.
        driver.ok(op="put", key="ts/huge", value="x" * (65 << 10))
        assert driver.ok(op="kvs_address")["address"] == kvs.address
        kvs.gate.refusing = True
        answers.append(driver.ask(op="get", key="ts/refused"))
        kvs.gate.refusing = False
        assert driver.close() == 0
    assert answers[0] == answers[1]
    assert not answers[0]["ok"] and answers[0]["code"] == "Unauthenticated", answers[0]
    assert "revoked" in answers[0]["message"]
    assert kvs.counter.opened == 1  # the first client's stream, refused
    assert kvs.counter.streams == []
    # Each client's read was a unary call: the refused stream's op, sent again, and the
    # switched-off client's.
    assert [call for call in kvs.counter.unary if call[1] == "ts/refused"] == [
        ("GetValue", "ts/refused"),
        ("GetValue", "ts/refused"),
    ]


def test_a_deadline_shorter_than_a_held_write_ends_it(
    cluster: tuple[Node, CountedKvs], launch_ts: Launcher
) -> None:
    scheduler, kvs = cluster
    driver = launch_ts(scheduler.address)
    driver.ok(op="put", key="ts/first", value=1)
    started = time.monotonic()
    driver.send(op="put", key="ts/held", value=1, timeout=0.5)  # the op's deadline
    answer = driver.receive(WAIT)
    assert time.monotonic() - started < 10.0
    assert not answer["ok"] and answer["code"] == "DeadlineExceeded", answer
    assert driver.ok(op="get", key="ts/first")["value"] == 1  # the stream goes on
    assert driver.close() == 0
    assert kvs.counter.unary == []
    assert kvs.counter.streams == [[("put", "ts/first"), ("put", "ts/held"), ("get", "ts/first")]]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "switched-off"])
def test_cbgrpc_serve_takes_ops_on_a_stream_at_its_own_address(
    start_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
    launch_ts: Launcher,
    streamed: bool,
) -> None:
    """`cbgrpc serve` names no KVS address, but says it serves StreamOps (serves_op_streams)."""
    unary: list[str] = []
    for name in UNARY:  # before the server starts: it serves the methods it finds then
        original = getattr(KvsServicer, name)

        async def recorded(
            self: KvsServicer, request: Any, context: Any, _n: str = name, _f: Any = original
        ) -> Any:
            if counted(request.key):
                unary.append(_n)
            return await _f(self, request, context)

        monkeypatch.setattr(KvsServicer, name, recorded)
    node = start_node(start_local(make_config()))
    driver = launch_ts(node.address, env={} if streamed else {"CLOUDBURST_KVS_STREAM": "0"})
    driver.ok(op="put", key="ts/serve", value="v")
    assert driver.ok(op="get", key="ts/serve")["value"] == "v"
    assert driver.ok(op="delete", key="ts/serve")["existed"] is True
    assert driver.ok(op="kvs_address")["address"] == ""
    assert driver.close() == 0
    assert unary == ([] if streamed else ["PutValue", "GetValue", "DeleteValue"])
