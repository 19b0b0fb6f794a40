"""Gossip averaging as the Cloudburst paper ran it: fire-and-forget sends, no final barrier.

Ten functions of a DAG send their estimate to random peers and average what
they receive. Nobody waits for the others to finish, so late sends reach
peers that have returned: those messages are dropped, ``send`` returns False
and the drop is counted, and every request completes. Run on `cbgrpc serve`
and on a cluster of separate processes, both with default settings.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from cloudburst import CloudburstConnection
from harness import CbgrpcProcess, ServeProcess, running_process_cluster

GOSSIPERS = 10
FANOUT = 3
REQUESTS = 5
DROPPED = "cloudburst_messaging_dropped_total"


def gossip(cloudburst: Any, run: str, index: int) -> dict[str, float]:
    cloudburst.put_object(f"{run}/id/{index}", cloudburst.get_id())
    peers = [
        cloudburst.get_object(f"{run}/id/{j}", timeout=60) for j in range(GOSSIPERS) if j != index
    ]
    rng = random.Random(f"{run}/{index}")
    value = float(index)
    sent = {True: 0, False: 0}
    for _ in range(1 + index):  # the first gossiper finishes first, the last one last
        for peer in rng.sample(peers, FANOUT):
            sent[cloudburst.send(peer, value)] += 1
        for _, theirs in cloudburst.recv(timeout=0.05):
            value = (value + theirs) / 2
    if index == GOSSIPERS - 1:
        # The last one goes on gossiping with the first until that one has returned.
        deadline = time.monotonic() + 60
        while cloudburst.send(peers[0], value):
            sent[True] += 1
            if time.monotonic() > deadline:
                raise TimeoutError("the first gossiper never finished")
            cloudburst.recv(timeout=0.01)
        sent[False] += 1
    return {"value": value, "delivered": sent[True], "dropped": sent[False]}


def tally(cloudburst: Any, *results: dict[str, float]) -> list[dict[str, float]]:
    return list(results)


def scrape_dropped(process: CbgrpcProcess) -> float:
    """The process's count of dropped messages, from its Prometheus endpoint."""
    url = process.wait_for_log("metrics on http://", stdout=True).rsplit(" ", 1)[1].strip()
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(DROPPED + "{") or line.startswith(DROPPED + " ")
    )


def gossip_rounds(address: str) -> list[list[dict[str, float]]]:
    """Register the gossip DAG and run it REQUESTS times; every request must complete."""
    names = [f"gossip{i}" for i in range(GOSSIPERS)]
    with CloudburstConnection(address) as cloud:
        for name in names:
            cloud.register(gossip, name)
        cloud.register(tally, "tally")
        assert cloud.register_dag(
            "gossip", [*names, "tally"], [(name, "tally") for name in names]
        ), cloud.last_error
        return [
            cloud.call_dag(
                "gossip",
                {name: [f"run{request}", i] for i, name in enumerate(names)},
                direct_response=True,
                timeout=120,
            )
            for request in range(REQUESTS)
        ]


def check(requests: list[list[dict[str, float]]], counted: float) -> None:
    assert len(requests) == REQUESTS
    for results in requests:
        assert len(results) == GOSSIPERS
        assert all(0 <= r["value"] <= GOSSIPERS - 1 for r in results)
        assert results[-1]["dropped"] >= 1  # the last gossiper's sends to the finished first one
    dropped = sum(r["dropped"] for results in requests for r in results)
    assert counted == dropped  # every send that returned False was counted, and only those


def test_gossip_with_sends_to_finished_peers_on_serve(
    serve_process: Callable[..., ServeProcess],
) -> None:
    server = serve_process("--storage", "memory", "--metrics-port", "0")
    before = scrape_dropped(server)
    requests = gossip_rounds(server.address)
    check(requests, scrape_dropped(server) - before)


def test_gossip_with_sends_to_finished_peers_on_a_process_cluster() -> None:
    with running_process_cluster("--metrics-port", "0") as cluster:
        before = sum(scrape_dropped(e) for e in cluster.executors)
        requests = gossip_rounds(cluster.address)
        check(requests, sum(scrape_dropped(e) for e in cluster.executors) - before)
