"""Processes and clients of another release are refused with one clear error, early.

The servers here run on 127.0.0.1 port 0. A server of "another release" is
one made with another ``protocol_version``; a client of another release is a
channel whose user agent names another version, or the SDK with
``CLOUDBURST_PROTOCOL_VERSION`` set (the documented hook), read when it connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cloudburst import CloudburstConnection
from cloudburst.errors import DOMAIN, NoExecutorError, ProtocolMismatchError, UnavailableError
from cloudburst.protocol import PROTOCOL_ENV, protocol_version, user_agent
from cloudburst.transport import channel_options
from cloudburst.v1 import (
    executor_service_pb2,
    executor_service_pb2_grpc,
    kvs_service_pb2,
    kvs_service_pb2_grpc,
    messaging_service_pb2,
    messaging_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudburst_grpc.config import KvsConfig
from cloudburst_grpc.executor_client import (
    NotDeliveredError,
    PeerDirectory,
    RemoteExecutorPeer,
)
from cloudburst_grpc.local import Node
from cloudburst_grpc.messaging.service import MessagingPeer
from cloudburst_grpc.scheduler import policy
from cloudburst_grpc.scheduler.pool import ExecutorPool
from cloudburst_grpc.server import bind, create_server
from cloudburst_kvs.access import EndpointKvs, KvsEndpoint
from cloudburst_kvs.local import add_kvs_to_server, open_backend
from harness import make_config

LIMIT = 1024 * 1024
#: The version of this process, and one another release would speak.
OURS = protocol_version()
OTHER = OURS + 1


def _channel(address: str, agent: str | None) -> grpc.Channel:
    options: list[tuple[str, object]] = [*channel_options(LIMIT)]
    if agent is not None:
        options.append(("grpc.primary_user_agent", agent))
    return grpc.insecure_channel(address, options=options)


def _assert_refused(error: grpc.RpcError, role: str) -> None:
    """``error`` is the refusal of a ``role`` of this release to a caller of OTHER."""
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = error.details() or ""
    assert f"this {role} speaks cloudburst-grpc wire protocol {OURS}" in message
    assert f"speaks {OTHER}; run one release across the deployment" in message
    assert "docs/operations.md#upgrades" in message
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.domain, info.reason) == (DOMAIN, "PROTOCOL_MISMATCH")
    assert dict(info.metadata) == {
        "server_protocol": str(OURS),
        "client_protocol": str(OTHER),
        "server_role": role,
    }


def _calls(channel: grpc.Channel) -> Iterator[tuple[str, grpc.RpcError]]:
    """Open one call of each shape on ``channel``; yield what each fails with."""
    scheduler = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
    kvs = kvs_service_pb2_grpc.KvsServiceStub(channel)
    attempts: dict[str, Callable[[], object]] = {
        "unary": lambda: scheduler.ListFunctions(
            scheduler_service_pb2.ListFunctionsRequest(), timeout=30
        ),
        "server streaming": lambda: list(
            kvs.WatchValues(kvs_service_pb2.WatchValuesRequest(keys=["k"]), timeout=30)
        ),
        "client streaming": lambda: kvs.PutValueChunks(
            iter([kvs_service_pb2.PutValueChunksRequest()]), timeout=30
        ),
        "bidirectional": lambda: list(
            scheduler.StreamCalls(iter([scheduler_service_pb2.StreamCallsRequest()]), timeout=30)
        ),
    }
    for shape, attempt in attempts.items():
        with pytest.raises(grpc.RpcError) as caught:
            attempt()
        yield shape, caught.value


def test_a_caller_of_another_release_is_refused_on_every_kind_of_call(local_node: Node) -> None:
    with _channel(local_node.address, f"{user_agent(OTHER)} grpc-python/1") as channel:
        shapes = []
        for shape, error in _calls(channel):
            _assert_refused(error, "cbgrpc serve")
            shapes.append(shape)
    assert len(shapes) == 4


@pytest.mark.parametrize("agent", [None, "grpcurl/v1.9.1 grpc-go/1.61.0", user_agent(OURS)])
def test_a_caller_without_a_version_or_of_this_release_is_served(
    local_node: Node, agent: str | None
) -> None:
    with _channel(local_node.address, agent) as channel:
        scheduler = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)
        scheduler.ListFunctions(scheduler_service_pb2.ListFunctionsRequest(), timeout=30)
        # A stream too: a frame with only releases is not answered; closing ends it with OK.
        frames = iter([scheduler_service_pb2.StreamCallsRequest(release_keys=["none"])])
        assert list(scheduler.StreamCalls(frames, timeout=30)) == []


def test_the_refusing_server_logs_once_per_peer(
    local_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cloudburst_grpc.interceptors"):
        with _channel(local_node.address, user_agent(OTHER)) as channel:
            for _ in _calls(channel):
                pass
    refusals = [r.getMessage() for r in caplog.records if r.name == "cloudburst_grpc.interceptors"]
    assert len(refusals) == 1, refusals
    assert f"wire protocol {OURS}, the caller at ipv4:127.0.0.1:" in refusals[0]
    assert f"speaks {OTHER}; run one release" in refusals[0]


def test_the_sdk_of_another_release_fails_on_connect(
    local_node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROTOCOL_ENV, str(OTHER))
    # Without the check, this would end in a confusing error at the first call, not here.
    with pytest.raises(ProtocolMismatchError) as caught:
        CloudburstConnection(local_node.address, connect_timeout=60)
    message = str(caught.value)
    assert message.startswith(
        f"the cloudburst scheduler at {local_node.address} speaks cloudburst-grpc wire "
        f"protocol {OURS}, this SDK speaks {OTHER}: use the SDK of the cluster's release"
    )
    assert "docs/operations.md#upgrades" in message
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    monkeypatch.delenv(PROTOCOL_ENV)
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.list() == []


@dataclass
class OtherRelease:
    """Services of another release on one server: a real KVS, and the executor's and
    messaging services as stubs (a refusal comes before any servicer runs)."""

    address: str


@pytest.fixture
async def other_release() -> AsyncIterator[OtherRelease]:
    async with contextlib.AsyncExitStack() as stack:
        config = KvsConfig(engine="memory")
        store = open_backend(config, LIMIT)
        await store.start()
        stack.push_async_callback(store.close)
        server, _health = create_server(LIMIT, role="executor", protocol_version=OTHER)
        add_kvs_to_server(server, store, config, LIMIT)
        executor_service_pb2_grpc.add_ExecutorServiceServicer_to_server(
            executor_service_pb2_grpc.ExecutorServiceServicer(),  # type: ignore[abstract]
            server,
        )
        messaging_service_pb2_grpc.add_MessagingServiceServicer_to_server(
            messaging_service_pb2_grpc.MessagingServiceServicer(),  # type: ignore[abstract]
            server,
        )
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        stack.push_async_callback(server.stop, None)
        yield OtherRelease(f"127.0.0.1:{port}")


def _refusals(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


#: What gRPC's asyncio client reports for a stream that ended while a frame was being written
#: to it, the peer's own status lost (see cloudburst/streams.py).
_LOST = ("Internal error from Core", grpc.StatusCode.INTERNAL)


def _lost_status() -> grpc.aio.AioRpcError:
    details, code = _LOST
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def test_a_silent_stream_whose_status_was_lost_is_explained_by_a_unary_call(
    other_release: OtherRelease,
) -> None:
    # gRPC loses the refusal of a stream that ends while a frame is being written to it; the
    # peer asks the executor with a unary call, whose refusal it does get, before failing
    # what waited on the stream.
    peer = RemoteExecutorPeer("old", other_release.address, "scheduler-test", LIMIT)
    try:
        answer = asyncio.get_running_loop().create_future()
        peer._answers[1] = answer
        peer._ended(_lost_status())
        with pytest.raises(NotDeliveredError, match=f"wire protocol {OTHER}"):
            await asyncio.wait_for(answer, 30)
    finally:
        await peer.close()


async def test_a_silent_stream_to_a_gone_executor_whose_status_was_lost_is_unavailable() -> None:
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        peer = RemoteExecutorPeer("gone", address, "scheduler-test", LIMIT)
        try:
            answer = asyncio.get_running_loop().create_future()
            peer._answers[1] = answer
            peer._ended(_lost_status())
            with pytest.raises(UnavailableError) as caught:
                await asyncio.wait_for(answer, 30)
            assert not isinstance(caught.value, NotDeliveredError)  # it may have run there
        finally:
            await peer.close()


async def test_the_scheduler_keeps_an_executor_of_another_release_out_of_placement(
    other_release: OtherRelease, caplog: pytest.LogCaptureFixture
) -> None:
    broken: list[str] = []
    peers = PeerDirectory(
        lambda executor_id, address: RemoteExecutorPeer(
            executor_id,
            address,
            "scheduler-test",
            LIMIT,
            lambda _, reason: broken.append(reason),
        )
    )
    pool = ExecutorPool(peers)
    try:
        pool.add("old", other_release.address)
        with caplog.at_level(logging.WARNING):
            await pool.check_health(timeout=30)
        assert pool.is_down("old")
        down = _refusals(caplog, "cloudburst_grpc.scheduler.pool")
        assert len(down) == 1
        assert "executor old is down (it speaks cloudburst-grpc wire protocol" in down[0]
        assert f"protocol {OTHER}, this scheduler speaks {OURS}" in down[0]
        with pytest.raises(NoExecutorError):
            policy.place("f", [], pool.views())

        # A call sent there before the health check knew is refused when its stream opens:
        # it never ran, so the scheduler may place it elsewhere.
        request = executor_service_pb2.ExecuteFunctionRequest(function_name="f")
        for _ in range(2):
            with pytest.raises(NotDeliveredError) as caught:
                with caplog.at_level(logging.ERROR):
                    await pool.peer("old").execute(request, timeout=30)
            assert f"speaks cloudburst-grpc wire protocol {OTHER}" in str(caught.value)
        assert broken and all(f"wire protocol {OTHER}" in reason for reason in broken)
        # The refused side says so once, naming the executor.
        logged = _refusals(caplog, "cloudburst_grpc.executor_client")
        assert logged == [
            f"executor old at {other_release.address} speaks cloudburst-grpc wire protocol "
            f"{OTHER} and refused this process, which speaks {OURS}; run one release across "
            "the deployment (see docs/operations.md#upgrades)"
        ]
    finally:
        await peers.close()


async def test_a_kvs_client_of_another_release_is_refused(
    other_release: OtherRelease, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = KvsEndpoint(make_config(), other_release.address, None)
    kvs = EndpointKvs(endpoint)
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(2):
                with pytest.raises(ProtocolMismatchError) as caught:
                    await kvs.get("k")
                assert f"this executor speaks cloudburst-grpc wire protocol {OTHER}" in str(
                    caught.value
                )
            with pytest.raises(ProtocolMismatchError):
                async for _ in kvs.watch_keys("k"):
                    break
        assert _refusals(caplog, "cloudburst_kvs.access") == [
            f"the KVS at {other_release.address} speaks cloudburst-grpc wire protocol {OTHER} "
            f"and refused this process, which speaks {OURS}; run one release across the "
            "deployment (see docs/operations.md#upgrades)"
        ]
    finally:
        await endpoint.close()


async def test_a_message_to_a_process_of_another_release_fails_at_once(
    other_release: OtherRelease,
) -> None:
    peer = MessagingPeer(other_release.address, "executor-test", LIMIT)
    try:
        envelope = messaging_service_pb2.MessageEnvelope(recipient_id="mailbox")
        with pytest.raises(ProtocolMismatchError) as caught:
            await peer.send(envelope, timeout=30)
        assert f"speaks cloudburst-grpc wire protocol {OTHER}" in str(caught.value)
    finally:
        await peer.close()
