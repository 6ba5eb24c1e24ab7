"""The embedded store: one SQLite file, reached through the stdlib sqlite3 module off the event loop.

Statements run on a dedicated writer thread, key lookups on a reader thread with a read-only
connection of their own (see sqlite_worker), and usage batches in a child process
(sqlite_usage_process); the event loop never blocks on disk, and each connection is only ever used
by its own thread. The file is
opened in WAL mode with synchronous=NORMAL, a busy timeout for other processes holding the write
lock, and foreign keys enforced. Writes that change a key run in one BEGIN IMMEDIATE transaction
with their audit entry.

This module opens, migrates and closes the store; the key and audit methods are in sqlite_keys, the
usage records, reports and rollups in sqlite_usage.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from gateway.store.base import KeyStore, StoreUnavailable, UsageStore
from gateway.store.migrate import list_migrations
from gateway.store.sqlite_keys import SQLiteKeys
from gateway.store.sqlite_usage import SQLiteUsage
from gateway.store.sqlite_worker import BUSY_TIMEOUT, MEMORY, Lane, open_connection, ts, write_transaction

_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT NOT NULL PRIMARY KEY, applied_at TEXT NOT NULL)"
)


def parse_sqlite_url(url: str) -> str:
    """The file path of sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite:///:memory:."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(f"not a sqlite URL (scheme {parts.scheme!r})")
    if parts.netloc:
        raise ValueError(
            "a sqlite URL has no host: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise ValueError("a sqlite URL takes no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/") or len(path) < 2:
        raise ValueError(
            "a sqlite URL needs a file: sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = path[1:]
    return path if path == MEMORY else os.path.abspath(path)


class SQLiteStore(SQLiteKeys, SQLiteUsage, KeyStore, UsageStore):
    def __init__(self, url: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = parse_sqlite_url(url)
        self.busy_timeout = busy_timeout
        self.migrations_applied: list[str] = []  # what the last open() applied

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        self._writer = Lane("gateway-sqlite")
        try:
            await self._writer.open(self._connect)
            self.migrations_applied = await self.migrate()
            if self.path != MEMORY:
                self._reader = Lane("gateway-sqlite-read")
                await self._reader.open(self._connect_reader)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self.path != MEMORY:
            try:
                _create_private_file(self.path)
            except OSError as exc:
                raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        return open_connection(self.path, self.busy_timeout)

    def _connect_reader(self) -> sqlite3.Connection:
        conn = open_connection(self.path, self.busy_timeout)
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def close(self) -> None:
        # Closed from the first await on: a call made meanwhile fails as "not open" instead of
        # starting a usage writer process that nothing would stop.
        writer, self._writer = self._writer, None
        reader, self._reader = self._reader, None
        usage, self._usage_process = self._usage_process, None
        if usage is not None:
            await usage.close()
        for lane in (reader, writer):
            if lane is not None:
                await lane.close()

    async def migrate(self) -> list[str]:
        return await self._run(_migrate)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT count(*) FROM schema_migrations").fetchone())


# --- helpers (they run on the worker thread) -------------------------------------------------------


def _create_private_file(path: str) -> None:
    """Create the database file readable by its owner only, and its folder, if they are missing."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script, split where sqlite3 itself sees a complete statement."""
    pieces = script.split(";")
    buffer = ""
    for i, piece in enumerate(pieces):
        buffer += piece
        if i < len(pieces) - 1:
            buffer += ";"
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        yield buffer


def _migrate(conn: sqlite3.Connection) -> list[str]:
    applied: list[str] = []
    for migration in list_migrations("sqlite"):
        with write_transaction(conn):
            conn.execute(_MIGRATIONS_TABLE)
            done = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE name = ?", (migration.name,)
            ).fetchone()
            if done is None:
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, ts(datetime.now(UTC))),
                )
                applied.append(migration.name)
    return applied
