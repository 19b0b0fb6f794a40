"""Function-to-function messaging: get_id, send, recv."""

from __future__ import annotations

from typing import Any

import pytest

from cloudburst import CloudburstConnection
from cloudburst.errors import QueueFullError, RemoteFunctionError
from cloudburst_grpc.local import Node, start_local
from harness import Cluster, ProcessCluster, make_config

ROUNDS = 50


def ping(cloudburst: Any, rounds: int) -> dict[str, Any]:
    me = cloudburst.get_id()
    cloudburst.put_object("ping-id", me)
    peer = cloudburst.get_object("pong-id", timeout=20)
    log: list[Any] = []
    for i in range(rounds):
        cloudburst.send(peer, ("ping", i))
        replies = cloudburst.recv(timeout=20)
        assert [sender for sender, _ in replies] == [peer], replies
        log.extend(message for _, message in replies)
    return {"me": me, "peer": peer, "log": log}


def pong(cloudburst: Any, rounds: int) -> int:
    cloudburst.put_object("pong-id", cloudburst.get_id())
    answered = 0
    while answered < rounds:
        messages = cloudburst.recv(timeout=20)
        if not messages:
            raise TimeoutError(f"no ping after {answered} rounds")
        for sender, (kind, i) in messages:
            assert kind == "ping"
            cloudburst.send(sender, ("pong", i))
            answered += 1
    return answered


def report(cloudburst: Any, exchange: dict[str, Any], answered: int) -> dict[str, Any]:
    return {**exchange, "answered": answered}


def play_ping_pong(address: str) -> dict[str, Any]:
    with CloudburstConnection(address) as cloud:
        cloud.register(ping, "ping")
        cloud.register(pong, "pong")
        cloud.register(report, "report")
        assert cloud.register_dag(
            "ping_pong", ["ping", "pong", "report"], [("ping", "report"), ("pong", "report")]
        ), cloud.last_error
        result: dict[str, Any] = cloud.call_dag(
            "ping_pong", {"ping": ROUNDS, "pong": ROUNDS}, direct_response=True, timeout=60
        )
    assert result["log"] == [("pong", i) for i in range(ROUNDS)]
    assert result["answered"] == ROUNDS
    return result


def address_of(mailbox_id: str) -> str:
    return mailbox_id.rpartition("@")[2]


def test_ping_pong_in_local_mode(local_node: Node) -> None:
    result = play_ping_pong(local_node.address)
    assert address_of(result["me"]) == address_of(result["peer"]) == local_node.address


def test_ping_pong_across_servers(cluster: Cluster) -> None:
    play_ping_pong(cluster.address)


def test_ping_pong_across_executor_processes(process_cluster: ProcessCluster) -> None:
    result = play_ping_pong(process_cluster.address)
    executors = {e.address for e in process_cluster.executors}
    # Each mailbox id names the process hosting it: the two ran in different processes.
    assert {address_of(result["me"]), address_of(result["peer"])} == executors


def flood(cloudburst: Any, count: int) -> str:
    peer = cloudburst.get_object("sink-id", timeout=20)
    for i in range(count):
        cloudburst.send(peer, i)
    return "sent"


def collect(cloudburst: Any, count: int) -> list[int]:
    cloudburst.put_object("sink-id", cloudburst.get_id())
    received: list[int] = []
    while len(received) < count:
        messages = cloudburst.recv(timeout=20)
        if not messages:
            raise TimeoutError(f"only {len(received)} of {count} arrived")
        received.extend(message for _, message in messages)
    return received


def gather(cloudburst: Any, sent: str, received: list[int]) -> list[int]:
    return received


@pytest.mark.parametrize("where", ["local", "cluster"])
def test_thousands_of_messages_arrive_in_order_once(
    local_node: Node, cluster: Cluster, where: str
) -> None:
    address = local_node.address if where == "local" else cluster.address
    count = 3000
    with CloudburstConnection(address) as cloud:
        cloud.register(flood, "flood")
        cloud.register(collect, "collect")
        cloud.register(gather, "gather")
        assert cloud.register_dag(
            "flood_dag",
            ["flood", "collect", "gather"],
            [("flood", "gather"), ("collect", "gather")],
        )
        received = cloud.call_dag(
            "flood_dag", {"flood": count, "collect": count}, direct_response=True, timeout=120
        )
    assert received == list(range(count))


def send_to(cloudburst: Any, dest: str) -> bool:
    delivered: bool = cloudburst.send(dest, "hello")
    return delivered


def test_sending_to_an_unknown_id_raises_in_the_sender(local_node: Node) -> None:
    unknown = f"0123456789abcdef-1@{local_node.address}"
    with CloudburstConnection(local_node.address) as cloud:
        handle = cloud.register(send_to, "send_to")
        with pytest.raises(RemoteFunctionError) as info:
            handle(unknown).get(timeout=30)
    assert info.value.remote_type == "cloudburst.errors.MailboxNotFoundError"
    assert unknown in info.value.remote_message


def my_id(cloudburst: Any) -> str:
    return str(cloudburst.get_id())


def test_sending_to_a_malformed_id_raises_in_the_sender(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        handle = cloud.register(send_to, "send_to")
        with pytest.raises(RemoteFunctionError) as info:
            handle("no-address-here").get(timeout=30)
    assert info.value.remote_type == "cloudburst.errors.MailboxNotFoundError"
    assert "not a mailbox id" in info.value.remote_message


def test_a_message_to_a_finished_function_is_dropped(local_node: Node) -> None:
    router = local_node.router
    assert router is not None
    with CloudburstConnection(local_node.address) as cloud:
        finished = cloud.register(my_id, "my_id")().get(timeout=30)
        before = router.dropped
        assert cloud.register(send_to, "send_to")(finished).get(timeout=30) is False
    assert router.dropped == before + 1


def outrun(cloudburst: Any, count: int) -> str:
    peer = cloudburst.get_object("slow-id", timeout=20)
    try:
        for i in range(count):
            cloudburst.send(peer, i)
    except Exception as exc:  # the test wants to see which error, by name
        return type(exc).__name__ + ": " + str(exc)
    finally:
        cloudburst.put_object("outrun-done", True)
    return "all sent"


def slow_reader(cloudburst: Any, count: int) -> int:
    cloudburst.put_object("slow-id", cloudburst.get_id())
    cloudburst.get_object("outrun-done", timeout=30)  # read nothing until the sender gave up
    return len(cloudburst.recv())


def both(cloudburst: Any, outcome: str, unread: int) -> tuple[str, int]:
    return outcome, unread


def test_a_sender_that_outruns_its_receiver_gets_a_clear_error(start_node: Any) -> None:
    config = make_config(executor={"mailbox_capacity": 8, "send_timeout_seconds": 0.2})
    node = start_node(start_local(config))
    with CloudburstConnection(node.address) as cloud:
        cloud.register(outrun, "outrun")
        cloud.register(slow_reader, "slow_reader")
        cloud.register(both, "both")
        assert cloud.register_dag(
            "outrun_dag",
            ["outrun", "slow_reader", "both"],
            [("outrun", "both"), ("slow_reader", "both")],
        )
        outcome, unread = cloud.call_dag(
            "outrun_dag", {"outrun": 100, "slow_reader": 100}, direct_response=True, timeout=60
        )
    assert outcome.startswith(QueueFullError.__name__) and "is full (8 unread" in outcome
    assert unread == 8  # the mailbox never held more than its capacity


def leave_unread(cloudburst: Any) -> str:
    me = str(cloudburst.get_id())
    cloudburst.send(me, "never read")
    return me


def test_unread_messages_are_discarded_when_the_invocation_ends(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        handle = cloud.register(leave_unread, "leave_unread")
        first = handle().get(timeout=30)
        second = handle().get(timeout=30)
        assert first != second
        assert cloud.register(send_to, "send_to")(first).get(timeout=30) is False
    routers = {id(e._router) for e in local_node.executors}
    assert len(routers) == 1
    assert len(local_node.executors[0]._router or []) == 0  # no mailbox outlived its call


def recv_nothing(cloudburst: Any) -> list[Any]:
    return list(cloudburst.recv())


def test_recv_without_timeout_never_waits(local_node: Node) -> None:
    with CloudburstConnection(local_node.address) as cloud:
        assert cloud.register(recv_nothing, "recv_nothing")().get(timeout=30) == []
