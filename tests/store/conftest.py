"""The `store` fixture: every contract test runs once on SQLite and once on PostgreSQL.

SQLite gets a fresh file under tmp_path. PostgreSQL gets a fresh schema in the throwaway database of
the `pg_url` fixture, selected through search_path, and dropped afterwards: creating a schema is much
faster than creating a database, and tests never see each other's rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from gateway.store import KeyStore, open_store

StoreFactory = Callable[[], KeyStore]


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
