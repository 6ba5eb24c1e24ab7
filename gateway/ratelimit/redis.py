"""The Redis limiter (`redis://`): one Lua script per request, coalesced into one pipeline per tick.

Concurrent requests in the same event-loop tick share one round trip: each `hit` queues its script
call, and a single flush writes them all at once on one pipelined connection (`resp.py`). The
script reads Redis's TIME, so replicas' clocks never matter, and every key expires a little after
its window.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from importlib.resources import files

import hiredis

from gateway.ratelimit.base import LATE, Counters, Limiter, LimiterUnavailable
from gateway.ratelimit.policy import BUCKETS, Decision, Outcome
from gateway.ratelimit.resp import RespConnection, Waiter, bulk, command, connect, endpoint

SCRIPT = (files("gateway.ratelimit") / "limit.lua").read_text()
log = logging.getLogger("gateway.ratelimit")

# One queued hit: counters, cost, the caller's future, and whether it was sent once already.
Entry = tuple[Counters, int, "asyncio.Future[Decision]", bool]


class _Batch(Waiter):
    __slots__ = ("entries", "timer")

    def __init__(self, entries: list[Entry], done: Callable[[Waiter, BaseException | None], None]) -> None:
        super().__init__(len(entries), done)
        self.entries = entries
        self.timer: asyncio.TimerHandle | None = None


class RedisLimiter(Limiter):
    def __init__(self, url: str, timeout: float, now_ms: int = 0) -> None:
        self.endpoint = endpoint(url)  # ValueError here, at startup, for a URL that cannot be used
        self.sha = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1
        self.timeout = timeout
        self.now_ms = now_ms  # tests only: a fixed time instead of Redis TIME
        self._load = command("SCRIPT", "LOAD", SCRIPT)
        self._head = b"$7\r\nEVALSHA\r\n" + bulk(self.sha)
        self._buckets = bulk(BUCKETS)
        self._queue: list[Entry] = []
        self._flush_scheduled = False
        self._conn: RespConnection | None = None
        self._connecting = False
        self._reload = False
        self._closed = False
        self.round_trips = 0

    def hit(self, counters: Counters, cost: int = 1) -> asyncio.Future[Decision]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        if self._closed:
            fut.set_exception(LimiterUnavailable("redis: limiter closed"))
            return fut
        self._queue.append((counters, cost, fut, False))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queue:
            return
        conn = self._conn
        if conn is None or not conn.open:
            if not self._connecting:  # the queue goes out once connected
                self._connecting = True
                asyncio.get_running_loop().create_task(self._connect()).add_done_callback(_consume)
            return
        batch, self._queue = self._queue, []
        self._send(conn, batch)

    async def _connect(self) -> None:
        try:
            conn = await connect(self.endpoint, self.timeout)
        except Exception as e:  # whatever it is, every queued caller gets the failure policy
            self._fail_queued(LimiterUnavailable(f"redis: {type(e).__name__}"))
            return
        finally:
            self._connecting = False
        if self._closed:
            conn.close()
            self._fail_queued(LimiterUnavailable("redis: limiter closed"))
            return
        # Sent ahead of the first batch, unawaited: Redis runs a connection's commands in order. A new
        # connection may be to a restarted Redis, which has no scripts.
        prelude = [*self.endpoint.first, self._load]
        conn.send(b"".join(prelude), Waiter(len(prelude), self._prelude_done))
        self._reload = False
        self._conn = conn
        self._flush()

    def _send(self, conn: RespConnection, entries: list[Entry]) -> None:
        if self._reload:
            self._reload = False
            conn.send(self._load, Waiter(1, self._prelude_done))
        encode, fixed_time = self._encode, self.now_ms
        parts = []
        for counters, cost, _, _ in entries:
            cached = counters.encoded  # the common case without a call
            if cached is None or cost != 1 or fixed_time:
                cached = encode(counters, cost)
            parts.append(cached)
        blob = b"".join(parts)
        batch = _Batch(entries, self._done)
        self.round_trips += 1
        conn.send(blob, batch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        batch.timer = loop.call_at(deadline, self._expired, conn, batch, deadline, True)

    def _expired(self, conn: RespConnection, batch: _Batch, deadline: float, first: bool) -> None:
        loop = asyncio.get_running_loop()
        if first and loop.time() - deadline > LATE:
            # This loop woke up late: it was busy elsewhere (or starved of CPU) while the reply may
            # have come in time. That time was not Redis's: one more timeout from now.
            batch.timer = loop.call_later(self.timeout, self._expired, conn, batch, deadline, False)
            return
        # Still due (an answered or failed batch cancels its timer): every batch behind it fails too,
        # since the stream is out of step.
        conn.abort(TimeoutError())

    def _done(self, batch: Waiter, err: BaseException | None) -> None:
        assert isinstance(batch, _Batch)
        if batch.timer is not None:
            batch.timer.cancel()
        if err is not None:
            self._lost(batch, err)
            return
        again: list[Entry] = []
        for (counters, cost, fut, sent_before), reply in zip(batch.entries, batch.replies, strict=True):
            if type(reply) is list:
                # The common case, inline: the script's reply is allowed, then remaining, reset and
                # retry (ms) per counter.
                try:
                    outcomes = []
                    i = 2
                    for limit in counters.limits:
                        outcomes.append(Outcome(limit, reply[i], reply[i + 1] / 1000, reply[i + 2] / 1000))
                        i += 3
                    fut.set_result(Decision(reply[0] == 1, outcomes))
                except asyncio.InvalidStateError:
                    pass  # the caller went away (its future was cancelled)
                except (TypeError, IndexError):  # not the script's reply shape: never a hang
                    if not fut.done():
                        fut.set_exception(LimiterUnavailable("redis: unexpected reply"))
                continue
            if fut.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("NOSCRIPT") and not sent_before:
                    again.append((counters, cost, fut, True))  # SCRIPT FLUSH on the server: load, resend
                    continue
                fut.set_exception(LimiterUnavailable(f"redis: {str(reply).split(' ', 1)[0]}"))
                continue
            fut.set_exception(LimiterUnavailable("redis: unexpected reply"))
        if again:
            self._reload = True
            self._requeue(again)

    def _lost(self, batch: _Batch, err: BaseException) -> None:
        """A connection that a restarted Redis closed fails on first use, before any reply: send the
        batch again, once, on a new connection. Not when a reply came (the commands ran: they would
        count twice) nor after a timeout (a slow Redis may still run them): the policy applies."""
        if batch.replies or isinstance(err, TimeoutError) or self._closed:
            self._fail(batch.entries, LimiterUnavailable(f"redis: {type(err).__name__}"))
            return
        fresh = [(c, cost, fut, True) for c, cost, fut, sent_before in batch.entries if not sent_before]
        self._fail([e for e in batch.entries if e[3]], LimiterUnavailable(f"redis: {type(err).__name__}"))
        if fresh:
            self._requeue(fresh)

    def _requeue(self, entries: list[Entry]) -> None:
        self._queue[:0] = entries
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _prelude_done(self, waiter: Waiter, err: BaseException | None) -> None:
        errors = [str(r) for r in waiter.replies if isinstance(r, hiredis.ReplyError)]
        if errors:  # the batches behind it fail on their own replies (NOAUTH, NOSCRIPT)
            log.error("redis refused the connection set-up: %s", "; ".join(errors))

    def _fail_queued(self, err: LimiterUnavailable) -> None:
        queued, self._queue = self._queue, []
        self._fail(queued, err)

    @staticmethod
    def _fail(entries: list[Entry], err: LimiterUnavailable) -> None:
        for _, _, fut, _ in entries:
            if not fut.done():
                fut.set_exception(err)

    def _encode(self, counters: Counters, cost: int) -> bytes:
        """One EVALSHA in RESP, when the counters carry none yet. A request's counters are one object
        per key and route (the stage's plan), so in production (cost 1, Redis TIME) its command is
        encoded once and kept on them: encoding it each time cost more than the rest of a decision
        (bench/limiter_micro.py)."""
        blob = self._build(counters, cost)
        if cost == 1 and not self.now_ms:
            counters.encoded = blob
        return blob

    def _build(self, counters: Counters, cost: int) -> bytes:
        parts = [b"*%d\r\n" % (6 + 4 * len(counters)), self._head, bulk(len(counters))]
        parts += [bulk(key) for key in counters.keys]
        parts += (self._buckets, bulk(cost), bulk(self.now_ms))
        parts += [bulk(lim.count) + bulk(lim.period) + bulk(lim.width_ms) for lim in counters.limits]
        return b"".join(parts)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
        self._fail_queued(LimiterUnavailable("redis: limiter closed"))


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
