"""The `store` fixture: every contract test runs once on SQLite and once on PostgreSQL.

SQLite gets a fresh file under tmp_path. PostgreSQL gets a fresh schema in the throwaway database of
the `pg_url` fixture, selected through search_path, and dropped afterwards: creating a schema is much
faster than creating a database, and tests never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.store import KeyStore, open_store

StoreFactory = Callable[[], KeyStore]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@pytest.fixture
async def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty store of the backend under test; several stores may open it."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")
    schema = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_url, timeout=10)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield _with_search_path(pg_url, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def new_store(store_url: str) -> AsyncIterator[StoreFactory]:
    """Makes unopened stores on the test's database; all of them are closed at the end."""
    made: list[KeyStore] = []

    def make() -> KeyStore:
        store = open_store(store_url)
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()


@pytest.fixture
async def store(new_store: StoreFactory) -> KeyStore:
    """An open store with the migrations applied."""
    s = new_store()
    await s.open()
    return s
