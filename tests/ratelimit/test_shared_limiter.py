"""memory:// under `--workers N`: the workers' hits decided by one MemoryLimiter in the limits process.

The contract suite runs on this backend too (`shared` in conftest). Here: what only it has — one
frame per tick, the same decisions as the memory limiter to the last field, a limits process that is
slow or gone (the failure policy, never a hang), an answer that comes after its timeout, and the
limits process's bounded memory of decoded counters; and the brute-force throttle, whose failures the
limits process counts for every worker.
"""

from __future__ import annotations

import asyncio
import marshal
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.anomalies import Anomaly
from gateway.config.anomalies import AnomaliesConfig
from gateway.config.schema import AuthThrottleConfig
from gateway.errors import GatewayError
from gateway.http.exchange import Exchange
from gateway.metrics import Metrics
from gateway.ratelimit import host
from gateway.ratelimit.base import LimiterUnavailable
from gateway.ratelimit.failover import FailoverLimiter
from gateway.ratelimit.host import LimiterHost
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Decision, Limit
from gateway.ratelimit.shared import RemoteDetector, SharedLimiter, WorkerLink
from gateway.services import Services
from gateway.stages.throttle import AuthThrottle
from tests.keys.support import config_data, validate

from .conftest import MemoryBackend, MsClock, SharedBackend, counters, unique_owner


def lim(count: int, period: int, name: str) -> Limit:
    return Limit(name, count, period)


async def test_one_ticks_hits_travel_in_one_frame_and_stay_exact() -> None:
    b = await SharedBackend(MsClock()).start()
    try:
        c = counters(unique_owner(), lim(30, 60, "minute"))
        decisions = await asyncio.gather(*(b.limiter.hit(c) for _ in range(50)))
        assert b.limiter.frames == 1
        assert [d.allowed for d in decisions] == [True] * 30 + [False] * 20
        assert [d.outcomes[0].remaining for d in decisions[:30]] == list(range(29, -1, -1))
        await b.hit(c)
        assert b.limiter.frames == 2
    finally:
        await b.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_shared_and_memory_decide_identically(seed: int) -> None:
    """Every field of every decision, over random costs, keys, limits and clock moves (back ones too)."""
    rng = random.Random(seed)
    mem = MemoryBackend(MsClock())
    sh = await SharedBackend(MsClock()).start()
    try:
        owner = unique_owner()
        plans = [
            counters(owner, lim(5, 1, "second"), lim(40, 60, "minute"), key="a"),
            counters(owner, lim(3, 60, "minute"), key="b"),
            counters(owner, lim(10, 1, "second"), lim(12, 60, "minute"), lim(100, 3600, "hour"), key="c"),
        ]
        t = 1_700_000_000_000
        for step in range(600):
            t += rng.choice([0, 0, 1, 7, 50, 400, 1300, -30])
            mem.clock.set_ms(t)
            sh.clock.set_ms(t)
            c, cost = rng.choice(plans), rng.choice([1, 1, 1, 2, 5])
            want, got = await mem.hit(c, cost), await sh.hit(c, cost)
            assert got == want, f"step {step}"
    finally:
        await mem.close()
        await sh.close()


async def test_a_silent_limits_process_fails_over_within_the_timeout() -> None:
    b = SharedBackend(MsClock(), timeout=0.05)  # never started: nothing reads the limits process's end
    try:
        c = counters(unique_owner(), lim(4, 60, "minute"))
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable, match="timeout"):
            await b.limiter.hit(c)
        assert 0.04 <= time.monotonic() - started < 2.0
        # as a worker has it: behind the failure policy, its share of the limit (4 / 2 workers)
        failover = FailoverLimiter(b.limiter, "local", 2, b.clock, Metrics().ratelimit_degraded)
        results = []
        for _ in range(4):
            d = failover.hit(c)
            results.append(d if isinstance(d, Decision) else await d)
        assert [d.allowed for d in results] == [True, True, False, False]
        assert results[0].outcomes[0].limit.count == 2
    finally:
        await b.close()


async def test_an_answer_after_its_timeout_is_dropped_and_the_next_is_right() -> None:
    b = await SharedBackend(MsClock(), timeout=0.05).start()
    try:
        c = counters(unique_owner(), lim(10, 60, "minute"))
        assert (await b.hit(c)).outcomes[0].remaining == 9
        [host_end] = b.host._ends
        assert host_end.transport is not None
        host_end.transport.pause_reading()  # a limits process that is busy elsewhere
        with pytest.raises(LimiterUnavailable, match="timeout"):
            await b.hit(c)
        late = b.limiter.hit(c)  # queued behind the first, sent now
        await asyncio.sleep(0)
        host_end.transport.resume_reading()
        d = await late
        # the limits process decided all three; the worker used the second answer for nothing
        assert d.allowed and d.outcomes[0].remaining == 7
    finally:
        await b.close()


async def test_a_limits_process_gone_fails_pending_and_new_hits_at_once() -> None:
    b = await SharedBackend(MsClock(), timeout=30.0).start()
    try:
        c = counters(unique_owner(), lim(10, 60, "minute"))
        await b.hit(c)
        [host_end] = b.host._ends
        assert host_end.transport is not None
        host_end.transport.pause_reading()
        pending = b.limiter.hit(c)
        await asyncio.sleep(0.01)
        b.host.close()
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable, match="not reachable"):
            await pending
        with pytest.raises(LimiterUnavailable, match="not reachable"):
            await b.limiter.hit(c)
        assert time.monotonic() - started < 1.0  # not the 30 s timeout
    finally:
        await b.close()


async def test_the_limits_process_keeps_a_bounded_number_of_decoded_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "MAX_DECODED", 20)
    b = await SharedBackend(MsClock()).start()
    try:
        owner = unique_owner()
        for round_ in range(3):
            for i in range(50):
                d = await b.hit(counters(owner, lim(3, 60, "minute"), key=f"k{i}"))
                assert d.allowed and d.outcomes[0].remaining == 2 - round_
                assert len(b.host._counters) <= 20
        assert not (await b.hit(counters(owner, lim(3, 60, "minute"), key="k0"))).allowed
    finally:
        await b.close()


# --- the brute-force throttle, counted in the limits process ---------------------------------------------


async def test_failed_authentications_are_counted_across_workers_and_every_worker_cools_down() -> None:
    clock = MsClock()
    cfg = AuthThrottleConfig(max_failures=3, window="60s", cooldown="300s")
    limits = LimiterHost(MemoryLimiter(clock), AuthThrottle(cfg, clock))
    workers = []
    for _ in range(2):
        host_end, worker_end = socket.socketpair()
        await limits.serve(host_end)
        limiter = SharedLimiter(worker_end, 5.0)
        throttle = AuthThrottle(cfg, clock, limiter.report_failure)
        limiter.on_block = throttle.block
        workers.append((limiter, throttle))
    ta, tb = (throttle for _, throttle in workers)
    try:
        clock.set_ms(1_700_000_000_000)
        for throttle in (ta, tb, ta, tb):  # two each: neither worker alone is past 3
            throttle.check("192.0.2.7")
            throttle.fail("192.0.2.7")
        tb.fail("198.51.100.1")
        await wait_until(lambda: "192.0.2.7" in tb.state and tb.blocked_until("192.0.2.7") > 0)
        await wait_until(lambda: ta.blocked_until("192.0.2.7") > 0)
        for throttle in (ta, tb):
            with pytest.raises(GatewayError) as e:
                throttle.check("192.0.2.7")
            assert e.value.code == "rate_limited"
            assert dict(e.value.headers)[b"Retry-After"] == b"300"
            throttle.check("198.51.100.1")  # another address: untouched
        assert limits.throttle.state["192.0.2.7"][1] == 4
        clock.advance_ms(300_001)
        ta.check("192.0.2.7")  # the cool-down ends on every worker
        tb.check("192.0.2.7")
    finally:
        for limiter, _ in workers:
            await limiter.close()
        limits.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within 5 s"
        await asyncio.sleep(0.001)


async def test_a_worker_that_never_asked_anything_still_hears_of_cool_downs(tmp_path: Path) -> None:
    """A worker whose clients all authenticated, on routes without limits, never sends a frame: its
    services must read the limits process's end from the start, or another worker's brute force is
    let through here (seen end to end: one of two workers kept answering 200)."""
    config = validate(
        config_data(f"sqlite:///{tmp_path / 'keys.db'}", "http://127.0.0.1:9", auth={"max_failures": 1})
    )
    clock = MsClock()
    limits = LimiterHost(MemoryLimiter(clock), AuthThrottle(config.auth, clock))
    host_end, worker_end = socket.socketpair()
    await limits.serve(host_end)
    services = await Services.open(config, link=WorkerLink(worker_end, 2))
    try:
        limits.notice(limits._ends[0], marshal.dumps((["192.0.2.9", "192.0.2.9"], [])))  # two failures elsewhere
        await wait_until(lambda: services.throttle.blocked_until("192.0.2.9") > 0)
        with pytest.raises(GatewayError):
            services.throttle.check("192.0.2.9")
    finally:
        await services.close()
        limits.close()


# --- anomaly detection, in the limits process ----------------------------------------------------------


async def test_anomalies_are_detected_over_every_workers_exchanges_and_recorded_once() -> None:
    """A key seen from 3 addresses by each of two workers is seen from 6 by the one detector: past its
    max of 4, one shared_key anomaly, delivered to the worker whose exchange set it off."""
    clock = MsClock()
    clock.set_ms(1_700_000_000_000)
    cfg = AnomaliesConfig(shared_key={"max_addresses": 4})
    limits = LimiterHost(MemoryLimiter(clock), AuthThrottle(AuthThrottleConfig(), clock), cfg)
    workers: list[tuple[SharedLimiter, list[Anomaly]]] = []
    for _ in range(2):
        host_end, worker_end = socket.socketpair()
        await limits.serve(host_end)
        limiter = SharedLimiter(worker_end, 5.0)
        await limiter.connect()
        got: list[Anomaly] = []
        limiter.on_anomaly = got.append
        workers.append((limiter, got))
    try:
        for i in range(6):
            limiter, _ = workers[i % 2]
            limiter.observe("key_abc", f"192.0.2.{i}", "", "")
            await asyncio.sleep(0.01)  # one tick each, as separate requests
        await wait_until(lambda: sum(len(got) for _, got in workers) == 1)
        await asyncio.sleep(0.05)
        [event] = [e for _, got in workers for e in got]
        assert event.kind == "shared_key" and event.key_id == "key_abc" and event.detail == {"addresses": 5}
        assert workers[0][1] == [event]  # the fifth address came from the first worker
    finally:
        for limiter, _ in workers:
            await limiter.close()
        limits.close()


async def test_only_exchanges_the_detector_looks_at_are_sent() -> None:
    """Keyless traffic that is not a failed authentication (auth: none routes, 404s) costs no frame."""
    host_end, worker_end = socket.socketpair()
    limiter = SharedLimiter(worker_end, 5.0)
    try:
        detector = RemoteDetector(limiter)
        plain = Exchange(0.0, 0.0)
        plain.error_code, plain.client_ip = "no_route", "192.0.2.1"
        detector.observe(plain)
        failed = Exchange(0.0, 0.0)
        failed.error_code, failed.client_ip, failed.key_prefix = "invalid_api_key", "192.0.2.2", "sk_live_abcd"
        detector.observe(failed)
        assert limiter._seen == [(None, "192.0.2.2", "invalid_api_key", "sk_live_abcd")]
    finally:
        await limiter.close()
        host_end.close()
