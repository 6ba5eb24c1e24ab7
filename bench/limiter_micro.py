"""Microbenchmark: CPU cost of one rate-limit decision, memory limiter vs Redis limiter.

- memory: `MemoryLimiter.hit` on a key with two limits (1000/second, 1000000/hour) plus an owner
  limit, spread over 1000 keys so the counter map is realistic; CPU-µs per decision. The limits are
  high enough that every decision admits (the common case, which also writes the counters).
- redis: the `RedisLimiter` as the gateway uses it, batched: 64 concurrent hits per event-loop tick
  (one pipeline each), on a real Redis, each caller woken by a done-callback. Reports this process's CPU time per decision (Redis's own
  CPU is not counted: it is another process) and round trips per decision.

    .venv/bin/python -m bench.limiter_micro [--redis redis://127.0.0.1:6379/0]

Without --redis, `$GATEWAY_TEST_REDIS_URL` is used; with neither, only the memory limiter is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from gateway.clock import Clock
from gateway.ratelimit.base import Counters
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Decision, parse_limits

MEMORY_DECISIONS = 300_000
REDIS_DECISIONS = 64 * 500
BATCH = 64
KEYS = 1000


def plans(prefix: str) -> list[Counters]:
    """KEYS keys of one owner each: own 1000/second + 1000000/hour, and the owner's 10000000/day."""
    own = parse_limits(["1000/second", "1000000/hour"])
    owner = parse_limits(["10000000/day"], prefix="owner-")
    limits = (*own, *owner)  # shared by every key, as the stage shares a route's
    out = []
    for i in range(KEYS):
        tag = "{" + f"{prefix}o{i}" + "}"
        keys = [f"rl:{tag}:k:key{i}:{lim.name}" for lim in own] + [f"rl:{tag}:o:{lim.name}" for lim in owner]
        out.append(Counters(tuple(keys), limits))
    return out


def measure_memory() -> dict[str, float]:
    limiter = MemoryLimiter(Clock())
    counters = plans("m")
    for c in counters:  # counters exist already: the steady state, not first sight of a key
        limiter.hit(c)
    n = MEMORY_DECISIONS
    start = time.process_time()
    admitted = 0
    for i in range(n):
        d = limiter.hit(counters[i % KEYS])
        admitted += d.allowed  # type: ignore[union-attr]
    cpu = time.process_time() - start
    return {"cpu_us": cpu / n * 1e6, "round_trips": 0.0, "decisions": n, "admitted": admitted}


async def measure_redis(url: str) -> dict[str, float]:
    from gateway.ratelimit.redis import RedisLimiter

    limiter = RedisLimiter(url, timeout=2.0)
    counters = plans("bench-" + uuid.uuid4().hex[:8] + "-")
    try:
        # warm up: connection, script loaded, counters created
        await asyncio.gather(*[limiter.hit(c) for c in counters[:BATCH]])  # type: ignore[misc]
        rounds = REDIS_DECISIONS // BATCH
        trips = limiter.round_trips
        admitted = 0
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for r in range(rounds):
            base = (r * BATCH) % KEYS
            batch = [limiter.hit(counters[(base + j) % KEYS]) for j in range(BATCH)]
            # Each caller woken the cheapest way a future allows (a C callback), not through gather,
            # whose Python callback per future cost about 0.5 µs: the waiting mechanism is the
            # caller's, and the gateway's is its own (a task per request, paid by any async backend).
            woken: list[object] = []
            for fut in batch:
                fut.add_done_callback(woken.append)  # type: ignore[union-attr]
            await batch[-1]  # type: ignore[misc]  # replies come in order: the last one ends the batch
            for fut in batch:
                d = fut.result()  # type: ignore[union-attr]
                assert isinstance(d, Decision)
                admitted += d.allowed
        cpu = time.process_time() - start_cpu
        wall = time.perf_counter() - start_wall
        n = rounds * BATCH
        return {
            "cpu_us": cpu / n * 1e6,
            "round_trips": (limiter.round_trips - trips) / n,
            "decisions": n,
            "admitted": admitted,
            "wall_us": wall / n * 1e6,
        }
    finally:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        async for k in client.scan_iter(match="rl:{bench-*"):
            await client.delete(k)
        await client.aclose()
        await limiter.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", ""), help="redis://… to measure")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each (default 5)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # Interleaved, memory then Redis, round after round: this shared machine's background load drifts,
    # and a ratio of medians over neighbouring runs survives it better than one run of each.
    memory: list[dict[str, float]] = []
    redis: list[dict[str, float]] = []
    for _ in range(args.rounds):
        memory.append(measure_memory())
        if args.redis:
            redis.append(asyncio.run(measure_redis(args.redis)))
    rows = [("memory", memory)] + ([(f"redis (batch {BATCH}/tick)", redis)] if redis else [])
    print(f"{'limiter':<22} {'CPU-µs/decision, median (min-max)':>34} {'round trips/decision':>21} {'decisions':>10}")
    for name, runs in rows:
        cpu = sorted(r["cpu_us"] for r in runs)
        print(f"{name:<22} {statistics.median(cpu):>18.2f} ({cpu[0]:.2f}-{cpu[-1]:.2f}) "
              f"{runs[0]['round_trips']:21.4f} {int(runs[0]['decisions']):10d}")
    if redis:
        ratios = sorted(r["cpu_us"] / m["cpu_us"] for m, r in zip(memory, redis, strict=True))
        median = statistics.median(r["cpu_us"] for r in redis) / statistics.median(m["cpu_us"] for m in memory)
        wall = statistics.median(r["wall_us"] for r in redis)
        print(f"redis / memory CPU: {median:.2f}x (per round {ratios[0]:.2f}-{ratios[-1]:.2f}x; "
              f"wall {wall:.1f} µs/decision; Redis server CPU not included)")
    else:
        print("no Redis given (--redis or $GATEWAY_TEST_REDIS_URL): memory only")


if __name__ == "__main__":
    main()
