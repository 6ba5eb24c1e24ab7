"""What every part of the SQLite store runs on: connections, each used by one thread only.

Statements run on a dedicated writer thread (a one-worker executor) and key lookups on a reader
thread with a read-only connection, so the event loop never blocks on disk and a lookup never waits
behind a write; SQLiteStore opens and closes them. Writes run in one BEGIN IMMEDIATE transaction each.

Timestamps are stored as fixed-width ISO-8601 UTC text ('2024-05-01T12:00:00.000000Z'), so text
order is time order and values round-trip to the microsecond.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TypeVar

from gateway.store.base import StoreUnavailable

T = TypeVar("T")
BUSY_TIMEOUT = 5.0  # seconds to wait for another process's write lock
MEMORY = ":memory:"


class Lane:
    """One connection and the one thread that ever uses it."""

    def __init__(self, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        def make() -> None:
            self.conn = connect()

        await asyncio.get_running_loop().run_in_executor(self.executor, make)

    async def close(self) -> None:
        def disconnect() -> None:
            conn, self.conn = self.conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass

        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, disconnect)
        finally:
            self.executor.shutdown(wait=False)


class SQLiteWorker:
    """The store's connections and their threads, shared by the key and usage parts of SQLiteStore:
    a writer lane for every statement, and a reader lane for key lookups (file databases only)."""

    path: str
    busy_timeout: float
    _writer: Lane | None = None
    _reader: Lane | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        lane = self._writer
        if lane is None:
            raise StoreUnavailable("the SQLite store is not open")
        return await asyncio.get_running_loop().run_in_executor(lane.executor, self._call, fn, lane)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read on the data path (a key lookup) on its own connection and thread: never queued
        behind a write that waits for the write lock. Another process (the usage writer) may hold it,
        and SQLite's busy wait sleeps in steps of up to 100 ms. An in-memory database has one
        connection only."""
        lane = self._reader
        if lane is None:
            return await self._run(fn)
        return await asyncio.get_running_loop().run_in_executor(lane.executor, self._call, fn, lane)

    def _call(self, fn: Callable[[sqlite3.Connection], T], lane: Lane) -> T:
        conn = lane.conn
        if conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        try:
            return fn(conn)
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"the change violates a store constraint: {exc}") from exc
        except sqlite3.DataError as exc:
            raise ValueError(f"a value does not fit the store: {exc}") from exc
        except (sqlite3.OperationalError, sqlite3.InternalError, sqlite3.NotSupportedError) as exc:
            raise StoreUnavailable(f"SQLite store {self.path} unavailable: {exc}") from exc
        except sqlite3.ProgrammingError:
            raise  # a bug in the store, not an outage
        except (sqlite3.DatabaseError, OSError) as exc:  # "file is not a database", I/O errors
            raise StoreUnavailable(f"SQLite store {self.path} unavailable: {exc}") from exc


# --- helpers (they run on the worker thread) -------------------------------------------------------


def open_connection(path: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=NORMAL, a busy timeout for other processes holding
    the write lock (the usage writer process is one), and foreign keys enforced."""
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"cannot open SQLite store {path}: {exc}") from exc
    try:
        _wal(conn, busy_timeout)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"cannot open SQLite store {path}: {exc}") from exc
    return conn


def _wal(conn: sqlite3.Connection, patience: float) -> None:
    """Switch to WAL. Two processes opening a new database at once (workers starting together) can
    both try; SQLite answers the loser "locked" at once instead of waiting, so it tries again."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock up front: all of it is committed or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def ts(value: datetime) -> str:
    """The stored text of an aware datetime."""
    utc = value.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def from_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)
