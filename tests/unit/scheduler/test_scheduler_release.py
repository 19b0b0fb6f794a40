"""Batching of released results (cloudburst_grpc.scheduler.release), against a recording KVS."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from cloudburst.errors import UnavailableError
from cloudburst_grpc.scheduler.release import BATCH_LIMIT, ResultReleaser


class RecordingKvs:
    """Records delete_many batches; the first one waits until ``go`` is set."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.fail = fail
        self._changed = asyncio.Condition()

    async def delete_many(self, keys: Sequence[str], keyspace: int = 0) -> int:
        self.batches.append(list(keys))
        self.started.set()
        async with self._changed:
            self._changed.notify_all()
        await self.go.wait()
        if self.fail:
            raise UnavailableError("the KVS is down")
        return len(keys)

    async def wait_for(self, keys: set[str]) -> None:
        """Wait until batches have named every key of ``keys``."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: keys <= {key for batch in self.batches for key in batch}
            )


async def test_keys_released_within_the_linger_go_in_one_batch() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, linger=60.0)  # type: ignore[arg-type]
    for key in ("a", "b", "c"):
        releaser.release([key])
        await asyncio.sleep(0)  # let the batch start lingering
    assert kvs.batches == [], "a batch waits for others to join it"
    assert releaser.backlog == 3
    async with asyncio.timeout(5):  # close() cuts the 60 s linger short
        await releaser.close(timeout=5)
    assert kvs.batches == [["a", "b", "c"]]


async def test_a_linger_ends_by_itself() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, linger=0.01)  # type: ignore[arg-type]
    releaser.release(["a"])
    async with asyncio.timeout(5):
        await kvs.started.wait()
    assert kvs.batches == [["a"]]


async def test_keys_released_during_a_batch_form_the_next_batch() -> None:
    kvs = RecordingKvs()
    releaser = ResultReleaser(kvs, linger=0)  # type: ignore[arg-type]
    releaser.release(["a", "b"])
    async with asyncio.timeout(5):
        await kvs.started.wait()
    releaser.release(["c"])
    releaser.release(["d"])
    assert releaser.backlog == 4
    kvs.go.set()
    await releaser.close(timeout=5)
    assert kvs.batches == [["a", "b"], ["c", "d"]]
    assert releaser.backlog == 0


async def test_a_large_release_is_split_into_bounded_batches() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, linger=0)  # type: ignore[arg-type]
    releaser.release(f"k{i}" for i in range(BATCH_LIMIT * 2 + 5))
    await releaser.close(timeout=5)
    assert [len(b) for b in kvs.batches] == [BATCH_LIMIT, BATCH_LIMIT, 5]


async def test_a_failed_batch_is_logged_and_the_next_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kvs = RecordingKvs(fail=True)
    kvs.go.set()
    releaser = ResultReleaser(kvs, linger=0)  # type: ignore[arg-type]
    releaser.release(["a"])
    await releaser.close(timeout=5)
    releaser.release(["b"])
    await releaser.close(timeout=5)
    assert kvs.batches == [["a"], ["b"]]
    assert "cannot delete 1 released results (they stay stored)" in caplog.text


async def test_close_gives_up_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    kvs = RecordingKvs()
    releaser = ResultReleaser(kvs, linger=0)  # type: ignore[arg-type]
    releaser.release(["a"])
    releaser.release(["b"])
    await releaser.close(timeout=0.05)
    assert "2 released results not deleted at shutdown" in caplog.text


async def test_a_tracked_result_expires_after_hold_and_ttl() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, ttl=0.02, hold=0.01, linger=0)  # type: ignore[arg-type]
    releaser.expire_later("a")
    releaser.expire_later("b")
    assert releaser.expiring == 2
    async with asyncio.timeout(5):  # due a moment apart, they may expire in two batches
        await kvs.wait_for({"a", "b"})
    await releaser.close(timeout=5)
    assert sorted(key for batch in kvs.batches for key in batch) == ["a", "b"]
    assert releaser.expiring == 0


async def test_a_released_result_does_not_expire_again() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, ttl=0.02, linger=0)  # type: ignore[arg-type]
    releaser.expire_later("a")
    releaser.release(["a"])
    assert releaser.expiring == 0
    releaser.expire_later("b")
    async with asyncio.timeout(5):
        while ["b"] not in kvs.batches:
            kvs.started.clear()
            await kvs.started.wait()
    await releaser.close(timeout=5)
    assert kvs.batches == [["a"], ["b"]]


async def test_a_zero_ttl_keeps_results() -> None:
    kvs = RecordingKvs()
    releaser = ResultReleaser(kvs, ttl=0.0)  # type: ignore[arg-type]
    releaser.expire_later("a")
    assert releaser.expiring == 0
    await releaser.close(timeout=5)
    assert kvs.batches == []


async def test_a_release_waits_for_the_results_store() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, linger=0)  # type: ignore[arg-type]
    stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    releaser.storing("result", stored)
    releaser.release(["result", "other"])
    await releaser.close(timeout=5)
    assert kvs.batches == [["other"]], "a result still being stored is not deleted yet"
    stored.set_result(None)
    await asyncio.sleep(0)  # the store's callback releases the key
    await releaser.close(timeout=5)
    assert kvs.batches == [["other"], ["result"]]


class RecordingHolder:
    """Records the EndHold requests a releaser makes of an executor."""

    def __init__(self) -> None:
        self.drops: list[list[str]] = []
        self.stores: list[list[str]] = []

    def end_hold(self, drop: Sequence[str] = (), store: Sequence[str] = ()) -> None:
        if drop:
            self.drops.append(list(drop))
        if store:
            self.stores.append(list(store))


async def test_a_release_of_a_held_store_drops_it_and_deletes_nothing() -> None:
    kvs = RecordingKvs()
    kvs.go.set()
    releaser = ResultReleaser(kvs, linger=0)  # type: ignore[arg-type]
    holder = RecordingHolder()
    loop = asyncio.get_running_loop()
    stored = {key: loop.create_future() for key in ("a", "b")}
    for key, future in stored.items():
        releaser.storing(key, future)
        releaser.held_by(key, holder)
    releaser.release(["a", "b"])
    assert holder.drops == [["a", "b"]], "one request per executor"
    releaser.dropped("a")  # the executor dropped a's store; b's had started already
    for future in stored.values():
        future.set_result(None)
    await asyncio.sleep(0)  # the stores' callbacks release the keys
    await releaser.close(timeout=5)
    assert kvs.batches == [["b"]], "only the store that was made is deleted"


async def test_a_call_that_wants_a_held_store_has_it_start_once() -> None:
    releaser = ResultReleaser(RecordingKvs(), linger=0)  # type: ignore[arg-type]
    holder = RecordingHolder()
    releaser.storing("a", asyncio.get_running_loop().create_future())
    releaser.held_by("a", holder)
    releaser.held_by("not-being-stored", holder)  # no store: nothing to hold
    releaser.want(["a", "not-being-stored"])
    releaser.want(["a"])
    assert holder.stores == [["a"]]
    releaser.release(["a"])
    assert holder.drops == [], "a store asked for is not dropped"


async def test_held_stores_wanted_together_start_with_one_request_per_executor() -> None:
    releaser = ResultReleaser(RecordingKvs(), linger=0)  # type: ignore[arg-type]
    first, second = RecordingHolder(), RecordingHolder()
    loop = asyncio.get_running_loop()
    for key, holder in (("a", first), ("b", second), ("c", first)):
        releaser.storing(key, loop.create_future())
        releaser.held_by(key, holder)
    releaser.want(["a", "b", "c", "unknown"])
    assert first.stores == [["a", "c"]]
    assert second.stores == [["b"]]
