"""What every part of the SQLite store runs on: one connection, used by one worker thread only.

Every statement runs on a single dedicated thread (a one-worker executor), so the event loop never
blocks on disk and the connection is only ever used by that thread; SQLiteStore opens and closes
both. Writes run in one BEGIN IMMEDIATE transaction each.

Timestamps are stored as fixed-width ISO-8601 UTC text ('2024-05-01T12:00:00.000000Z'), so text
order is time order and values round-trip to the microsecond.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TypeVar

from gateway.store.base import StoreUnavailable

T = TypeVar("T")


class SQLiteWorker:
    """The connection and its worker thread, shared by the key and usage parts of SQLiteStore."""

    path: str
    _executor: ThreadPoolExecutor | None
    _conn: sqlite3.Connection | None  # used only on the executor's thread

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise StoreUnavailable("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
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
