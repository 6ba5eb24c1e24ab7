"""Lifecycle on a fake clock: expiry and its defaults, Sunset near the end, rotation with a grace
that never outlives the old key, revocation at once, and last_used_at without per-request writes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from gateway.clock import FakeClock
from gateway.keys.changes import PAGE, KeyChanges
from gateway.keys.model import AuditEntry
from gateway.keys.service import KeyService
from gateway.metrics import Metrics
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import bearer, call, cli, count_store_calls, metric, new_key, problem

DAY = 86400.0
HTTP_DATE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
    r"\d{2}:\d{2}:\d{2} GMT$"
)


def sunset_of(value: str | None) -> datetime:
    assert value is not None and HTTP_DATE.match(value), value
    return parsedate_to_datetime(value)


async def status(gw: RunningGateway, key: str) -> int:
    return (await call(gw, "GET", "/any/x", bearer(key))).status


async def test_default_ttl_is_90_days(gw: RunningGateway, clock: FakeClock) -> None:
    rec, key = await new_key(gw)
    assert rec.expires_at == clock.now() + timedelta(days=90)
    assert rec.public()["expires_at"] == (clock.now() + timedelta(days=90)).isoformat().replace("+00:00", "Z")
    clock.advance(90 * DAY - 1)
    assert await status(gw, key) == 200
    clock.advance(1)
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "expired_api_key")
    assert (await gw.services.keys.get(rec.id)).display_status(clock.now()) == "expired"


async def test_ttl_and_no_expiry(gw: RunningGateway, clock: FakeClock) -> None:
    short, short_key = await new_key(gw, ttl="30d")
    forever, forever_key = await new_key(gw, no_expiry=True)
    assert short.expires_at == clock.now() + timedelta(days=30)
    assert forever.expires_at is None and forever.public()["expires_at"] is None
    clock.advance(30 * DAY)
    problem(await call(gw, "GET", "/any/x", bearer(short_key)), 401, "expired_api_key")
    clock.advance(3650 * DAY)
    r = await call(gw, "GET", "/any/x", bearer(forever_key))
    assert r.status == 200
    assert r.header("sunset") is None


async def test_default_ttl_none(start: Start, clock: FakeClock) -> None:
    gw = await start(keys={"default_ttl": "none"})
    rec, _key = await new_key(gw)
    assert rec.expires_at is None
    rec2, _ = await new_key(gw, ttl="1d")
    assert rec2.expires_at == clock.now() + timedelta(days=1)


async def test_sunset_within_warn_before(gw: RunningGateway, clock: FakeClock) -> None:
    rec, key = await new_key(gw, ttl="30d")
    assert rec.expires_at is not None
    r = await call(gw, "GET", "/any/x", bearer(key))
    assert r.status == 200 and r.header("sunset") is None
    clock.advance(23 * DAY - 1)  # 7 days and a second before the end
    r = await call(gw, "GET", "/any/x", bearer(key))
    assert r.status == 200 and r.header("sunset") is None
    clock.advance(1)
    r = await call(gw, "GET", "/any/x", bearer(key))
    assert r.status == 200
    assert sunset_of(r.header("sunset")) == rec.expires_at.replace(microsecond=0)
    # errors after authentication carry it too
    r = await call(gw, "POST", "/orders", bearer(key), b"{}")
    assert r.status == 403 and sunset_of(r.header("sunset")) == rec.expires_at.replace(microsecond=0)


async def test_warn_before_is_configurable(start: Start, clock: FakeClock) -> None:
    gw = await start(keys={"warn_before": "1d"})
    _, key = await new_key(gw, ttl="3d")
    clock.advance(2 * DAY - 60)
    assert (await call(gw, "GET", "/any/x", bearer(key))).header("sunset") is None
    clock.advance(60)
    assert (await call(gw, "GET", "/any/x", bearer(key))).header("sunset") is not None


async def test_rotation(gw: RunningGateway, clock: FakeClock, up: RecordingUpstream) -> None:
    old, old_key = await new_key(gw, "bob", name="ci", env="test", scopes=["orders:read", "reports:*"],
                                 allow_ips=["127.0.0.0/8", "2001:db8::/32"], limits=["1000/minute", "50000/day"])
    assert await status(gw, old_key) == 200  # cached before the rotation
    new, new_key_raw, previous = await gw.services.keys.rotate(old.id, grace="1h")
    assert new_key_raw != old_key and new.id != old.id
    for field in ("owner", "name", "env", "scopes", "allow_ips", "limits"):
        assert getattr(new, field) == getattr(old, field), field
    assert new.rotated_from == old.id and previous.rotated_to == new.id
    grace_end = clock.now() + timedelta(hours=1)
    stored_old = await gw.services.keys.get(old.id)
    assert stored_old.grace_until == grace_end and stored_old.rotated_to == new.id
    assert stored_old.public()["status"] == "rotating"

    rotated = metric(gw, "gateway_rotated_key_requests_total")
    r = await call(gw, "GET", "/orders/1", bearer(old_key))
    assert r.status == 200
    assert sunset_of(r.header("sunset")) == grace_end
    assert metric(gw, "gateway_rotated_key_requests_total") == rotated + 1
    r = await call(gw, "GET", "/orders/1", bearer(new_key_raw))
    assert r.status == 200 and r.header("sunset") is None
    assert metric(gw, "gateway_rotated_key_requests_total") == rotated + 1
    assert [q.header("x-credential-identifier") for q in up.requests[-2:]] == [old.id, new.id]
    assert up.requests[-1].header("x-consumer-id") == "bob"

    clock.advance(3600 - 1)
    r = await call(gw, "GET", "/any/x", bearer(old_key))
    assert r.status == 200 and r.header("sunset")
    clock.advance(1)
    problem(await call(gw, "GET", "/any/x", bearer(old_key)), 401, "expired_api_key")
    assert await status(gw, new_key_raw) == 200
    assert metric(gw, "gateway_rotated_key_requests_total") == rotated + 2


async def test_rotation_grace_never_outlives_the_old_key(gw: RunningGateway, clock: FakeClock) -> None:
    old, old_key = await new_key(gw, ttl="2h")
    assert old.expires_at is not None
    clock.advance(3600)
    new, new_raw, _ = await gw.services.keys.rotate(old.id, grace="24h")
    r = await call(gw, "GET", "/any/x", bearer(old_key))
    assert r.status == 200
    assert sunset_of(r.header("sunset")) == old.expires_at.replace(microsecond=0)
    clock.advance(3600)
    problem(await call(gw, "GET", "/any/x", bearer(old_key)), 401, "expired_api_key")
    assert await status(gw, new_raw) == 200
    assert new.expires_at == clock.now() - timedelta(hours=1) + timedelta(days=90)


async def test_rotation_with_no_grace_ends_the_old_key_at_once(gw: RunningGateway) -> None:
    old, old_key = await new_key(gw)
    assert await status(gw, old_key) == 200
    _, new_raw, _ = await gw.services.keys.rotate(old.id, grace="0s")
    problem(await call(gw, "GET", "/any/x", bearer(old_key)), 401, "expired_api_key")
    assert await status(gw, new_raw) == 200


async def test_revocation_is_effective_on_the_next_request(gw: RunningGateway, up: RecordingUpstream) -> None:
    rec, key = await new_key(gw)
    for _ in range(3):
        assert await status(gw, key) == 200
    assert gw.services.cache.fresh(gw.services.peppers.current.digest(key.encode()), gw.services.clock.time())
    await gw.services.keys.revoke(rec.id, reason="leaked")
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert len(up.requests) == 3
    stored = await gw.services.keys.get(rec.id)
    assert stored.status == "revoked" and stored.revoke_reason == "leaked"


async def test_revocation_in_another_process_reaches_this_one_at_its_next_key_sync(
    start: Start, clock: FakeClock, config_file: Path
) -> None:
    gw = await start(keys={"cache_ttl": "10s"})
    rec, key = await new_key(gw)
    _, other_key = await new_key(gw)
    changes = gw.services.key_changes
    await changes.poll()  # where this process starts reading
    assert await status(gw, key) == 200 and await status(gw, other_key) == 200
    run = await cli(config_file, "keys", "revoke", rec.id, "--reason", "rotated out")
    assert run.code == 0, run.err
    assert await status(gw, key) == 200  # still cached: nothing read the change yet
    await changes.poll()  # the next sync, every keys.sync_interval; no cache expiry needed
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert await status(gw, other_key) == 200
    assert metric(gw, "gateway_key_change_propagation_seconds_count") == 1


async def test_key_sync_forgets_each_change_once(gw: RunningGateway) -> None:
    """A key is forgotten once per change, not at every poll: each forgetting costs a store read."""
    changes = gw.services.key_changes
    await changes.poll()
    rec, key = await new_key(gw)
    await gw.services.keys.update(rec.id, name="renamed")
    await changes.poll()
    assert metric(gw, "gateway_key_change_propagation_seconds_count") == 2  # the create and the update
    calls = count_store_calls(gw.services.store)
    assert await status(gw, key) == 200
    for _ in range(3):
        await changes.poll()
        assert await status(gw, key) == 200
    assert calls["find_by_digests"] == 1  # read once after the update, then cached throughout
    assert metric(gw, "gateway_key_change_propagation_seconds_count") == 2


async def test_key_sync_sees_a_revocation_behind_a_burst_of_changes(gw: RunningGateway) -> None:
    """More entries than one page since the last poll (a bulk import): all are read, by id."""
    changes = gw.services.key_changes
    rec, key = await new_key(gw)
    await changes.poll()
    assert await status(gw, key) == 200
    for i in range(PAGE + 5):
        await gw.services.store.add_audit(AuditEntry("note", "test", "", f"key_{i}", {}, at=gw.services.clock.now()))
    await KeyService(gw.services.store, gw.services.peppers, "sk", gw.services.clock, None).revoke(rec.id)
    assert await status(gw, key) == 200  # another process revoked it: still cached here
    await changes.poll()
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert changes.gaps == {}


async def revoke_behind_a_later_commit(gw: RunningGateway, revoked: str, other: str, changes: KeyChanges) -> None:
    """PostgreSQL: a revocation's audit id taken, a later id committed and polled past while the
    revocation's transaction is still open (the poll records one gap), then the revocation commits."""
    async with gw.services.store._connection() as conn, conn.transaction():  # type: ignore[attr-defined]
        await conn.execute("UPDATE api_keys SET status = 'revoked' WHERE id = $1", revoked)
        await conn.execute(
            "INSERT INTO audit_log (at, action, actor, source_ip, key_id) VALUES (now(), 'revoke', 'test', '', $1)",
            revoked,
        )
        await gw.services.keys.update(other, name="later")  # a later id, committed first
        await changes.poll()
        assert len(changes.gaps) == 1


async def test_a_first_key_sync_sees_an_entry_committed_after_it_started(gw: RunningGateway, backend: str) -> None:
    """The first poll starts from the newest id; a lower one still uncommitted then (PostgreSQL) is
    looked up until it appears, like any id skipped later."""
    if backend != "postgres":
        pytest.skip("SQLite commits ids in order")
    rec, key = await new_key(gw)
    other, _ = await new_key(gw)
    assert await status(gw, key) == 200
    store = gw.services.store
    changes = KeyChanges(store, gw.services.cache, gw.services.clock, Metrics(), 0.25)  # a process starting
    await revoke_behind_a_later_commit(gw, rec.id, other.id, changes)
    await changes.poll()
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert changes.gaps == {}


async def request_during_a_held_read(gw: RunningGateway, key: str, meanwhile: Callable[[], Awaitable[None]]) -> int:
    """A request whose store read of its key is held, once done, until `meanwhile` has run."""
    store = gw.services.store
    real = store.find_by_digests
    read, go = asyncio.Event(), asyncio.Event()

    async def held(digests: list[bytes]) -> object:
        record = await real(digests)
        read.set()
        await go.wait()
        return record

    store.find_by_digests = held  # type: ignore[method-assign]
    try:
        first = asyncio.ensure_future(status(gw, key))
        await read.wait()
        await meanwhile()
        go.set()
        return await first
    finally:
        store.find_by_digests = real  # type: ignore[method-assign]


async def test_a_lookup_under_way_while_a_key_changes_is_not_cached(gw: RunningGateway) -> None:
    """The store read began before a revocation made elsewhere, the sync forgot the key meanwhile:
    what the read returns may predate the revocation, so it serves its own request only."""
    changes = gw.services.key_changes
    rec, key = await new_key(gw)
    await changes.poll()

    async def revoked_elsewhere() -> None:
        await KeyService(gw.services.store, gw.services.peppers, "sk", gw.services.clock, None).revoke(rec.id)
        await changes.poll()

    assert await request_during_a_held_read(gw, key, revoked_elsewhere) == 200  # it began before
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")


async def test_a_lookup_under_way_while_another_key_changes_is_cached(gw: RunningGateway) -> None:
    """Only a change to the key being read keeps its read out of the cache: with changes to other keys
    arriving all the time, a slow store must still cache."""
    _, key = await new_key(gw)
    other, _ = await new_key(gw)

    async def another_changed() -> None:
        gw.services.cache.invalidate(other.id)

    assert await request_during_a_held_read(gw, key, another_changed) == 200
    calls = count_store_calls(gw.services.store)
    assert await status(gw, key) == 200
    assert calls["find_by_digests"] == 0  # cached by the first read
    assert gw.services.cache.changed == {}  # nothing remembered once no read is under way


async def test_key_sync_reads_an_entry_committed_after_a_later_one(gw: RunningGateway, backend: str) -> None:
    """PostgreSQL hands out ids before commit: the revocation's id is read past while its transaction
    is open, and must still be applied once it commits."""
    if backend != "postgres":
        pytest.skip("SQLite commits ids in order")
    changes = gw.services.key_changes
    rec, key = await new_key(gw)
    other, _ = await new_key(gw)
    await changes.poll()
    assert await status(gw, key) == 200
    await revoke_behind_a_later_commit(gw, rec.id, other.id, changes)
    assert await status(gw, key) == 200  # cached: the poll could not see the revocation yet
    await changes.poll()
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert changes.gaps == {}


async def test_last_used_without_a_write_per_request(gw: RunningGateway, clock: FakeClock, config_file: Path) -> None:
    rec, key = await new_key(gw)
    calls = count_store_calls(gw.services.store)
    for _ in range(25):
        assert await status(gw, key) == 200
        clock.advance(1)
    assert calls.writes == 0
    assert (await gw.services.keys.get(rec.id)).last_used_at is None
    await gw.services.flush_last_used()
    assert calls["touch"] == 1 and calls.writes == 1
    await gw.services.flush_last_used()  # nothing new: no write
    assert calls.writes == 1
    last = datetime.fromtimestamp(clock.time() - 1, UTC)
    assert (await gw.services.keys.get(rec.id)).last_used_at == last
    shown = await cli(config_file, "keys", "show", rec.id, "--json")
    assert shown.code == 0, shown.err
    assert shown.json()["last_used_at"] == last.isoformat().replace("+00:00", "Z")


async def test_a_change_interleaved_with_a_revoke_does_not_undo_it(gw: RunningGateway) -> None:
    """An admin PATCH reads the key, a revoke lands, the PATCH writes: the key must stay revoked."""
    rec, key = await new_key(gw, scopes=["orders:read"])
    store = gw.services.store
    real_get = store.get_key
    gate = asyncio.Event()
    first = True

    async def slow_first_read(key_id: str) -> object:
        nonlocal first
        record = await real_get(key_id)
        if first:
            first = False
            await gate.wait()
        return record

    store.get_key = slow_first_read  # type: ignore[method-assign]
    update = asyncio.create_task(gw.services.keys.update(rec.id, scopes=["orders:write"]))
    await asyncio.sleep(0.05)
    revoke = asyncio.create_task(gw.services.keys.revoke(rec.id, reason="leaked"))
    await asyncio.sleep(0.05)
    gate.set()
    await update
    await revoke
    store.get_key = real_get  # type: ignore[method-assign]
    stored = await gw.services.keys.get(rec.id)
    assert stored.status == "revoked" and stored.scopes == ("orders:write",)
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")

    # and a rotation interleaved with a revoke leaves the old key revoked
    rec, key = await new_key(gw)
    first = True
    gate.clear()
    store.get_key = slow_first_read  # type: ignore[method-assign]
    rotate = asyncio.create_task(gw.services.keys.rotate(rec.id, grace="1h"))
    await asyncio.sleep(0.05)
    revoke = asyncio.create_task(gw.services.keys.revoke(rec.id))
    await asyncio.sleep(0.05)
    gate.set()
    _, new_raw, _ = await rotate
    await revoke
    store.get_key = real_get  # type: ignore[method-assign]
    assert (await gw.services.keys.get(rec.id)).status == "revoked"
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert await status(gw, new_raw) == 200


async def test_last_used_of_many_keys_is_written_in_chunks_and_a_failed_chunk_is_kept(
    gw: RunningGateway, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written a chunk at a time, so neither the event loop nor the store's thread is held long."""
    from gateway.services import TOUCH_CHUNK
    from gateway.store import StoreUnavailable

    recs = [(await new_key(gw))[0] for _ in range(3)]
    services = gw.services
    now = clock.time()
    ids = [r.id for r in recs] + [f"key_absent{i:05d}" for i in range(2 * TOUCH_CHUNK)]  # 2 chunks + 3
    services.key_auth.last_used = dict.fromkeys(ids, now)
    store = services.store
    real_touch = store.touch
    chunks: list[int] = []

    async def touch(batch: dict[str, datetime]) -> None:
        chunks.append(len(batch))
        if len(chunks) == 2:
            raise StoreUnavailable("down for a moment")
        await real_touch(batch)

    monkeypatch.setattr(store, "touch", touch)
    await services.flush_last_used()
    assert chunks == [TOUCH_CHUNK, TOUCH_CHUNK]
    assert sorted(services.key_auth.last_used) == sorted(ids[TOUCH_CHUNK:])  # kept for the next try
    assert (await services.keys.get(recs[0].id)).last_used_at == datetime.fromtimestamp(now, UTC)  # type: ignore[union-attr]
    await services.flush_last_used()
    assert chunks == [TOUCH_CHUNK, TOUCH_CHUNK, TOUCH_CHUNK, 3] and not services.key_auth.last_used
