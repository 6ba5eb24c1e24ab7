"""Microbenchmark: CPU cost of one rate-limit decision, memory limiter vs Redis limiter.

- memory: `MemoryLimiter.hit` on a key with two limits (per second and per hour) plus an owner
  limit (per day), spread over 1000 keys so the counter map is realistic (`--keys 1`: one key, as
  a busy client's); CPU-µs per decision. The limits are high enough that every decision admits (the
  common case, which also writes the counters); neither limiter's cost depends on their size.
- redis: the `RedisLimiter` as the gateway uses it, batched: 64 concurrent hits per event-loop tick
  (one pipeline each), on a real Redis, each caller woken by a done-callback. Reports this process's
  CPU time per decision and round trips per decision, and apart from them the Redis server's own CPU
  per decision (from its INFO cpu: a Redis used by nothing else gives the true figure).

    .venv/bin/python -m bench.limiter_micro [--redis redis://127.0.0.1:6379/0] [--keys N] [--rounds N]

Without --redis, `$GATEWAY_TEST_REDIS_URL` is used; with neither, only the memory limiter is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

from gateway.app import install_uvloop
from gateway.clock import Clock
from gateway.ratelimit.base import Counters
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Decision, parse_limits

MEMORY_DECISIONS = 300_000
REDIS_DECISIONS = 64 * 500
BATCH = 64


def plans(prefix: str, keys: int) -> list[Counters]:
    """`keys` keys of one owner each: own per-second and per-hour limits, and the owner's per day."""
    own = parse_limits(["1000000/second", "1000000000/hour"])
    owner = parse_limits(["100000000000/day"], prefix="owner-")
    limits = (*own, *owner)  # shared by every key, as the stage shares a route's
    out = []
    for i in range(keys):
        tag = "{" + f"{prefix}o{i}" + "}"
        names = [f"rl:{tag}:k:key{i}:{lim.name}" for lim in own] + [f"rl:{tag}:o:{lim.name}" for lim in owner]
        out.append(Counters(tuple(names), limits))
    return out


def measure_memory(keys: int) -> dict[str, float]:
    limiter = MemoryLimiter(Clock())
    counters = plans("m", keys)
    for c in counters:  # counters exist already: the steady state, not first sight of a key
        limiter.hit(c)
    n = MEMORY_DECISIONS
    start = time.process_time()
    admitted = 0
    for i in range(n):
        d = limiter.hit(counters[i % keys])
        admitted += d.allowed  # type: ignore[union-attr]
    cpu = time.process_time() - start
    return {"cpu_us": cpu / n * 1e6, "round_trips": 0.0, "decisions": n, "admitted": admitted}


async def measure_redis(url: str, keys: int) -> dict[str, float]:
    import redis.asyncio as aioredis

    from gateway.ratelimit.redis import RedisLimiter

    limiter = RedisLimiter(url, timeout=2.0)
    counters = plans("bench-" + uuid.uuid4().hex[:8] + "-", keys)
    client = aioredis.Redis.from_url(url)
    try:
        # warm up: connection, script loaded, counters created
        await asyncio.gather(*[limiter.hit(c) for c in counters[:BATCH]])  # type: ignore[misc]
        rounds = REDIS_DECISIONS // BATCH
        trips = limiter.round_trips
        admitted = 0
        start_server = await _server_cpu(client)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for r in range(rounds):
            base = (r * BATCH) % keys
            batch = [limiter.hit(counters[(base + j) % keys]) for j in range(BATCH)]
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
        server = await _server_cpu(client) - start_server
        n = rounds * BATCH
        return {
            "cpu_us": cpu / n * 1e6,
            "server_cpu_us": server / n * 1e6,
            "round_trips": (limiter.round_trips - trips) / n,
            "decisions": n,
            "admitted": admitted,
            "wall_us": wall / n * 1e6,
        }
    finally:
        async for k in client.scan_iter(match="rl:{bench-*"):
            await client.delete(k)
        await client.aclose()
        await limiter.close()


async def _server_cpu(client: Any) -> float:
    """The Redis server's CPU seconds so far (its main thread and the rest, user and system)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default=os.environ.get("GATEWAY_TEST_REDIS_URL", ""), help="redis://… to measure")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each (default 5)")
    parser.add_argument("--keys", type=int, default=1000, help="keys the decisions are spread over (default 1000)")
    args = parser.parse_args()
    install_uvloop()
    # Interleaved, memory then Redis, round after round: this shared machine's background load drifts,
    # and a ratio of medians over neighbouring runs survives it better than one run of each.
    memory: list[dict[str, float]] = []
    redis: list[dict[str, float]] = []
    for _ in range(args.rounds):
        memory.append(measure_memory(args.keys))
        if args.redis:
            redis.append(asyncio.run(measure_redis(args.redis, args.keys)))
    rows = [("memory", memory)] + ([(f"redis (batch {BATCH}/tick)", redis)] if redis else [])
    print(f"{'limiter':<22} {'CPU-µs/decision, median (min-max)':>34} {'round trips/decision':>21} {'decisions':>10}")
    for name, runs in rows:
        cpu = sorted(r["cpu_us"] for r in runs)
        print(f"{name:<22} {statistics.median(cpu):>18.2f} ({cpu[0]:.2f}-{cpu[-1]:.2f}) "
              f"{runs[0]['round_trips']:21.4f} {int(runs[0]['decisions']):10d}")
    if redis:
        ratios = sorted(r["cpu_us"] / m["cpu_us"] for m, r in zip(memory, redis, strict=True))
        mem = statistics.median(m["cpu_us"] for m in memory)
        red = statistics.median(r["cpu_us"] for r in redis)
        server = statistics.median(r["server_cpu_us"] for r in redis)
        wall = statistics.median(r["wall_us"] for r in redis)
        print(f"redis / memory CPU: {red / mem:.2f}x (per round {ratios[0]:.2f}-{ratios[-1]:.2f}x; "
              f"wall {wall:.1f} µs/decision), this process only")
        print(f"the Redis server besides: {server:.2f} CPU-µs/decision (median); with it, redis / memory: "
              f"{(red + server) / mem:.1f}x")
    else:
        print("no Redis given (--redis or $GATEWAY_TEST_REDIS_URL): memory only")


if __name__ == "__main__":
    main()
