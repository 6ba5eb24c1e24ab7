"""The verified-key cache: hits cost no store call, entries live `cache_ttl`, unknown keys are
remembered in a bounded LRU, one lookup per key at a time, and a store outage is survived by cached
keys up to `max_stale` while unknown keys get 503."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.keys.format import generate
from gateway.store import StoreUnavailable
from tests.helpers.gateway import RunningGateway

from .conftest import Start
from .support import bearer, call, count_store_calls, new_key, problem


async def test_a_cached_key_makes_no_store_call(gw: RunningGateway) -> None:
    _, key = await new_key(gw)
    calls = count_store_calls(gw.services.store)
    for _ in range(20):
        assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert calls["find_by_digests"] == 1
    assert calls.counts == {"find_by_digests": 1}


async def test_positive_entries_expire_after_cache_ttl(start: Start, clock: FakeClock) -> None:
    gw = await start(keys={"cache_ttl": "10s"})
    _, key = await new_key(gw)
    calls = count_store_calls(gw.services.store)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    clock.advance(9.9)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert calls["find_by_digests"] == 1
    clock.advance(0.1)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert calls["find_by_digests"] == 2
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert calls["find_by_digests"] == 2


async def test_a_refreshed_key_keeps_its_entry_unless_it_changed(start: Start, clock: FakeClock) -> None:
    """Unchanged (the last-used time aside), the cached entry is kept: no new long-lived objects per
    key and TTL. A change made elsewhere (here straight in the store) is picked up with a new one."""
    from datetime import UTC, datetime

    gw = await start(keys={"cache_ttl": "10s"})
    rec, key = await new_key(gw, scopes=["orders:read"])
    cache = gw.services.cache
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    [first] = [e for e in cache.positive.values() if e.record.id == rec.id]
    await gw.services.store.touch({rec.id: datetime.now(UTC)})
    clock.advance(10)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    [second] = [e for e in cache.positive.values() if e.record.id == rec.id]
    assert second is first and second.fetched == clock.time()
    stored = await gw.services.store.get_key(rec.id)
    assert stored is not None
    stored.scopes = ("orders:read", "orders:write")
    await gw.services.store.update_key(stored, None)  # as another process would: no local invalidation
    clock.advance(10)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    [third] = [e for e in cache.positive.values() if e.record.id == rec.id]
    assert third is not first and third.granted == {"orders:read", "orders:write"}


async def test_a_cached_key_leaves_few_objects_for_the_garbage_collector(gw: RunningGateway) -> None:
    """With 10^5 keys, every full collection walks each key's cached state: its lists of scopes,
    addresses and limits are tuples of strings (untracked once a collection has seen them), and
    keys with the same scopes share one set of them."""
    import gc

    first, key1 = await new_key(gw, scopes=["orders:read"], allow_ips=["127.0.0.0/8"], limits=["50/second"])
    second, key2 = await new_key(gw, scopes=["orders:read"], allow_ips=["127.0.0.0/8"], limits=["50/second"])
    for key in (key1, key2):
        assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    entries = {e.record.id: e for e in gw.services.cache.positive.values()}
    a, b = entries[first.id], entries[second.id]
    gc.collect()
    for field in (a.record.scopes, a.record.allow_ips, a.record.limits):
        assert field and not gc.is_tracked(field), field  # empty tuples are never tracked: not a test
    assert a.granted is b.granted and a.networks is b.networks


def test_cache_ttl_is_capped_at_30s() -> None:
    from pydantic import ValidationError

    from gateway.config.schema import KeysConfig

    with pytest.raises(ValidationError, match="at most 30s"):
        KeysConfig.model_validate({"cache_ttl": "31s"})


async def test_negative_cache_is_bounded(start: Start, clock: FakeClock) -> None:
    gw = await start(keys={"negative_cache_size": 5, "negative_ttl": "60s"})
    cache = gw.services.cache
    calls = count_store_calls(gw.services.store)
    unknown = [generate("sk", "live") for _ in range(20)]
    for i, key in enumerate(unknown):
        problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
        assert len(cache.negative) == min(i + 1, 5)
    assert calls["find_by_digests"] == 20
    # the 5 most recent are remembered: no store call for them within negative_ttl
    for key in unknown[-5:]:
        problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    assert calls["find_by_digests"] == 20
    # an older one was evicted: it costs a lookup again
    problem(await call(gw, "GET", "/any/x", bearer(unknown[0])), 401, "invalid_api_key")
    assert calls["find_by_digests"] == 21
    assert len(cache.negative) == 5
    # and remembered entries expire after negative_ttl
    clock.advance(61)
    problem(await call(gw, "GET", "/any/x", bearer(unknown[-1])), 401, "invalid_api_key")
    assert calls["find_by_digests"] == 22


async def test_a_key_created_after_it_was_remembered_unknown_works_after_negative_ttl(
    start: Start, clock: FakeClock
) -> None:
    gw = await start(keys={"negative_ttl": "5s"})
    _, key = await new_key(gw)
    store = gw.services.store
    real = store.find_by_digests

    async def missing(digests: list[bytes]) -> Any:
        return None

    store.find_by_digests = missing  # type: ignore[method-assign]
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    store.find_by_digests = real  # type: ignore[method-assign]
    problem(await call(gw, "GET", "/any/x", bearer(key)), 401, "invalid_api_key")
    clock.advance(5)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200


async def test_single_flight(gw: RunningGateway) -> None:
    _, key = await new_key(gw)
    store = gw.services.store
    calls = count_store_calls(store)
    lookup = store.find_by_digests

    async def slow(digests: list[bytes]) -> Any:
        await asyncio.sleep(0.2)  # every request arrives while the first lookup is still running
        return await lookup(digests)

    store.find_by_digests = slow  # type: ignore[method-assign]
    results = await asyncio.gather(*(call(gw, "GET", f"/any/{i}", bearer(key)) for i in range(50)))
    assert [r.status for r in results] == [200] * 50
    assert calls["find_by_digests"] == 1
    assert gw.services.cache.store_calls == 1
    # unknown keys too: one lookup for 50 concurrent requests
    unknown = generate("sk", "test")
    results = await asyncio.gather(*(call(gw, "GET", f"/any/{i}", bearer(unknown)) for i in range(50)))
    assert {r.status for r in results} == {401}
    assert calls["find_by_digests"] == 2


async def _store_down(gw: RunningGateway) -> None:
    async def down(digests: list[bytes]) -> Any:
        raise StoreUnavailable("test: the store is down")

    gw.services.store.find_by_digests = down  # type: ignore[method-assign]


async def test_store_down_serves_cached_keys_up_to_max_stale(start: Start, clock: FakeClock) -> None:
    gw = await start(keys={"cache_ttl": "10s", "max_stale": "60s"})
    _, key = await new_key(gw)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    await _store_down(gw)
    clock.advance(30)  # past cache_ttl: the store is asked, fails, the stale entry serves
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    clock.advance(29.9)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    assert gw.services.metrics.registry.get_sample_value("gateway_key_store_up") == 0
    clock.advance(0.1)  # max_stale after the last successful read
    r = await call(gw, "GET", "/any/x", bearer(key))
    problem(r, 503, "service_unavailable")


async def test_store_down_unknown_keys_get_503(gw: RunningGateway, up: Any) -> None:
    await _store_down(gw)
    key = generate("sk", "live")
    problem(await call(gw, "GET", "/any/x", bearer(key)), 503, "service_unavailable")
    # malformed keys still need no store: 401, not 503
    problem(await call(gw, "GET", "/any/x", bearer("sk_live_x")), 401, "invalid_api_key")
    assert not up.requests


async def test_store_down_with_a_closed_store(gw: RunningGateway) -> None:
    """The real failure: the store's connection is gone."""
    await gw.services.store.close()
    problem(await call(gw, "GET", "/any/x", bearer(generate("sk", "live"))), 503, "service_unavailable")
    await gw.services.store.open()
    _, key = await new_key(gw)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
