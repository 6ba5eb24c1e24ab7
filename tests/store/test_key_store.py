"""The KeyStore contract: every test taking `store` or `new_store` runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.keys.model import AuditEntry, KeyRecord
from gateway.store import KeyStore, StoreUnavailable, open_store
from gateway.store.base import StaleKey
from gateway.store.migrate import list_migrations
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore, parse_sqlite_url
from tests.helpers.net import free_port
from tests.store.conftest import StoreFactory

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def digest(n: int) -> bytes:
    return bytes([n]) * 32


def make_key(
    key_id: str, n: int, *, owner: str = "alice", created_at: datetime = T0, **fields: object
) -> KeyRecord:
    record = KeyRecord(
        id=key_id,
        owner=owner,
        name=f"{key_id} name",
        env="test",
        digest=digest(n),
        pepper_version=1,
        hint=f"gk_test_…{n:04d}",
        scopes=("read",),
        allow_ips=(),
        limits=("100/s",),
        created_at=created_at,
    )
    return replace(record, **fields)  # type: ignore[arg-type]


def audit(
    action: str, key_id: str | None, *, at: datetime = T0, change: dict[str, object] | None = None
) -> AuditEntry:
    return AuditEntry(
        action=action, actor="admin", source_ip="127.0.0.1", key_id=key_id, change=change or {}, at=at
    )


async def insert(store: KeyStore, record: KeyRecord) -> None:
    await store.insert_key(record, audit("create", record.id, at=record.created_at))


# --- migrations --------------------------------------------------------------------------------------


async def test_open_applies_migrations_once(new_store: StoreFactory, backend: str) -> None:
    names = [m.name for m in list_migrations(backend)]
    assert names[0] == "0001_keys"
    first = new_store()
    await first.open()
    assert first.migrations_applied == names  # type: ignore[attr-defined]
    assert await first.migrate() == []
    await insert(first, make_key("k1", 1))

    second = new_store()
    await second.open()
    assert second.migrations_applied == []  # type: ignore[attr-defined]
    assert await second.migrate() == []
    assert await second.get_key("k1") == make_key("k1", 1)


async def test_concurrent_opens_apply_each_migration_once(new_store: StoreFactory, backend: str) -> None:
    names = [m.name for m in list_migrations(backend)]
    stores = [new_store() for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    # Each migration runs in its own transaction, so two stores may share the work; what matters is
    # that every migration was applied exactly once, in order within each store.
    applied = [s.migrations_applied for s in stores]  # type: ignore[attr-defined]
    assert sorted(name for names_of_one in applied for name in names_of_one) == names
    for names_of_one in applied:
        assert names_of_one == sorted(names_of_one)


# --- keys --------------------------------------------------------------------------------------------


async def test_insert_get_and_find_by_digests(store: KeyStore) -> None:
    k1 = make_key("k1", 1)
    k2 = make_key("k2", 2, pepper_version=2)
    entry = audit("create", "k1")
    await store.insert_key(k1, entry)
    await insert(store, k2)
    assert isinstance(entry.id, int)

    assert await store.get_key("k1") == k1
    assert await store.get_key("k2") == k2
    assert await store.get_key("k3") is None
    # one digest per pepper version: the one that matches wins
    assert await store.find_by_digests([digest(9), digest(1)]) == k1
    assert await store.find_by_digests([digest(2), digest(8)]) == k2
    assert await store.find_by_digests([digest(8), digest(9)]) is None
    assert await store.find_by_digests([]) is None


async def test_unique_digest_and_id_enforced(store: KeyStore) -> None:
    await insert(store, make_key("k1", 1))

    with pytest.raises(ValueError, match="digest") as caught:
        await insert(store, make_key("k2", 1))
    message = str(caught.value)
    assert digest(1).hex() not in message and repr(digest(1)) not in message
    assert await store.get_key("k2") is None

    with pytest.raises(ValueError, match="already exists"):
        await insert(store, make_key("k1", 2))
    assert await store.find_by_digests([digest(2)]) is None

    # a refused key leaves no audit entry behind
    assert [(e.action, e.key_id) for e in await store.list_audit()] == [("create", "k1")]


async def test_list_keys_oldest_first_with_owner_filter(store: KeyStore) -> None:
    hour = timedelta(hours=1)
    await insert(store, make_key("a", 1, owner="alice", created_at=T0 + 2 * hour))
    await insert(store, make_key("b", 2, owner="bob", created_at=T0))
    await insert(store, make_key("c", 3, owner="alice", created_at=T0 + hour))
    await insert(store, make_key("d", 4, owner="bob", created_at=T0 + 3 * hour))

    assert [k.id for k in await store.list_keys()] == ["b", "c", "a", "d"]
    assert [k.id for k in await store.list_keys("alice")] == ["c", "a"]
    assert [k.id for k in await store.list_keys(owner="bob")] == ["b", "d"]
    assert await store.list_keys("nobody") == []


async def test_concurrent_inserts_all_land(store: KeyStore) -> None:
    keys = [make_key(f"k{i:02d}", i, created_at=T0 + timedelta(seconds=i)) for i in range(20)]
    await asyncio.gather(*(insert(store, k) for k in keys))
    assert await store.list_keys() == keys
    assert len(await store.list_audit()) == 20


async def test_update_key_writes_every_mutable_field_and_its_audit(store: KeyStore) -> None:
    await insert(store, make_key("k1", 1))
    await insert(store, make_key("k2", 2))
    await insert(store, make_key("k0", 3))
    changed = KeyRecord(
        id="k1",
        owner="carol",
        name="renamed",
        env="live",
        digest=digest(4),
        pepper_version=7,
        hint="gk_live_…9999",
        scopes=("read", "write"),
        allow_ips=("10.0.0.0/8",),
        limits=("5/s", "1000/d"),
        status="revoked",
        created_at=T0,
        expires_at=T0 + timedelta(days=30),
        revoked_at=T0 + timedelta(days=1),
        revoke_reason="leaked in a log",
        rotated_to="k2",
        rotated_from="k0",
        grace_until=T0 + timedelta(days=2),
        last_used_at=T0 + timedelta(hours=5),
    )
    entry = audit("revoke", "k1", at=T0 + timedelta(days=1), change={"reason": "leaked in a log"})
    await store.update_key(changed, entry)

    assert await store.get_key("k1") == changed
    assert await store.find_by_digests([digest(4)]) == changed
    assert await store.find_by_digests([digest(1)]) is None
    newest = (await store.list_audit(limit=1))[0]
    assert newest == entry
    assert isinstance(newest.id, int)

    # without an audit entry, nothing is added to the trail
    await store.update_key(replace(changed, name="again"), None)
    assert (await store.get_key("k1")).name == "again"  # type: ignore[union-attr]
    assert len(await store.list_audit()) == 4


async def test_update_missing_key_raises_and_writes_no_audit(store: KeyStore) -> None:
    with pytest.raises(KeyError):
        await store.update_key(make_key("ghost", 1), audit("update", "ghost"))
    assert await store.list_audit() == []
    assert await store.get_key("ghost") is None


async def test_update_key_rejects_a_digest_taken_by_another_key(store: KeyStore) -> None:
    k1 = make_key("k1", 1)
    await insert(store, k1)
    await insert(store, make_key("k2", 2))
    with pytest.raises(ValueError, match="digest"):
        await store.update_key(replace(k1, digest=digest(2), name="x"), audit("update", "k1"))
    assert await store.get_key("k1") == k1
    assert [e.action for e in await store.list_audit()] == ["create", "create"]


async def test_rotate_changes_both_rows_in_one_go(store: KeyStore) -> None:
    old = make_key("k1", 1)
    await insert(store, old)
    later = T0 + timedelta(hours=1)
    new = make_key("k2", 2, created_at=later, rotated_from="k1")
    retired = replace(old, rotated_to="k2", grace_until=later + timedelta(days=1))
    entry = audit("rotate", "k1", at=later, change={"rotated_to": "k2"})

    await store.rotate(retired, new, entry)

    assert await store.get_key("k1") == retired
    assert await store.get_key("k2") == new
    assert await store.find_by_digests([digest(2)]) == new
    assert [e.action for e in await store.list_audit()] == ["rotate", "create"]
    assert isinstance(entry.id, int)


async def test_rotate_is_all_or_nothing(store: KeyStore) -> None:
    old = make_key("k1", 1)
    other = make_key("k3", 3)
    await insert(store, old)
    await insert(store, other)
    later = T0 + timedelta(hours=1)

    # the successor's digest is taken: the old key must stay as it was
    clash = make_key("k2", 3, created_at=later, rotated_from="k1")
    retired = replace(old, rotated_to="k2", grace_until=later + timedelta(days=1))
    with pytest.raises(ValueError, match="digest"):
        await store.rotate(retired, clash, audit("rotate", "k1", at=later))
    assert await store.get_key("k1") == old
    assert await store.get_key("k2") is None

    # the old key is gone: the successor must not be stored either
    orphan = make_key("k4", 4, created_at=later)
    with pytest.raises(KeyError):
        await store.rotate(make_key("ghost", 5, rotated_to="k4"), orphan, audit("rotate", "ghost", at=later))
    assert await store.get_key("k4") is None

    assert [e.action for e in await store.list_audit()] == ["create", "create"]


async def test_a_write_based_on_a_stale_status_is_refused(store: KeyStore) -> None:
    """Another process revoked the key between this one's read and write: the revoke must stand."""
    await insert(store, make_key("k1", 1))
    seen = await store.get_key("k1")
    assert seen is not None
    await store.update_key(replace(seen, status="revoked"), audit("revoke", "k1"), expect_status="active")

    renamed = replace(seen, name="renamed")  # built from the stale read: status still "active"
    with pytest.raises(StaleKey):
        await store.update_key(renamed, audit("update", "k1"), expect_status="active")
    stored = await store.get_key("k1")
    assert stored is not None and stored.status == "revoked" and stored.name == "k1 name"
    assert [e.action for e in await store.list_audit()] == ["revoke", "create"]

    successor = make_key("k2", 2, rotated_from="k1")
    with pytest.raises(StaleKey):
        await store.rotate(replace(seen, rotated_to="k2"), successor, audit("rotate", "k1"))
    assert await store.get_key("k2") is None


async def test_touch_only_moves_forward(store: KeyStore) -> None:
    await insert(store, make_key("k1", 1))
    await insert(store, make_key("k2", 2))
    t1, t2, t3 = (T0 + timedelta(minutes=m, microseconds=m) for m in (1, 2, 3))

    await store.touch({"k1": t2, "k2": t1})
    assert (await store.get_key("k1")).last_used_at == t2  # type: ignore[union-attr]
    assert (await store.get_key("k2")).last_used_at == t1  # type: ignore[union-attr]

    await store.touch({"k1": t1, "k2": t3, "unknown": t3})
    assert (await store.get_key("k1")).last_used_at == t2  # type: ignore[union-attr]
    assert (await store.get_key("k2")).last_used_at == t3  # type: ignore[union-attr]

    await store.touch({})
    # an update from a stale copy does not move it back either
    stale = replace(make_key("k1", 1), name="renamed", last_used_at=t1)
    await store.update_key(stale, None)
    got = await store.get_key("k1")
    assert got is not None and got.name == "renamed" and got.last_used_at == t2


# --- audit -------------------------------------------------------------------------------------------


async def test_list_audit_newest_first_with_filters_and_limit(store: KeyStore) -> None:
    minute = timedelta(minutes=1)
    entries = [
        audit("create", "k1", at=T0),
        audit("create", "k2", at=T0 + minute),
        audit("auth_failed", None, at=T0 + 2 * minute),
        audit("update", "k1", at=T0 + 3 * minute),
        audit("revoke", "k2", at=T0 + 4 * minute),
        audit("revoke", "k1", at=T0 + 4 * minute),  # same instant: the later insert is newer
    ]
    for e in entries:
        await store.add_audit(e)
    ids = [e.id for e in entries if e.id is not None]
    assert len(ids) == len(entries) and ids == sorted(set(ids))

    newest_first = list(reversed(entries))
    assert await store.list_audit() == newest_first
    assert await store.list_audit(limit=2) == newest_first[:2]
    assert await store.list_audit(limit=0) == []
    assert await store.list_audit(since=T0 + 3 * minute) == newest_first[:3]
    assert await store.list_audit(key_id="k1") == [entries[5], entries[3], entries[0]]
    assert await store.list_audit(since=T0 + minute, key_id="k2", limit=5) == [entries[4], entries[1]]
    assert await store.list_audit(key_id="k1", limit=1) == [entries[5]]
    assert await store.list_audit(since=T0 + timedelta(days=1)) == []


async def test_key_changes_feed_from_the_audit_log(store: KeyStore) -> None:
    minute = timedelta(minutes=1)
    await store.add_audit(audit("create", "k0", at=T0))
    [(start, none, _)] = await store.key_changes(-1)
    assert none == ""
    entries = [
        audit("update", "k1", at=T0 + minute),
        audit("auth_failed", None, at=T0 + minute),  # about no key: key id ""
        audit("revoke", "k2", at=T0 + 2 * minute),
        audit("rotate", "k1", at=T0 + 3 * minute),
    ]
    for e in entries:
        await store.add_audit(e)
    ids = [e.id for e in entries]
    assert all(isinstance(i, int) for i in ids)
    changes = await store.key_changes(start)
    assert [(i, k) for i, k, _ in changes] == [(ids[0], "k1"), (ids[1], ""), (ids[2], "k2"), (ids[3], "k1")]
    assert [t for _, _, t in changes] == [(T0 + m * minute).timestamp() for m in (1, 1, 2, 3)]
    assert await store.key_changes(ids[3]) == []
    assert [i for i, _, _ in await store.key_changes(ids[1])] == [ids[2], ids[3]]
    assert [i for i, _, _ in await store.key_changes(start, limit=2)] == [ids[0], ids[1]]
    [(last, _, _)] = await store.key_changes(-1)
    assert last == ids[3]
    among = await store.key_changes_among([ids[3], ids[0], ids[3] + 1000])  # the last: no such entry (yet)
    assert [(i, k) for i, k, _ in among] == [(ids[0], "k1"), (ids[3], "k1")]
    assert await store.key_changes_among([]) == []


# --- representations ---------------------------------------------------------------------------------


async def test_datetimes_come_back_aware_utc_to_the_microsecond(store: KeyStore) -> None:
    plus2 = timezone(timedelta(hours=2))
    created = datetime(2024, 6, 30, 23, 59, 59, 999999, tzinfo=plus2)
    record = make_key(
        "k1",
        1,
        created_at=created,
        expires_at=datetime(2031, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        grace_until=datetime(2024, 7, 1, 9, 30, 0, 500000, tzinfo=timezone(timedelta(hours=-7))),
        last_used_at=datetime(2024, 7, 1, 0, 0, 0, 654321, tzinfo=UTC),
    )
    entry = audit("create", "k1", at=created)
    await store.insert_key(record, entry)

    got = await store.get_key("k1")
    assert got == record
    assert got is not None
    for value in (got.created_at, got.expires_at, got.grace_until, got.last_used_at):
        assert value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert got.created_at.microsecond == 999999 and got.created_at.hour == 21
    assert got.revoked_at is None

    [stored] = await store.list_audit()
    assert stored.at == created and stored.at.utcoffset() == timedelta(0)


async def test_naive_datetimes_are_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await insert(store, make_key("k1", 1, created_at=datetime(2024, 1, 1)))
    assert await store.get_key("k1") is None
    await insert(store, make_key("k2", 2))
    with pytest.raises(ValueError, match="timezone"):
        await store.touch({"k2": datetime(2024, 1, 1)})


async def test_json_fields_round_trip(store: KeyStore) -> None:
    full = make_key(
        "k1",
        1,
        scopes=("read", "write:keys", "ünïcode", "quote\"and'apostrophe"),
        allow_ips=("10.0.0.0/8", "2001:db8::/32", "192.0.2.7"),
        limits=("100/s", "10000/d"),
    )
    empty = make_key("k2", 2, scopes=(), allow_ips=(), limits=())
    change: dict[str, object] = {
        "scopes": {"from": ["read"], "to": ["read", "write"]},
        "count": 3,
        "flag": True,
        "nothing": None,
        "text": "ünïcode",
    }
    await store.insert_key(full, audit("create", "k1", change=change))
    await insert(store, empty)

    assert await store.get_key("k1") == full
    assert await store.get_key("k2") == empty
    oldest = (await store.list_audit())[-1]
    assert oldest.change == change


# --- availability ------------------------------------------------------------------------------------


async def test_ping_and_closed_store(store: KeyStore) -> None:
    await store.ping()
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.get_key("k1")


async def test_postgres_refusing_connections_is_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/gateway_test")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.open(), 10)
    assert time.monotonic() - started < 5
    with pytest.raises(StoreUnavailable):
        await store.ping()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_postgres_not_answering_is_unavailable(silent_server: int) -> None:
    store = PostgresStore(f"postgresql://postgres:secret@127.0.0.1:{silent_server}/db", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await asyncio.wait_for(store.open(), 10)
    assert time.monotonic() - started < 5
    assert "secret" not in str(caught.value)


async def test_sqlite_folder_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    store = SQLiteStore(f"sqlite:///{tmp_path / 'not-a-folder' / 'keys.db'}")
    with pytest.raises(StoreUnavailable):
        await store.open()
    with pytest.raises(StoreUnavailable):
        await store.get_key("k1")


async def test_sqlite_file_that_is_no_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    path.write_bytes(b"this is not an SQLite database, just some text long enough to have a header\n" * 20)
    store = SQLiteStore(f"sqlite:///{path}")
    with pytest.raises(StoreUnavailable):
        await store.open()


# --- SQLite specifics --------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


async def test_sqlite_file_is_created_private(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "missing" / "folder" / "keys.db"
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        await insert(store, make_key("k1", 1))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for sidecar in (path.with_name("keys.db-wal"), path.with_name("keys.db-shm")):
            if sidecar.exists():
                assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    finally:
        await store.close()


async def test_sqlite_file_mode_of_an_existing_file_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_sqlite_url("sqlite:///data/keys.db") == str(tmp_path / "data" / "keys.db")
    assert parse_sqlite_url("sqlite:////var/lib/gateway/keys.db") == "/var/lib/gateway/keys.db"
    assert parse_sqlite_url("sqlite:///:memory:") == ":memory:"
    assert isinstance(open_store("sqlite:///keys.db"), SQLiteStore)
    for bad in ("sqlite://host/keys.db", "sqlite:///", "sqlite://", "sqlite:///keys.db?mode=ro"):
        with pytest.raises(ValueError):
            parse_sqlite_url(bad)


async def test_sqlite_relative_path_and_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    on_disk = SQLiteStore("sqlite:///state/keys.db")
    await on_disk.open()
    await on_disk.close()
    assert (tmp_path / "state" / "keys.db").is_file()

    memory = SQLiteStore("sqlite:///:memory:")
    await memory.open()
    try:
        await insert(memory, make_key("k1", 1))
        assert await memory.get_key("k1") == make_key("k1", 1)
    finally:
        await memory.close()


async def test_sqlite_statements_run_off_the_event_loop_thread(tmp_path: Path) -> None:
    import threading

    store = SQLiteStore(f"sqlite:///{tmp_path / 'keys.db'}")
    await store.open()
    seen: list[str] = []
    assert store._writer is not None
    conn = store._writer.conn
    assert conn is not None
    conn.set_trace_callback(lambda _sql: seen.append(threading.current_thread().name))
    try:
        await insert(store, make_key("k1", 1))
        await store.get_key("k1")
    finally:
        await store.close()
    assert seen and all(name.startswith("gateway-sqlite") for name in seen)
    assert threading.current_thread().name not in seen
