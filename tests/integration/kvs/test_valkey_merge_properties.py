"""Racing writers on a real Valkey Cluster converge on what the pure lattice code computes.

Writes are drawn with forced ties (few times, few writers, values that are
prefixes of each other) so that every tie-break of ``lattices.lww_order_key``
is exercised, and are sent concurrently through two stores (two KVS
processes), half of them staged as large values would be.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs import lattices
from cloudburst_kvs.valkey_store import ValkeyStore
from valkey_cluster import ValkeyCluster

USER = lattice_pb2.KEYSPACE_USER
SERIALIZERS = [value_pb2.SERIALIZER_BYTES, value_pb2.SERIALIZER_STRING]
DATA = [b"", b"a", b"ab", b"b", b"\x00", b"\x00\x00", b"\xff", b"a" * 300]


def make_lww(time_ns: int, writer: str, serializer: int, data: bytes) -> lattice_pb2.Lattice:
    lattice = lattice_pb2.Lattice()
    lattice.lww.timestamp.time_ns = time_ns
    lattice.lww.timestamp.writer_id = writer
    lattice.lww.value.serializer = serializer  # type: ignore[assignment]
    lattice.lww.value.data = data
    return lattice


lww_writes = st.lists(
    st.builds(
        make_lww,
        st.sampled_from([1, 2, 2**63 + 5]),
        st.sampled_from(["", "a", "b", "ab", "é"]),
        st.sampled_from(SERIALIZERS),
        st.sampled_from(DATA),
    ),
    min_size=1,
    max_size=12,
)

set_writes = st.lists(
    st.lists(st.sampled_from(DATA), max_size=4).map(
        lambda items: lattice_pb2.Lattice(
            set=lattice_pb2.SetLattice(
                values=[
                    value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=d) for d in items
                ]
            )
        )
    ),
    min_size=1,
    max_size=8,
)


@pytest.fixture(scope="module")
def stores(valkey_cluster: ValkeyCluster) -> Iterator[tuple[asyncio.Runner, list[ValkeyStore]]]:
    with asyncio.Runner() as runner:
        pair = [
            ValkeyStore(valkey_cluster.url, inline_limit=64 * 1024),
            ValkeyStore(valkey_cluster.url, inline_limit=0),  # every value staged
        ]
        for store in pair:
            runner.run(store.start())
        try:
            yield runner, pair
        finally:
            for store in pair:
                runner.run(store.close())


_counter = iter(range(10**9))


async def race(stores: list[ValkeyStore], key: str, writes: list[lattice_pb2.Lattice]) -> None:
    await asyncio.gather(*(stores[i % 2].put(USER, key, write) for i, write in enumerate(writes)))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=lww_writes)
def test_racing_lww_writers_converge_on_the_pure_merge(
    stores: tuple[asyncio.Runner, list[ValkeyStore]], writes: list[lattice_pb2.Lattice]
) -> None:
    runner, pair = stores
    key = f"race-lww-{next(_counter)}"
    runner.run(race(pair, key, writes))
    expected = functools.reduce(lattices.merge, writes[1:], lattices.normalize(writes[0]))
    assert runner.run(pair[0].read(USER, key)) == expected
    assert runner.run(pair[1].read(USER, key)) == expected


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=set_writes)
def test_racing_set_writers_converge_on_the_union(
    stores: tuple[asyncio.Runner, list[ValkeyStore]], writes: list[lattice_pb2.Lattice]
) -> None:
    runner, pair = stores
    key = f"race-set-{next(_counter)}"
    runner.run(race(pair, key, writes))
    expected = functools.reduce(lattices.merge, writes[1:], lattices.normalize(writes[0]))
    assert runner.run(pair[0].read(USER, key)) == expected
