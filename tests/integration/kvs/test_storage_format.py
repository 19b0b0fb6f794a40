"""The durable engines record their storage format and refuse data of another one.

Real SQLite files in temporary directories, the test run's real Valkey cluster,
and ``cbgrpc kvs`` as a real subprocess for what an operator sees.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudburst.v1 import lattice_pb2, value_pb2
from cloudburst_kvs import valkey_codec as codec
from cloudburst_kvs.storage import (
    SQLITE_FILE_NAME,
    STORAGE_FORMAT,
    SqliteEngine,
    StorageFormatError,
)
from cloudburst_kvs.store import LatticeStore
from cloudburst_kvs.valkey_store import ValkeyStore
from valkey_cluster import ValkeyCluster

USER = lattice_pb2.KEYSPACE_USER
SYSTEM = lattice_pb2.KEYSPACE_SYSTEM
NEWER = STORAGE_FORMAT + 1
#: A storage format older than this release's (and than format 1, the first: none is between).
OLDER = -1
FORMAT_KEY = codec.FORMAT_KEY.decode()
#: How long a refused ``cbgrpc kvs`` may take to exit.
EXIT_TIMEOUT = 60.0


def lww(data: bytes) -> lattice_pb2.Lattice:
    value = value_pb2.Value(serializer=value_pb2.SERIALIZER_BYTES, data=data)
    return lattice_pb2.Lattice(lww=lattice_pb2.LwwLattice(value=value))


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def write_database(path: Path, version: int, rows: dict[str, bytes]) -> None:
    """A database as a release wrote it: the lattice table, ``rows``, and ``version``."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "CREATE TABLE lattices (keyspace INTEGER NOT NULL, key TEXT NOT NULL, "
            "lattice BLOB NOT NULL, PRIMARY KEY (keyspace, key)) WITHOUT ROWID"
        )
        conn.executemany(
            "INSERT INTO lattices VALUES (?, ?, ?)",
            [(USER, key, lww(data).SerializeToString()) for key, data in rows.items()],
        )
        conn.execute(f"PRAGMA user_version={version}")
        conn.commit()
    finally:
        conn.close()


def stored_rows(path: Path) -> dict[str, bytes]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT key, lattice FROM lattices").fetchall()
    return {key: lattice_pb2.Lattice.FromString(blob).lww.value.data for key, blob in rows}


def run_kvs(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``cbgrpc kvs`` that is expected to exit on its own (a refused start)."""
    command = [sys.executable, "-m", "cloudburst_grpc", "kvs", "--host", "127.0.0.1"]
    return subprocess.run(
        [*command, "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


# SQLite


async def test_a_new_sqlite_store_gets_the_format_and_keeps_data_across_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / SQLITE_FILE_NAME
    async with LatticeStore(SqliteEngine(path)) as store:
        await store.put(USER, "kept", lww(b"value"))
    assert user_version(path) == STORAGE_FORMAT

    async with LatticeStore(SqliteEngine(path)) as reopened:
        found = await reopened.read(USER, "kept")
    assert found is not None and found.lww.value.data == b"value"
    assert user_version(path) == STORAGE_FORMAT


async def test_a_sqlite_store_from_before_the_marker_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / SQLITE_FILE_NAME
    write_database(path, 0, {"old": b"from before the marker"})

    async with LatticeStore(SqliteEngine(path)) as store:
        found = await store.read(USER, "old")
        await store.put(USER, "new", lww(b"after"))
    assert found is not None and found.lww.value.data == b"from before the marker"
    assert user_version(path) == STORAGE_FORMAT
    assert stored_rows(path) == {"old": b"from before the marker", "new": b"after"}


@pytest.mark.parametrize(
    ("found", "says"),
    [
        (NEWER, f"storage format {NEWER}, written by a newer release"),
        # No release converts an older format (format 1 is the first): a marker below the
        # current format is one no release wrote (0 means no marker, so this one is below it).
        (OLDER, f"storage format {OLDER}, older than storage format {STORAGE_FORMAT}"),
    ],
)
def test_a_sqlite_store_of_another_format_is_refused_and_left_as_it_is(
    tmp_path: Path, found: int, says: str
) -> None:
    path = tmp_path / SQLITE_FILE_NAME
    write_database(path, found, {"theirs": b"another layout"})
    before = path.read_bytes()

    with pytest.raises(StorageFormatError) as refused:
        SqliteEngine(path)
    message = str(refused.value)
    assert str(path) in message
    assert says in message and f"storage format {STORAGE_FORMAT}" in message
    assert "Run the release that wrote it" in message or "Run a release that reads" in message
    assert "restore the backup" in message

    assert path.read_bytes() == before
    assert not path.with_name(path.name + "-wal").exists()
    assert user_version(path) == found
    assert stored_rows(path) == {"theirs": b"another layout"}


def test_cbgrpc_kvs_refuses_a_sqlite_store_of_a_newer_format(tmp_path: Path) -> None:
    path = tmp_path / SQLITE_FILE_NAME
    write_database(path, NEWER, {"theirs": b"newer layout"})

    result = run_kvs("--engine", "sqlite", "--data-dir", str(tmp_path))

    assert result.returncode == 1, result.stderr
    assert "listening on" not in result.stdout
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr
    assert f"storage format {NEWER}" in result.stderr
    assert f"storage format {STORAGE_FORMAT}" in result.stderr
    assert "Run the release that wrote it" in result.stderr
    assert user_version(path) == NEWER
    assert stored_rows(path) == {"theirs": b"newer layout"}


# Valkey


@pytest.fixture
def valkey(valkey_cluster: ValkeyCluster) -> Iterator[ValkeyCluster]:
    """The shared cluster, emptied before and after (the marker included)."""
    for node in valkey_cluster.primaries():
        valkey_cluster.command(node, "FLUSHALL")
    try:
        yield valkey_cluster
    finally:
        for node in valkey_cluster.primaries():
            valkey_cluster.command(node, "FLUSHALL")


def valkey_get(cluster: ValkeyCluster, key: str) -> str:
    return cluster.command(cluster.primary_of(key), "GET", key).strip()


def valkey_set(cluster: ValkeyCluster, key: str, value: str) -> None:
    assert cluster.command(cluster.primary_of(key), "SET", key, value).strip() == "OK"


async def test_a_new_valkey_store_gets_the_format_and_keeps_data_across_a_restart(
    valkey: ValkeyCluster,
) -> None:
    async with ValkeyStore(valkey.url, operation_timeout=5.0) as store:
        await store.put(USER, "kept", lww(b"value"))
        await store.put(SYSTEM, "function/f", lww(b"definition"))
        # The marker is no key of either keyspace.
        assert await store.list_page(SYSTEM, "", 100, "") == (["function/f"], "")
        assert await store.list_page(USER, "", 100, "") == (["kept"], "")
    assert valkey_get(valkey, FORMAT_KEY) == str(STORAGE_FORMAT)

    async with ValkeyStore(valkey.url, operation_timeout=5.0) as reopened:
        found = await reopened.read(USER, "kept")
        definition = await reopened.read(SYSTEM, "function/f")
    assert found is not None and found.lww.value.data == b"value"
    assert definition is not None and definition.lww.value.data == b"definition"
    assert valkey_get(valkey, FORMAT_KEY) == str(STORAGE_FORMAT)


async def test_a_valkey_store_from_before_the_marker_is_adopted(valkey: ValkeyCluster) -> None:
    async with ValkeyStore(valkey.url, operation_timeout=5.0) as store:
        await store.put(USER, "old", lww(b"from before the marker"))
    # What a release before the marker left: its data and no marker.
    valkey.command(valkey.primary_of(FORMAT_KEY), "DEL", FORMAT_KEY)
    assert valkey_get(valkey, FORMAT_KEY) == ""

    async with ValkeyStore(valkey.url, operation_timeout=5.0) as adopted:
        found = await adopted.read(USER, "old")
    assert found is not None and found.lww.value.data == b"from before the marker"
    assert valkey_get(valkey, FORMAT_KEY) == str(STORAGE_FORMAT)


@pytest.mark.parametrize(
    ("found", "says"),
    [
        (NEWER, f"storage format {NEWER}, written by a newer release"),
        # A cluster without a marker is format 1 and gets it; any older marker is refused.
        (0, f"storage format 0, older than storage format {STORAGE_FORMAT}"),
        (OLDER, f"storage format {OLDER}, older than storage format {STORAGE_FORMAT}"),
    ],
)
async def test_a_valkey_store_of_another_format_is_refused_and_left_as_it_is(
    valkey: ValkeyCluster, found: int, says: str
) -> None:
    async with ValkeyStore(valkey.url, operation_timeout=5.0) as store:
        await store.put(USER, "theirs", lww(b"another layout"))
    valkey_set(valkey, FORMAT_KEY, str(found))
    refused_store = ValkeyStore(valkey.url, operation_timeout=5.0)
    with pytest.raises(StorageFormatError) as refused:
        await refused_store.start()
    await refused_store.close()
    message = str(refused.value)
    assert valkey.url in message and FORMAT_KEY in message
    assert says in message and f"storage format {STORAGE_FORMAT}" in message
    assert "Run the release that wrote it" in message or "Run a release that reads" in message
    assert "restore the backup" in message

    assert valkey_get(valkey, FORMAT_KEY) == str(found)
    # The data is as it was for the release that reads it (here: this one, marker put back).
    valkey_set(valkey, FORMAT_KEY, str(STORAGE_FORMAT))
    async with ValkeyStore(valkey.url, operation_timeout=5.0) as store:
        read = await store.read(USER, "theirs")
    assert read is not None and read.lww.value.data == b"another layout"


async def test_a_valkey_marker_that_is_no_number_is_refused(valkey: ValkeyCluster) -> None:
    valkey_set(valkey, FORMAT_KEY, "banana")
    store = ValkeyStore(valkey.url, operation_timeout=5.0)
    with pytest.raises(StorageFormatError, match="not a storage format number"):
        await store.start()
    await store.close()
    assert valkey_get(valkey, FORMAT_KEY) == "banana"


def test_cbgrpc_kvs_refuses_a_valkey_cluster_of_a_newer_format(valkey: ValkeyCluster) -> None:
    valkey_set(valkey, FORMAT_KEY, str(NEWER))

    result = run_kvs("--engine", "valkey", "--valkey-url", valkey.url)

    assert result.returncode == 1, result.stderr
    assert "listening on" not in result.stdout
    assert "Traceback" not in result.stderr
    assert valkey.url in result.stderr and FORMAT_KEY in result.stderr
    assert f"storage format {NEWER}" in result.stderr
    assert f"storage format {STORAGE_FORMAT}" in result.stderr
    assert "Run the release that wrote it" in result.stderr
    assert valkey_get(valkey, FORMAT_KEY) == str(NEWER)
