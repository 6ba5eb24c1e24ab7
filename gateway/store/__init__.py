"""Where keys and the audit trail live: one interface, an embedded SQLite twin, PostgreSQL."""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.store.base import KeyStore, StoreUnavailable


def open_store(url: str) -> KeyStore:
    """The store for a URL: sqlite:///FILE (embedded) or postgresql://… (asyncpg pool)."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from gateway.store.sqlite import SQLiteStore

        return SQLiteStore(url)
    if scheme in ("postgresql", "postgres"):
        from gateway.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported store URL scheme {scheme!r}")


__all__ = ["KeyStore", "StoreUnavailable", "open_store"]
