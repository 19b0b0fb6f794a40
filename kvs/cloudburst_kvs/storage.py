"""Storage engines behind the lattice store: a small synchronous interface.

The store keeps every lattice in memory and uses an engine only to load them at
start-up and to make writes durable, so the interface is three calls. Engines
are called from one thread at a time (the store's writer thread after start-up)
and never from the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

#: A stored row: keyspace number, key, serialized ``cloudburst.v1.Lattice``.
Row = tuple[int, str, bytes]

#: The file name of the SQLite database inside the KVS data directory.
SQLITE_FILE_NAME = "kvs.sqlite3"

#: The format of the data the durable engines store, recorded in the store itself (SQLite's
#: ``PRAGMA user_version``, the Valkey key :data:`cloudburst_kvs.valkey_codec.FORMAT_KEY`).
#: A KVS refuses to start on data of a higher format than this. Bump it when a release changes
#: how stored bytes are laid out or read (the table, the Valkey keys or value headers, the
#: encoding of a lattice) so that an older release would misread them, and make that release
#: convert or refuse stores of the older format (see :func:`check_format`); the engines mark a
#: store that has no marker (written before it, in format 1). It is not the wire protocol's
#: ``PROTOCOL_VERSION``: that one covers what processes send each other and changes with the
#: messages on the wire, this one covers what stays on disk or in Valkey across restarts and
#: releases. Either may change without the other.
STORAGE_FORMAT = 1


class StorageError(OSError):
    """The storage engine cannot be opened or written; the message says what to check."""


class StorageFormatError(StorageError):
    """The stored data is of a format this release does not read; nothing was changed."""


def check_format(where: str, found: int) -> None:
    """Refuse a store (``where``) marked with storage format ``found`` unless it is this one's.

    The rule for every engine: a newer format is refused (this release would
    misread it), and so is an older one, which this release has no step to
    convert. Format 1 is the first there is, so an older marker is one that
    no release wrote. A release that bumps :data:`STORAGE_FORMAT` and reads
    the previous format converts such a store, by a named step the engines run
    before this check, and marks it with the new format; without that step
    the older format is refused here. (A store without a marker is format 1:
    the engines mark it rather than check it.)

    Raises:
        StorageFormatError: ``found`` is not :data:`STORAGE_FORMAT`.
    """
    if found > STORAGE_FORMAT:
        raise StorageFormatError(_newer_format_message(where, found))
    if found < STORAGE_FORMAT:
        raise StorageFormatError(_older_format_message(where, found))


def _newer_format_message(where: str, found: int) -> str:
    """What to tell an operator whose store (``where``) holds data of storage format ``found``."""
    return (
        f"{where} holds data of storage format {found}, written by a newer release of "
        f"cloudburst-grpc; this release reads storage format {STORAGE_FORMAT} and would misread "
        "it, so it does not start and leaves the data as it is. Run the release that wrote it "
        "(or a newer one), or restore the backup taken before the upgrade "
        "(see docs/operations.md#stored-data-across-releases)"
    )


def _older_format_message(where: str, found: int) -> str:
    """What to tell an operator whose store (``where``) holds an older storage format ``found``."""
    return (
        f"{where} holds data of storage format {found}, older than storage format "
        f"{STORAGE_FORMAT}, which this release reads; it converts no older format (and no "
        "release of cloudburst-grpc writes a format below 1), so it does not start and leaves "
        "the data as it is. Run a release that reads that format, or restore the backup taken "
        "before the data was changed (see docs/operations.md#stored-data-across-releases)"
    )


class StorageEngine(Protocol):
    """What the lattice store needs from a storage engine."""

    @property
    def durable(self) -> bool:
        """Whether writes survive the process; False lets the store skip its writer thread."""
        ...

    def load(self) -> Iterator[Row]:
        """Yield every stored row, in no particular order."""
        ...

    def write(self, puts: Sequence[Row], deletes: Sequence[tuple[int, str]]) -> None:
        """Store ``puts`` (replacing rows) and remove ``deletes`` in one atomic transaction.

        A key appears at most once across both sequences.
        """
        ...

    def close(self) -> None:
        """Release the engine's resources; idempotent."""
        ...


class MemoryEngine:
    """An engine that keeps nothing: the store's own memory is the only copy.

    For tests and for ``kvs.engine = "memory"``; everything is lost on exit.
    """

    durable = False

    def load(self) -> Iterator[Row]:
        """Yield nothing: a memory store always starts empty."""
        return iter(())

    def write(self, puts: Sequence[Row], deletes: Sequence[tuple[int, str]]) -> None:
        """Do nothing; the store already holds the data."""

    def close(self) -> None:
        """Do nothing."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS lattices (
    keyspace INTEGER NOT NULL,
    key TEXT NOT NULL,
    lattice BLOB NOT NULL,
    PRIMARY KEY (keyspace, key)
) WITHOUT ROWID
"""


class SqliteEngine:
    """A durable engine on the standard library's SQLite, in WAL mode.

    ``sync="normal"`` makes a committed write survive a crash of the process
    (the WAL is written before the commit returns) but not necessarily a power
    loss; ``sync="full"`` also syncs the WAL to disk on every commit. Because the
    store groups concurrent writes into one transaction, ``full`` costs one
    fsync per group, not per write.
    """

    durable = True

    def __init__(self, path: Path | str, sync: str = "normal") -> None:
        """Open (creating if needed) the database file at ``path`` and its directory.

        Args:
            path: The database file.
            sync: ``"normal"`` or ``"full"`` (SQLite's ``synchronous`` setting).

        Raises:
            ValueError: ``sync`` is neither ``"normal"`` nor ``"full"``.
            StorageError: The directory or the database cannot be created or written.
        """
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', not {sync!r}")
        self.path = Path(path)
        hint = (
            "check that the KVS data directory (kvs.data_dir) exists or can be created and "
            "is writable, or run with kvs.engine = 'memory'"
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the KVS data directory {self.path.parent}: {exc.strerror or exc}; "
                f"{hint}"
            ) from exc
        self._conn: sqlite3.Connection | None = None
        try:
            # The store's writer thread uses the connection after start-up, and the
            # store guarantees one thread at a time, so the same-thread check is moot.
            # Autocommit mode: write() issues BEGIN/COMMIT itself.
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the KVS database {self.path}: {exc}; {hint}") from exc
        try:
            # Checked before anything is changed: a newer release's file is left as it is.
            self._check_format(conn)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning(
                    "SQLite at %s runs in journal mode %s, not WAL; writes will be slower",
                    self.path,
                    mode,
                )
            conn.execute(f"PRAGMA synchronous={sync.upper()}")
            self._mark_format(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(
                    f"cannot open the KVS database {self.path}: {exc}; {hint}"
                ) from exc
            raise
        self._conn = conn
        logger.info(
            "KVS database opened at %s (storage format %d, synchronous=%s)",
            self.path,
            STORAGE_FORMAT,
            sync,
        )

    def _check_format(self, conn: sqlite3.Connection) -> int:
        """Return the database's storage format marker, 0 for none (see :func:`check_format`)."""
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found != 0:
            check_format(f"the KVS database {self.path}", found)
        return found

    def _mark_format(self, conn: sqlite3.Connection) -> None:
        """Create the table if needed and record this release's storage format, in one transaction.

        A database without a marker (``user_version`` 0) is either new or was written by a
        release before the marker, whose layout is format 1: both get the marker.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = self._check_format(conn)  # again, now that no other writer can change it
            existed = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
            conn.execute(_SCHEMA)
            if found == 0:
                conn.execute(f"PRAGMA user_version={STORAGE_FORMAT}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if existed and found == 0:
            logger.info(
                "KVS database %s had no storage format marker (a release before the marker "
                "wrote it): marked as format %d",
                self.path,
                STORAGE_FORMAT,
            )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"the KVS database {self.path} is closed")
        return self._conn

    def load(self) -> Iterator[Row]:
        """Yield every stored row."""
        cursor = self._connection().execute("SELECT keyspace, key, lattice FROM lattices")
        for keyspace, key, lattice in cursor:
            yield int(keyspace), str(key), bytes(lattice)

    def write(self, puts: Sequence[Row], deletes: Sequence[tuple[int, str]]) -> None:
        """Apply puts and deletes in one transaction.

        Raises:
            StorageError: The transaction failed (disk full, I/O error ...); nothing was applied.
        """
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            if puts:
                conn.executemany(
                    "INSERT OR REPLACE INTO lattices (keyspace, key, lattice) VALUES (?, ?, ?)",
                    puts,
                )
            if deletes:
                conn.executemany("DELETE FROM lattices WHERE keyspace = ? AND key = ?", deletes)
            conn.execute("COMMIT")
        except BaseException as exc:
            # SQLite rolls some failures back itself (a full disk, for one); only
            # roll back what is still open, so the next BEGIN starts clean.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("cannot roll back a failed write to %s", self.path)
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot write to the KVS database {self.path}: {exc}") from exc
            raise

    def close(self) -> None:
        """Close the database; idempotent."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
            logger.info("KVS database closed at %s", self.path)


def open_engine(engine: str, data_dir: Path, sync: str = "normal") -> StorageEngine:
    """Open the engine named by the configuration.

    Args:
        engine: ``"sqlite"`` or ``"memory"``.
        data_dir: The directory of the SQLite database (unused by the memory engine).
        sync: SQLite's synchronous mode, ``"normal"`` or ``"full"``.

    Raises:
        ValueError: The engine name is unknown.
        StorageError: The SQLite database cannot be opened.
    """
    if engine == "memory":
        return MemoryEngine()
    if engine == "sqlite":
        return SqliteEngine(Path(data_dir) / SQLITE_FILE_NAME, sync)
    raise ValueError(f"unknown KVS engine {engine!r}; use 'sqlite' or 'memory'")


__all__ = [
    "SQLITE_FILE_NAME",
    "STORAGE_FORMAT",
    "MemoryEngine",
    "Row",
    "SqliteEngine",
    "StorageEngine",
    "StorageError",
    "StorageFormatError",
    "check_format",
    "open_engine",
]
