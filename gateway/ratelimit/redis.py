"""The Redis limiter (`redis://`): one Lua script per request, coalesced into one pipeline per tick.

Concurrent requests in the same event-loop tick share one round trip: each `hit` queues its script
call, and a single flush sends them all in one pipeline. The script reads Redis's TIME, so replicas'
clocks never matter, and every key expires a little after its window.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib.resources import files
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.ratelimit.base import Counters, Limiter, LimiterUnavailable
from gateway.ratelimit.policy import BUCKETS, Decision, Limit, Outcome

SCRIPT = (files("gateway.ratelimit") / "limit.lua").read_text()
LATE = 0.005  # seconds past a call's deadline that show the event loop itself was held up


class RedisLimiter(Limiter):
    def __init__(self, url: str, timeout: float, now_ms: int = 0) -> None:
        # The call's deadline is kept in _flush, which cancels a late call (and the connection is
        # dropped). No socket read timeout: redis-py would arm a timer per reply, which cost more
        # than the rest of a decision; at the call's own length it would also fire on replies that
        # came in while the loop was busy.
        safety = max(1.0, 10 * timeout)
        self.redis = aioredis.Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=safety,
            health_check_interval=0,
            # A pooled connection that a restarted Redis closed fails on first use: reconnect and send
            # again, at once. Only connection errors are retried, once; a slow Redis is left to the
            # timeout and the failure policy.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self.sha = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
        self.timeout = timeout
        self.now_ms = now_ms  # tests only: a fixed time instead of Redis TIME
        self._head = b"$7\r\nEVALSHA\r\n" + _bulk(self.sha)
        self._buckets = _bulk(BUCKETS)
        self._zero = _bulk(0)
        self._keys: dict[str, bytes] = {}
        self._limits: dict[Limit, bytes] = {}
        self._queue: list[tuple[Counters, int, asyncio.Future[Decision]]] = []
        self._flush_scheduled = False
        self.round_trips = 0

    def hit(self, counters: Counters, cost: int = 1) -> asyncio.Future[Decision]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._queue.append((counters, cost, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._start_flush)
        return fut

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        task.add_done_callback(_consume)

    def _encode(self, counters: Counters, cost: int) -> bytes:
        """One EVALSHA in RESP, from cached pieces: redis-py's general command packing cost more
        than the rest of a decision (bench/limiter_micro.py)."""
        keys = self._keys
        limits = self._limits
        parts = [b"*%d\r\n" % (6 + 4 * len(counters)), self._head, _bulk(len(counters))]
        for key, _ in counters:
            enc = keys.get(key)
            if enc is None:
                if len(keys) > 100_000:
                    keys.clear()
                enc = keys[key] = _bulk(key)
            parts.append(enc)
        parts += (self._buckets, _bulk(cost), _bulk(self.now_ms) if self.now_ms else self._zero)
        for _, limit in counters:
            enc = limits.get(limit)
            if enc is None:
                enc = limits[limit] = _bulk(limit.count) + _bulk(limit.period) + _bulk(limit.width_ms)
            parts.append(enc)
        return b"".join(parts)

    @staticmethod
    async def _exchange(conn: Any, blob: bytes, count: int, results: list[Any]) -> None:
        await conn.send_packed_command(blob, check_health=False)
        for _ in range(count):
            try:
                results.append(await conn.read_response())
            except ResponseError as e:  # one command's error: the stream stays in step
                results.append(e)

    async def _send(self, batch: list[tuple[Counters, int, asyncio.Future[Decision]]]) -> list[Any]:
        blob = b"".join([self._encode(counters, cost) for counters, cost, _ in batch])
        self.round_trips += 1
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            results: list[Any] = []
            try:
                await self._exchange(conn, blob, len(batch), results)
            except RedisConnectionError:
                if results:
                    raise  # replies were read: the commands ran; sending them again would count twice
                # A pooled connection that a restarted Redis closed fails on the write or on the first
                # read, before any reply: send the batch again, once, on a new connection.
                await conn.disconnect()
                await self._exchange(conn, blob, len(batch), results)
        except BaseException:
            await conn.disconnect()  # replies may still be in flight: this connection is out of step
            raise
        finally:
            await pool.release(conn)
        if any(isinstance(r, NoScriptError) for r in results):
            # A restarted or new Redis has no scripts: load it once and send the batch again.
            await self.redis.script_load(SCRIPT)
            return await self._send(batch)
        return results

    async def _flush(self, batch: list[tuple[Counters, int, asyncio.Future[Decision]]]) -> None:
        loop = asyncio.get_running_loop()
        send = loop.create_task(self._send(batch))
        try:
            deadline = loop.time() + self.timeout
            done, _ = await asyncio.wait((send,), timeout=self.timeout)
            if not done and loop.time() - deadline > LATE:
                # This loop woke up late: it was busy elsewhere (or starved of CPU) while the reply
                # may have come in time. That time was not Redis's: one more timeout from now.
                done, _ = await asyncio.wait((send,), timeout=self.timeout)
            if not done:
                send.cancel()
                raise TimeoutError
            results = send.result()
        except (RedisError, OSError, TimeoutError) as e:
            err = LimiterUnavailable(f"redis: {type(e).__name__}")
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (counters, _, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(LimiterUnavailable(f"redis: {type(result).__name__}"))
                continue
            fut.set_result(_decision(counters, result))

    async def close(self) -> None:
        await self.redis.aclose()


def _decision(counters: Counters, result: list[int]) -> Decision:
    allowed = result[0] == 1
    outcomes = []
    for i, (_, limit) in enumerate(counters):
        remaining, reset, retry = result[2 + i * 3 : 5 + i * 3]
        outcomes.append(Outcome(limit, int(remaining), reset / 1000, retry / 1000))
    return Decision(allowed, outcomes)


def _bulk(value: object) -> bytes:
    data = value.encode() if isinstance(value, str) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
