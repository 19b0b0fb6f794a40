"""What executors report of their caches reaches placement (ExecutorPool.note_cached)."""

from __future__ import annotations

import random

from cloudburst_grpc.executor_client import ExecutorPeer, PeerDirectory
from cloudburst_grpc.scheduler import policy
from cloudburst_grpc.scheduler.pool import ExecutorPool


def no_remote(executor_id: str, address: str) -> ExecutorPeer:
    raise AssertionError("no peer is opened here")


def cached(pool: ExecutorPool) -> dict[str, frozenset[str]]:
    return {view.executor_id: view.cached_keys for view in pool.views()}


def test_reports_replace_or_change_what_an_executor_caches() -> None:
    pool = ExecutorPool(PeerDirectory(no_remote))
    pool.add("a", "a:1")
    pool.add("b", "b:1")
    pool.note_cached("a", ["k1", "k2"], [], full=True)
    pool.note_cached("a", ["k3"], ["k1"], full=False)
    pool.note_cached("nobody", ["k9"], [], full=True)  # a stranger's report is ignored
    assert cached(pool) == {"a": frozenset({"k2", "k3"}), "b": frozenset()}
    pool.note_cached("a", ["k4"], [], full=True)  # after a reconnect: the whole set again
    assert cached(pool)["a"] == frozenset({"k4"})


def test_a_call_goes_where_its_referenced_keys_are_cached() -> None:
    pool = ExecutorPool(PeerDirectory(no_remote))
    for executor_id in ("a", "b", "c"):
        pool.add(executor_id, f"{executor_id}:1")
    pool.note_cached("b", ["array"], [], full=True)
    rng = random.Random(7)
    chosen = {policy.place("f", ["array"], pool.views(), rng).executor_id for _ in range(50)}
    assert chosen == {"b"}
    spread = {policy.place("f", [], pool.views(), rng).executor_id for _ in range(50)}
    assert spread == {"a", "b", "c"}, "without references the load spreads"
