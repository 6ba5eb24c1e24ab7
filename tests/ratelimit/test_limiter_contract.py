"""The limiter contract, run on every backend: memory, memory as `--workers N` reaches it (shared),
and Redis with the script told the fake time.

Exactness, atomicity across several limits, the sliding window (no 2x burst at a window's edge),
Retry-After that is never early, sane reset times, and the same decisions from both backends.
Then what only one backend has: Redis keys expire and carry the owner's hash tag, concurrent Redis
calls share round trips, the memory limiter's state is bounded.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.http.exchange import Exchange
from gateway.keys.cache import CachedKey
from gateway.keys.model import KeyRecord
from gateway.metrics import Metrics
from gateway.ratelimit.base import Counters
from gateway.ratelimit.policy import BUCKETS, Decision, Limit, Outcome
from gateway.stages.ratelimit import RateLimitStage

from .conftest import Backend, MemoryBackend, MsClock, RedisBackend, counters, unique_owner

SECOND, MINUTE, HOUR = 1, 60, 3600


def lim(count: int, period: int, name: str | None = None) -> Limit:
    return Limit(name or {1: "second", 60: "minute", 3600: "hour"}[period], count, period)


def outcome_of(d: Decision, name: str) -> Outcome:
    [o] = [o for o in d.outcomes if o.limit.name == name]
    return o


async def hits(b: Backend, c: Counters, n: int) -> list[Decision]:
    return [await b.hit(c) for _ in range(n)]


# --- the contract, on both backends -------------------------------------------------------------------


async def test_exactly_n_of_n_plus_k(backend: Backend) -> None:
    c = counters(unique_owner(), lim(7, MINUTE))
    decisions = await hits(backend, c, 10)
    assert [d.allowed for d in decisions] == [True] * 7 + [False] * 3
    assert [d.outcomes[0].remaining for d in decisions] == [6, 5, 4, 3, 2, 1, 0, 0, 0, 0]
    for d in decisions[7:]:
        assert d.violated() == d.outcomes
        assert d.outcomes[0].retry_after > 0
    for d in decisions[:7]:
        assert d.violated() == []
        assert d.outcomes[0].retry_after == 0


async def test_a_refused_hit_consumes_from_no_limit(backend: Backend) -> None:
    owner = unique_owner()
    tight, loose = lim(3, MINUTE, "tight"), lim(10, MINUTE, "loose")
    both = counters(owner, tight, loose)
    for expected in (2, 1, 0):
        d = await backend.hit(both)
        assert d.allowed
        assert outcome_of(d, "tight").remaining == expected
    assert outcome_of(d, "loose").remaining == 7
    for _ in range(5):
        d = await backend.hit(both)
        assert not d.allowed
        assert [o.limit.name for o in d.violated()] == ["tight"]
        assert outcome_of(d, "loose").remaining == 7, "a refused request took from the limit that admitted it"
        assert outcome_of(d, "loose").retry_after == 0
    # the loose counter on its own: still 7 left, so the refusals really took nothing
    d = await backend.hit(counters(owner, loose))
    assert d.allowed and d.outcomes[0].remaining == 6


async def test_multi_window_each_limit_reports_its_own_state(backend: Backend) -> None:
    c = counters(unique_owner(), lim(10, SECOND), lim(100, MINUTE))
    start = backend.clock.ms
    admitted = 0
    for second in range(10):
        backend.clock.set_ms(start + second * 1100)  # past one second and one sub-window: a fresh second
        for i in range(10):
            d = await backend.hit(c)
            assert d.allowed
            admitted += 1
            assert outcome_of(d, "second").remaining == 9 - i
            assert outcome_of(d, "minute").remaining == 100 - admitted
        if second < 9:
            # the 11th in this second: the per-second limit refuses, the minute keeps its count
            d = await backend.hit(c)
            assert not d.allowed
            assert [o.limit.name for o in d.violated()] == ["second"]
            assert outcome_of(d, "second").remaining == 0
            assert outcome_of(d, "minute").remaining == 100 - admitted
            assert 0 < outcome_of(d, "second").retry_after <= 1 + 1 / BUCKETS
    # 100 in the minute: now the minute refuses although the second has room again
    backend.clock.advance_ms(1100)
    d = await backend.hit(c)
    assert not d.allowed
    assert [o.limit.name for o in d.violated()] == ["minute"]
    assert outcome_of(d, "second").remaining == 10
    assert outcome_of(d, "minute").remaining == 0
    assert outcome_of(d, "second").retry_after == 0
    assert outcome_of(d, "minute").retry_after > 30


async def test_no_double_burst_at_the_window_edge(backend: Backend) -> None:
    n = 10
    c = counters(unique_owner(), lim(n, MINUTE))
    t0 = backend.clock.ms
    assert t0 % 60_000 == 0, "the test starts on a minute boundary"
    backend.clock.set_ms(t0 + 59_900)
    assert all(d.allowed for d in await hits(backend, c, n))
    backend.clock.set_ms(t0 + 60_100)
    second = await hits(backend, c, n)
    assert not any(d.allowed for d in second), "a fixed window would admit a second burst here"
    # Capacity comes back once the burst has slid out: after a period plus at most one sub-window.
    backend.clock.set_ms(t0 + 59_900 + 60_000 + 60_000 // BUCKETS)
    again = await hits(backend, c, n + 1)
    assert [d.allowed for d in again] == [True] * n + [False]


async def test_capacity_returns_gradually_as_the_window_slides(backend: Backend) -> None:
    c = counters(unique_owner(), lim(6, MINUTE))
    t0 = backend.clock.ms
    for at in (0, 0, 20_000, 20_000, 40_000, 40_000):
        backend.clock.set_ms(t0 + at)
        assert (await backend.hit(c)).allowed
    backend.clock.set_ms(t0 + 50_000)
    assert not (await backend.hit(c)).allowed
    # the two from t0 leave first: exactly two slots, no more
    backend.clock.set_ms(t0 + 63_000)
    assert [d.allowed for d in await hits(backend, c, 3)] == [True, True, False]
    backend.clock.set_ms(t0 + 83_000)
    assert [d.allowed for d in await hits(backend, c, 3)] == [True, True, False]


async def test_retry_after_is_never_early(backend: Backend) -> None:
    c = counters(unique_owner(), lim(5, MINUTE), lim(3, SECOND))
    t0 = backend.clock.ms
    for at in (0, 10_000, 10_000, 30_000, 30_000):
        backend.clock.set_ms(t0 + at + 7)
        assert (await backend.hit(c)).allowed
    backend.clock.set_ms(t0 + 40_123)
    d = await backend.hit(c)
    assert not d.allowed
    retry_ms = round(outcome_of(d, "minute").retry_after * 1000)
    assert retry_ms > 0
    assert d.retry_after >= retry_ms / 1000, "Retry-After (whole seconds) must not round down"
    refused_at = backend.clock.ms
    backend.clock.set_ms(refused_at + retry_ms - 1)
    assert not (await backend.hit(c)).allowed, "admitted before retry_after said it would be"
    backend.clock.set_ms(refused_at + retry_ms)
    assert (await backend.hit(c)).allowed, "retry_after was later than needed"
    # and a per-second limit's retry, likewise exact
    c2 = counters(unique_owner(), lim(3, SECOND))
    backend.clock.set_ms(t0 + 100_031)
    await hits(backend, c2, 3)
    backend.clock.advance_ms(400)
    d = await backend.hit(c2)
    assert not d.allowed
    retry_ms = round(d.outcomes[0].retry_after * 1000)
    at = backend.clock.ms
    backend.clock.set_ms(at + retry_ms - 1)
    assert not (await backend.hit(c2)).allowed
    backend.clock.set_ms(at + retry_ms)
    assert (await backend.hit(c2)).allowed


async def test_retry_after_exact_on_random_traffic(backend: Backend) -> None:
    """Whenever a hit is refused, it is refused up to retry_after - 1 ms and admitted at retry_after."""
    rnd = random.Random(20240601)
    c = counters(unique_owner(), lim(4, SECOND), lim(12, MINUTE))
    checked = 0
    for _ in range(150):
        backend.clock.advance_ms(rnd.randint(0, 900))
        d = await backend.hit(c)
        if d.allowed:
            continue
        retry_ms = max(round(o.retry_after * 1000) for o in d.violated())
        at = backend.clock.ms
        backend.clock.set_ms(at + retry_ms - 1)
        assert not (await backend.hit(c)).allowed, (at, retry_ms)
        backend.clock.set_ms(at + retry_ms)
        assert (await backend.hit(c)).allowed, (at, retry_ms)
        checked += 1
    assert checked > 10


async def test_reset_is_sane(backend: Backend) -> None:
    rnd = random.Random(7)
    c = counters(unique_owner(), lim(5, SECOND), lim(50, MINUTE), lim(500, HOUR))
    for _ in range(300):
        backend.clock.advance_ms(rnd.randint(0, 400))
        d = await backend.hit(c)
        for o in d.outcomes:
            period = o.limit.period
            if o.remaining < o.limit.count:  # something counted: a reset is ahead
                assert 0 < o.reset <= period + period / BUCKETS, (o, d.allowed)
            else:
                assert 0 <= o.reset <= period + period / BUCKETS, o
            assert 0 <= o.remaining <= o.limit.count
            if not d.allowed and o.retry_after > 0:
                assert 0 < o.retry_after <= period + period / BUCKETS


async def test_a_clock_stepping_back_never_frees_a_slot_early(backend: Backend) -> None:
    """A hit the clock places before the newest sub-window (an NTP step back) counts in the newest:
    its slot frees with that one, not with the earlier sub-window it named."""
    clock = backend.clock
    width = 1000 // BUCKETS
    clock.set_ms(clock.ms // width * width)  # at the start of a sub-window
    start = clock.ms
    c = counters(unique_owner(), lim(3, SECOND))
    assert (await backend.hit(c)).allowed  # sub-window 0
    clock.set_ms(start + 14 * width)
    assert (await backend.hit(c)).allowed  # sub-window 14
    clock.set_ms(start + 2 * width)
    assert (await backend.hit(c)).allowed  # the clock says sub-window 2: counted in 14
    # Sub-windows 0 and 2 have left the window, 14 has not: two hits are still counted.
    clock.set_ms(start + (BUCKETS + 3) * width)
    d = await backend.hit(c)
    assert d.allowed and d.outcomes[0].remaining == 0
    assert not (await backend.hit(c)).allowed


async def test_no_window_of_a_period_ever_admits_more_than_the_limit(backend: Backend) -> None:
    """The sliding window's guarantee, and its bound on the other side: a refusal means the last
    period plus at most one sub-window already holds the limit."""
    rnd = random.Random(99)
    n, period_ms = 8, 60_000
    width = period_ms // BUCKETS
    c = counters(unique_owner(), lim(n, MINUTE))
    admitted: list[int] = []
    for _ in range(400):
        backend.clock.advance_ms(rnd.choice([0, 0, 50, 400, 1500, 4000, 9000]))
        now = backend.clock.ms
        d = await backend.hit(c)
        if d.allowed:
            admitted.append(now)
            assert sum(1 for t in admitted if t > now - period_ms) <= n
        else:
            assert sum(1 for t in admitted if t > now - period_ms - width) >= n
    assert len(admitted) > 3 * n


async def test_cost_counts_as_that_many_hits(backend: Backend) -> None:
    c = counters(unique_owner(), lim(10, MINUTE))
    assert (await backend.hit(c, cost=4)).outcomes[0].remaining == 6
    assert (await backend.hit(c, cost=6)).outcomes[0].remaining == 0
    d = await backend.hit(c, cost=1)
    assert not d.allowed


# --- both backends, one sequence -------------------------------------------------------------------------


def _view(d: Decision) -> tuple[Any, ...]:
    return (d.allowed, [(o.limit.name, o.remaining, round(o.reset * 1000), round(o.retry_after * 1000))
                        for o in d.outcomes])


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_memory_and_redis_decide_identically(redis_url: str, seed: int) -> None:
    rnd = random.Random(seed)
    mem = MemoryBackend(MsClock())
    red = RedisBackend(MsClock(), redis_url)
    owners = {b.name: unique_owner() for b in (mem, red)}

    def plan(b: Backend, which: int) -> Counters:
        o = owners[b.name]
        own = counters(o, lim(3, SECOND), lim(20, MINUTE), key=f"k{which}")
        return Counters((*own.keys, f"rl:{{{o}}}:o:owner-minute"), (*own.limits, lim(30, MINUTE, "owner-minute")))

    try:
        for step in range(400):
            advance = rnd.choice([0, 0, 0, 30, 120, 700, 2500, 9000, -40, -700, -3000])  # the clock may step back
            which, cost = rnd.randint(1, 3), rnd.choice([1, 1, 1, 2])
            for b in (mem, red):
                b.clock.advance_ms(advance)
            dm = await mem.hit(plan(mem, which), cost)
            dr = await red.hit(plan(red, which), cost)
            assert _view(dm) == _view(dr), f"step {step}"
        client = aioredis.Redis.from_url(redis_url)
        try:
            stored = [k async for k in client.scan_iter(match=f"*{{{owners['redis']}}}*")]
            assert stored
            for k in stored:
                await _assert_summary_matches(client, k)
        finally:
            await client.aclose()
    finally:
        await red.close()


async def _assert_summary_matches(client: aioredis.Redis, key: bytes | str) -> dict[int, int]:
    """A Redis counter's fields '-1', '-2' and '-3' are the total, the oldest and the newest of its
    sub-windows (the fields numbered from 0); returns the sub-windows."""
    fields = await client.hgetall(key)
    windows = {int(f): int(v) for f, v in fields.items() if int(f) >= 0}
    assert windows, (key, fields)
    assert int(fields[b"-1"]) == sum(windows.values()), (key, fields)
    assert int(fields[b"-2"]) == min(windows), (key, fields)
    assert int(fields[b"-3"]) == max(windows), (key, fields)
    return windows


# The script as the previous release ran it, kept to check that both can share counters while a fleet
# is upgraded one gateway at a time.
PREVIOUS_SCRIPT = (Path(__file__).parent / "limit_previous.lua").read_text()


async def _previous(client: aioredis.Redis, c: Counters, cost: int, now_ms: int) -> tuple[Any, ...]:
    args = [BUCKETS, cost, now_ms, *(v for lim in c.limits for v in (lim.count, lim.period, lim.width_ms))]
    reply = await client.eval(PREVIOUS_SCRIPT, len(c.keys), *c.keys, *args)  # type: ignore[misc]
    per_limit = [reply[i : i + 3] for i in range(2, len(reply), 3)]
    return (reply[0] == 1, [(lim.name, r, reset, retry) for lim, (r, reset, retry) in zip(c.limits, per_limit, strict=True)])


@pytest.mark.parametrize("seed", [1, 2])
async def test_redis_counters_shared_with_the_previous_script_stay_exact(redis_url: str, seed: int) -> None:
    """During a rolling upgrade, gateways running this script and the one before it decide on the
    same counters: every decision, from either, is the memory limiter's."""
    rnd = random.Random(seed)
    mem = MemoryBackend(MsClock())
    red = RedisBackend(MsClock(), redis_url)
    client = aioredis.Redis.from_url(redis_url)
    owners = {b.name: unique_owner() for b in (mem, red)}

    def plan(b: Backend) -> Counters:
        return counters(owners[b.name], lim(4, SECOND), lim(25, MINUTE))

    try:
        for step in range(300):
            advance = rnd.choice([0, 0, 0, 30, 120, 700, 2500, 9000])
            cost = rnd.choice([1, 1, 1, 2])
            for b in (mem, red):
                b.clock.advance_ms(advance)
            dm = _view(await mem.hit(plan(mem), cost))
            if rnd.random() < 0.5:
                dr = _view(await red.hit(plan(red), cost))
            else:
                dr = await _previous(client, plan(red), cost, red.clock.ms)
            assert dm == dr, f"step {step}"
    finally:
        await client.aclose()
        await red.close()


async def test_redis_common_decision_reads_only_the_summary_fields(redis_url: str) -> None:
    """The point of the summary fields: while no sub-window ages out, a decision never reads a whole
    counter (INFO commandstats counts the commands scripts make too)."""
    b = RedisBackend(MsClock(), redis_url)
    client = aioredis.Redis.from_url(redis_url)

    async def calls(command: str) -> int:
        return int((await client.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0))

    try:
        c = counters(unique_owner(), lim(1000, MINUTE), lim(10000, HOUR))
        await b.hit(c)  # new counters: read whole once
        hgetall, hmget = await calls("hgetall"), await calls("hmget")
        for _ in range(50):
            assert (await b.hit(c)).allowed
        assert await calls("hgetall") == hgetall
        assert await calls("hmget") == hmget + 2 * 50
        # A refusal reads the refusing counter whole, for its retry time, and writes nothing.
        tight = counters(unique_owner(), lim(1, MINUTE))
        await b.hit(tight)
        stored = await client.hgetall(tight.keys[0])
        whole = await calls("hgetall")
        refused = await b.hit(tight)
        assert not refused.allowed and refused.outcomes[0].retry_after > 0
        assert await calls("hgetall") == whole + 1
        assert await client.hgetall(tight.keys[0]) == stored
    finally:
        await client.aclose()
        await b.close()


# --- Redis only -------------------------------------------------------------------------------------------


def _principal(owner: str, limits: list[str]) -> CachedKey:
    record = KeyRecord(id="key_" + unique_owner(), owner=owner, name="", env="live", digest=b"", pepper_version=1,
                       hint="", limits=limits)
    return CachedKey(record, 0.0)


async def test_redis_keys_expire_and_carry_the_owner_hash_tag(redis_url: str) -> None:
    """The keys the rate-limit stage uses, on the real server: every one has a TTL and `{owner}`."""
    clock = MsClock()
    b = RedisBackend(clock, redis_url)
    owner = unique_owner()
    stage = RateLimitStage(b.limiter, "orders", ["100/minute"], ["1000/hour"], Metrics(), legacy=False)
    client = aioredis.Redis.from_url(redis_url)
    try:
        for p in (_principal(owner, []), _principal(owner, ["5/second", "50/day"])):
            ex = Exchange(0.0, 0.0)
            ex.principal = p
            b.limiter.now_ms = 0  # the script reads Redis TIME, as in production
            hit_at = time.monotonic()
            pending = stage(ex)
            assert pending is not None
            await pending
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"*{owner}*")])
        assert len(keys) == 4, keys  # route minute, own second and day, the owner's hour
        for k in keys:
            assert "{" + owner + "}" in k, k
            pttl = await client.pttl(k)
            assert 0 < pttl <= 86400 * 1000 + 2 * (86400 * 1000 // BUCKETS), (k, pttl)
        second = await client.pttl(next(k for k in keys if k.endswith(":second")))
        since_hit = (time.monotonic() - hit_at) * 1000
        # a period and two sub-windows from the last hit, less what has passed since
        assert 1000 + 2 * 50 - since_hit - 1 <= second <= 1000 + 2 * 50
    finally:
        await client.aclose()
        await b.close()


async def test_redis_coalesces_concurrent_hits_and_admits_exactly_n(redis_url: str) -> None:
    b = RedisBackend(MsClock(), redis_url)
    try:
        await b.hit(counters(unique_owner(), lim(1, MINUTE)))  # the script is loaded now, not mid-test
        c = counters(unique_owner(), lim(73, MINUTE), lim(1000, HOUR))
        before = b.limiter.round_trips
        b.limiter.now_ms = b.clock.ms
        decisions = await asyncio.gather(*[b.limiter.hit(c) for _ in range(200)])  # type: ignore[misc]
        trips = b.limiter.round_trips - before
        assert sum(d.allowed for d in decisions) == 73
        assert trips <= 3, trips
        # the admitted are the first 73 queued, and their remaining counts down without a gap or repeat
        assert [d.allowed for d in decisions] == [True] * 73 + [False] * 127
        assert sorted(outcome_of(d, "minute").remaining for d in decisions[:73]) == list(range(73))
        assert all(outcome_of(d, "hour").remaining == 927 for d in decisions[73:])
    finally:
        await b.close()


async def test_redis_counter_without_its_summary_fields_is_read_whole(redis_url: str) -> None:
    """A counter holding only sub-windows (as the previous script wrote them) is read field by
    field, its stale sub-windows dropped, and its summary written for next time."""
    clock = MsClock()
    b = RedisBackend(clock, redis_url)
    client = aioredis.Redis.from_url(redis_url)
    limit = lim(10, MINUTE)
    c = counters(unique_owner(), limit)
    (key,) = c.keys
    now = 1_000_000 * limit.width_ms + 7  # index 1,000,000 (and 7 ms into it)
    clock.set_ms(now)
    try:
        await client.hset(key, mapping={1_000_000 - BUCKETS - 1: 5, 1_000_000 - BUCKETS: 3, 999_999: 2})
        d = await b.hit(c)
        assert d.allowed and outcome_of(d, "minute").remaining == 10 - 3 - 2 - 1  # the stale 5 is gone
        windows = await _assert_summary_matches(client, key)
        assert windows == {1_000_000 - BUCKETS: 3, 999_999: 2, 1_000_000: 1}
        # Five more fit, the next one is refused until the oldest sub-window leaves the window.
        assert [(await b.hit(c)).allowed for _ in range(5)] == [True] * 4 + [False]
        refused = await b.hit(c)
        assert not refused.allowed
        # the oldest sub-window, 1,000,000 - BUCKETS, leaves the window when 1,000,001 begins
        assert outcome_of(refused, "minute").retry_after == (1_000_001 * limit.width_ms - now) / 1000
        assert (await _assert_summary_matches(client, key))[1_000_000] == 5
    finally:
        await client.aclose()
        await b.close()


async def test_redis_script_is_reloaded_after_a_script_flush(redis_url: str) -> None:
    b = RedisBackend(MsClock(), redis_url)
    client = aioredis.Redis.from_url(redis_url)
    try:
        c = counters(unique_owner(), lim(2, MINUTE))
        assert (await b.hit(c)).allowed
        await client.script_flush()
        assert (await b.hit(c)).allowed
        assert not (await b.hit(c)).allowed
    finally:
        await client.aclose()
        await b.close()


# --- memory only ------------------------------------------------------------------------------------------


def test_memory_counters_are_bounded() -> None:
    b = MemoryBackend(MsClock(), max_counters=50)
    limiter = b.limiter
    for i in range(1000):
        b.clock.advance_ms(1)
        d = limiter.hit(counters("o", lim(1, MINUTE), lim(10, HOUR), key=f"k{i}"))
        assert isinstance(d, Decision) and d.allowed
        assert len(limiter.windows) <= 50  # type: ignore[attr-defined]
    # the most recent keys are still counted
    d = limiter.hit(counters("o", lim(1, MINUTE), lim(10, HOUR), key="k999"))
    assert isinstance(d, Decision) and not d.allowed
